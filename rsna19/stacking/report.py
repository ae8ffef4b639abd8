"""Scores of the second level: one row per base model, their plain mean, each stacker and the blend.

Next to the scores, each stacker's and the blend's row says what post-processing did to it (``wll_oof_raw``: the OOF
loss before it; ``postprocess``: the steps kept; ``d_<step>``: the change of the OOF loss when the step was tried,
negative where it helped), every row its OOF loss relative to the best base model (``vs_best_base``), and the final
output's row a ``warning`` when it is worse than that model out of fold.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES
from rsna19.core.metrics import per_class_auc, per_class_log_loss, study_auc_any, weighted_log_loss
from rsna19.stacking.postprocess import STEPS, PostprocessFit

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
    "wll_oof_raw",
    "postprocess",
    *[f"d_{step}" for step in STEPS],
    "vs_best_base",
    "warning",
]
#: The columns :func:`format_score_table` prints (the rest are in the file).
DISPLAY_COLUMNS: list[str] = [*SCORE_COLUMNS[: SCORE_COLUMNS.index("wll_oof_raw")], "postprocess", "vs_best_base"]


def score_row(
    name: str,
    kind: str,
    y_oof: np.ndarray,
    p_oof: np.ndarray,
    y_test: np.ndarray | None = None,
    p_test: np.ndarray | None = None,
    studies_oof: np.ndarray | None = None,
    studies_test: np.ndarray | None = None,
    post: PostprocessFit | None = None,
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
    row["wll_oof_raw"] = post.loss_raw if post is not None else math.nan
    row["postprocess"] = post.label if post is not None else ""
    row.update({f"d_{step}": post.effect[step] if post is not None else math.nan for step in STEPS})
    return row


def flag_against_base(scores: pd.DataFrame, final: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Fill ``vs_best_base`` (OOF loss / the best base model's) and the ``warning`` of the final outputs.

    Args:
        scores: the score table (rows of kind ``base`` are the base models).
        final: names of the rows that are final outputs (the blend; the stackers when there is no blend).

    Returns:
        The table and one warning line per final output worse than the best base model out of fold.
    """
    scores = scores.copy()
    scores["warning"] = ""
    base = scores[scores["kind"] == "base"]["wll_oof"].dropna()
    if base.empty:
        return scores, []
    best_name = scores.loc[base.idxmin(), "name"]
    scores["vs_best_base"] = scores["wll_oof"] / base.min()
    warnings = []
    for i in scores.index[scores["name"].isin(final)]:
        row = scores.loc[i]
        if row["wll_oof"] > base.min():
            text = f"worse than the best base model {best_name} out of fold ({row['vs_best_base']:.3f}x)"
            scores.loc[i, "warning"] = text
            warnings.append(f"{row['name']}: {text}")
    return scores, warnings


def score_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Rows from :func:`score_row` as a frame with :data:`SCORE_COLUMNS`."""
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def format_score_table(scores: pd.DataFrame, digits: int = 4) -> str:
    """A fixed-width text table of ``scores``' :data:`DISPLAY_COLUMNS` (empty cells for unknown values), best OOF
    loss marked with ``*``, then one line per ``warning``."""
    df = scores[[c for c in DISPLAY_COLUMNS if c in scores.columns]].copy()
    best = df["wll_oof"].idxmin() if len(df) else None
    headers = [c.removeprefix("loss_") if c.startswith("loss_") else c for c in df.columns]
    body = []
    for i, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if isinstance(v, float | np.floating):
                cells.append("" if math.isnan(v) else f"{v:.{digits}f}")
            elif v is None or (isinstance(v, str) and not v):
                cells.append("")
            else:
                cells.append(str(v))
        cells[0] += " *" if i == best else ""
        body.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if j < 2 else h.rjust(w) for j, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))))
    if "warning" in scores.columns:
        for _, row in scores.iterrows():
            if isinstance(row["warning"], str) and row["warning"]:
                lines.append(f"WARNING {row['name']}: {row['warning']}")
    return "\n".join(lines)
