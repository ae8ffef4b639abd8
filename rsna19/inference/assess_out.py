"""What ``predict-study`` writes for a study that is not assessable (:mod:`rsna19.inference.assess`).

The study's ``studies.json`` entry gets ``status: "not_assessable"``, the ``assessment`` (reasons and checks) and
no prediction, no ``study_result``: never a negative. The report picture says NOT ASSESSABLE with the reasons
over a few of the refused slices; with ``--dicom-out`` the SR carries every finding as SCT *Indeterminate* with
the reasons, and the SC is that picture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rsna19.inference.assess import GateLimits, NotAssessable, assess_series, study_assessment

log = logging.getLogger(__name__)


class StudyGate:
    """The gate of one study: called by :func:`rsna19.inference.study.predict_series` for each series.

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
    entry: dict[str, Any],
    gate: StudyGate,
    png: Path,
    dicom_out: str | os.PathLike[str] | None,
    study: Any,
    identity: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """Fill ``entry`` for a not-assessable study and write its report picture (and its SR and SC).

    Args:
        entry: the study's ``studies.json`` entry (``assessment`` already set).
        gate: the study's gate, holding the refused series.
        png: the report picture to write (``OUT/report_<study>.png``).
        dicom_out: the DICOM output folder, or None.
        study: the study's input (its used series' slice references are the SR's evidence).
        identity: :func:`rsna19.inference.study.bundle_identity`.
        say: the one-line message.
    """
    import pandas as pd

    from rsna19.report import render_not_assessable_report

    assert gate.refused is not None
    volume, meta = gate.refused
    assessment = entry["assessment"]
    reasons = [r["message"] for r in assessment["reasons"]]
    entry["status"] = "not_assessable"
    entry["error"] = None
    entry["not_assessable"] = "; ".join(reasons)
    entry["study_result"] = None
    render_not_assessable_report(volume, meta["sop_uids"], meta["positions"], png, str(entry["study_uid"]), reasons)
    entry["report"] = png.name
    refs = meta.get("refs") or []
    if refs:  # the drift watch sees refused studies too (a site sending blank images is a fact worth watching)
        from rsna19.monitor.facts import series_facts

        entry["input_facts"] = series_facts(str(refs[0]["path"]), volume)
    entry["report_series"] = str(meta["series_uid"])
    if dicom_out is not None:
        from rsna19.inference.dicom_out import write_study_dicom

        try:
            slices = pd.DataFrame({"sop_uid": [str(u) for u in meta["sop_uids"]]})
            refs = [r for s in study.used for r in s.slice_refs() if s.series_uid == str(meta["series_uid"])]
            written = write_study_dicom(dicom_out, refs, slices, None, identity, png, assessment=assessment)
            entry["dicom"] = written.to_dict(Path(dicom_out))
        except Exception as exc:  # noqa: BLE001 - the DICOM copy is reported as failed; the verdict stands
            log.debug("DICOM outputs failed", exc_info=True)
            entry["dicom"] = {"error": " ".join(str(exc).split()) or type(exc).__name__}
    say(f"study {entry['study_uid']}: not assessable: {entry['not_assessable']}")
