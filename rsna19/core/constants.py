"""Names and numbers shared by every stage."""

from __future__ import annotations

#: The five hemorrhage subtypes, in the order of the RSNA label csv.
SUBTYPES: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")

#: All six predicted classes; ``any`` is last, as in ``stage_2_train.csv``.
CLASSES: tuple[str, ...] = (*SUBTYPES, "any")

#: Short names of the classes on pictures (radiology abbreviations).
SHORT_NAMES: dict[str, str] = {
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "any": "any",
}

#: Competition weights: ``any`` counts twice.
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)

#: Probability column names used in every prediction parquet.
PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)

#: HU value used for air and for padding outside the image.
AIR_HU: int = -1024

#: Named CT windows (centre, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
    "soft": (40.0, 380.0),
    "stroke": (40.0, 40.0),  # narrow: acute blood (50–90 HU) against grey matter (30–45 HU)
}

#: Deterministic test-time augmentation views, averaged by default at prediction.
DEFAULT_TTA: tuple[str, ...] = ("none", "hflip", "vflip", "transpose")

#: Splits for which per-slice embeddings are written (train/oof of one fold's patients, and test).
EMBED_SPLITS: tuple[str, ...] = ("train", "oof", "test")
