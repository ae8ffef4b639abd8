"""``rsna19 predict-study``: a folder or zip of DICOM files → per-slice and per-study predictions and reports.

:func:`predict_studies` reads the input once (:meth:`StudyPredictor.reading
<rsna19.study.predictor.StudyPredictor.reading>`: every study, series and skipped file with its reason),
predicts each study in memory (:meth:`~rsna19.study.predictor.StudyPredictor.predict_input`) and hands
each :class:`~rsna19.inference.result.StudyResult` to the writers here, which never read back what was written.

Outputs in ``OUT``: ``slices.csv`` (study, series, sop_uid, z, position, six stacked probabilities), ``models.csv``
(the same per base model, with its family: what each model said before the stacker), ``studies.json`` (per
study: max probabilities, top slices, series used and skipped with reasons, or the error that stopped it) and
``report_<study>.png`` (:func:`rsna19.viz.report.render_study_report`, with a Grad-CAM map of ``any`` on the top slice
where a 2D model allows it). A study that fails is reported with its message; the others are still processed.

With a study model in the bundle (:mod:`rsna19.core.calibration`), each study also gets ``study_result`` (calibrated
probabilities, operating points, flags), drawn on the report; ``dicom_out`` adds a DICOM SR and Secondary Capture
per study (:mod:`rsna19.inference.dicom_out`) and, for a positive study whose bleed map was drawn (the predictor's
``seg`` option), a DICOM SEG (:mod:`rsna19.inference.seg_out`). A study the not-assessable gate refused
(:mod:`rsna19.inference.assess`) gets ``status: "not_assessable"`` with the reasons, a report picture saying so and
an SR of *Indeterminate* findings (:mod:`rsna19.inference.assess_out`). ``studies.json`` records the bundle's
SHA-256 and version.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import write_csv, write_text
from rsna19.core.jsonable import json_default
from rsna19.inference.assess_out import write_not_assessable
from rsna19.inference.dicom_out import write_result_dicom
from rsna19.inference.result import MODEL_COLUMNS, SLICE_COLUMNS, StudyResult
from rsna19.inference.seg_out import study_seg
from rsna19.study.predictor import StudyPredictor, StudySource, message
from rsna19.viz.report import render_study_report

__all__ = ["MODEL_COLUMNS", "SLICE_COLUMNS", "StudyBatch", "predict_studies", "report_name", "write_study_outputs"]

log = logging.getLogger(__name__)


def report_name(study_uid: str) -> str:
    """``report_<study>.png`` with characters that are unsafe in file names replaced by ``_``."""
    return f"report_{re.sub(r'[^A-Za-z0-9._-]', '_', study_uid)}.png"


def write_report(result: StudyResult, png: Path) -> None:
    """Draw the report of a predicted study (its :attr:`~StudyResult.report_series`) into ``png``, atomically; the
    bleed map of the top slice in red when the study has one (:attr:`StudyResult.bleed`)."""
    best = result.report_series
    top = int(np.argmax(best.stacked[:, -1]))
    render_study_report(
        best.volume,
        np.clip(best.stacked, 0.0, 1.0),
        best.meta["sop_uids"],
        best.meta["positions"],
        png,
        result.study_uid,
        top_k=result.top_k,
        cam=result.cam,
        threshold=result.threshold,
        study_result=result.study_result,
        seg_mask=result.bleed.overlay(top) if result.bleed is not None else None,
    )


def write_study_outputs(
    result: StudyResult, out: Path, identity: dict[str, Any], dicom_out: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Write the report picture (and the DICOM SR / SC / SEG) of one study; returns its ``studies.json`` entry.

    Args:
        result: the study as predicted.
        out: folder of the report picture.
        identity: the bundle's identity (:meth:`StudyPredictor.identity`), written into the SR and SEG.
        dicom_out: folder of the SR, SC and SEG; None writes none. The SEG is written when the predictor drew a
            bleed map (``seg`` option: :attr:`StudyResult.bleed`, or the reason in ``seg_note``).
    """
    entry = result.entry()
    png = out / report_name(result.study_uid)
    if result.error is None and not result.assessable:
        write_not_assessable(result, entry, png, dicom_out, identity)
        return entry
    if not result.ok:
        return entry
    write_report(result, png)
    entry["report"] = png.name
    if dicom_out is not None:
        entry["dicom"] = _study_dicom(dicom_out, result, identity, png)
        if (result.bleed is not None or result.bleed_note is not None) and "error" not in entry["dicom"]:
            best = result.report_series
            entry["dicom"].update(study_seg(dicom_out, result.study, best, result.bleed, result.bleed_note, identity))
    return entry


def _study_dicom(out: str | os.PathLike[str], result: StudyResult, identity: dict[str, Any], png: Path) -> dict:
    """Write the SR and SC of one study; returns ``studies.json``'s ``dicom`` entry (with ``error`` on failure)."""
    if result.study_result is None:
        return {"error": "the bundle has no study model (re-export it): no calibrated result to report"}
    try:
        return write_result_dicom(out, result, identity, png).to_dict(Path(out))
    except Exception as exc:  # noqa: BLE001 - the DICOM copy is reported as failed; the prediction stands
        log.debug("DICOM outputs failed", exc_info=True)
        return {"error": message(exc)}


@dataclass
class StudyBatch:
    """What :func:`predict_studies` wrote, in memory.

    Attributes:
        summary: the ``studies.json`` dict.
        slices: the ``slices.csv`` frame (:data:`SLICE_COLUMNS`) of every predicted study.
        results: each study's result, volumes and CAM maps dropped once written (``keep_results`` keeps them).
    """

    summary: dict[str, Any]
    slices: pd.DataFrame
    results: list[StudyResult] = field(default_factory=list)


def predict_studies(
    path: StudySource,
    predictor: StudyPredictor,
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    dicom_out: str | os.PathLike[str] | None = None,
    say: Callable[[str], None] = print,
    keep_results: bool = False,
) -> StudyBatch:
    """Predict every study in a folder or zip and write ``slices.csv``, ``models.csv``, ``studies.json`` and the
    reports.

    Args:
        path: a folder (searched recursively; several studies, series and stray files are fine), a zip, a list of
            files or pydicom datasets.
        predictor: the loaded bundle and its options (:meth:`StudyPredictor.load`).
        out: output folder (created).
        workers: processes reading the DICOM headers.
        dicom_out: folder for each study's DICOM SR and Secondary Capture (:mod:`rsna19.inference.dicom_out`);
            None writes none.
        say: where the one-line-per-study messages go.
        keep_results: keep each study's volumes and CAM map in :attr:`StudyBatch.results` (memory grows with the
            number of studies); by default they are dropped once the study's outputs are written.

    Raises:
        UserError: ``path`` missing or an unsafe zip (errors of single studies are reported in ``studies.json``).
    """
    t_start = time.perf_counter()
    if predictor.geometry["assumed"]:
        say(f"predict-study: {predictor.geometry['note']}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = predictor.identity()
    results, entries, frames, model_frames = [], [], [], []
    with predictor.reading(path, workers=workers) as inputs:
        if not inputs.studies:
            say(f"{inputs.source}: no DICOM study found ({len(inputs.skipped_files)} file(s) skipped)")
        for study in inputs.studies.values():
            result = predictor.predict_input(study, inputs.root)
            entries.append(write_study_outputs(result, out, identity, dicom_out))
            say(_study_line(result))
            frames.append(result.slices())
            model_frames.append(result.models())
            if not keep_results:
                result.series, result.cam, result.sources = [], None, None
                result.refused, result.bleed = None, None
            results.append(result)
        files_skipped = inputs.to_dict()["files_skipped"]
    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SLICE_COLUMNS))
    write_csv(slices[list(SLICE_COLUMNS)], out / "slices.csv")
    per_model = pd.concat(model_frames, ignore_index=True) if model_frames else pd.DataFrame(columns=MODEL_COLUMNS)
    write_csv(per_model[list(MODEL_COLUMNS)], out / "models.csv")
    summary = _summary(predictor, path, entries, files_skipped, time.perf_counter() - t_start)
    write_text(json.dumps(summary, indent=1, default=json_default) + "\n", out / "studies.json")
    return StudyBatch(summary, slices, results)


def _summary(
    predictor: StudyPredictor, path: Any, entries: list[dict[str, Any]], files_skipped: list[dict], seconds: float
) -> dict[str, Any]:
    """The ``studies.json`` dict."""
    bundle, o = predictor.bundle, predictor.options
    return {
        "source": str(path),
        "bundle": str(bundle.path),
        **predictor.identity(),
        "study_model": predictor.operating_points(),
        "device": str(bundle.device),
        "folds": bundle.folds,
        "tta": bundle.tta,
        "training_slices": predictor.geometry,
        "series_policy": {"all_series": o.all_series, "include_contrast": o.include_contrast},
        "n_studies": len(entries),
        "n_ok": sum(s["status"] == "ok" for s in entries),
        "n_errors": sum(s["status"] == "error" for s in entries),
        "n_not_assessable": sum(s["status"] == "not_assessable" for s in entries),
        "bundle_load_s": round(predictor.load_s, 3),
        "total_s": round(seconds + predictor.load_s, 3),
        "files_skipped": files_skipped,
        "studies": entries,
    }


def _study_line(result: StudyResult) -> str:
    """The one-line message of a study."""
    if result.error is None and not result.assessable:
        return f"study {result.study_uid}: not assessable: {result.not_assessable}"
    if not result.ok:
        return f"study {result.study_uid}: error: {result.error}"
    p, positive = result.prediction["max_probability"], result.prediction["positive_classes"]
    n = sum(len(sp.out_meta["sop_uids"]) for sp in result.series)
    return (
        f"study {result.study_uid}: {n} slices in {len(result.series)} series ({len(result.study.skipped)} skipped), "
        f"max p_any {p['any']:.3f}" + (f" ({', '.join(positive)})" if positive else "") + f", {result.seconds:.1f} s"
    )
