"""The bleed map as DICOM SEG (rsna19/inference/seg_out.py): the inverse of the conversion's map, and predict-study
--dicom-out on a positive hospital-like study (single-frame and Enhanced CT) with the tiny run's bundle."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hospital import SOFT, THICK_MM, enhanced_copy, head_plan, write_series

from rsna19.conversion.series import convert_mask, convert_series
from rsna19.inference.seg_out import map_slices, network_to_slice, to_source_grid
from rsna19.study.batch import predict_studies
from rsna19.study.bundle import export_bundle, load_bundle
from rsna19.study.predictor import StudyOptions, StudyPredictor

STUDY_UID = "1.2.826.0.1.3680043.10.1226.3"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _write_head(root, study_uid=STUDY_UID):
    paths = write_series(
        root, head_plan(), study_uid=study_uid, series_uid=f"{study_uid}.1", step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head 5.0 H30s"},
    )  # fmt: skip
    for p in paths:  # a scanner writes the Frame of Reference module
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = f"{study_uid}.99"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ds.save_as(p, enforce_file_format=True)
    return paths


@pytest.mark.parametrize("spacing", [None, 3.0])
def test_to_source_grid_inverts_the_conversion_map(tmp_path, spacing):
    """A mask drawn on the source pixels, moved into the model frame (convert_mask) and back, lands where it was
    (exactly at the scanner's spacing; within one source pixel when resampled)."""
    paths = _write_head(tmp_path / "in")
    refs = [{"path": str(p)} for p in paths]
    volume, meta = convert_series(refs, crop=48, spacing=spacing, correct_tilt=True)
    rows, cols = meta["original_shape"][1:]
    src = np.zeros((len(paths), rows, cols), dtype=np.uint8)
    src[:, 24:36, 28:40] = 1  # inside the crop
    model = convert_mask(src, meta)
    back = to_source_grid(model.astype(bool)[..., None], meta, (rows, cols))[..., 0]
    if spacing is None:
        np.testing.assert_array_equal(back, src.astype(bool))
    else:
        diff = back ^ src.astype(bool)
        edge = np.zeros_like(diff)
        edge[:, 23:38, 27:42] = True
        edge[:, 25:35, 29:39] = False
        assert not (diff & ~edge).any() and back.sum() > 0.8 * src.sum()


def test_network_frame_and_slice_choice():
    net = np.zeros((4, 4), dtype=np.float32)
    net[1, 2] = 1.0  # a 4×4 centre crop of an 8×8 resized frame, over a 16×16 slice
    out = network_to_slice(net, 8, (16, 16))
    assert out.shape == (16, 16) and out.sum() == 4 and out[6:8, 8:10].all()
    assert map_slices(np.array([0.1, 0.9, 0.5, 0.7]), 0.6) == [1, 3]
    assert map_slices(np.array([0.1, 0.2]), 0.6) == [1]  # the top slice always


@pytest.fixture(scope="module")
def positive(tiny_run, tmp_path_factory):
    """The tiny bundle with the study model's ``any`` operating point at 0 (every study positive, so every study
    gets a map), on a single-frame head series and its Enhanced CT copy, with and without --no-seg."""
    root = tmp_path_factory.mktemp("seg")
    path = export_bundle(tiny_run, root / "bundle").path
    bundle = load_bundle(path, device="cpu")
    bundle.study_model = copy.deepcopy(bundle.study_model)
    bundle.study_model["classes"]["any"]["threshold"] = 0.0
    bundle.study_model["classes"]["subdural"]["threshold"] = 0.0
    paths = _write_head(root / "in" / "single")
    mf_uid = "1.2.826.0.1.3680043.10.1226.4"
    enhanced_copy(
        paths, root / "in_mf" / "MF", sop_uid=f"{mf_uid}.1.1", series_uid=f"{mf_uid}.1", study_uid=mf_uid,
        patient_id="P", reverse=True,
    )  # fmt: skip
    ds = pydicom.dcmread(root / "in_mf" / "MF")
    ds.FrameOfReferenceUID = f"{mf_uid}.99"
    ds.save_as(root / "in_mf" / "MF", enforce_file_format=True)
    runs = {}
    for name, inp, seg in (("single", root / "in", True), ("mf", root / "in_mf", True), ("noseg", root / "in", False)):
        out = root / name
        predictor = StudyPredictor(bundle, StudyOptions(cam=False, source_headers=True, seg=seg))
        runs[name] = predict_studies(inp, predictor, out, say=lambda _l: None, dicom_out=out / "dicom").summary
        runs[name]["out"] = out
    return {"runs": runs, "paths": paths, "bundle": bundle}


def _seg(run):
    (study,) = run["studies"]
    assert study["status"] == "ok" and study["study_result"]["flag"] == "positive"
    return study, run["out"] / "dicom" / study["dicom"]["seg"]


def test_positive_study_gets_a_seg_of_the_seg_aux_model_on_its_source_slices(positive):
    study, path = _seg(positive["runs"]["single"])
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.StudyInstanceUID == study["study_uid"]
    assert study["dicom"]["seg_map"]["source"].startswith("seg_aux:")
    # One segment per subtype reported present (subdural, forced), coded in SNOMED CT.
    labels = [(d.SegmentedPropertyTypeCodeSequence[0].CodeValue, d.SegmentLabel) for d in seg.SegmentSequence]
    want = ["subdural"] if study["study_result"]["classes"]["subdural"]["positive"] else []
    assert len(labels) == len(set(study["study_result"]["positive_classes"]) - {"any"} or {"any"})
    if want:
        assert ("35486000", "Subdural intracranial hemorrhage") in labels
    # Every frame lies on a source instance of the predicted series; the map sits inside the head.
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in positive["paths"]}
    refs = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= set(sources)
    for f in seg.PerFrameFunctionalGroupsSequence[: seg.NumberOfFrames]:
        (src,) = f.DerivationImageSequence[0].SourceImageSequence
        assert str(src.ReferencedSOPInstanceUID) in sources
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    assert frames.any()
    for k, f in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        ds = pydicom.dcmread(sources[src])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert (hu[frames[k] > 0] > -200).mean() > 0.8  # mostly not air: the map lies on the head


def test_enhanced_ct_seg_references_frames_of_the_multiframe_file(positive):
    study, path = _seg(positive["runs"]["mf"])
    seg = hd.seg.segread(path)
    (inst,) = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert str(inst.ReferencedSOPInstanceUID) == "1.2.826.0.1.3680043.10.1226.4.1.1"
    frames = {
        int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert frames and frames <= set(range(1, 9))
    # The same map as the single-frame copy (frames stored in reverse): same number of bleed pixels.
    single, _ = _seg(positive["runs"]["single"])
    assert study["dicom"]["seg_map"]["pixels"] == single["dicom"]["seg_map"]["pixels"]


def test_no_seg_leaves_it_out_and_keeps_sr_and_sc(positive):
    (study,) = positive["runs"]["noseg"]["studies"]
    d = study["dicom"]
    assert "seg" not in d and "seg_note" not in d and d["sr"] and d["sc"]
    assert not list((positive["runs"]["noseg"]["out"] / "dicom").glob("SEG_*"))


def test_report_picture_shows_the_map(positive):
    """The report of the SEG run differs from the --no-seg run only where the map is drawn (the top slice)."""
    import matplotlib.image as mpimg

    (a,) = positive["runs"]["single"]["studies"]
    (b,) = positive["runs"]["noseg"]["studies"]
    with_map = mpimg.imread(positive["runs"]["single"]["out"] / a["report"])
    without = mpimg.imread(positive["runs"]["noseg"]["out"] / b["report"])
    assert with_map.shape == without.shape
    changed = np.argwhere(np.abs(with_map - without).max(axis=-1) > 0.05)
    assert len(changed) > 0
    # Only the top-left montage panel changes (the first 2.4 inches of width and the top part).
    assert changed[:, 1].max() < 0.35 * with_map.shape[1] and changed[:, 0].max() < 0.5 * with_map.shape[0]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_seg_validates(positive):
    for name in ("single", "mf"):
        _study, path = _seg(positive["runs"][name])
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"


def test_studies_json_records_the_seg(positive):
    run = positive["runs"]["single"]
    saved = json.loads((run["out"] / "studies.json").read_text())
    assert saved["studies"][0]["dicom"]["seg_sop_instance_uid"]


def test_gradcam_map_when_the_bundle_has_no_seg_model(positive, tmp_path):
    """Without a seg_aux model the map is Grad-CAM of any, one segment, only on the mapped slices."""
    from rsna19.core.constants import CLASSES
    from rsna19.inference.seg_out import bleed_map
    from rsna19.study.predictor import _rows, predict_series

    bundle = positive["bundle"]
    sp = predict_series(bundle, [{"path": str(p)} for p in positive["paths"]], tmp_path / "cache")
    result = {"classes": {c: {"positive": c == "any"} for c in CLASSES}}
    rows = _rows(sp.meta)
    bm = bleed_map(bundle, tmp_path / "cache", rows, sp.volume.shape, sp.stacked, result, prefer="gradcam")
    assert bm is not None and bm.source.startswith("gradcam:") and bm.segments == ["any"]
    assert bm.masks.shape == (*sp.volume.shape, 1)
    outside = np.setdiff1d(np.arange(sp.volume.shape[0]), bm.slices)
    assert not bm.masks[outside].any() and bm.slices[0] == int(np.argmax(sp.stacked[:, -1]))
