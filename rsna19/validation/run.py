"""``rsna19 validate``: a bundle checked on a site's own labelled studies or on CQ500, reported the way the
literature reports it.

Every study in DATA goes through ``predict-study`` (:func:`rsna19.study.batch.predict_studies`: series choice,
thin-series reformatting, every encoding; its outputs stay in ``OUT/predict/``). The study's calibrated
probability is the bundle's study model applied to the slices of its key (for ``cq500`` the key is the study
folder, so a folder holding two StudyInstanceUIDs is one study), compared with the reference
(:mod:`rsna19.validation.references`). Nothing is silently dropped: every study in DATA or in the labels is a row
of ``OUT/studies.csv`` with its ``status``:

* ``ok``: predicted and labelled: evaluated;
* ``unreadable``: in DATA but nothing could be predicted (the reason: no readable DICOM, no usable axial series,
  conversion failed);
* ``not_in_labels``: predicted, but the labels have no row for it;
* ``not_in_data``: in the labels, but DATA holds no study with that key.

Studies with a gap in their reference (a blank label, a missing read) are evaluated for the classes they have.
Each kind of problem is counted and listed in ``validation.json`` (``problems``) and said on the terminal.

Outputs: ``studies.csv``, ``validation.csv``, ``validation.json``, ``report.png``, ``table.md`` and ``summary.txt``
(docs/contracts.md); with ``--recalibrate``, a new bundle and the cross-validated rows in ``validation.csv``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import ensure_writable_dir, write_csv, write_text
from rsna19.core.calibration import calibrate_frame
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.core.jsonable import json_default
from rsna19.core.metrics import bootstrap_indices, resample_weights
from rsna19.io.cq500 import study_key
from rsna19.study.batch import predict_studies
from rsna19.study.bundle import write_recalibrated_bundle
from rsna19.study.predictor import StudyPredictor
from rsna19.validation.recalibrate import cross_validate, refit_study_model, stratified_folds
from rsna19.validation.references import Reference, read_reference
from rsna19.validation.report import write_report
from rsna19.validation.stats import VALIDATION_COLUMNS, class_rows, confusion, ranking_metrics

log = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = ("ok", "unreadable", "not_assessable", "not_in_labels", "not_in_data")


def study_keys(summary: dict[str, Any], fmt: str) -> tuple[dict[str, str], dict[str, str]]:
    """The key of every study in a ``studies.json`` summary, and the keys of folders with no readable study.

    Returns:
        ``(key_of, folder_problems)``: study UID → key; key → reason, for CQ500 folders whose files were all
        skipped (no study came out of them).
    """
    key_of: dict[str, str] = {}
    for s in summary["studies"]:
        if fmt == "cq500":
            key = study_key(s.get("folder") or "")
            key_of[s["study_uid"]] = key or f"{s.get('folder') or '.'} (not a CQ500 folder)"
        else:
            key_of[s["study_uid"]] = s["study_uid"]
    unread: dict[str, list[str]] = {}
    if fmt == "cq500":
        known = set(key_of.values())
        for f in summary.get("files_skipped", []):
            key = study_key(f["path"])
            if key is not None and key not in known:
                unread.setdefault(key, []).append(f["reason"])
    problems = {}
    for key, reasons in unread.items():
        common = "; ".join(f"{n}× {r}" for r, n in Counter(reasons).most_common(3))
        problems[key] = f"no readable DICOM study: {len(reasons)} file(s) skipped ({common})"
    return key_of, problems


def study_table(
    summary: dict[str, Any], slices: pd.DataFrame, model: dict[str, Any], ref: Reference, fmt: str
) -> pd.DataFrame:
    """``studies.csv``: one row a study key of DATA or of the labels, with status, probabilities and reference."""
    key_of, folder_problems = study_keys(summary, fmt)
    uids: dict[str, list[str]] = {}
    for uid, key in key_of.items():
        uids.setdefault(key, []).append(uid)
    errors: dict[str, list[str]] = {}
    refused: dict[str, list[str]] = {}  # the not-assessable gate (rsna19/inference/assess.py): no result, no metric
    for s in summary["studies"]:
        if s["status"] == "not_assessable":
            refused.setdefault(key_of[s["study_uid"]], []).append(str(s.get("not_assessable") or "not assessable"))
        elif s["status"] != "ok":
            errors.setdefault(key_of[s["study_uid"]], []).append(s.get("error") or "failed")
    sl = slices.assign(study_uid=slices["study_uid"].astype(str).map(key_of))
    probs = calibrate_frame(model, sl) if len(sl) else pd.DataFrame()
    keys = sorted(set(uids) | set(folder_problems) | set(ref.labels.index))
    rows = []
    for key in keys:
        row: dict[str, Any] = {"study_key": key, "study_uids": ";".join(sorted(uids.get(key, [])))}
        if key in probs.index:
            row["status"] = "ok" if key in ref.labels.index else "not_in_labels"
            # A key with two studies (one CQ500 folder, two StudyInstanceUIDs) of which one failed keeps the error.
            row["reason"] = "; ".join(f"partly unreadable: {e}" for e in errors.get(key, []))
        elif key in refused:
            row["status"] = "not_assessable"
            row["reason"] = "; ".join(refused[key])
        elif key in uids or key in folder_problems:
            row["status"] = "unreadable"
            row["reason"] = "; ".join(errors.get(key, [])) or folder_problems.get(key, "no series could be predicted")
        else:
            row["status"] = "not_in_data"
            row["reason"] = "in the labels, but DATA has no study with this key"
        row["missing"] = ";".join(ref.missing.get(key, []))
        rows.append(row)
    table = pd.DataFrame(rows, columns=["study_key", "study_uids", "status", "reason", "missing"])
    table = table.set_index("study_key")
    for c in CLASSES:
        table[f"y_{c}"] = ref.labels[c].reindex(table.index)
    if ref.reads is not None:
        for c in CLASSES:
            table[f"reads_{c}"] = ref.reads[c].reindex(table.index).astype("Int64")
    for c in CLASSES:
        table[f"score_{c}"] = probs[f"score_{c}"].reindex(table.index) if len(probs) else np.nan
        table[f"p_{c}"] = probs[f"p_{c}"].reindex(table.index) if len(probs) else np.nan
    return table


def metric_rows(
    table: pd.DataFrame, model: dict[str, Any], classes: list[str], weights: np.ndarray, n_bins: int
) -> list[dict[str, Any]]:
    """The bundle's ``validation.csv`` rows of every evaluated class, from the ``ok`` rows of ``studies.csv``."""
    rows = []
    for c in classes:
        y = table[f"y_{c}"].to_numpy(dtype=np.float64)
        known = ~np.isnan(y)
        p = table[f"p_{c}"].to_numpy(dtype=np.float64)
        rows += class_rows(c, y[known], p[known], model["classes"][c]["threshold"], weights[:, known], n_bins)
    return rows


@dataclass(frozen=True)
class ValidateOptions:
    """How ``validate`` measures.

    Attributes:
        fmt: ``studies`` or ``cq500`` (the labels' format).
        n_boot: bootstrap resamples of the intervals (at least 100).
        seed: seed of the bootstrap and of the recalibration folds.
        n_bins: equal-width bins of the calibration error and the reliability plot.
        recalibrate: write a bundle recalibrated on these studies here (None: no recalibration).
        cv_folds: folds of the cross-validated recalibration numbers.
        force: replace an existing recalibrated bundle.
    """

    fmt: str = "studies"
    n_boot: int = 2000
    seed: int = 0
    n_bins: int = 10
    recalibrate: str | os.PathLike[str] | None = None
    cv_folds: int = 5
    force: bool = False

    def check(self) -> None:
        """Raise :class:`UserError` for too few resamples or a recalibrated bundle that would be replaced."""
        if self.n_boot < 100:
            raise UserError(f"--bootstrap {self.n_boot}: use at least 100 resamples (2000 for reported intervals)")
        if self.recalibrate is not None and Path(self.recalibrate).exists() and not self.force:
            raise UserError(f"{self.recalibrate} exists; use --force to replace the recalibrated bundle")


def validate(
    data: str | os.PathLike[str],
    predictor: StudyPredictor,
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    options: ValidateOptions = ValidateOptions(),
    workers: int = 1,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Predict every study of ``data`` with ``predictor`` and compare with ``labels``; write the outputs to ``out``.

    Args:
        data: a folder (any layout) or zip of studies; for ``cq500`` the CQ500 folders.
        predictor: the loaded bundle (it must hold a study model), with ``cam`` off for speed.
        labels: the study labels csv (``studies``) or CQ500's ``reads.csv`` (``cq500``).
        out: output folder.
        options: the format, bootstrap, bins and recalibration.
        workers: processes reading the DICOM headers.
        say: where the progress and problem messages go.

    Returns:
        The ``validation.json`` dict.

    Raises:
        UserError: unreadable labels, a bundle without a study model, no study both predicted and labelled, or
            fewer than 100 bootstrap resamples.
    """
    o = options
    o.check()
    ref = read_reference(labels, o.fmt)
    out = ensure_writable_dir(out)
    model = predictor.bundle.study_model
    if model is None:
        raise UserError(f"{predictor.bundle.path}: the bundle has no study model (re-export it with `rsna19 bundle`)")
    batch = predict_studies(data, predictor, out / "predict", workers=workers, say=say)
    table = study_table(batch.summary, batch.slices, model, ref, o.fmt)
    ok = table[table["status"] == "ok"]
    if ok.empty:
        raise UserError(
            f"no study of {data} is in {labels}: {int((table['status'] == 'not_in_labels').sum())} predicted "
            f"without labels, {int((table['status'] == 'not_in_data').sum())} labelled but not found "
            f"(keys are {'CQ500-CT-<n> from the folder names' if o.fmt == 'cq500' else 'StudyInstanceUIDs'})"
        )
    weights = resample_weights(bootstrap_indices(len(ok), o.n_boot, o.seed), len(ok))
    rows = metric_rows(ok, model, ref.classes, weights, o.n_bins)
    recal = None
    if o.recalibrate is not None:
        source = {"data": str(data), "labels": str(labels)}
        recal, cv_rows, cv_cols = _recalibrate(predictor.bundle.path, model, ok, ref, source, weights, o)
        rows += cv_rows
        table = table.join(cv_cols)
    problems = _problems(table, ref, batch.summary, o.fmt)
    info = _info(data, labels, predictor, table, ok, ref, problems, recal, o)
    info["predict_s"] = batch.summary.get("total_s")
    _write_outputs(out, table, pd.DataFrame(rows)[list(VALIDATION_COLUMNS)], info)
    for entry in problems.values():
        if entry["count"]:
            shown = entry["studies"] or [f"{k}: {v}" for k, v in entry["details"].items()]
            listed = "; ".join(shown[:5]) + (" ..." if len(shown) > 5 else "")
            say(f"validate: {entry['message']}: {entry['count']} ({listed})")
    return info


def _info(
    data: Any,
    labels: Any,
    predictor: StudyPredictor,
    table: pd.DataFrame,
    ok: pd.DataFrame,
    ref: Reference,
    problems: dict[str, Any],
    recal: dict[str, Any] | None,
    o: ValidateOptions,
) -> dict[str, Any]:
    """The ``validation.json`` dict (the summary is added when the report is written)."""
    model = predictor.bundle.study_model
    return {
        "data": str(data),
        "labels": str(labels),
        "format": o.fmt,
        "bundle": str(predictor.bundle.path),
        "bundle_sha256": predictor.bundle.sha256,
        "study_score": model["score"],
        "classes": ref.classes,
        "n_studies": {s: int((table["status"] == s).sum()) for s in STATUSES},
        "n_positive": {c: int(np.nansum(ok[f"y_{c}"].to_numpy(dtype=np.float64))) for c in ref.classes},
        "bootstrap": {"resamples": o.n_boot, "seed": o.seed, "interval": "percentile 95 %", "unit": "study"},
        "proportion_interval": "Wilson score 95 %",
        "ece_bins": o.n_bins,
        "operating_points": {
            c: {k: model["classes"][c].get(k) for k in ("threshold", "target_sensitivity")} for c in CLASSES
        },
        "fleiss_kappa": ref.kappa,
        "problems": problems,
        "recalibration": recal,
    }


def _write_outputs(out: Path, table: pd.DataFrame, result: pd.DataFrame, info: dict[str, Any]) -> None:
    """``studies.csv``, ``validation.csv``, the report files and ``validation.json``."""
    write_csv(table.reset_index(), out / "studies.csv")
    write_csv(result, out / "validation.csv")
    info["summary"] = write_report(result, table, info, out)
    write_text(
        json.dumps(_finite(info), indent=1, default=json_default, allow_nan=False) + "\n", out / "validation.json"
    )


def _recalibrate(
    bundle: Path,
    model: dict[str, Any],
    ok: pd.DataFrame,
    ref: Reference,
    source: dict[str, Any],
    weights: np.ndarray,
    o: ValidateOptions,
) -> tuple[dict[str, Any], list[dict[str, Any]], pd.DataFrame]:
    """Refit the study model on the ``ok`` studies, write the new bundle, and the cross-validated numbers."""
    scores = pd.DataFrame({c: ok[f"score_{c}"] for c in CLASSES})
    labs = pd.DataFrame({c: ok[f"y_{c}"] for c in CLASSES})
    k, seed, n_bins, dst = max(2, min(o.cv_folds, len(ok))), o.seed, o.n_bins, o.recalibrate
    folds = stratified_folds(labs["any"].to_numpy(dtype=np.float64), k, seed)
    p_cv, flag_cv = cross_validate(model, scores, labs, folds)
    source = {**source, "n_studies": len(ok), "cv_folds": k, "seed": seed}
    new = refit_study_model(model, scores, labs, source)
    sha = write_recalibrated_bundle(bundle, dst, new, source, force=o.force)
    rows = []
    for c in ref.classes:
        y = labs[c].to_numpy(dtype=np.float64)
        known = ~np.isnan(y)
        p = p_cv[c].to_numpy(dtype=np.float64)[known]
        common = {"model": "recalibrated_cv", "class": c, **ranking_metrics(y[known], p, weights[:, known], n_bins)}
        flags = flag_cv[c].to_numpy(dtype=bool)[known]
        rows.append({**common, "point": "operating_point", "threshold": float("nan"), **confusion(y[known], flags)})
    cols = pd.DataFrame(index=ok.index)
    cols["cv_fold"] = folds
    for c in CLASSES:
        cols[f"p_cv_{c}"] = p_cv[c]
        cols[f"flag_cv_{c}"] = flag_cv[c].where(labs[c].notna())
    recal = {
        "bundle": str(dst),
        "bundle_sha256": sha,
        "cv_folds": k,
        "seed": seed,
        "n_studies": len(ok),
        "operating_points": {
            c: {kk: new["classes"][c].get(kk) for kk in ("threshold", "target_sensitivity", "recalibrated")}
            for c in CLASSES
        },
    }
    return recal, rows, cols


def _problems(table: pd.DataFrame, ref: Reference, summary: dict[str, Any], fmt: str) -> dict[str, dict[str, Any]]:
    """Every kind of problem with its message, count and studies (validation.json ``problems``)."""
    gap = "missing reads" if fmt == "cq500" else "missing labels"

    def entry(message: str, keys: list[str], details: dict[str, str] | None = None) -> dict[str, Any]:
        return {"message": message, "count": len(keys), "studies": keys, "details": details or {}}

    by = {s: table.index[table["status"] == s].tolist() for s in STATUSES}
    gaps = [k for k in table.index if table.at[k, "missing"] and table.at[k, "status"] == "ok"]
    loose = summary.get("files_skipped", [])
    unread = table.loc[by["unreadable"], "reason"].to_dict()
    return {
        "unreadable": entry(
            "studies in DATA that could not be read or predicted (not evaluated)", by["unreadable"], unread
        ),
        "not_assessable": entry(
            "studies the models cannot judge (not assessable: no result, not evaluated)",
            by["not_assessable"],
            table.loc[by["not_assessable"], "reason"].to_dict(),
        ),
        "not_in_labels": entry(
            f"studies in DATA without a row in the {'reads' if fmt == 'cq500' else 'labels'} (not evaluated)",
            by["not_in_labels"],
        ),
        "not_in_data": entry("studies in the labels that are not in DATA (not evaluated)", by["not_in_data"]),
        "missing_reads": entry(
            f"evaluated studies with {gap} (left out of those classes only)",
            gaps,
            {k: str(table.at[k, "missing"]) for k in gaps},
        ),
        "files_skipped": {
            "message": "files in DATA that belong to no readable study",
            "count": len(loose),
            "studies": [],
            "details": dict(Counter(f["reason"] for f in loose).most_common(10)),
        },
        "label_rows": {"message": "rows of the labels file dropped or changed", "count": len(ref.problems),
                       "studies": [], "details": {str(i): m for i, m in enumerate(ref.problems)}},
    }  # fmt: skip


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return None
    return obj
