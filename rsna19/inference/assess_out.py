"""What ``predict-study`` writes for a study that is not assessable (:mod:`rsna19.inference.assess`).

The gate runs inside :meth:`rsna19.study.predictor.StudyPredictor.predict_input` (:class:`StudyGate`);
the study's :class:`~rsna19.inference.result.StudyResult` is marked not assessable and its ``studies.json`` entry
gets ``status: "not_assessable"``, the ``assessment`` (reasons and checks) and no prediction, no
``study_result``: never a negative. The report picture says NOT ASSESSABLE with the reasons
over a few of the refused slices; with ``--dicom-out`` the SR carries every finding as SCT *Indeterminate* with
the reasons, and the SC is that picture.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rsna19.inference.assess import GateLimits, NotAssessable, assess_series, study_assessment
from rsna19.inference.dicom_out import write_result_dicom
from rsna19.viz.report import render_not_assessable_report

if TYPE_CHECKING:
    from rsna19.inference.result import StudyResult

log = logging.getLogger(__name__)


class StudyGate:
    """The gate of one study: called by :func:`rsna19.study.predictor.predict_series` for each series.

    Keeps every series' verdict and the volume of the last refused one (for the report picture).
    """

    def __init__(self, limits: GateLimits) -> None:
        self.limits = limits
        self.verdicts: list[dict[str, Any]] = []
        self.refused: tuple[np.ndarray, dict[str, Any]] | None = None

    def __call__(self, volume: np.ndarray, meta: dict[str, Any], refs: list[dict[str, Any]]) -> None:
        verdict = {"series_uid": str(meta["series_uid"])}
        verdict.update(assess_series(volume, meta, self.limits, [str(r["path"]) for r in refs]))
        self.verdicts.append(verdict)
        if not verdict["assessable"]:
            self.refused = (volume, {**meta, "refs": refs})
            raise NotAssessable(verdict)

    def assessment(self) -> dict[str, Any] | None:
        """The study's verdict (:func:`study_assessment`); None when no series reached the gate."""
        return study_assessment(self.verdicts) if self.verdicts else None


def write_not_assessable(
    result: StudyResult,
    entry: dict[str, Any],
    png: Path,
    dicom_out: str | os.PathLike[str] | None,
    identity: dict[str, Any],
) -> None:
    """Write the report picture (and the SR and SC) of a not-assessable study; adds ``report`` and ``dicom`` to its
    ``studies.json`` entry.

    Args:
        result: the study as the predictor left it (:attr:`StudyResult.not_assessable` set, the refused series in
            :attr:`StudyResult.refused`).
        entry: its ``studies.json`` entry (:meth:`StudyResult.entry`).
        png: the report picture to write (``OUT/report_<study>.png``).
        dicom_out: the DICOM output folder, or None.
        identity: the bundle's identity (:meth:`rsna19.study.predictor.StudyPredictor.identity`).
    """
    assert result.refused is not None and result.assessment is not None
    volume, meta = result.refused
    reasons = [r["message"] for r in result.assessment["reasons"]]
    render_not_assessable_report(volume, meta["sop_uids"], meta["positions"], png, result.study_uid, reasons)
    entry["report"] = png.name
    if dicom_out is not None:
        try:
            entry["dicom"] = write_result_dicom(dicom_out, result, identity, png).to_dict(Path(dicom_out))
        except Exception as exc:  # noqa: BLE001 - the DICOM copy is reported as failed; the verdict stands
            log.debug("DICOM outputs failed", exc_info=True)
            entry["dicom"] = {"error": " ".join(str(exc).split()) or type(exc).__name__}
