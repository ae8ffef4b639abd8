"""The study predictor: load a bundle once, then ``predict(study) -> StudyResult`` in memory.

:class:`StudyPredictor` is to ``predict-study`` what nnU-Net's ``nnUNetPredictor.predict_single_npy_array`` is to its
file API: the bundle's networks are rebuilt once through the training builders
(:func:`rsna19.study.bundle.load_bundle`), and each study, given as a folder, a zip, a list of files, pydicom
datasets or an already-read :class:`~rsna19.inference.inputs.StudyInput`, goes through

0. series ranking (:mod:`rsna19.inference.series_select`, :func:`apply_selection`): the best series is predicted
   (``all_series``: every usable one), every other gets its reason;
1. :func:`rsna19.conversion.series.convert_series` with the bundle's conversion options, i.e. exactly the training
   conversion, into a private scratch cache, then the not-assessable gate (:mod:`rsna19.inference.assess`: a
   series the models cannot judge stops here; a study whose every series is refused gets a result marked not
   assessable, with the reasons, and no model runs); a series much thinner than the training slices is averaged
   into slabs of the training spacing (:mod:`rsna19.inference.reformat`) and its slices later take their slab's
   probabilities;
2. every base model (:meth:`rsna19.engine.predictor.Predictor.predict_cache`: the family's task, input mapping,
   TTA and AMP rule), averaged over the bundled folds; a sequence model gets its embeddings from its bundled image
   model, in memory;
3. the level-2 features (:func:`rsna19.stacking.features.build_features`) through the bundled stacker; then the
   calibrated study result (:mod:`rsna19.core.calibration`); with ``seg``, the bleed map of a positive study
   (:mod:`rsna19.inference.seg_out`, drawn on the report instead of the Grad-CAM map), else a Grad-CAM map of
   ``any`` on the top slice; and the drift watch's input facts (:mod:`rsna19.monitor.facts`).

The :class:`~rsna19.inference.result.StudyResult` holds all of it; the writers of :mod:`rsna19.study.batch`
and :mod:`rsna19.inference.dicom_out` turn it into files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom

from rsna19.conversion.series import convert_series, write_series
from rsna19.core.calibration import apply_study_model
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.inference.assess import NotAssessable, gate_limits
from rsna19.inference.assess_out import StudyGate
from rsna19.inference.dicom_out import read_source_slices
from rsna19.inference.gradcam import cam_target, grad_cam
from rsna19.inference.inputs import SeriesInput, StudyInput, StudyInputs, collect_studies, group_files
from rsna19.inference.reformat import needs_reformat, reformat_slabs
from rsna19.inference.result import SeriesPrediction, StudyResult
from rsna19.inference.seg_out import study_bleed_map
from rsna19.inference.series_select import DEFAULT_TRAINING_SPACING_MM, SelectionPolicy, rank_series
from rsna19.monitor.facts import series_facts, study_input_facts
from rsna19.stacking.features import Level2Data, build_features
from rsna19.study.bundle import Bundle, load_bundle
from rsna19.viz.report import summarise_study

log = logging.getLogger(__name__)

#: What :meth:`StudyPredictor.predict` accepts: a folder, zip or file; a list of files; pydicom datasets; a study
#: or series already read by :func:`rsna19.inference.inputs.collect_studies`.
StudySource = (
    str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sequence[pydicom.Dataset] | StudyInput | SeriesInput
)


@dataclass(frozen=True)
class StudyOptions:
    """How studies are predicted and reported.

    Attributes:
        top_k: slices in the report's montage and in ``top_slices``.
        threshold: decision threshold of the uncalibrated ``positive`` flags and of the report.
        cam: draw a Grad-CAM map of ``any`` over the top slice.
        all_series: predict every usable series of a study, not only the best ranked one.
        include_contrast: let contrast / CTA / perfusion series be predicted.
        source_headers: keep the source headers of the predicted slices in the result (what the DICOM SR and
            SC are built from), read while the input files exist.
        seg: draw the bleed map of a positive study (:mod:`rsna19.inference.seg_out`) for its DICOM SEG and the
            report picture (instead of the Grad-CAM map).
    """

    top_k: int = 6
    threshold: float = 0.5
    cam: bool = True
    all_series: bool = False
    include_contrast: bool = False
    source_headers: bool = False
    seg: bool = False


class StudyPredictor:
    """A loaded bundle that predicts studies in memory.

    Args:
        bundle: a :class:`rsna19.study.bundle.Bundle` (see :meth:`load` for a bundle folder).
        options: how studies are predicted and reported.
        load_s: seconds the bundle took to load (recorded in ``studies.json``).
    """

    def __init__(self, bundle: Bundle, options: StudyOptions = StudyOptions(), load_s: float = 0.0) -> None:
        self.bundle = bundle
        self.options = options
        self.load_s = load_s
        self.geometry = training_slices(bundle)
        self.limits = gate_limits(bundle)
        self.policy = SelectionPolicy(
            training_spacing_mm=self.geometry["slice_spacing_mm"],
            all_series=options.all_series,
            include_contrast=options.include_contrast,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        folds: list[int] | None = None,
        tta: list[str] | None = None,
        options: StudyOptions = StudyOptions(),
    ) -> StudyPredictor:
        """Load the bundle ``path`` (:func:`rsna19.study.bundle.load_bundle`: ``device``, ``folds``, ``tta``) once."""
        t0 = time.perf_counter()
        bundle = load_bundle(path, device=device, folds=folds, tta=tta)
        return cls(bundle, options, load_s=time.perf_counter() - t0)

    def predict(self, study: StudySource) -> StudyResult:
        """Predict one study in memory.

        Args:
            study: a folder, zip or file; a list of files; pydicom datasets; a :class:`StudyInput` or
                :class:`SeriesInput` already read. The input must hold exactly one study.

        Returns:
            The result; a study that cannot be predicted has ``error`` set (nothing is raised for it).

        Raises:
            UserError: the input is missing, an unsafe zip, or holds no study or several.
        """
        if isinstance(study, StudyInput | SeriesInput):
            return self.predict_input(_as_study(study))
        with self.reading(study) as inputs:
            if len(inputs.studies) != 1:
                raise UserError(
                    f"{inputs.source}: {len(inputs.studies)} studies found, predict() takes one "
                    f"({len(inputs.skipped_files)} file(s) skipped); use reading() and predict_input() for several"
                )
            return self.predict_input(next(iter(inputs.studies.values())), inputs.root)

    @contextlib.contextmanager
    def reading(self, source: StudySource, workers: int = 1) -> Iterator[StudyInputs]:
        """Find the studies of ``source`` (:func:`rsna19.inference.inputs.collect_studies`); the files (a zip's
        extraction, written datasets) exist until the context ends.

        Args:
            source: a folder, zip or file; a list of files; pydicom datasets.
            workers: processes reading the DICOM headers.
        """
        with quiet_pydicom(), tempfile.TemporaryDirectory(prefix="rsna19-input-") as scratch:
            scratch = Path(scratch)
            if isinstance(source, str | os.PathLike):
                yield collect_studies(source, scratch, workers=workers)
                return
            items = list(source)
            if items and all(isinstance(d, pydicom.Dataset) for d in items):
                files = _write_datasets(items, scratch)
                yield group_files(files, scratch, scratch, workers=workers)
                return
            files = [Path(p).resolve() for p in items]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{missing[0]}: no such file ({len(missing)} of {len(files)} missing)")
            root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else scratch
            yield group_files(files, root, root, workers=workers)

    def predict_input(self, study: StudyInput, root: Path | None = None) -> StudyResult:
        """Rank, convert and predict the series of a study already read; never raises for the study's content.

        Args:
            study: the study (its ``used`` / ``skipped`` series are updated with the ranking's choice).
            root: the folder its files are shown relative to in :meth:`StudyResult.entry`.
        """
        t0 = time.perf_counter()
        o = self.options
        result = StudyResult(study, root, families=self.bundle.families, top_k=o.top_k, threshold=o.threshold)
        result.ranking = apply_selection(study, self.policy)
        with quiet_pydicom(), tempfile.TemporaryDirectory(prefix="rsna19-study-") as cache:
            try:
                self._predict_series(result, Path(cache))
                if o.source_headers:
                    result.sources = read_source_slices(result.slice_refs())
            except Exception as exc:  # noqa: BLE001 - a bad study is reported in its result
                result.error = message(exc)
                log.debug("study %s failed", study.study_uid, exc_info=True)
        result.seconds = time.perf_counter() - t0
        return result

    def _predict_series(self, result: StudyResult, cache: Path) -> None:
        """Predict every chosen series of ``result.study`` into ``result``, then the study-level values."""
        study = result.study
        if study.problem:
            raise UserError(study.problem)
        result.failed = []
        gate = StudyGate(self.limits)  # the not-assessable gate (rsna19/inference/assess.py)
        for s in study.used:
            try:
                ps = s.facts.pixel_spacing_mm if s.facts is not None else None
                sp = predict_series(self.bundle, s.slice_refs(), cache, self.policy.training_spacing_mm, ps, gate=gate)
                result.series.append(sp)
            except NotAssessable:
                pass  # recorded by the gate; the study is not assessable when no series is
            except Exception as exc:  # noqa: BLE001 - one bad series must not lose the study's others
                result.failed.append({**s.to_dict(), "reason": f"conversion/prediction failed: {message(exc)}"})
        result.assessment = gate.assessment()
        if not result.series and gate.refused is not None:
            volume, meta = gate.refused
            result.refused = gate.refused
            result.not_assessable = "; ".join(r["message"] for r in result.assessment["reasons"])
            refs = meta.get("refs") or []
            if refs:  # the drift watch sees refused studies too (a site sending blank images is a fact worth watching)
                result.input_facts = series_facts(str(refs[0]["path"]), volume)
            return
        if not result.series:
            raise UserError(
                f"study {study.study_uid}: no series could be predicted ("
                + "; ".join(f"{f['series_uid']}: {f['reason']}" for f in result.failed)
                + ")"
            )
        slices = result.slices()
        result.prediction = summarise_study(slices, top_k=self.options.top_k, threshold=self.options.threshold)
        sm = self.bundle.study_model
        result.study_result = apply_study_model(sm, slices, result.fold_slices()) if sm is not None else None
        best = result.report_series
        result.input_facts = study_input_facts(study, best)  # for the drift watch (rsna19/monitor)
        if self.options.seg:  # the bleed map of the SEG, also drawn on the report picture
            result.bleed, result.bleed_note = study_bleed_map(
                self.bundle, cache, best, _rows(best.meta), result.study_result
            )
        if self.options.cam and result.bleed is None:
            try:
                z_top = int(np.argmax(best.stacked[:, -1]))
                result.cam = top_slice_cam(self.bundle, cache, _rows(best.meta), z_top, best.volume.shape[1:])
            except Exception as exc:  # noqa: BLE001 - the picture is optional, the prediction is not
                result.cam_note = f"no Grad-CAM: {message(exc)}"

    def identity(self) -> dict[str, Any]:
        """What identifies the bundle in ``studies.json`` and the SR: the SHA-256 of ``bundle.json`` (which lists
        the checksum of every other file), the bundle format version and the rsna19 version that wrote it."""
        b = self.bundle
        return {
            "bundle_sha256": b.sha256,
            "bundle_version": b.manifest.get("bundle_version"),
            "rsna19_version": b.manifest.get("versions", {}).get("rsna19"),
        }

    def operating_points(self) -> dict[str, Any] | None:
        """The study model's score, method and per-class thresholds (``studies.json``'s ``study_model``), or None."""
        model = self.bundle.study_model
        if model is None:
            return None
        keys = ("target_sensitivity", "threshold", "score_threshold", "slice_threshold", "oof_sensitivity")
        return {
            "score": model["score"],
            "method": model["method"],
            "bundle_sha256": self.bundle.sha256,
            "classes": {c: {k: e.get(k) for k in (*keys, "oof_specificity")} for c, e in model["classes"].items()},
        }


def _as_study(item: StudyInput | SeriesInput) -> StudyInput:
    """A study of its own for a lone series."""
    if isinstance(item, StudyInput):
        return item
    study = StudyInput(item.study_uid, item.patient_id)
    (study.used if item.used else study.skipped).append(item)
    return study


def _write_datasets(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    """Write pydicom datasets as files (the converter reads files), each under a name of its own."""
    files = []
    for i, ds in enumerate(datasets):
        path = folder / f"ds{i:06d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def _rows(meta: dict[str, Any]) -> pd.DataFrame:
    """Cache-index rows (docs/contracts.md) of one converted series."""
    n = len(meta["sop_uids"])
    return pd.DataFrame(
        {
            "sop_uid": [str(s) for s in meta["sop_uids"]],
            "series_uid": str(meta["series_uid"]),
            "study_uid": str(meta["study_uid"]),
            "patient_id": str(meta["patient_id"]),
            "split": "test",
            "z": np.arange(n, dtype=np.int64),
            "n_slices": n,
        }
    )


def fold_probabilities(bundle: Bundle, cache: Path, rows: pd.DataFrame) -> dict[str, dict[int, np.ndarray]]:
    """Each bundled model's probabilities for ``rows`` of ``cache`` from each of its folds.

    Returns:
        model name → fold → (N, 6) float32, in ``rows`` order.
    """
    return {p.name: p.predict_cache(cache, rows, per_member=True) for p in bundle.models}


def _fold_mean(folds: dict[int, np.ndarray]) -> np.ndarray:
    """The fold average, as :meth:`rsna19.engine.predictor.Predictor.predict_cache` takes it."""
    return np.mean(np.stack(list(folds.values())), axis=0, dtype=np.float64).astype(np.float32)


def stack_probabilities(
    bundle: Bundle,
    rows: pd.DataFrame,
    per_model: dict[str, np.ndarray],
    per_fold: dict[str, dict[int, np.ndarray]] | None = None,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The bundled stacker's (N, 6) probabilities for ``rows`` (one or more series), in ``rows`` order, and the same
    from each fold's base models alone.

    Args:
        per_model: model name → (N, 6) fold-averaged probabilities.
        per_fold: model name → fold → (N, 6). Each fold's level-2 features are built once and serve twice: when the
            stacker stacks each base fold separately (bundles with ``test_per_fold``) its predictions of them are
            averaged into the first result, and each alone is the second (what one out-of-fold prediction is: the
            study score the operating points were fitted on, :func:`rsna19.core.calibration.apply_study_model`).

    Returns:
        ``(stacked, fold → stacked)``; the second is empty without ``per_fold``.
    """
    st = bundle.stacker

    order: list[pd.Series] = []  # the feature rows' sop_uid order (the same for every set of these rows)

    def level2(probs: dict[str, np.ndarray]) -> Level2Data:
        preds = {}
        for m in st.models:
            df = rows[["sop_uid", "series_uid", "study_uid", "patient_id"]].copy()
            df["slice_idx"] = rows["z"].to_numpy()
            df[list(PROB_COLUMNS)] = probs[m]
            preds[m] = df
        features = build_features(preds, st.offsets, st.windows)
        order.append(features["sop_uid"])
        return Level2Data.from_features(features, st.models)

    folds = sorted(set.intersection(*(set(per_fold[m]) for m in st.models))) if per_fold else []
    fold_sets = {k: level2({m: per_fold[m][k] for m in st.models}) for k in folds} if per_fold else {}
    sets = list(fold_sets.values()) if st.per_fold and fold_sets else [level2(per_model)]
    where = pd.Index(order[0]).get_indexer(rows["sop_uid"])

    def ordered(stacked: np.ndarray) -> np.ndarray:
        return np.asarray(stacked, dtype=np.float64)[where]

    return ordered(st.predict(sets)), {k: ordered(st.predict(d)) for k, d in fold_sets.items()}


def top_slice_cam(bundle: Bundle, cache: Path, rows: pd.DataFrame, z: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Grad-CAM of ``any`` on slice ``z`` from the first single-slice-input (channels layout) model, or None.

    The network sees the slice resized to ``data.resize`` and centre-cropped to ``data.crop``; the map is put back
    in that frame (zeros outside the crop) so that stretching it over the slice lines it up.
    """
    models = sorted(
        (p for p in bundle.models if p.cfg.data.layout == "channels"),
        key=lambda p: p.cfg.data.slices,  # a plain 2D model first: one backbone pass, the clearest map
    )
    if not models:
        return None
    predictor = models[0]
    member = predictor.members[0]
    target = cam_target(member.net)
    if target is None:
        return None
    x = predictor.input_image(member, cache, rows, z)
    cam = grad_cam(member.net, x, CLASSES.index("any"), target_layer=target)
    frame = predictor.cfg.data.resize or shape[0]
    full = np.zeros((frame, frame), dtype=np.float32)
    h, w = cam.shape
    y0, x0 = max((frame - h) // 2, 0), max((frame - w) // 2, 0)
    full[y0 : y0 + h, x0 : x0 + w] = cam[: frame - y0, : frame - x0]
    return full


def in_plane_spacing(bundle: Bundle, pixel_spacing_mm: float) -> tuple[float | None, str]:
    """The in-plane spacing to convert a series at, and why.

    A bundle converted at a fixed spacing (``convert.spacing``) resamples every series to it, which fixes the field
    of view of the ``crop``-pixel window: nothing more to do. A bundle converted at the scanner's spacing saw the
    pixel sizes of its training series; a series outside their range (5th–95th percentile, ±10 %) is resampled to
    their median, so the crop window covers the head as in training.
    """
    c = bundle.convert
    if c.get("spacing"):
        return float(c["spacing"]), f"bundle converts at {float(c['spacing']):g} mm"
    geo = bundle.training_geometry or {}
    lo, hi = geo.get("pixel_spacing_range_mm") or (None, None)
    if lo is None or hi is None:
        return None, "scanner spacing kept (the bundle records no training pixel spacing)"
    if 0.9 * lo <= pixel_spacing_mm <= 1.1 * hi:
        return None, f"scanner spacing {pixel_spacing_mm:g} mm within the training range {lo:g}–{hi:g} mm"
    target = float(geo["pixel_spacing_mm"])
    return target, f"scanner spacing {pixel_spacing_mm:g} mm outside the training {lo:g}–{hi:g} mm: resampled"


def predict_series(
    bundle: Bundle,
    slices: Sequence[str | os.PathLike[str] | Mapping[str, Any]],
    cache: Path,
    training_spacing_mm: float | None = None,
    pixel_spacing_mm: float | None = None,
    gate: Callable[[np.ndarray, dict[str, Any], list[dict[str, Any]]], None] | None = None,
) -> SeriesPrediction:
    """Convert one series like the training cache, predict it with every model and the stacker.

    Args:
        bundle: the loaded bundle.
        slices: the series' slices: file paths (every slice a file holds: all frames of a multi-frame file), or the
            slice references input collection kept (:meth:`rsna19.inference.inputs.SeriesInput.slice_refs`:
            ``path``, ``frame``, ``sop_uid``), which convert exactly those slices, frames included.
        cache: scratch conversion cache.
        training_spacing_mm: slice spacing of the training series; a much thinner series is averaged into slabs
            of it first (:mod:`rsna19.inference.reformat`). None: never reformat.
        pixel_spacing_mm: the series' in-plane pixel spacing (from its headers), for :func:`in_plane_spacing`;
            None converts with the bundle's options as they are.
        gate: called with the converted (Z, H, W) HU volume, its meta and the slice references before any model
            runs; it raises (:class:`rsna19.inference.assess.NotAssessable`) to stop a series the models cannot
            judge.
    """
    c = bundle.convert
    t0 = time.perf_counter()
    if pixel_spacing_mm is None:
        spacing, why = c["spacing"], "bundle conversion options"
    else:
        spacing, why = in_plane_spacing(bundle, pixel_spacing_mm)
    refs = [dict(r) if isinstance(r, Mapping) else {"path": os.fspath(r)} for r in slices]
    volume, meta = convert_series(refs, crop=c["crop"], spacing=spacing, correct_tilt=c["correct_tilt"])
    if gate is not None:
        gate(volume, meta, refs)
    t1 = time.perf_counter()
    sp = SeriesPrediction(str(meta["series_uid"]), volume, meta)
    sp.info["in_plane"] = {"spacing_mm": spacing, "crop_px": c["crop"], "why": why}
    dz = float(meta["spacing"][0])
    if training_spacing_mm and len(meta["sop_uids"]) > 1 and needs_reformat(dz, training_spacing_mm):
        slabs = reformat_slabs(volume, meta, training_spacing_mm)
        sp.input_meta, sp.slab_of = meta, slabs.slab_of
        sp.volume, sp.meta = slabs.volume, slabs.meta
        sp.info["reformat"] = slabs.info(dz, training_spacing_mm)
    else:
        sp.info["reformat"] = None
    write_series(sp.volume, sp.meta, cache, preview=False)
    rows = _rows(sp.meta)
    t2 = time.perf_counter()
    per_fold = fold_probabilities(bundle, cache, rows)
    sp.per_model = {name: _fold_mean(folds) for name, folds in per_fold.items()}
    t3 = time.perf_counter()
    sp.stacked, sp.stacked_folds = stack_probabilities(bundle, rows, sp.per_model, per_fold)
    t4 = time.perf_counter()
    sp.seconds = {
        "convert_s": round(t1 - t0, 3),
        "reformat_s": round(t2 - t1, 3),
        "models_s": round(t3 - t2, 3),
        "stack_s": round(t4 - t3, 3),
    }
    return sp


def training_slices(bundle: Bundle) -> dict[str, Any]:
    """The training slice spacing the series ranking and the reformatting aim at, and where it comes from.

    Returns:
        ``{"slice_spacing_mm", "slice_thickness_mm", "assumed", "note"}``; bundles written before the training
        geometry was recorded get :data:`~rsna19.inference.series_select.DEFAULT_TRAINING_SPACING_MM`, said so.
    """
    geo = bundle.training_geometry
    if geo and geo.get("slice_spacing_mm"):
        return {
            "slice_spacing_mm": float(geo["slice_spacing_mm"]),
            "slice_thickness_mm": geo.get("slice_thickness_mm"),
            "assumed": False,
            "note": f"from bundle.json ({geo.get('n_series', '?')} training series)",
        }
    return {
        "slice_spacing_mm": DEFAULT_TRAINING_SPACING_MM,
        "slice_thickness_mm": DEFAULT_TRAINING_SPACING_MM,
        "assumed": True,
        "note": (
            f"the bundle records no training slice spacing (written before it was recorded): "
            f"assuming {DEFAULT_TRAINING_SPACING_MM:g} mm; re-export it with `rsna19 bundle` to record it"
        ),
    }


def apply_selection(study: StudyInput, policy: SelectionPolicy) -> list[dict[str, Any]]:
    """Rank the readable series of ``study`` (:func:`rank_series`) and move the ones not chosen to its skipped ones.

    Every candidate series gets its verdict as ``selection`` (rank, score, criteria, header facts); a skipped one
    also its ``reason``.

    Returns:
        The compact ranking for ``studies.json``: one ``{"series_uid", "rank", "score", "used", "reason"}`` a
        candidate, best first.
    """
    candidates = [s for s in study.used if s.facts is not None]
    if not candidates:
        return []
    by_uid = {s.series_uid: s for s in candidates}
    used, skipped, ranking = [], [], []
    for choice in rank_series([s.facts for s in candidates], policy):
        s = by_uid[choice.facts.series_uid]
        s.selection = choice.to_dict()
        if choice.used:
            used.append(s)
        else:
            s.reason = choice.reason
            skipped.append(s)
        ranking.append({k: s.selection[k] for k in ("series_uid", "description", "rank", "score", "used", "reason")})
    study.used = used + [s for s in study.used if s.facts is None]
    study.skipped = skipped + study.skipped
    return ranking


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's per-file warnings for the duration.

    Headers of real scanners are full of values that break the VR rules (a UI with letters, a DS with too many
    digits); they are read leniently, and a warning per file would bury the one-line-per-study messages.
    """
    logger = logging.getLogger("pydicom")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def message(exc: BaseException) -> str:
    """A one-line message: the text of expected errors, the type as well for unexpected ones."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UserError | ValueError) else f"{type(exc).__name__}: {text}"
