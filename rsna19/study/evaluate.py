"""``rsna19 evaluate``: decision metrics of a stack's test predictions or of ``predict-study`` outputs, per class, at
study and slice level, at the operating points of a study model.

Sources:

* a stack folder (``STACK/<name>/`` with ``test.parquet``): the slices of one method (default ``blend``); the
  study model comes from ``--bundle`` or, without one, is fitted on the same folder's ``oof.parquet`` exactly as
  ``rsna19 bundle`` fits it;
* a ``predict-study`` output folder (``slices.csv`` + ``studies.json``): the slices as served, and the calibrated
  study results ``studies.json`` holds (or, for outputs of a bundle without a study model, those of ``--bundle``);
* with ``--bundle``, a folder or zip of DICOM studies: predicted in memory by the bundle's
  :class:`~rsna19.study.predictor.StudyPredictor` (exactly what ``predict-study`` would write, nothing
  written), then evaluated like a ``predict-study`` output.

Labels: a Kaggle label csv (``ID,Label``, ``ID_<sop>_<class>``; a study is positive when any labelled slice is),
or a study-level csv with ``study_uid`` and the six class columns (then only study-level rows are reported).

Rows of ``evaluation.csv``: ``level`` (``study``: calibrated study probability at the study operating point;
``study_score``: the uncalibrated study score (max slice probability) at the same operating point; ``slice``:
the stacked slice probability at the slice threshold of the study model), ``class``, ``n, n_pos, auc, threshold,
sensitivity, specificity, brier, ece``. Next to it ``roc.png``, ``reliability.png`` and ``evaluation.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import write_csv, write_text
from rsna19.core.calibration import calibrate_frame, fit_study_model, study_labels
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.core.metrics import decision_metrics
from rsna19.inference.result import SLICE_COLUMNS
from rsna19.io.rsna_csv import read_labels
from rsna19.study.bundle import load_study_model
from rsna19.study.predictor import StudyOptions, StudyPredictor
from rsna19.viz.plots import plot_reliability, plot_roc

log = logging.getLogger(__name__)

#: Columns of ``evaluation.csv``.
EVAL_COLUMNS: tuple[str, ...] = (
    "level",
    "class",
    "n",
    "n_pos",
    "auc",
    "threshold",
    "sensitivity",
    "specificity",
    "brier",
    "ece",
)


@dataclass
class Source:
    """What is evaluated.

    Attributes:
        kind: ``stack`` or ``predict-study``.
        slices: one row a slice: ``study_uid, sop_uid, p_<class>`` ×6.
        studies: one row a study (index ``study_uid``): ``score_<class>``, ``p_<class>`` (calibrated); None when
            it must come from a study model.
        oof: OOF slices with labels to fit a study model on (stack sources), else None.
        describe: a short description for the summary.
        operating_points: the ``study_model`` entry of ``studies.json`` (score, thresholds per class), if any.
    """

    kind: str
    slices: pd.DataFrame
    studies: pd.DataFrame | None
    oof: pd.DataFrame | None
    describe: str
    operating_points: dict[str, Any] | None = None


def load_source(
    path: str | os.PathLike[str], which: str | None = None, bundle: str | os.PathLike[str] | None = None
) -> Source:
    """Read a stack folder or a ``predict-study`` output folder; with ``bundle``, a folder or zip of DICOM studies is
    predicted in memory (:func:`predict_source`).

    Raises:
        UserError: neither kind of folder, or an unknown stack method.
    """
    root = Path(path)
    if (root / "test.parquet").is_file():
        test = pd.read_parquet(root / "test.parquet")
        methods = list(dict.fromkeys(test["model"].astype(str)))
        which = which or ("blend" if "blend" in methods else methods[-1])
        if which not in methods:
            raise UserError(f"{root}: no stack method {which!r}; it has {', '.join(methods)}")
        oof = None
        if (root / "oof.parquet").is_file():
            frame = pd.read_parquet(root / "oof.parquet")
            oof = frame[frame["model"] == which].reset_index(drop=True)
        slices = test[test["model"] == which].reset_index(drop=True)
        return Source("stack", slices, None, oof, f"stack {root.name}, method {which}")
    if (root / "slices.csv").is_file() and (root / "studies.json").is_file():
        slices = pd.read_csv(root / "slices.csv", dtype={"study_uid": str, "sop_uid": str, "series_uid": str})
        summary = json.loads((root / "studies.json").read_text())
        return study_source(
            slices, summary.get("studies", []), summary.get("study_model"), f"predict-study output {root.name}"
        )
    if bundle is not None and root.exists():
        return predict_source(root, bundle)
    raise UserError(
        f"{root}: neither a stack folder (test.parquet) nor a predict-study output (slices.csv); DICOM studies "
        "are evaluated with --bundle"
    )


def study_source(
    slices: pd.DataFrame, entries: list[dict[str, Any]], operating_points: dict[str, Any] | None, describe: str
) -> Source:
    """A ``predict-study`` source from its slices and ``studies.json`` entries (as written, or in memory).

    Args:
        slices: ``slices.csv`` rows.
        entries: ``studies.json``'s per-study entries (:meth:`rsna19.inference.result.StudyResult.entry`).
        operating_points: ``studies.json``'s ``study_model``.
        describe: a short description for the summary.
    """
    rows = {}
    for s in entries:
        result = s.get("study_result")
        if s.get("status") != "ok" or not result:
            continue
        rows[s["study_uid"]] = {
            **{f"score_{c}": result["classes"][c]["score"] for c in CLASSES},
            **{f"p_{c}": result["classes"][c]["probability"] for c in CLASSES},
        }
    studies = pd.DataFrame.from_dict(rows, orient="index") if rows else None
    if studies is not None:
        studies.index.name = "study_uid"
    return Source("predict-study", slices, studies, None, describe, operating_points if studies is not None else None)


def predict_source(path: str | os.PathLike[str], bundle: str | os.PathLike[str]) -> Source:
    """Predict the DICOM studies of a folder or zip in memory with
    :class:`rsna19.study.predictor.StudyPredictor` (no Grad-CAM, nothing written): the evaluated source."""
    # Here, not at the top: it imports torch, which evaluating written predictions does not need.

    predictor = StudyPredictor.load(bundle, options=StudyOptions(cam=False))
    with predictor.reading(path) as inputs:
        results = [predictor.predict_input(study, inputs.root) for study in inputs.studies.values()]
    slices = [r.slices() for r in results if r.ok]
    return study_source(
        pd.concat(slices, ignore_index=True) if slices else pd.DataFrame(columns=list(SLICE_COLUMNS)),
        [r.entry() for r in results],
        predictor.operating_points(),
        f"DICOM studies {Path(path).name} predicted with {Path(bundle).name}",
    )


def read_label_table(path: str | os.PathLike[str]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Slice labels (Kaggle ``ID,Label`` csv) or study labels (``study_uid`` + class columns).

    Returns:
        (slice labels indexed by ``sop_uid``, None) or (None, study labels indexed by ``study_uid``).

    Raises:
        UserError: a missing file or neither format.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels file {path} does not exist")
    head = pd.read_csv(path, nrows=0).columns
    if "study_uid" in head and set(CLASSES) <= set(head):
        df = pd.read_csv(path, dtype={"study_uid": str}).set_index("study_uid")[list(CLASSES)]
        return None, df.astype(np.float64)
    if {"ID", "Label"} <= set(head):
        return read_labels(path).set_index("sop_uid")[list(CLASSES)], None
    raise UserError(f"{path}: expected an ID,Label csv or a study_uid csv with the columns {', '.join(CLASSES)}")


def _study_model(
    src: Source,
    source: str | os.PathLike[str],
    bundle: str | os.PathLike[str] | None,
    sensitivity: dict[str, float] | None,
    study_score: str,
) -> tuple[dict[str, Any], str, str | None]:
    """The study model that gives the operating points: the bundle's, one fitted on a stack's OOF rows, or the one
    recorded in ``studies.json``; with where it comes from and the bundle's SHA-256 when known."""
    if bundle is not None:
        model, _, bundle_sha = load_study_model(bundle)
        if model is None:
            raise UserError(f"{bundle}: the bundle has no study model (re-export it with this version of rsna19)")
        return model, f"bundle {Path(bundle).name}", bundle_sha
    if src.oof is not None and len(src.oof):
        try:
            model = fit_study_model(src.oof, sensitivity, study_score, source={"oof": "stack oof.parquet"})
        except ValueError as exc:
            raise UserError(f"{source}: cannot fit a study model on oof.parquet: {exc}") from None
        return model, "fitted on the stack's oof.parquet", None
    if src.operating_points is not None:
        return src.operating_points, "operating points in studies.json", src.operating_points.get("bundle_sha256")
    raise UserError(f"{source}: no study model: pass --bundle (a bundle written with a study model)")


def _metric_rows(
    model: dict[str, Any], studies: pd.DataFrame, y_study: pd.DataFrame, slices: pd.DataFrame | None, n_bins: int
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Decision metrics per level and class, with the (y, p) curves and the operating points for the plots."""
    rows, curves, ops = [], {}, {}
    levels = [("study", "p_"), ("study_score", "score_")]
    for level, prefix in levels:
        curves[level], ops[level] = {}, {}
        for c in CLASSES:
            e = model["classes"][c]
            thr = e["threshold"] if level == "study" else (e.get("score_threshold") or e["threshold"])
            y, p = y_study[c].to_numpy(), studies[f"{prefix}{c}"].to_numpy(dtype=np.float64)
            m = decision_metrics(y, p, thr, n_bins)
            rows.append({"level": level, "class": c, **m})
            curves[level][c] = (y, p)
            ops[level][c] = (m["sensitivity"], m["specificity"])
    if slices is not None:
        curves["slice"], ops["slice"] = {}, {}
        for c, col in zip(CLASSES, PROB_COLUMNS):
            y, p = slices[c].to_numpy(), np.clip(slices[col].to_numpy(dtype=np.float64), 0, 1)
            m = decision_metrics(y, p, model["classes"][c]["slice_threshold"], n_bins)
            rows.append({"level": "slice", "class": c, **m})
            curves["slice"][c] = (y, p)
            ops["slice"][c] = (m["sensitivity"], m["specificity"])
    return rows, curves, ops


def _plots(curves: dict[str, Any], ops: dict[str, Any], out: Path, describe: str, n_bins: int) -> None:
    """``roc.png`` (with the operating points) and ``reliability.png``."""
    panels = {"study (calibrated)": curves["study"]}
    if "slice" in curves:
        panels["slice"] = curves["slice"]
    op_panels = {"study (calibrated)": ops["study"], "slice": ops.get("slice", {})}
    plot_roc(panels, out / "roc.png", f"ROC · {describe}", op_panels)
    plot_reliability(
        {"study (uncalibrated score)": curves["study_score"], **panels}, out / "reliability.png", describe, n_bins
    )


def evaluate(
    source: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    bundle: str | os.PathLike[str] | None = None,
    which: str | None = None,
    sensitivity: dict[str, float] | None = None,
    study_score: str = "max",
    n_bins: int = 10,
) -> pd.DataFrame:
    """Evaluate ``source`` against ``labels`` and write ``evaluation.csv``, ``evaluation.json`` and the plots.

    Args:
        source: a stack folder, a ``predict-study`` output folder, or (with ``bundle``) DICOM studies to predict.
        labels: the labels csv (see the module docstring).
        out: output folder (created).
        bundle: a bundle whose study model gives the operating points (and the calibration of a stack source).
        which: stack method (stack sources; default ``blend``).
        sensitivity, study_score: used when the study model is fitted here (a stack source without ``bundle``).
        n_bins: bins of the expected calibration error and the reliability plot.

    Returns:
        The ``evaluation.csv`` table.

    Raises:
        UserError: unreadable inputs, no labelled slice or study, or no study model to take thresholds from.
    """
    src = load_source(source, which, bundle)
    slice_labels, given_study_labels = read_label_table(labels)
    model, model_origin, bundle_sha = _study_model(src, source, bundle, sensitivity, study_score)
    slices = src.slices
    n_unlabelled = 0
    if slice_labels is not None:
        lab = slice_labels.reindex(slices["sop_uid"].astype(str))
        known = lab.notna().all(axis=1).to_numpy()
        n_unlabelled = int((~known).sum())
        slices = slices.loc[known].reset_index(drop=True)
        slices[list(CLASSES)] = lab.to_numpy()[known]
        if slices.empty:
            raise UserError(f"{labels}: none of the {len(src.slices)} predicted slices has labels")
        y_study = study_labels(slices)
    else:
        assert given_study_labels is not None
        y_study = given_study_labels
    studies = src.studies if src.studies is not None else calibrate_frame(model, src.slices)
    common = studies.index.intersection(y_study.index)
    if len(common) == 0:
        raise UserError(f"{labels}: none of the {len(studies)} predicted studies has labels")
    studies, y_study = studies.loc[common], y_study.loc[common]

    rows, curves, ops = _metric_rows(model, studies, y_study, slices if slice_labels is not None else None, n_bins)
    table = pd.DataFrame(rows)[list(EVAL_COLUMNS)]
    table[["n", "n_pos"]] = table[["n", "n_pos"]].astype(int)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "evaluation.csv")
    _plots(curves, ops, out, src.describe, n_bins)
    summary: dict[str, Any] = {
        "source": str(source),
        "kind": src.kind,
        "describe": src.describe,
        "labels": str(labels),
        "study_model": model_origin,
        "study_score": model["score"],
        "bundle_sha256": bundle_sha,
        "n_studies": int(len(common)),
        "n_slices": int(len(slices)) if slice_labels is not None else None,
        "n_slices_unlabelled": n_unlabelled,
        "ece_bins": n_bins,
        "operating_points": {
            c: {k: model["classes"][c][k] for k in ("target_sensitivity", "threshold", "slice_threshold")}
            for c in CLASSES
        },
    }
    write_text(json.dumps(summary, indent=1) + "\n", out / "evaluation.json")
    return table


def format_table(table: pd.DataFrame) -> str:
    """The evaluation table as aligned text (3 decimals)."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
