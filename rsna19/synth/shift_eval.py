"""Scores of a bundle's ``predict-study`` outputs on one scanner-shift preset (:mod:`rsna19.synth.shift`;
``benchmarks/shift.py``, docs/benchmarks.md "Scanner shift").

The study scores compared (issue 23, point 3): ``max`` (the slice maximum, what the bundle's study model uses by
default) and ``top3`` (the mean of the three highest slices, :data:`rsna19.core.calibration.STUDY_SCORES`), each as
study AUC(any); the operating point is the bundle's calibrated flag of ``any`` (``studies.json``), read as sensitivity
and specificity on the preset's studies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.metrics import binary_auc, weighted_log_loss


def _top3(s: pd.Series) -> float:
    return float(np.sort(s.to_numpy(dtype=np.float64))[-3:].mean())


def evaluate_preset(studies: str | os.PathLike[str], pred: str | os.PathLike[str]) -> dict[str, Any]:
    """The scores of one preset from its ``labels.csv`` and predict-study's outputs.

    Args:
        studies: the preset's folder (:func:`rsna19.synth.shift.write_shift_preset`).
        pred: predict-study's ``--out`` folder for its ``stage_2_test``.

    Returns:
        ``n_studies, n_slices, slice_auc, slice_wll`` (stacked output), ``study_auc_max, study_auc_top3``,
        ``p_neg, p_pos`` (mean p_any of negative / positive slices), ``sens_op, spec_op`` (the calibrated flag of
        ``any``), ``best_base`` (the bundled model with the lowest weighted log loss), ``best_base_wll`` and
        ``blend_minus_best``.
    """
    studies, pred = Path(studies), Path(pred)
    labels = pd.read_csv(studies / "labels.csv")
    slices = pd.read_csv(pred / "slices.csv")
    df = labels.merge(slices[["sop_uid", *PROB_COLUMNS]], on="sop_uid", how="inner")
    y, p = df[list(CLASSES)].to_numpy(float), df[list(PROB_COLUMNS)].to_numpy(float)
    g = df.groupby("study_uid")
    y_study = g["any"].max()
    row: dict[str, Any] = {
        "n_studies": float(len(y_study)),
        "n_slices": float(len(df)),
        "slice_auc": binary_auc(y[:, -1], p[:, -1]),
        "slice_wll": weighted_log_loss(y, p),
        "study_auc_max": binary_auc(y_study, g["p_any"].max().loc[y_study.index]),
        "study_auc_top3": binary_auc(y_study, g["p_any"].agg(_top3).loc[y_study.index]),
        "p_neg": float(p[y[:, -1] == 0, -1].mean()),
        "p_pos": float(p[y[:, -1] == 1, -1].mean()),
    }
    info = json.loads((pred / "studies.json").read_text())
    flags = {
        s["study_uid"]: s["study_result"]["flag"] == "positive"
        for s in info["studies"]
        if s.get("status") == "ok" and s.get("study_result")
    }
    f = np.array([flags.get(u, False) for u in y_study.index])
    yy = y_study.to_numpy() > 0
    row["sens_op"] = float(f[yy].mean()) if yy.any() else float("nan")
    row["spec_op"] = float((~f[~yy]).mean()) if (~yy).any() else float("nan")
    models = pd.read_csv(pred / "models.csv")
    losses = {}
    for name, m in models.groupby("model"):
        mm = labels.merge(m[["sop_uid", *PROB_COLUMNS]], on="sop_uid", how="inner")
        losses[str(name)] = weighted_log_loss(mm[list(CLASSES)].to_numpy(float), mm[list(PROB_COLUMNS)].to_numpy(float))
    best = min(losses, key=losses.__getitem__)
    row["best_base_wll"] = losses[best]
    row["blend_minus_best"] = row["slice_wll"] - losses[best]
    row["best_base"] = best
    return row
