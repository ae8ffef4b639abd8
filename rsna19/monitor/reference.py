"""The drift reference a bundle records at export (:func:`training_reference`): input facts of the training series
and the calibrated outputs of the out-of-fold studies (:mod:`rsna19.monitor.drift`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.calibration import calibrate_frame
from rsna19.monitor.drift import build_reference
from rsna19.monitor.facts import header_facts, hu_facts

#: Most training series read for the reference (evenly spaced over the sorted series UIDs).
MAX_SERIES: int = 400


def training_reference(
    cache: Path, index: Path | None, study_model: dict[str, Any] | None, oof: pd.DataFrame | None
) -> dict[str, Any] | None:
    """The ``drift_reference`` of a bundle; None when the cache has no train series.

    Args:
        cache: the run's conversion cache (``cache_index.parquet``, ``<series>/meta.json`` and ``volume.npy``).
        index: the run's ``index.parquet`` (the path of each slice: the header facts); None leaves them unknown.
        study_model: the bundle's study model (calibrates the out-of-fold outputs).
        oof: the out-of-fold slice predictions the study model was fitted on (``study_uid``, ``p_<class>``).
    """
    cache_index = cache / "cache_index.parquet"
    if not cache_index.is_file():
        return None
    rows = pd.read_parquet(cache_index, columns=["series_uid", "split"])
    uids = sorted(rows.loc[rows["split"] == "train", "series_uid"].astype(str).unique())
    if not uids:
        return None
    if len(uids) > MAX_SERIES:
        uids = [uids[int(i)] for i in np.linspace(0, len(uids) - 1, MAX_SERIES).round()]
    first_path: dict[str, str] = {}
    if index is not None and index.is_file():
        ix = pd.read_parquet(index, columns=["series_uid", "path"])
        first_path = ix.groupby("series_uid")["path"].first().astype(str).to_dict()
    facts = []
    for uid in uids:
        volume_file = cache / uid / "volume.npy"
        if not volume_file.is_file():
            continue
        volume = np.load(volume_file, mmap_mode="r")
        header = header_facts(first_path[uid]) if uid in first_path else {}
        facts.append({**header, **hu_facts(np.asarray(volume))})
    p_any: list[float] = []
    flags: list[bool] = []
    if study_model is not None and oof is not None and len(oof):
        cal = calibrate_frame(study_model, oof)
        p_any = [float(v) for v in cal["p_any"]]
        flags = [bool(v) for v in cal["flag_any"]]
    return build_reference(facts, p_any, flags, source=f"{len(facts)} train series of the cache; OOF studies")
