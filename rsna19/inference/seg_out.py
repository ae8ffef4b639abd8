"""The bleed map of a positive study as a DICOM Segmentation (``SEG_<SOPInstanceUID>.dcm``), written with highdicom.

Where the map comes from (:func:`bleed_map`):

* **segmentation-aided model** (family ``seg_aux``, when the bundle has one): its mask head's per-subtype
  probabilities (fold members averaged), thresholded at :data:`MASK_THRESHOLD`; one segment per subtype reported
  present in the study result, or one *Intracranial hemorrhage* segment (the union) when ``any`` is the only
  finding;
* else **Grad-CAM of ``any``** (the first single-slice 2D model), thresholded at :data:`CAM_THRESHOLD` of its
  per-slice peak: one *Intracranial hemorrhage* segment. Grad-CAM is an explanation, not a delineation: the
  segment's description says so.

The map covers the slices of the series the report shows whose stacked ``p_any`` reaches the study model's slice
operating point for ``any`` (at most :data:`MAX_SLICES`, the top slice always); only studies whose ``any`` is
reported positive get one (a bleed map of a negative study would show a bleed that the result denies).

The masks are computed in the frame the models saw (crop, resampling, tilt shift, reformatted slabs) and carried
back to the pixel grid of every source image through the inverse of that map (:func:`to_source_grid`), so the
segment frames lie exactly on the source slices. The SEG references the source instances: one source image per
single-frame file, or the frames of an Enhanced CT (multi-frame) file. Binary segmentation, same study, new series
9903, UIDs derived from the bundle checksum and the study UID (a re-run gives the same SEG). Segmented property
category SCT 49755003 *Morphologically abnormal structure*, type the SNOMED CT finding of
:data:`rsna19.inference.dicom_out.FINDING_CODES`, algorithm type AUTOMATIC with the algorithm identification
(``rsna19``, its version, the map's source).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import atomic_path
from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.inference.dicom_out import MANUFACTURER, _uid, finding_code, read_source_slices
from rsna19.inference.gradcam import cam_target, grad_cam

if TYPE_CHECKING:
    from rsna19.study.bundle import Bundle

log = logging.getLogger(__name__)

#: Mask probability of the segmentation-aided model counted as bleed.
MASK_THRESHOLD: float = 0.5
#: Fraction of a slice's Grad-CAM peak counted as bleed.
CAM_THRESHOLD: float = 0.5
#: Most slices in one map (the ones with the highest ``p_any``).
MAX_SLICES: int = 16
SEG_SERIES_NUMBER = 9903


@dataclass
class BleedMap:
    """A study's bleed map in the frame the models saw.

    Attributes:
        masks: (Z, H, W, S) bool over the series' model-frame volume (``SeriesPrediction.volume``).
        segments: (S,) the class of each segment (``any`` or a subtype).
        source: ``seg_aux:<model>`` or ``gradcam:<model>``.
        slices: model-frame slice indices the map was computed on, most suspicious first.
    """

    masks: np.ndarray
    segments: list[str]
    source: str
    slices: list[int] = field(default_factory=list)

    def overlay(self, z: int) -> np.ndarray:
        """(H, W) bool: every segment of slice ``z`` together (for the report picture)."""
        return self.masks[z].any(axis=-1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "segments": list(self.segments),
            "slices": [int(z) for z in self.slices],
            "pixels": {c: int(self.masks[..., i].sum()) for i, c in enumerate(self.segments)},
        }


def network_to_slice(net_map: np.ndarray, resize: int | None, shape: tuple[int, int]) -> np.ndarray:
    """A (h, w) map in the network's input frame → the (H, W) model-frame slice (nearest).

    The network sees the slice resized to ``resize`` (square) and centre-cropped to (h, w); the map is put back in
    the resized frame (zeros outside the crop) and stretched over the slice.
    """
    frame = int(resize or shape[0])
    full = np.zeros((frame, frame), dtype=np.float32)
    h, w = net_map.shape
    y0, x0 = max((frame - h) // 2, 0), max((frame - w) // 2, 0)
    full[y0 : y0 + h, x0 : x0 + w] = net_map[: frame - y0, : frame - x0]
    rows = np.minimum((np.arange(shape[0]) * frame) // shape[0], frame - 1)
    cols = np.minimum((np.arange(shape[1]) * frame) // shape[1], frame - 1)
    return full[np.ix_(rows, cols)]


def map_slices(p_any: np.ndarray, slice_threshold: float | None, k: int = MAX_SLICES) -> list[int]:
    """The slices a map covers: ``p_any`` at least the slice operating point, at most ``k``, the top one always."""
    p = np.asarray(p_any, dtype=np.float64)
    order = [int(i) for i in np.argsort(-p, kind="stable")]
    keep = [i for i in order if slice_threshold is None or p[i] >= slice_threshold][:k]
    return keep or order[:1]


def bleed_map(
    bundle: Bundle,
    cache: str | os.PathLike[str],
    rows: pd.DataFrame,
    volume_shape: tuple[int, int, int],
    stacked: np.ndarray,
    study_result: dict[str, Any],
    prefer: str = "seg_aux",
) -> BleedMap | None:
    """The bleed map of one predicted series (see the module docstring); None when no model can draw one.

    Args:
        bundle: the loaded bundle.
        cache: the scratch cache holding the series as the models read it.
        rows: the series' cache rows (``sop_uid``, ``series_uid``, ``z`` ...).
        volume_shape: (Z, H, W) of the model-frame volume.
        stacked: (Z, 6) the stacker's probabilities.
        study_result: the calibrated study result (its positive classes choose the segments).
        prefer: ``seg_aux`` (the segmentation-aided model when the bundle has one) or ``gradcam``.
    """
    import torch

    slice_thr = (bundle.study_model or {}).get("classes", {}).get("any", {}).get("slice_threshold")
    zs = map_slices(np.asarray(stacked)[:, CLASSES.index("any")], slice_thr)
    shape = (int(volume_shape[1]), int(volume_shape[2]))
    families = bundle.families
    seg_models = [p for p in bundle.models if families.get(p.name) == "seg_aux" and p.cfg.data.layout == "channels"]
    cam_models = sorted((p for p in bundle.models if p.cfg.data.layout == "channels"), key=lambda p: p.cfg.data.slices)
    positive = [c for c in SUBTYPES if study_result["classes"][c]["positive"]]
    if seg_models and prefer == "seg_aux":
        predictor = seg_models[0]
        segments = positive or ["any"]
        masks = np.zeros((*volume_shape, len(segments)), dtype=bool)
        for z in zs:
            probs = []
            for member in predictor.members:
                x = predictor.input_image(member, cache, rows, z)
                with torch.no_grad():
                    _labels, logits = member.net(x)
                probs.append(torch.sigmoid(logits.float())[0].cpu().numpy())
            mean = np.mean(probs, axis=0)  # (5, h, w)
            for s, cls in enumerate(segments):
                channel = mean.max(axis=0) if cls == "any" else mean[SUBTYPES.index(cls)]
                masks[z, :, :, s] = network_to_slice(channel, predictor.cfg.data.resize, shape) >= MASK_THRESHOLD
        return BleedMap(masks, segments, f"seg_aux:{predictor.name}", zs)
    if not cam_models:
        return None

    predictor = cam_models[0]
    member = predictor.members[0]
    target = cam_target(member.net)
    if target is None:
        return None
    masks = np.zeros((*volume_shape, 1), dtype=bool)
    for z in zs:
        x = predictor.input_image(member, cache, rows, z)
        cam = grad_cam(member.net, x, CLASSES.index("any"), target_layer=target)
        masks[z, :, :, 0] = network_to_slice(cam, predictor.cfg.data.resize, shape) >= CAM_THRESHOLD
        masks[z, :, :, 0] &= cam.max() > 0
    return BleedMap(masks, ["any"], f"gradcam:{predictor.name}", zs)


def to_source_grid(
    mask: np.ndarray, meta: Mapping[str, Any], shape: tuple[int, int], slab_of: np.ndarray | None = None
) -> np.ndarray:
    """Carry model-frame masks back to the source images' pixel grid (the inverse of the conversion's map).

    The conversion samples output pixel (i, j) of slice k at input row ``(y0 + i) · k_r − s_r`` and column
    ``(x0 + j) · k_c − s_c`` (:func:`rsna19.conversion.resample.sample_window`); each input pixel takes the output
    pixel nearest to it, or nothing outside the crop.

    Args:
        mask: (Z_model, H, W, S) bool in the model frame.
        meta: the conversion meta of the input slices (``crop_box``, ``scale``, ``slice_shifts_px``).
        shape: (rows, cols) of the source images.
        slab_of: (Z_in,) the slab of each input slice when the series was reformatted, else None.

    Returns:
        (Z_in, rows, cols, S) bool, in the order of ``meta["sop_uids"]``.
    """
    y0, x0, _y1, _x1 = (int(v) for v in meta["crop_box"])
    k_r, k_c = (float(v) for v in meta["scale"])
    shifts = np.asarray(meta.get("slice_shifts_px") or [[0.0, 0.0]] * len(meta["sop_uids"]), dtype=np.float64)
    n_in = len(meta["sop_uids"])
    index = np.arange(n_in) if slab_of is None else np.asarray(slab_of)
    h, w = mask.shape[1:3]
    out = np.zeros((n_in, shape[0], shape[1], mask.shape[3]), dtype=bool)
    for k in range(n_in):
        src = mask[int(index[k])]
        if not src.any():
            continue
        i = np.rint((np.arange(shape[0]) + shifts[k, 0]) / k_r).astype(np.int64) - y0
        j = np.rint((np.arange(shape[1]) + shifts[k, 1]) / k_c).astype(np.int64) - x0
        ok_i, ok_j = (i >= 0) & (i < h), (j >= 0) & (j < w)
        block = src[np.clip(i, 0, h - 1)][:, np.clip(j, 0, w - 1)]
        out[k] = block & ok_i[:, None, None] & ok_j[None, :, None]
    return out


def build_seg(
    source_images: Sequence[Any],
    pixel_array: np.ndarray,
    segments: Sequence[str],
    source: str,
    identity: Mapping[str, Any],
    sop_uid: str,
    series_uid: str,
) -> Any:
    """A binary highdicom Segmentation of ``segments`` over ``source_images``.

    Args:
        source_images: the source datasets (single-frame files in ``pixel_array`` order, or one multi-frame file).
        pixel_array: (frames, rows, cols, S) bool, one frame per source image (or per frame of the file).
        segments: (S,) classes.
        source: the map's source (``seg_aux:<model>`` / ``gradcam:<model>``).
        identity: ``rsna19_version``, ``bundle_sha256``.
        sop_uid, series_uid: of the new SEG.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(
        name="rsna19",
        family=codes.DCM.ArtificialIntelligence,
        version=str(identity["rsna19_version"]),
        parameters={"map": source, "bundle_sha256": str(identity["bundle_sha256"])[:16]},
    )
    gradcam = source.startswith("gradcam")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"{finding_code(c).meaning}" + (" (Grad-CAM)" if gradcam else ""),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=finding_code(c),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for i, c in enumerate(segments)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=np.ascontiguousarray(pixel_array.astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"bundle {str(identity['bundle_sha256'])[:16]}",
        software_versions=str(identity["rsna19_version"]),
        device_serial_number=str(identity["bundle_sha256"])[:16],
        series_description="rsna19 bleed map (not verified)",
    )
    return seg


def write_seg(
    out: str | os.PathLike[str],
    refs: Sequence[Mapping[str, Any]],
    bleed: BleedMap,
    meta: Mapping[str, Any],
    slab_of: np.ndarray | None,
    identity: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the SEG of one study's bleed map; returns ``studies.json``'s SEG keys (``seg``, ``seg_sop_instance_uid``,
    ``seg_frames``, ``seg_map``) or ``seg_note`` when there is nothing to write.

    Args:
        out: the DICOM output folder.
        refs: slice references (``path``, ``frame``, ``sop_uid``) of the mapped series.
        bleed: the map (:func:`bleed_map`).
        meta: the conversion meta of the input slices.
        slab_of: the slab of each input slice (reformatted series), else None.
        identity: ``rsna19_version``, ``bundle_sha256``.

    Raises:
        ValueError: the series mixes single- and multi-frame files, or its headers cannot be read.
    """
    if not bleed.masks.any():
        return {"seg_note": f"no bleed map: the {bleed.source} map is empty at its threshold"}
    sources = read_source_slices(refs)
    uids = [str(u) for u in meta["sop_uids"]]
    where = [sources.where.get(u) for u in uids]
    if any(w is None for w in where) or not where:
        raise ValueError("a mapped slice has no readable source header")
    files = list(dict.fromkeys(sop for sop, _f in where))  # type: ignore[misc]
    first = sources.headers[files[0]]
    shape = (int(first.Rows), int(first.Columns))
    grid = to_source_grid(bleed.masks, meta, shape, slab_of)  # (Z_in, rows, cols, S)
    multi = [f for (_s, f) in where if f]  # type: ignore[misc]
    if multi and len(files) == 1:
        ds = sources.headers[files[0]]
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        pixels = np.zeros((n_frames, *shape, grid.shape[3]), dtype=bool)
        for k, (_sop, f) in enumerate(where):  # type: ignore[misc]
            pixels[int(f) - 1] = grid[k]
        source_images = [sources.headers[files[0]]]
    elif not multi:
        order = {sop: k for k, (sop, _f) in enumerate(where)}  # type: ignore[misc]
        source_images = [sources.headers[sop] for sop in files]
        pixels = np.stack([grid[order[sop]] for sop in files])
    else:
        raise ValueError("the series mixes multi-frame and single-frame files: no SEG written")
    study_uid = str(first.StudyInstanceUID)
    sha = str(identity["bundle_sha256"])
    sop_uid, series_uid = _uid(sha, study_uid, "seg"), _uid(sha, study_uid, "seg-series")
    note = None
    if any("FrameOfReferenceUID" not in ds for ds in source_images):
        # Required by the CT IOD, absent in some anonymised exports: the SEG's segment frames still lie on the
        # source images (they are referenced one by one), in a frame of reference named after the series.
        for_uid = _uid(sha, str(first.SeriesInstanceUID), "frame-of-reference")
        source_images = [copy.copy(ds) for ds in source_images]
        for ds in source_images:
            ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or for_uid
        note = "the source images have no FrameOfReferenceUID: the SEG names one derived from the series UID"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seg = build_seg(source_images, pixels, bleed.segments, bleed.source, identity, sop_uid, series_uid)
        path = Path(out) / f"SEG_{sop_uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    return {
        "seg": path.name,
        "seg_sop_instance_uid": sop_uid,
        "seg_frames": int(seg.NumberOfFrames),
        "seg_map": bleed.to_dict(),
        **({"seg_note": note} if note else {}),
    }


def study_bleed_map(
    bundle: Bundle, cache: str | os.PathLike[str], series: Any, rows: pd.DataFrame, study_result: dict[str, Any] | None
) -> tuple[BleedMap | None, str | None]:
    """The bleed map of a study's report series, or None with the reason (negative, no study model, failure).

    Args:
        bundle: the loaded bundle.
        cache: the scratch cache holding ``series`` as the models read it.
        series: the report series (:class:`rsna19.study.batch.SeriesPrediction`: ``volume``, ``stacked``).
        rows: its cache rows.
        study_result: the calibrated study result.
    """
    if study_result is None:
        return None, "no bleed map: the bundle has no study model"
    if study_result["flag"] != "positive":
        return None, "no bleed map: 'any' is negative"
    try:
        bleed = bleed_map(bundle, cache, rows, tuple(series.volume.shape), series.stacked, study_result)
    except Exception as exc:  # noqa: BLE001 - the map is an extra; the result stands
        log.debug("bleed map failed", exc_info=True)
        return None, f"no bleed map: {type(exc).__name__}: {' '.join(str(exc).split())}"
    if bleed is None:
        return None, "no bleed map: no single-slice 2D model in the bundle to draw one"
    return bleed, None


def study_seg(
    out: str | os.PathLike[str], study: Any, series: Any, bleed: BleedMap | None, note: str | None, identity: Any
) -> dict[str, Any]:
    """Write the SEG of a study's bleed map; the keys for ``studies.json``'s ``dicom`` (``seg…`` or ``seg_note``)."""
    if bleed is None:
        return {"seg_note": note or "no bleed map"}
    try:
        refs = [r for s in study.used if s.series_uid == series.series_uid for r in s.slice_refs()]
        meta = series.input_meta if series.input_meta is not None else series.meta
        return write_seg(out, refs, bleed, meta, series.slab_of, identity)
    except Exception as exc:  # noqa: BLE001 - the SEG is reported as failed; the SR and SC stand
        log.debug("SEG failed", exc_info=True)
        return {"seg_error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
