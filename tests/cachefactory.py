"""Write small conversion caches (docs/contracts.md) directly, for tests of folds, datasets, training and prediction.

Each series is a disc of "brain" (~30 HU) in a skull ring (~1000 HU) surrounded by air. A bleed is a bright
blob (~75 HU) spanning a few consecutive slices; each subtype sits at its own place in the slice, so a small
network can learn to tell them apart. A slice is positive for a subtype where its blob crosses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.constants import AIR_HU, CLASSES, SUBTYPES

#: Where each subtype's blob sits, as fractions of the image size (row, col).
_BLOB_PLACE = {
    "epidural": (0.22, 0.5),
    "intraparenchymal": (0.5, 0.35),
    "intraventricular": (0.5, 0.55),
    "subarachnoid": (0.7, 0.65),
    "subdural": (0.5, 0.8),
}


def _series_volume(rng: np.random.Generator, n_z: int, size: int, bleeds: list[tuple[str, int, int]]) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    r = np.hypot(yy - 0.5, xx - 0.5)
    vol = np.full((n_z, size, size), AIR_HU, dtype=np.float32)
    vol[:, r < 0.42] = 1000.0
    vol[:, r < 0.36] = 30.0
    vol += rng.normal(0, 4, vol.shape).astype(np.float32) * (r < 0.42)
    for subtype, z0, z1 in bleeds:
        cy, cx = _BLOB_PLACE[subtype]
        blob = np.hypot(yy - cy, xx - cx) < 0.09
        vol[z0:z1, blob] = 75.0
    return np.round(vol).astype(np.int16)


def write_cache(
    root: str | Path,
    n_patients: int = 8,
    n_test_patients: int = 2,
    size: int = 48,
    slices: tuple[int, int] = (6, 10),
    positive_rate: float = 0.6,
    seed: int = 0,
) -> Path:
    """Write a cache with one or two studies (one series each) per patient.

    Args:
        root: cache directory to create.
        n_patients: training patients; every third has two studies.
        n_test_patients: test patients (labels NaN in the index).
        size: H = W of every volume.
        slices: inclusive range of slices per series.
        positive_rate: chance that a training series has a bleed.
        seed: everything is a function of it.

    Returns:
        ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    n_series = 0
    for p in range(n_patients + n_test_patients):
        split = "train" if p < n_patients else "test"
        patient = f"ID_p{p:04d}"
        for s in range(2 if p % 3 == 2 else 1):
            study, series = f"ID_st{p:04d}{s}", f"ID_se{p:04d}{s}"
            n_z = int(rng.integers(slices[0], slices[1] + 1))
            bleeds = []
            if rng.random() < positive_rate or (split == "train" and n_series % 4 == 0):
                for subtype in rng.choice(SUBTYPES, size=int(rng.integers(1, 3)), replace=False):
                    z0 = int(rng.integers(0, n_z - 2))
                    bleeds.append((str(subtype), z0, min(n_z, z0 + int(rng.integers(2, 4)))))
            n_series += 1
            vol = _series_volume(rng, n_z, size, bleeds)
            labels = np.zeros((n_z, len(CLASSES)), dtype=np.float32)
            for subtype, z0, z1 in bleeds:
                labels[z0:z1, SUBTYPES.index(subtype)] = 1
            labels[:, -1] = labels[:, :-1].max(axis=1)
            sops = [f"ID_{series[3:]}s{z:03d}" for z in range(n_z)]
            out = root / series
            out.mkdir(exist_ok=True)
            np.save(out / "volume.npy", vol)
            meta = {
                "sop_uids": sops,
                "positions": [5.0 * z for z in range(n_z)],
                "spacing": [5.0, 0.5, 0.5],
                "tilt_deg": 0.0,
                "crop_box": [0, 0, size, size],
                "original_shape": [n_z, size, size],
                "conversion_version": "test",
                "study_uid": study,
                "patient_id": patient,
                "split": split,
            }
            (out / "meta.json").write_text(json.dumps(meta))
            for z in range(n_z):
                row = {
                    "sop_uid": sops[z],
                    "series_uid": series,
                    "study_uid": study,
                    "patient_id": patient,
                    "split": split,
                    "z": z,
                    "n_slices": n_z,
                }
                row.update({c: (float(labels[z, i]) if split == "train" else np.nan) for i, c in enumerate(CLASSES)})
                rows.append(row)
    pd.DataFrame(rows).to_parquet(root / "cache_index.parquet", index=False)
    return root


def write_cache_and_folds(root: str | Path, n_folds: int = 3, **kwargs: object) -> tuple[Path, Path]:
    """A cache under ``root/cache`` and its ``root/folds.csv``; kwargs go to :func:`write_cache`."""
    from rsna19.data.folds import write_folds

    root = Path(root)
    cache = write_cache(root / "cache", **kwargs)  # type: ignore[arg-type]
    write_folds(cache, root / "folds.csv", n_folds=n_folds, seed=0)
    return cache, root / "folds.csv"
