"""Scores of the second level: one row per base model, their plain mean, each stacker and the blend."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rsna19.constants import CLASSES
from rsna19.metrics import per_class_auc, per_class_log_loss, study_auc_any, weighted_log_loss

#: Columns of ``scores.csv``, in order. ``kind`` is one of ``base``, ``mean``, ``stacker``, ``blend``.
SCORE_COLUMNS: list[str] = [
    "name",
    "kind",
    "wll_oof",
    "wll_test",
    *[f"loss_{c}" for c in CLASSES],
    "auc_any",
    "auc_any_test",
    "study_auc_oof",
    "study_auc_test",
]


def score_row(
    name: str,
    kind: str,
    y_oof: np.ndarray,
    p_oof: np.ndarray,
    y_test: np.ndarray | None = None,
    p_test: np.ndarray | None = None,
    studies_oof: np.ndarray | None = None,
    studies_test: np.ndarray | None = None,
) -> dict[str, object]:
    """Scores of one set of predictions.

    Args:
        name, kind: row identity.
        y_oof, p_oof: (N, 6) OOF labels and probabilities; per-class losses and ``auc_any`` are OOF.
        y_test, p_test: (N_test, 6) test labels and probabilities; test scores are NaN without labels.
        studies_oof, studies_test: (N,) / (N_test,) study of each row, for the study-level AUC of ``any`` (a
            study's score is its highest slice); NaN without them.
    """
    has_test = y_test is not None and p_test is not None
    row: dict[str, object] = {"name": name, "kind": kind, "wll_oof": weighted_log_loss(y_oof, p_oof)}
    row["wll_test"] = weighted_log_loss(y_test, p_test) if has_test else math.nan
    row.update({f"loss_{c}": v for c, v in per_class_log_loss(y_oof, p_oof).items()})
    row["auc_any"] = per_class_auc(y_oof, p_oof)["any"]
    row["auc_any_test"] = per_class_auc(y_test, p_test)["any"] if has_test else math.nan
    row["study_auc_oof"] = (
        study_auc_any(studies_oof, y_oof[:, -1], p_oof[:, -1]) if studies_oof is not None else math.nan
    )
    row["study_auc_test"] = (
        study_auc_any(studies_test, y_test[:, -1], p_test[:, -1]) if has_test and studies_test is not None else math.nan
    )
    return row


def score_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Rows from :func:`score_row` as a frame with :data:`SCORE_COLUMNS`."""
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def format_score_table(scores: pd.DataFrame, digits: int = 4) -> str:
    """A fixed-width text table of ``scores`` (empty cells for unknown values), best OOF loss marked with ``*``."""
    df = scores.copy()
    best = df["wll_oof"].idxmin() if len(df) else None
    headers = [c.removeprefix("loss_") if c.startswith("loss_") else c for c in df.columns]
    body = []
    for i, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if isinstance(v, float | np.floating):
                cells.append("" if math.isnan(v) else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        cells[0] += " *" if i == best else ""
        body.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if j < 2 else h.rjust(w) for j, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)
