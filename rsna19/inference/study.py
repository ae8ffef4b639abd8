"""``rsna19 predict-study``: a folder or zip of DICOM files → per-slice and per-study predictions and reports.

For each study found by :func:`rsna19.inference.inputs.collect_studies` (which groups the files into series and
keeps the axial CT ones, with a reason for every series and file it skips):

0. the kept series are ranked (:mod:`rsna19.inference.series_select`, :func:`apply_selection`): the best one is
   predicted (``all_series``: every usable one), every other gets its reason;
1. every chosen series goes through :func:`rsna19.conversion.series.convert_series` with the bundle's conversion
   options, i.e. exactly the training conversion, into a private scratch cache; a series much thinner than the
   training slices is then averaged into slabs of the training spacing (:mod:`rsna19.inference.reformat`) and
   its slices later take their slab's probabilities;
2. every base model of the bundle predicts every slice through the forward path of ``rsna19 predict``
   (:meth:`rsna19.engine.predictor.Predictor.predict_cache`: the family's task, input mapping, TTA and AMP rule),
   averaged over the bundled folds; a sequence model gets its embeddings from its bundled image model, in memory;
3. the level-2 features of the series (:func:`rsna19.stacking.features.build_features`) go through the bundled
   stacker.

Outputs in ``OUT``: ``slices.csv`` (study, series, sop_uid, z, position, six stacked probabilities), ``models.csv``
(the same per base model, with its family: what each model said before the stacker), ``studies.json`` (per
study: max probabilities, top slices, series used and skipped with reasons, or the error that stopped it) and
``report_<study>.png`` (:func:`rsna19.report.render_study_report`, with a Grad-CAM map of ``any`` on the top slice
where a 2D model allows it). A study that fails is reported with its message; the others are still processed.

With a study model in the bundle (:mod:`rsna19.calibration`), each study also gets ``study_result`` (calibrated
probabilities, operating points, flags), drawn on the report; ``dicom_out`` adds a DICOM SR and Secondary Capture
per study (:mod:`rsna19.inference.dicom_out`). ``studies.json`` records the bundle's SHA-256 and version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.constants import CLASSES, PROB_COLUMNS
from rsna19.errors import UserError
from rsna19.inference.series_select import DEFAULT_TRAINING_SPACING_MM, SelectionPolicy, rank_series
from rsna19.utils.atomic import write_csv, write_text
from rsna19.utils.jsonable import json_default

log = logging.getLogger(__name__)

#: Columns of ``slices.csv``.
SLICE_COLUMNS: tuple[str, ...] = ("study_uid", "series_uid", "sop_uid", "z", "position", *PROB_COLUMNS)
#: Columns of ``models.csv``: every base model's fold-averaged probabilities, one row per slice and model.
MODEL_COLUMNS: tuple[str, ...] = ("study_uid", "series_uid", "sop_uid", "z", "model", "family", *PROB_COLUMNS)


def report_name(study_uid: str) -> str:
    """``report_<study>.png`` with characters that are unsafe in file names replaced by ``_``."""
    return f"report_{re.sub(r'[^A-Za-z0-9._-]', '_', study_uid)}.png"


@dataclass
class SeriesPrediction:
    """One converted and predicted series.

    Attributes:
        series_uid: the series.
        volume: (Z, H, W) int16 HU the models saw (the slabs of a reformatted thin series).
        meta: the conversion's meta of what the models saw (sop_uids, positions, ...).
        per_model: model name → (Z, 6) fold-averaged probabilities.
        stacked: (Z, 6) the stacker's probabilities (slice order).
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


def fold_probabilities(bundle: Any, cache: Path, rows: pd.DataFrame) -> dict[str, dict[int, np.ndarray]]:
    """Each bundled model's probabilities for ``rows`` of ``cache`` from each of its folds.

    Returns:
        model name → fold → (N, 6) float32, in ``rows`` order.
    """
    return {p.name: p.predict_cache(cache, rows, per_member=True) for p in bundle.models}


def _fold_mean(folds: dict[int, np.ndarray]) -> np.ndarray:
    """The fold average, as :meth:`rsna19.engine.predictor.Predictor.predict_cache` takes it."""
    return np.mean(np.stack(list(folds.values())), axis=0, dtype=np.float64).astype(np.float32)


def stack_probabilities(
    bundle: Any,
    rows: pd.DataFrame,
    per_model: dict[str, np.ndarray],
    per_fold: dict[str, dict[int, np.ndarray]] | None = None,
) -> np.ndarray:
    """The bundled stacker's (N, 6) probabilities for ``rows`` (one or more series), in ``rows`` order.

    Args:
        per_model: model name → (N, 6) fold-averaged probabilities.
        per_fold: model name → fold → (N, 6); when the stacker stacks each base fold separately (bundles with
            ``test_per_fold``), its level-2 features are built per fold and its predictions averaged.
    """
    from rsna19.stacking.features import Level2Data, build_features

    st = bundle.stacker

    def features(probs: dict[str, np.ndarray]) -> pd.DataFrame:
        preds = {}
        for m in st.models:
            df = rows[["sop_uid", "series_uid", "study_uid", "patient_id"]].copy()
            df["slice_idx"] = rows["z"].to_numpy()
            df[list(PROB_COLUMNS)] = probs[m]
            preds[m] = df
        return build_features(preds, st.offsets, st.windows)

    if st.per_fold and per_fold:
        folds = sorted(set.intersection(*(set(per_fold[m]) for m in st.models)))
        sets = [features({m: per_fold[m][k] for m in st.models}) for k in folds]
    else:
        sets = [features(per_model)]
    stacked = st.predict([Level2Data.from_features(f, st.models) for f in sets])
    where = pd.Index(sets[0]["sop_uid"]).get_indexer(rows["sop_uid"])
    return np.asarray(stacked, dtype=np.float64)[where]


def _cam_target(net: Any) -> Any:
    """The last 4-D feature stage of a 2D model's backbone (timm ResNets: ``layer4``), else its last Conv2d."""
    from torch import nn

    backbone = getattr(net, "backbone", net)
    for name in ("layer4", "stages", "features", "blocks"):
        if hasattr(backbone, name):
            return getattr(backbone, name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def top_slice_cam(bundle: Any, cache: Path, rows: pd.DataFrame, z: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Grad-CAM of ``any`` on slice ``z`` from the first single-slice-input (channels layout) model, or None.

    The network sees the slice resized to ``data.resize`` and centre-cropped to ``data.crop``; the map is put back
    in that frame (zeros outside the crop) so that stretching it over the slice lines it up.
    """
    from rsna19.inference.gradcam import grad_cam

    models = sorted(
        (p for p in bundle.models if p.cfg.data.layout == "channels"),
        key=lambda p: p.cfg.data.slices,  # a plain 2D model first: one backbone pass, the clearest map
    )
    if not models:
        return None
    predictor = models[0]
    member = predictor.members[0]
    target = _cam_target(member.net)
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


def in_plane_spacing(bundle: Any, pixel_spacing_mm: float) -> tuple[float | None, str]:
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
    bundle: Any,
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
    from rsna19.conversion.series import convert_series, write_series
    from rsna19.inference.reformat import needs_reformat, reformat_slabs

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
    sp.stacked = stack_probabilities(bundle, rows, sp.per_model, per_fold)
    t4 = time.perf_counter()
    sp.seconds = {
        "convert_s": round(t1 - t0, 3),
        "reformat_s": round(t2 - t1, 3),
        "models_s": round(t3 - t2, 3),
        "stack_s": round(t4 - t3, 3),
    }
    return sp


def _model_frame(study_uid: str, series: list[SeriesPrediction], families: dict[str, str]) -> pd.DataFrame:
    """``models.csv`` rows of one study: each base model's probabilities of each slice (before the stacker)."""
    parts = []
    for sp in series:
        meta = sp.out_meta
        for name, probs in sp.per_model.items():
            df = pd.DataFrame(
                {
                    "study_uid": study_uid,
                    "series_uid": sp.series_uid,
                    "sop_uid": [str(s) for s in meta["sop_uids"]],
                    "z": np.arange(len(meta["sop_uids"])),
                    "model": name,
                    "family": families.get(name, ""),
                }
            )
            df[list(PROB_COLUMNS)] = sp.expand(probs)
            parts.append(df)
    return pd.concat(parts, ignore_index=True)


def _study_frame(study_uid: str, series: list[SeriesPrediction]) -> pd.DataFrame:
    parts = []
    for sp in series:
        meta = sp.out_meta
        df = pd.DataFrame(
            {
                "study_uid": study_uid,
                "series_uid": sp.series_uid,
                "sop_uid": [str(s) for s in meta["sop_uids"]],
                "z": np.arange(len(meta["sop_uids"])),
                "position": np.asarray(meta["positions"], dtype=np.float64),
            }
        )
        df[list(PROB_COLUMNS)] = sp.expand(sp.stacked)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def predict_studies(
    path: str | os.PathLike[str],
    bundle: Any,
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    workers: int = 1,
    top_k: int = 6,
    threshold: float = 0.5,
    cam: bool = True,
    folds: list[int] | None = None,
    tta: list[str] | None = None,
    all_series: bool = False,
    include_contrast: bool = False,
    say: Callable[[str], None] = print,
    dicom_out: str | os.PathLike[str] | None = None,
    seg: bool = True,
) -> dict[str, Any]:
    """Predict every study in a folder or zip and write ``slices.csv``, ``studies.json`` and the reports.

    Args:
        path: a folder (searched recursively; several studies, series and stray files are fine) or a zip.
        bundle: a bundle folder, or a :class:`rsna19.bundle.Bundle` already loaded.
        out: output folder (created).
        device: ``cpu``, ``cuda`` or ``auto`` (the GPU when one is visible; when ``bundle`` is a path).
        workers: processes reading the DICOM headers.
        top_k: slices in each report's montage and in ``top_slices``.
        threshold: decision threshold of the ``positive`` flags and the report.
        cam: draw a Grad-CAM map of ``any`` over the top slice.
        folds: bundled folds to run (None: all; when ``bundle`` is a path).
        tta: TTA views to run instead of the bundle's (None: the bundle's; when ``bundle`` is a path).
        all_series: predict every usable series of a study, not only the best ranked one.
        include_contrast: let contrast / CTA / perfusion series be predicted.
        say: where the one-line-per-study messages go.
        dicom_out: folder for each study's DICOM SR and Secondary Capture (:mod:`rsna19.inference.dicom_out`);
            None writes none.
        seg: with ``dicom_out``, also write the bleed map of each positive study as a DICOM SEG
            (:mod:`rsna19.inference.seg_out`) and draw it on the report picture instead of the Grad-CAM heat map.

    Returns:
        The ``studies.json`` dict.

    Raises:
        UserError: ``path`` missing, an unsafe zip, or an unusable bundle (errors of single studies are reported in
            ``studies.json`` instead).
    """
    from rsna19.bundle import Bundle, load_bundle
    from rsna19.inference.assess import NotAssessable, gate_limits
    from rsna19.inference.assess_out import StudyGate, write_not_assessable
    from rsna19.inference.inputs import collect_studies
    from rsna19.inference.seg_out import study_bleed_map, study_seg
    from rsna19.monitor.facts import study_input_facts
    from rsna19.report import render_study_report, summarise_study

    t_start = time.perf_counter()
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, device=device, folds=folds, tta=tta)
    load_s = time.perf_counter() - t_start
    geometry = training_slices(bundle)
    limits = gate_limits(bundle)
    if geometry["assumed"]:
        say(f"predict-study: {geometry['note']}")
    policy = SelectionPolicy(
        training_spacing_mm=geometry["slice_spacing_mm"], all_series=all_series, include_contrast=include_contrast
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    model_frames = []
    studies_out = []
    with _quiet_pydicom(), tempfile.TemporaryDirectory(prefix="rsna19-study-") as scratch:
        scratch = Path(scratch)
        inputs = collect_studies(path, scratch / "input", workers=workers)
        if not inputs.studies:
            say(f"{path}: no DICOM study found ({len(inputs.skipped_files)} file(s) skipped)")
        for study_uid, study in inputs.studies.items():
            t0 = time.perf_counter()
            ranking = apply_selection(study, policy)
            entry: dict[str, Any] = {**study.to_dict(inputs.root), "status": "ok", "error": None}
            entry["series_ranking"] = ranking
            try:
                if study.problem:
                    raise UserError(study.problem)
                done: list[SeriesPrediction] = []
                failed = []
                gate = StudyGate(limits)  # the not-assessable gate (rsna19/inference/assess.py)
                for s in study.used:
                    try:
                        ps = s.facts.pixel_spacing_mm if s.facts is not None else None
                        sp = predict_series(
                            bundle, s.slice_refs(), scratch / "cache", policy.training_spacing_mm, ps, gate=gate
                        )
                        done.append(sp)
                        for d in entry["series_used"]:
                            if d["series_uid"] == s.series_uid:
                                d.update(sp.info, seconds=sp.seconds)
                    except NotAssessable:
                        pass  # recorded by the gate; the study is not assessable when no series is
                    except Exception as exc:  # noqa: BLE001 - one bad series must not lose the study's others
                        failed.append({**s.to_dict(), "reason": f"conversion/prediction failed: {_message(exc)}"})
                entry["series_failed"] = failed
                entry["assessment"] = gate.assessment()
                if not done and gate.refused is not None:
                    png = out / report_name(study_uid)
                    write_not_assessable(entry, gate, png, dicom_out, study, bundle_identity(bundle), say)
                    entry["seconds"] = round(time.perf_counter() - t0, 3)
                    studies_out.append(entry)
                    continue
                if not done:
                    raise UserError(
                        f"study {study_uid}: no series could be predicted ("
                        + "; ".join(f"{f['series_uid']}: {f['reason']}" for f in failed)
                        + ")"
                    )
                df = _study_frame(study_uid, done)
                frames.append(df)
                model_frames.append(_model_frame(study_uid, done, bundle.families))
                entry["prediction"] = summarise_study(df, top_k=top_k, threshold=threshold)
                entry["result_series"] = {
                    c: max(done, key=lambda sp, i=i: float(sp.stacked[:, i].max())).series_uid
                    for i, c in enumerate(CLASSES)
                }
                entry["study_result"] = study_result(bundle, df)
                entry["per_model_max"] = {
                    m: {
                        c: round(float(v), 6)
                        for c, v in zip(CLASSES, np.max([sp.per_model[m].max(axis=0) for sp in done], axis=0))
                    }
                    for m in done[0].per_model
                }
                # The report shows the series with the most suspicious slice.
                best = max(done, key=lambda sp: float(sp.stacked[:, -1].max()))
                entry["input_facts"] = study_input_facts(study, best)  # for the drift watch (rsna19/monitor)
                heat, cam_note = None, None
                bleed, bleed_note = None, None
                if seg and dicom_out is not None:  # the bleed map of the SEG, also drawn on the report picture
                    rows_best = _rows(best.meta)
                    bleed, bleed_note = study_bleed_map(
                        bundle, scratch / "cache", best, rows_best, entry["study_result"]
                    )
                if cam and bleed is None:
                    try:
                        z_top = int(np.argmax(best.stacked[:, -1]))
                        heat = top_slice_cam(bundle, scratch / "cache", _rows(best.meta), z_top, best.volume.shape[1:])
                    except Exception as exc:  # noqa: BLE001 - the picture is optional, the prediction is not
                        cam_note = f"no Grad-CAM: {_message(exc)}"
                png = out / report_name(study_uid)
                render_study_report(
                    best.volume,
                    np.clip(best.stacked, 0.0, 1.0),
                    best.meta["sop_uids"],
                    best.meta["positions"],
                    png,
                    study_uid,
                    top_k=top_k,
                    cam=heat,
                    threshold=threshold,
                    study_result=entry["study_result"],
                    seg_mask=bleed.overlay(int(np.argmax(best.stacked[:, -1]))) if bleed is not None else None,
                )
                entry["report"] = png.name
                entry["report_series"] = best.series_uid
                if cam_note:
                    entry["report_note"] = cam_note
                if dicom_out is not None:
                    entry["dicom"] = study_dicom(dicom_out, study, df, entry["study_result"], bundle, png)
                    if seg and "error" not in entry["dicom"]:
                        entry["dicom"].update(
                            study_seg(dicom_out, study, best, bleed, bleed_note, bundle_identity(bundle))
                        )
                p = entry["prediction"]["max_probability"]
                say(
                    f"study {study_uid}: {sum(len(sp.out_meta['sop_uids']) for sp in done)} slices in {len(done)} "
                    f"series ({len(study.skipped)} skipped), "
                    f"max p_any {p['any']:.3f}"
                    + (
                        f" ({', '.join(entry['prediction']['positive_classes'])})"
                        if entry["prediction"]["positive_classes"]
                        else ""
                    )
                    + f", {time.perf_counter() - t0:.1f} s"
                )
            except Exception as exc:  # noqa: BLE001 - a bad study is reported; the others go on
                entry["status"] = "error"
                entry["error"] = _message(exc)
                say(f"study {study_uid}: error: {entry['error']}")
                log.debug("study %s failed", study_uid, exc_info=True)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            studies_out.append(entry)
        files_skipped = inputs.to_dict()["files_skipped"]

    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SLICE_COLUMNS))
    write_csv(slices[list(SLICE_COLUMNS)], out / "slices.csv")
    per_model = pd.concat(model_frames, ignore_index=True) if model_frames else pd.DataFrame(columns=MODEL_COLUMNS)
    write_csv(per_model[list(MODEL_COLUMNS)], out / "models.csv")
    summary = {
        "source": str(path),
        "bundle": str(bundle.path),
        **bundle_identity(bundle),
        "study_model": operating_points(bundle),
        "device": str(bundle.device),
        "folds": bundle.folds,
        "tta": bundle.tta,
        "training_slices": geometry,
        "series_policy": {"all_series": all_series, "include_contrast": include_contrast},
        "n_studies": len(studies_out),
        "n_ok": sum(s["status"] == "ok" for s in studies_out),
        "n_errors": sum(s["status"] == "error" for s in studies_out),
        "n_not_assessable": sum(s["status"] == "not_assessable" for s in studies_out),
        "bundle_load_s": round(load_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "files_skipped": files_skipped,
        "studies": studies_out,
    }
    write_text(json.dumps(summary, indent=1, default=json_default) + "\n", out / "studies.json")
    return summary


def training_slices(bundle: Any) -> dict[str, Any]:
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


def apply_selection(study: Any, policy: SelectionPolicy) -> list[dict[str, Any]]:
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


# ------------------------------------------------------------------------------ calibrated result, DICOM outputs
def bundle_identity(bundle: Any) -> dict[str, Any]:
    """What identifies the bundle in ``studies.json`` and the SR: the SHA-256 of ``bundle.json`` (which lists the
    checksum of every other file), the bundle format version and the rsna19 version that wrote it."""
    return {
        "bundle_sha256": bundle.sha256,
        "bundle_version": bundle.manifest.get("bundle_version"),
        "rsna19_version": bundle.manifest.get("versions", {}).get("rsna19"),
    }


def operating_points(bundle: Any) -> dict[str, Any] | None:
    """The study model's score, method and per-class thresholds (``studies.json``'s ``study_model``), or None."""
    model = bundle.study_model
    if model is None:
        return None
    keys = ("target_sensitivity", "threshold", "score_threshold", "slice_threshold", "oof_sensitivity")
    return {
        "score": model["score"],
        "method": model["method"],
        "bundle_sha256": bundle.sha256,
        "classes": {c: {k: e.get(k) for k in (*keys, "oof_specificity")} for c, e in model["classes"].items()},
    }


def study_result(bundle: Any, slices: pd.DataFrame) -> dict[str, Any] | None:
    """The calibrated study result (:func:`rsna19.calibration.apply_study_model`), None without a study model."""
    from rsna19.calibration import apply_study_model

    return apply_study_model(bundle.study_model, slices) if bundle.study_model is not None else None


def study_dicom(
    out: str | os.PathLike[str], study: Any, slices: pd.DataFrame, result: dict[str, Any] | None, bundle: Any, png: Path
) -> dict[str, Any]:
    """Write the SR and SC of one study; returns ``studies.json``'s ``dicom`` entry (with ``error`` on failure)."""
    from rsna19.inference.dicom_out import write_study_dicom

    if result is None:
        return {"error": "the bundle has no study model (re-export it): no calibrated result to report"}
    try:
        predicted = set(slices["series_uid"].astype(str))
        # The slice references (path, frame, slice UID) of the predicted series: a frame of a multi-frame file is
        # referenced as that file's SOP instance plus its frame number.
        refs = [r for s in study.used if s.series_uid in predicted for r in s.slice_refs()]
        written = write_study_dicom(out, refs, slices, result, bundle_identity(bundle), png)
        return written.to_dict(Path(out))
    except Exception as exc:  # noqa: BLE001 - the DICOM copy is reported as failed; the prediction stands
        log.debug("DICOM outputs failed", exc_info=True)
        return {"error": _message(exc)}


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
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


def _message(exc: BaseException) -> str:
    """A one-line message: the text of expected errors, the type as well for unexpected ones."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UserError | ValueError) else f"{type(exc).__name__}: {text}"
