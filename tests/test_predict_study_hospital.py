"""``rsna19 predict-study`` on hospital-like studies: the series it picks and why (bone, thin, scout, CTA and a
duplicate copy skipped, each with its reason), a JPEG Lossless series read exactly, a DICOM SR and Secondary Capture
that validate, thin series reformatted to the training spacing, and the speed controls (--folds, --tta,
--device auto, per-series timings)."""

from __future__ import annotations

import json
import shutil
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pydicom
import pytest
from hospital import SOFT, THICK_MM, THIN_MM, head_plan, write_hospital_study, write_series
from pydicom.uid import UID, JPEGLosslessSV1

from rsna19.cli import main
from rsna19.conversion.series import convert_series
from rsna19.core.constants import CLASSES
from rsna19.study.bundle import export_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

#: Largest difference of a study-level probability between the 5 mm and the 0.625 mm series of one head.
STUDY_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    return export_bundle(tiny_run, tmp_path_factory.mktemp("hospital_bundle") / "bundle").path


@pytest.fixture(scope="module")
def plan():
    return head_plan()


def _run(args):
    assert main(["predict-study", *map(str, args), "--no-cam"]) == 0


def test_bundle_records_the_training_slices(bundle):
    geo = json.loads((bundle / "bundle.json").read_text())["training_geometry"]
    # configs/pipelines/tiny.yaml on the tiny preset: table steps of 3–5 mm, 64-pixel slices of ~4 mm pixels.
    assert 3.0 <= geo["slice_spacing_mm"] <= 5.0 and geo["n_series"] > 0
    assert 3.0 <= geo["pixel_spacing_range_mm"][0] <= geo["pixel_spacing_mm"] <= geo["pixel_spacing_range_mm"][1]


@pytest.fixture(scope="module")
def hospital(bundle, plan, tmp_path_factory):
    """The hospital-like study (tests/hospital.py: soft tissue stored JPEG Lossless, its uncompressed copy, bone,
    0.625 mm, scout, CTA) through one predict-study run with --dicom-out, shared by the tests below."""
    root = tmp_path_factory.mktemp("hospital_study")
    uid = write_hospital_study(root / "in", plan)
    out = root / "out"
    _run([root / "in", "--bundle", bundle, "--out", out, "--dicom-out", out / "dicom"])
    summary = json.loads((out / "studies.json").read_text())
    (study,) = summary["studies"]
    return {"root": root, "uid": uid, "out": out, "summary": summary, "study": study}


def test_hospital_study_picks_the_intended_series_and_explains_every_choice(hospital):
    summary, study, uid = hospital["summary"], hospital["study"], hospital["uid"]
    assert summary["device"] == "cpu"  # --device auto on a machine without a GPU
    assert summary["training_slices"]["assumed"] is False
    assert study["status"] == "ok" and not study["files_skipped"] and not summary["files_skipped"]
    assert [s["series_uid"] for s in study["series_used"]] == [uid["soft"]]
    reasons = {s["series_uid"]: s["reason"] for s in study["series_skipped"]}
    # Every other series is explained.
    assert set(reasons) == set(uid.values()) - {uid["soft"]}
    assert reasons[uid["bone"]].startswith("bone kernel")
    assert reasons[uid["thin"]].startswith("thicker series preferred")
    assert reasons[uid["scout"]].startswith("localizer")
    assert reasons[uid["cta"]].startswith("contrast")
    assert reasons[uid["copy"]].startswith(f"duplicate of 'Head 5.0 H30s' ({uid['soft']})")
    ranking = study["series_ranking"]  # every readable axial candidate (not the scout), best first
    assert ranking[0]["series_uid"] == uid["soft"] and ranking[0]["used"]
    assert {r["series_uid"] for r in ranking} == set(uid.values()) - {uid["scout"]}
    assert all(r["reason"] == reasons[r["series_uid"]] for r in ranking[1:])
    assert set(study["result_series"]) == set(CLASSES) and set(study["result_series"].values()) == {uid["soft"]}
    used = study["series_used"][0]
    assert set(used["seconds"]) == {"convert_s", "reformat_s", "models_s", "stack_s"}
    assert used["reformat"] is None and used["selection"]["rank"] == 1
    assert used["selection"]["header"]["transfer_syntax"] == JPEGLosslessSV1
    slices = pd.read_csv(hospital["out"] / "slices.csv")
    assert set(slices["series_uid"]) == {uid["soft"]} and len(slices) == 8
    assert np.isfinite(slices[[f"p_{c}" for c in CLASSES]].to_numpy()).all()


def test_jpeg_lossless_series_decodes_exactly_like_its_uncompressed_copy(hospital):
    """The predicted series went through the JPEG Lossless decoder: bit for bit the volume of the plain copy."""
    root = hospital["root"] / "in"
    assert {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in (root / "soft").iterdir()} == {JPEGLosslessSV1}
    jpeg, jmeta = convert_series(sorted((root / "soft").iterdir()), crop=None)
    plain, _ = convert_series(sorted((root / "copy").iterdir()), crop=None)
    np.testing.assert_array_equal(jpeg, plain)
    slices = pd.read_csv(hospital["out"] / "slices.csv")
    assert list(slices["sop_uid"]) == jmeta["sop_uids"]


def test_hospital_study_sr_and_sc_validate(hospital):
    study, uid = hospital["study"], hospital["uid"]
    dicom = study["dicom"]
    assert "error" not in dicom and "note" not in dicom  # valid source UIDs: nothing to warn about
    sr = pydicom.dcmread(hospital["out"] / "dicom" / dicom["sr"])
    sc = pydicom.dcmread(hospital["out"] / "dicom" / dicom["sc"])
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == study["study_uid"] and str(ds.PatientName) == "Hospital^Test"
        assert ds.AccessionNumber == "A0001" and UID(ds.SOPInstanceUID).is_valid
        assert ds.SeriesInstanceUID not in uid.values()
    # Evidence: the 8 instances of the predicted series only; the source images of the findings are among them.
    (ev,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = ev.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == uid["soft"] and len(series.ReferencedSOPSequence) == 8
    evidence = {str(r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence}
    images = set(_image_refs(sr.ContentSequence))
    assert images and images <= evidence
    params = " ".join(str(v) for v in _texts(sr.ContentSequence))
    assert f"bundle_sha256={hospital['summary']['bundle_sha256']}" in params
    png = mpimg.imread(hospital["out"] / study["report"])
    np.testing.assert_array_equal(sc.pixel_array, np.rint(png[..., :3] * 255).astype(np.uint8))
    if shutil.which("dciodvfy"):
        for path in (hospital["out"] / "dicom").iterdir():
            res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{path.name}: {errors}"


def _image_refs(seq):
    for item in seq or []:
        if item.ValueType == "IMAGE":
            yield str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        yield from _image_refs(item.get("ContentSequence"))


def _texts(seq):
    for item in seq or []:
        if item.ValueType == "TEXT":
            yield item.TextValue
        yield from _texts(item.get("ContentSequence"))


def test_thin_series_is_reformatted_and_agrees_with_the_thick_one(bundle, plan, tmp_path):
    """One head written at 5 mm (study A) and at 0.625 mm (study B): every thin slice gets a probability, and the
    study results agree within STUDY_TOLERANCE; --folds / --tta cut the work down and are recorded."""
    write_series(
        tmp_path / "in" / "a",
        plan,
        study_uid="1.2.7",
        series_uid="1.2.7.1",
        step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head 5"},
    )
    write_series(
        tmp_path / "in" / "b",
        plan,
        study_uid="1.2.8",
        series_uid="1.2.8.1",
        step=THIN_MM,
        attrs={**SOFT, "SeriesDescription": "Head 0.6"},
    )
    out = tmp_path / "out"
    _run([tmp_path / "in", "--bundle", bundle, "--out", out, "--folds", "0", "--tta", "none", "--device", "cpu"])
    summary = json.loads((out / "studies.json").read_text())
    assert summary["folds"] == [0] and summary["tta"] == ["none"]
    by = {s["study_uid"]: s for s in summary["studies"]}
    thin = by["1.2.8"]["series_used"][0]
    n_slabs = thin["reformat"]["n_slabs"]
    assert thin["reformat"]["n_slices_in"] == 64 and 6 <= n_slabs <= 14
    assert abs(thin["reformat"]["slab_width_mm"] - summary["training_slices"]["slice_spacing_mm"]) < 1.0
    slices = pd.read_csv(out / "slices.csv")
    b = slices[slices["study_uid"] == "1.2.8"]
    assert len(b) == 64 and b["p_any"].nunique() <= n_slabs
    pa = by["1.2.7"]["prediction"]["max_probability"]
    pb = by["1.2.8"]["prediction"]["max_probability"]
    diff = max(abs(pa[c] - pb[c]) for c in CLASSES)
    assert diff <= STUDY_TOLERANCE, f"5 mm {pa} vs 0.625 mm {pb}"
    per_model = pd.read_csv(out / "models.csv")
    assert len(per_model[per_model["study_uid"] == "1.2.8"]) == 64 * per_model["model"].nunique()
    assert np.isfinite(b[[f"p_{c}" for c in CLASSES]].to_numpy()).all()


def test_bad_speed_controls_are_user_errors(bundle, tmp_path, capsys):
    write_series(tmp_path / "in", head_plan(), study_uid="1.2.9", series_uid="1.2.9.1", step=THICK_MM, attrs=SOFT)
    out = tmp_path / "out"
    assert (
        main(["predict-study", str(tmp_path / "in"), "--bundle", str(bundle), "--out", str(out), "--folds", "7"]) == 1
    )
    assert "not [7]" in capsys.readouterr().err
    assert main(["predict-study", str(tmp_path / "in"), "--bundle", str(bundle), "--out", str(out), "--tta", "x"]) == 1
    assert "unknown TTA 'x'" in capsys.readouterr().err
