"""Calibrated study results, ``predict-study --dicom-out`` (SR + Secondary Capture) and ``rsna19 evaluate`` on a
bundle of the tiny run and test studies rewritten the way a hospital sends them (valid UIDs, patient module)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import warnings

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, generate_uid

from rsna19.cli import main
from rsna19.core.calibration import apply_platt, apply_study_model
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.core.metrics import decision_metrics, study_auc_any
from rsna19.study.bundle import STUDY_MODEL_FILE, export_bundle, load_bundle

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PAT-77", "PatientBirthDate": "19700101", "PatientSex": "F"}
STUDY = {"StudyDate": "20240102", "StudyTime": "101500", "AccessionNumber": "ACC1", "StudyID": "1"}
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """Bundle of the tiny run; two of its test studies with fresh valid UIDs and a patient module; predict-study
    with --dicom-out on them."""
    root = tmp_path_factory.mktemp("study_dicom")
    exported = export_bundle(tiny_run, root / "bundle")
    index = pd.read_parquet(tiny_run / "index.parquet")
    studies = sorted(index.loc[index["split"] == "test", "study_uid"].unique())[:2]
    inp = root / "input"
    inp.mkdir()
    new_uid: dict[str, str] = {}
    sources = {}
    for i, row in enumerate(index[index["study_uid"].isin(studies)].itertuples()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # RSNA-style "ID_<hex>" UIDs, replaced here
            ds = pydicom.dcmread(row.path)
            for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                setattr(ds, kw, new_uid.setdefault(str(getattr(ds, kw)), generate_uid()))
            ds.SOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for kw, value in {**PATIENT, **STUDY}.items():
            setattr(ds, kw, value)
        ds.save_as(inp / f"IM{i:04d}")
        sources[str(ds.SOPInstanceUID)] = ds
    out = root / "out"
    args = ["predict-study", str(inp), "--bundle", str(root / "bundle"), "--out", str(out), "--no-cam"]
    assert main([*args, "--dicom-out", str(out / "dicom")]) == 0
    summary = json.loads((out / "studies.json").read_text())
    return {
        "root": root,
        "out": out,
        "bundle": root / "bundle",
        "exported": exported,
        "summary": summary,
        "sources": sources,
        "index": index,
        "uid_map": new_uid,
        "studies": [new_uid[s] for s in studies],
    }


def _items(seq):
    """Content items of an SR content sequence, depth first: (concept meaning, item, depth)."""
    for item in seq or []:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        yield name, item
        yield from _items(item.get("ContentSequence"))


def _groups(sr):
    """Measurement groups of a TID 1500 report: finding meaning → {concept meaning: value or [image uids]}."""
    groups = {}
    for name, item in _items(sr.ContentSequence):
        if name != "Measurement Group":
            continue
        g: dict = {"images": [], "text": []}
        for sub_name, sub in _items(item.ContentSequence):
            if sub.ValueType == "NUM":
                g[sub_name] = float(sub.MeasuredValueSequence[0].NumericValue)
            elif sub.ValueType == "CODE":
                g.setdefault(sub_name, sub.ConceptCodeSequence[0].CodeMeaning)
            elif sub.ValueType == "IMAGE":
                g["images"].append(str(sub.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            elif sub.ValueType == "TEXT":
                g["text"].append(f"{sub_name}: {sub.TextValue}")
        groups[g["Finding"]] = g
    return groups


FINDING = {  # SNOMED CT, every one (issue 26: no private coding scheme)
    "any": "Intracranial hemorrhage (disorder)",
    "epidural": "Extradural hemorrhage",
    "intraparenchymal": "Cerebral hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid intracranial hemorrhage",
    "subdural": "Subdural intracranial hemorrhage",
}


def test_bundle_holds_a_checked_study_model(served, tmp_path):
    bundle = served["bundle"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["files"][STUDY_MODEL_FILE] == hashlib.sha256((bundle / STUDY_MODEL_FILE).read_bytes()).hexdigest()
    model = json.loads((bundle / STUDY_MODEL_FILE).read_text())
    assert model == served["exported"].study_model
    assert model["source"]["oof"].endswith("oof.parquet") and model["n_studies"] > 0
    for c in CLASSES:
        assert manifest["study_model"]["operating_points"][c]["threshold"] == model["classes"][c]["threshold"]
    # A changed study model is refused like any other bundle file.
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    model["classes"]["any"]["threshold"] = 0.0
    (copy / STUDY_MODEL_FILE).write_text(json.dumps(model))
    with pytest.raises(UserError, match="checksum"):
        load_bundle(copy)
    # A bundle written before study models existed still loads, without one.
    manifest.pop("study_model")
    del manifest["files"][STUDY_MODEL_FILE]
    (copy / STUDY_MODEL_FILE).unlink()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    old = load_bundle(copy)
    assert old.study_model is None and old.sha256 == hashlib.sha256((copy / "bundle.json").read_bytes()).hexdigest()


def _ab(model: dict, c: str) -> dict:
    return {"a": model["classes"][c]["a"], "b": model["classes"][c]["b"]}


def test_studies_json_has_the_calibrated_result(served):
    summary = served["summary"]
    sha = hashlib.sha256((served["bundle"] / "bundle.json").read_bytes()).hexdigest()
    assert summary["bundle_sha256"] == sha and summary["bundle_version"] == 1 and summary["rsna19_version"]
    model = json.loads((served["bundle"] / STUDY_MODEL_FILE).read_text())
    slices = pd.read_csv(served["out"] / "slices.csv")
    assert summary["n_ok"] == 2
    for s in summary["studies"]:
        r = s["study_result"]
        # Scored as the operating points were fitted: each fold's own study maximum, then their mean, which is never
        # below the maximum of the fold-averaged slices that slices.csv holds.
        assert r["folds"] == len(load_bundle(served["bundle"]).models[0].members) >= 2
        fold_mean = apply_study_model(model, slices[slices["study_uid"] == s["study_uid"]])
        assert fold_mean["folds"] == 0
        assert fold_mean["classes"]["any"]["score"] == pytest.approx(s["prediction"]["max_probability"]["any"])
        for c in CLASSES:
            e = r["classes"][c]
            assert e["score"] >= fold_mean["classes"][c]["score"] - 1e-6
            assert e["probability"] == pytest.approx(apply_platt(e["score"], **_ab(model, c)), abs=1e-5)  # both rounded
            assert e["above_operating_point"] == (e["probability"] >= e["threshold"])
            # Reported: a subtype only within a positive any.
            assert e["positive"] == (e["above_operating_point"] and r["classes"]["any"]["above_operating_point"])
            assert e["threshold"] == summary["study_model"]["classes"][c]["threshold"]
        assert r["flag"] == ("positive" if r["classes"]["any"]["positive"] else "negative")


def test_sr_round_trip(served):
    summary, sources = served["summary"], served["sources"]
    slices = pd.read_csv(served["out"] / "slices.csv")
    for s in summary["studies"]:
        sr_path = served["out"] / "dicom" / s["dicom"]["sr"]
        sr = pydicom.dcmread(sr_path)
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.SOPInstanceUID == s["dicom"]["sr_sop_instance_uid"]
        assert sr.StudyInstanceUID == s["study_uid"]
        assert sr.SeriesInstanceUID not in {str(d.SeriesInstanceUID) for d in sources.values()}
        assert str(sr.PatientName) == PATIENT["PatientName"] and sr.PatientID == PATIENT["PatientID"]
        assert sr.AccessionNumber == STUDY["AccessionNumber"] and sr.StudyDate == STUDY["StudyDate"]
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
        # Evidence: every instance of the predicted series, under the right study and series.
        study_sops = set(slices.loc[slices["study_uid"] == s["study_uid"], "sop_uid"])
        ev = sr.CurrentRequestedProcedureEvidenceSequence
        assert [e.StudyInstanceUID for e in ev] == [s["study_uid"]]
        listed = {
            str(r.ReferencedSOPInstanceUID): str(series.SeriesInstanceUID)
            for series in ev[0].ReferencedSeriesSequence
            for r in series.ReferencedSOPSequence
        }
        assert set(listed) == study_sops
        assert all(listed[u] == str(sources[u].SeriesInstanceUID) for u in listed)

        groups = _groups(sr)
        assert set(groups) == set(FINDING.values())
        top_any = s["prediction"]["top_slices"][0]["sop_uid"]
        for c in CLASSES:
            g, e = groups[FINDING[c]], s["study_result"]["classes"][c]
            assert g["Probability"] == pytest.approx(e["probability"], abs=1e-9)
            assert g["CAD Operating Point"] == pytest.approx(e["threshold"], rel=1e-9)
            assert g["Case Sensitivity"] == pytest.approx(e["target_sensitivity"])
            assert g["Score"] == pytest.approx(e["score"], abs=1e-9)
            assert g[FINDING[c]] == ("Present" if e["positive"] else "Absent")
            assert 0 < len(g["images"]) <= 3 and set(g["images"]) <= study_sops
            algo = " ".join(g["text"])
            assert f"bundle_sha256={summary['bundle_sha256']}" in algo and "bundle_version=1" in algo
        assert top_any in groups[FINDING["any"]]["images"]
    # No patient data in file names: the names are the new SOP instance UIDs.
    for f in (served["out"] / "dicom").iterdir():
        assert UID(f.stem.split("_", 1)[1]).is_valid
        assert not any(v.lower() in f.name.lower() for v in ("doe", "jane", "pat-77", "acc1"))


def test_sc_round_trip(served):
    sources = served["sources"]
    for s in served["summary"]["studies"]:
        sc = pydicom.dcmread(served["out"] / "dicom" / s["dicom"]["sc"])
        assert sc.SOPClassUID == SECONDARY_CAPTURE and sc.StudyInstanceUID == s["study_uid"]
        assert sc.SeriesInstanceUID not in {str(d.SeriesInstanceUID) for d in sources.values()}
        assert str(sc.PatientName) == PATIENT["PatientName"] and sc.PatientBirthDate == PATIENT["PatientBirthDate"]
        png = mpimg.imread(served["out"] / s["report"])
        want = np.rint(png[..., :3] * 255).astype(np.uint8)
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == want.shape
        np.testing.assert_array_equal(sc.pixel_array, want)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_finds_no_error(served):
    for s in served["summary"]["studies"]:
        for key in ("sr", "sc"):
            path = served["out"] / "dicom" / s["dicom"][key]
            res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{key}: {errors}"


@pytest.mark.skipif(
    shutil.which("dsr2html") is None or shutil.which("dcmj2pnm") is None,
    reason="DCMTK (Debian package dcmtk) not installed",
)
def test_dcmtk_viewers_open_the_sr_and_the_sc(served, tmp_path):
    """DCMTK's SR renderer reads the whole content tree; its image tool renders the SC picture."""
    for s in served["summary"]["studies"]:
        sr = served["out"] / "dicom" / s["dicom"]["sr"]
        res = subprocess.run(["dsr2html", str(sr), str(tmp_path / "sr.html")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        html = (tmp_path / "sr.html").read_text(errors="replace")
        assert "Imaging Measurement Report" in html and "rsna19 any" in html
        sc = served["out"] / "dicom" / s["dicom"]["sc"]
        png = tmp_path / "sc.png"
        res = subprocess.run(["dcmj2pnm", "--write-png", str(sc), str(png)], capture_output=True, text=True)
        assert res.returncode == 0 and png.read_bytes().startswith(b"\x89PNG"), res.stderr


def test_evaluate_a_stack_folder(tiny_run, tiny_dataset, tmp_path, capsys):
    stack = next((tiny_run / "stack").glob("*/test.parquet")).parent
    out = tmp_path / "eval"
    args = ["evaluate", str(stack), "--labels", str(tiny_dataset / "test_labels.csv"), "--out", str(out)]
    assert main(args) == 0
    assert "study_score" in capsys.readouterr().out
    table = pd.read_csv(out / "evaluation.csv")
    assert list(table["level"].unique()) == ["study", "study_score", "slice"] and len(table) == 18
    for png in ("roc.png", "reliability.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    # Platt scaling is monotone: the calibrated study AUC of any is the AUC of the study max.
    test = pd.read_parquet(stack / "test.parquet")
    test = test[test["model"] == "blend"]
    from rsna19.io.rsna_csv import read_labels

    labels = read_labels(tiny_dataset / "test_labels.csv").set_index("sop_uid")
    want = study_auc_any(test["study_uid"], labels.loc[test["sop_uid"], "any"], test["p_any"])
    got = table[(table["level"] == "study") & (table["class"] == "any")].iloc[0]
    assert got["auc"] == pytest.approx(want) and got["n"] == test["study_uid"].nunique()
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["study_model"] == "fitted on the stack's oof.parquet"


def test_evaluate_predict_study_outputs(served, tiny_dataset, tmp_path):
    """Study-level labels (study_uid + classes) of the rewritten studies; the calibrated numbers of studies.json."""
    from rsna19.io.rsna_csv import read_labels

    index, uid_map = served["index"], served["uid_map"]
    slices = read_labels(tiny_dataset / "test_labels.csv").merge(index[["sop_uid", "study_uid"]], on="sop_uid")
    labels = slices.groupby("study_uid")[list(CLASSES)].max().reset_index()
    labels["study_uid"] = labels["study_uid"].map(uid_map)
    labels = labels[labels["study_uid"].isin(served["studies"])]
    assert len(labels) == 2
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "eval"
    assert main(["evaluate", str(served["out"]), "--labels", str(tmp_path / "labels.csv"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "evaluation.csv")
    assert set(table["level"]) == {"study", "study_score"}  # no slice labels given
    by_uid = {s["study_uid"]: s["study_result"] for s in served["summary"]["studies"]}
    y = labels.set_index("study_uid").loc[list(by_uid)]
    for c in CLASSES:
        p = np.array([by_uid[u]["classes"][c]["probability"] for u in by_uid])
        want = decision_metrics(y[c].to_numpy(), p, by_uid[next(iter(by_uid))]["classes"][c]["threshold"])
        got = table[(table["level"] == "study") & (table["class"] == c)].iloc[0]
        for k in ("sensitivity", "specificity", "brier", "ece"):
            assert (np.isnan(got[k]) and np.isnan(want[k])) or got[k] == pytest.approx(want[k]), (c, k)


def test_evaluate_dicom_studies_in_memory(served, tmp_path):
    """`rsna19 evaluate DICOM --bundle B` predicts the studies in memory (StudyPredictor, nothing written but the
    evaluation): the same table as evaluating what predict-study wrote for them with the same bundle."""
    uids = served["studies"]
    labels = pd.DataFrame({"study_uid": uids, **{c: [1, 0] for c in CLASSES}})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    common = ["--labels", str(tmp_path / "labels.csv"), "--bundle", str(served["bundle"])]
    assert main(["evaluate", str(served["out"]), *common, "--out", str(tmp_path / "written")]) == 0
    assert main(["evaluate", str(served["root"] / "input"), *common, "--out", str(tmp_path / "memory")]) == 0
    written = pd.read_csv(tmp_path / "written" / "evaluation.csv")
    memory = pd.read_csv(tmp_path / "memory" / "evaluation.csv")
    assert len(memory) == 2 * len(CLASSES)
    pd.testing.assert_frame_equal(memory, written)
    assert sorted(os.listdir(tmp_path / "memory")) == sorted(os.listdir(tmp_path / "written"))
