"""What :class:`rsna19.study.predictor.StudyPredictor` returns for one study, in memory.

A :class:`StudyResult` holds everything the outputs of ``predict-study`` are made of: the series chosen (and the
reasons for the others), per-slice probabilities of every base model and of the stacker, the study result, the
timings, the top slices and the Grad-CAM map; the not-assessable gate's verdict (:mod:`rsna19.inference.assess`), the
bleed map of the DICOM SEG (:mod:`rsna19.inference.seg_out`) and the input facts of the drift watch
(:mod:`rsna19.monitor.facts`). The writers (:mod:`rsna19.inference.study_outputs`, the DICOM SR / SC
of :mod:`rsna19.inference.dicom_out`) take a :class:`StudyResult`; nothing reads back a file the predictor wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.inference.inputs import StudyInput

#: Columns of ``slices.csv``.
SLICE_COLUMNS: tuple[str, ...] = ("study_uid", "series_uid", "sop_uid", "z", "position", *PROB_COLUMNS)
#: Columns of ``models.csv``: every base model's fold-averaged probabilities, one row per slice and model.
MODEL_COLUMNS: tuple[str, ...] = ("study_uid", "series_uid", "sop_uid", "z", "model", "family", *PROB_COLUMNS)


@dataclass
class SeriesPrediction:
    """One converted and predicted series.

    Attributes:
        series_uid: the series.
        volume: (Z, H, W) int16 HU the models saw (the slabs of a reformatted thin series).
        meta: the conversion's meta of what the models saw (sop_uids, positions, ...).
        per_model: model name → (Z, 6) fold-averaged probabilities.
        stacked: (Z, 6) the stacker's probabilities (slice order).
        stacked_folds: fold → (Z, 6) the stacker's probabilities from that fold's base models alone (what one
            out-of-fold prediction is: the study model's operating points were fitted on such).
        input_meta: the conversion's meta of the input slices when the series was reformatted, else None.
        slab_of: (Z_in,) the slab of each input slice when reformatted, else None.
        seconds: wall time per step (``convert_s``, ``reformat_s``, ``models_s``, ``stack_s``).
        info: how the series was prepared (``reformat``, ``in_plane``), for ``studies.json``.
    """

    series_uid: str
    volume: np.ndarray
    meta: dict[str, Any]
    per_model: dict[str, np.ndarray] = field(default_factory=dict)
    stacked: np.ndarray | None = None
    stacked_folds: dict[int, np.ndarray] = field(default_factory=dict)
    input_meta: dict[str, Any] | None = None
    slab_of: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def out_meta(self) -> dict[str, Any]:
        """The meta of the input slices (every one of them gets a row in ``slices.csv``)."""
        return self.input_meta if self.input_meta is not None else self.meta

    def expand(self, probs: np.ndarray) -> np.ndarray:
        """(Z, 6) values of what the models saw → (Z_in, 6) values of the input slices."""
        return probs if self.slab_of is None else np.asarray(probs)[self.slab_of]

    def frame(self, study_uid: str, probs: np.ndarray, **columns: Any) -> pd.DataFrame:
        """One row an input slice: ``study_uid, series_uid, sop_uid, z``, ``columns``, then the (Z, 6) ``probs``."""
        meta = self.out_meta
        df = pd.DataFrame(
            {
                "study_uid": study_uid,
                "series_uid": self.series_uid,
                "sop_uid": [str(s) for s in meta["sop_uids"]],
                "z": np.arange(len(meta["sop_uids"])),
                **columns,
            }
        )
        df[list(PROB_COLUMNS)] = self.expand(probs)
        return df


@dataclass
class StudyResult:
    """One study as the predictor saw it and what the models said.

    Attributes:
        study: the study's series: ``used`` the predicted ones, ``skipped`` the others with their reasons (the
            ranking's verdict in ``selection``), ``skipped_files`` the files left out with theirs.
        root: the folder the input was read from (paths in :meth:`entry` are shown relative to it).
        ranking: the series ranking, best first (``series_uid, description, rank, score, used, reason``).
        series: the predicted series (volumes, per-model and stacked probabilities, timings).
        failed: the series whose conversion or prediction failed, with ``reason``.
        families: model name → family, for ``models.csv``.
        prediction: :func:`rsna19.viz.report.summarise_study` of the stacked slices (maxima, flags, ``top_slices``).
        study_result: the calibrated study result (:func:`rsna19.core.calibration.apply_study_model`); None without a
            study model in the bundle.
        cam: (H, W) float32 Grad-CAM map of ``any`` over the top slice of :attr:`report_series`, in the frame of
            its volume; None when not drawn.
        cam_note: why there is no map although one was asked for.
        assessment: the not-assessable gate's verdict of the study (:func:`rsna19.inference.assess.study_assessment`:
            ``assessable``, ``reasons``, ``checks``, per series); None when no series reached the gate.
        refused: the last series the gate refused: its (Z, H, W) HU volume and conversion meta (with ``refs``, its
            slice references), for the not-assessable report; None when none was refused.
        not_assessable: the reasons, joined, when the study is not assessable (every series refused: no model ran,
            no result); else None.
        bleed: the bleed map of the report series (:class:`rsna19.inference.seg_out.BleedMap`, in the frame the
            models saw) for the DICOM SEG and the report picture; None when not asked for or not drawn.
        bleed_note: why there is no bleed map although one was asked for.
        input_facts: the drift watch's input facts (:func:`rsna19.monitor.facts.study_input_facts`) of the report
            series, or of the refused series of a not-assessable study; None when no series was converted.
        sources: the source headers of the predicted slices (:class:`rsna19.inference.dicom_out.SourceSlices`),
            read while the input files existed, when DICOM outputs were asked for; else None.
        error: why the study could not be predicted; None when it was.
        seconds: wall time of the whole study (``total_s``).
        top_k, threshold: the report's montage size and decision threshold.
    """

    study: StudyInput
    root: Path | None = None
    ranking: list[dict[str, Any]] = field(default_factory=list)
    series: list[SeriesPrediction] = field(default_factory=list)
    failed: list[dict[str, Any]] | None = None
    families: dict[str, str] = field(default_factory=dict)
    prediction: dict[str, Any] | None = None
    study_result: dict[str, Any] | None = None
    cam: np.ndarray | None = None
    cam_note: str | None = None
    assessment: dict[str, Any] | None = None
    refused: tuple[np.ndarray, dict[str, Any]] | None = None
    not_assessable: str | None = None
    bleed: Any = None
    bleed_note: str | None = None
    input_facts: dict[str, Any] | None = None
    sources: Any = None
    error: str | None = None
    seconds: float = 0.0
    top_k: int = 6
    threshold: float = 0.5

    @property
    def study_uid(self) -> str:
        """The StudyInstanceUID."""
        return self.study.study_uid

    @property
    def top_slices(self) -> list[dict[str, Any]]:
        """The most suspicious slices, ``p_any`` descending (``sop_uid, z, position, p_any, series_uid``)."""
        return list(self.prediction["top_slices"]) if self.prediction else []

    @property
    def ok(self) -> bool:
        """True when the study was predicted."""
        return self.error is None and bool(self.series)

    @property
    def assessable(self) -> bool:
        """False when the gate refused every series of the study (a not-assessable study has no result)."""
        return self.not_assessable is None

    def slices(self) -> pd.DataFrame:
        """``slices.csv`` rows of the study (:data:`SLICE_COLUMNS`): the stacked probabilities of every slice."""
        if not self.series:
            return pd.DataFrame(columns=list(SLICE_COLUMNS))
        parts = [
            sp.frame(self.study_uid, sp.stacked, position=np.asarray(sp.out_meta["positions"], dtype=np.float64))
            for sp in self.series
        ]
        return pd.concat(parts, ignore_index=True)[list(SLICE_COLUMNS)]

    def fold_slices(self) -> list[pd.DataFrame]:
        """Per bundled fold (present in every series), the study's slices as that fold's models alone predict them
        (``study_uid``, ``sop_uid`` and the ``p_<class>`` columns); empty without per-fold predictions."""
        folds = sorted(set.intersection(*(set(sp.stacked_folds) for sp in self.series))) if self.series else []
        return [
            pd.concat([sp.frame(self.study_uid, sp.stacked_folds[k]) for sp in self.series], ignore_index=True)
            for k in folds
        ]

    def models(self) -> pd.DataFrame:
        """``models.csv`` rows (:data:`MODEL_COLUMNS`): each base model's probabilities before the stacker."""
        parts = [
            sp.frame(self.study_uid, probs, model=name, family=self.families.get(name, ""))
            for sp in self.series
            for name, probs in sp.per_model.items()
        ]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(MODEL_COLUMNS))

    @property
    def report_series(self) -> SeriesPrediction:
        """The series with the most suspicious slice (highest stacked ``any``): the one the report shows."""
        return max(self.series, key=lambda sp: float(sp.stacked[:, -1].max()))

    def slice_refs(self) -> list[dict[str, Any]]:
        """The slice references (``path``, ``frame``, ``sop_uid``) of every predicted series (of the refused series
        of a not-assessable study)."""
        predicted = {sp.series_uid for sp in self.series}
        if not predicted and self.refused is not None:
            predicted = {str(self.refused[1]["series_uid"])}
        return [r for s in self.study.used if s.series_uid in predicted for r in s.slice_refs()]

    def entry(self) -> dict[str, Any]:
        """The study's entry of ``studies.json`` (the writers add ``report`` and ``dicom``)."""
        entry: dict[str, Any] = {**self.study.to_dict(self.root), "status": "ok", "error": None}
        entry["series_ranking"] = self.ranking
        done = {sp.series_uid: sp for sp in self.series}
        for d in entry["series_used"]:
            if d["series_uid"] in done:
                d.update(done[d["series_uid"]].info, seconds=done[d["series_uid"]].seconds)
        if self.failed is not None:
            entry["series_failed"] = self.failed
        entry["assessment"] = self.assessment
        if self.error is not None:
            entry.update(status="error", error=self.error)
        elif self.not_assessable is not None:
            entry.update(status="not_assessable", not_assessable=self.not_assessable, study_result=None)
            if self.refused is not None:
                entry["report_series"] = str(self.refused[1]["series_uid"])
        elif self.series:
            entry.update(self._prediction_entry())
        if self.input_facts is not None:
            entry["input_facts"] = self.input_facts
        entry["seconds"] = round(self.seconds, 3)
        return entry

    def _prediction_entry(self) -> dict[str, Any]:
        """The prediction part of :meth:`entry`: maxima, result series, calibrated result, per-model maxima."""
        stacked = {sp.series_uid: sp.stacked for sp in self.series}
        per_model = np.max([[sp.per_model[m].max(axis=0) for m in self.series[0].per_model] for sp in self.series], 0)
        out: dict[str, Any] = {
            "prediction": self.prediction,
            "result_series": {
                c: max(stacked, key=lambda u, i=i: float(stacked[u][:, i].max())) for i, c in enumerate(CLASSES)
            },
            "study_result": self.study_result,
            "per_model_max": {
                m: {c: round(float(v), 6) for c, v in zip(CLASSES, row)}
                for m, row in zip(self.series[0].per_model, per_model)
            },
            "report_series": self.report_series.series_uid,
        }
        if self.cam_note:
            out["report_note"] = self.cam_note
        return out
