"""``rsna19 predict-study``: a nested folder of mixed studies with junk files, a zip, and a bad study."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pydicom
import pytest
from tinyfamilies import FAMILIES

from rsna19.cli import main
from rsna19.core.constants import PROB_COLUMNS
from rsna19.inference.inputs import collect_studies
from rsna19.study.batch import SLICE_COLUMNS, report_name, write_report
from rsna19.study.bundle import export_bundle
from rsna19.study.predictor import StudyPredictor


@pytest.fixture(scope="module")
def case(tiny_run, tiny_dataset, tmp_path_factory):
    """A bundle of the tiny run and an input folder: 2 test studies mixed in one folder, a train study nested
    deeper, a study whose only series is MR (must fail alone), and junk files."""
    root = tmp_path_factory.mktemp("predict_study")
    exported = export_bundle(tiny_run, root / "bundle")
    index = pd.read_parquet(tiny_run / "index.parquet")
    test_studies = sorted(index.loc[index["split"] == "test", "study_uid"].unique())
    train_studies = sorted(index.loc[index["split"] == "train", "study_uid"].unique())
    inp = root / "input"
    (inp / "mixed").mkdir(parents=True)
    (inp / "deep" / "er" / "x").mkdir(parents=True)
    (inp / "mr").mkdir()
    for i, path in enumerate(index.loc[index["study_uid"].isin(test_studies), "path"]):
        shutil.copy(path, inp / "mixed" / f"IM{i:04d}")  # no extension, as scanners write them
    good_train = train_studies[0]
    for path in index.loc[index["study_uid"] == good_train, "path"]:
        shutil.copy(path, inp / "deep" / "er" / "x")
    bad = train_studies[1]
    for i, path in enumerate(index.loc[index["study_uid"] == bad, "path"]):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(inp / "mr" / f"mr{i}.dcm")
    (inp / "readme.txt").write_text("not a DICOM file\n")
    (inp / "deep" / ".DS_Store").write_bytes(b"\x00\x01Bud1" * 10)
    (inp / "mixed" / "truncated.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    return {
        "bundle": exported.path,
        "exported": exported,
        "input": inp,
        "index": index,
        "good": [*test_studies, good_train],
        "bad": bad,
        "test_studies": test_studies,
        "root": root,
    }


@pytest.fixture(scope="module")
def folder_run(case):
    out = case["root"] / "out"
    assert main(["predict-study", str(case["input"]), "--bundle", str(case["bundle"]), "--out", str(out)]) == 0
    return out


def test_outputs_per_study(case, folder_run):
    slices = pd.read_csv(folder_run / "slices.csv")
    assert list(slices.columns) == list(SLICE_COLUMNS)
    assert set(slices["study_uid"]) == set(case["good"])
    index = case["index"]
    assert set(slices["sop_uid"]) == set(index.loc[index["study_uid"].isin(case["good"]), "sop_uid"])
    probs = slices[list(PROB_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs > 0).all() and (probs < 1).all()
    assert (slices.groupby("series_uid")["position"].apply(lambda p: p.is_monotonic_increasing)).all()

    summary = json.loads((folder_run / "studies.json").read_text())
    assert summary["n_studies"] == 4 and summary["n_ok"] == 3 and summary["n_errors"] == 1
    skipped = {f["path"] for f in summary["files_skipped"]}
    assert {"readme.txt", "deep/.DS_Store", "mixed/truncated.dcm"} <= skipped
    by_uid = {s["study_uid"]: s for s in summary["studies"]}
    for uid in case["good"]:
        s = by_uid[uid]
        assert s["status"] == "ok" and s["error"] is None
        assert len(s["series_used"]) == 1
        assert set(s["prediction"]["max_probability"]) == {c.removeprefix("p_") for c in PROB_COLUMNS}
        assert s["prediction"]["top_slices"][0]["sop_uid"] in set(slices["sop_uid"])
        assert set(s["per_model_max"]) == set(FAMILIES)
        png = folder_run / s["report"]
        assert png.name == report_name(uid) and png.read_bytes().startswith(b"\x89PNG")
    bad = by_uid[case["bad"]]
    assert bad["status"] == "error" and "MR" in bad["error"] and "no usable axial CT" in bad["error"]
    assert bad["series_skipped"] and not (folder_run / report_name(case["bad"])).exists()


def test_same_probabilities_as_the_training_pipeline(case, folder_run):
    """Test studies: predict-study (own conversion, bundle) = the run's stacked test predictions (cache, runs)."""
    slices = pd.read_csv(folder_run / "slices.csv").set_index("sop_uid")
    l2 = case["exported"].level2
    want = pd.DataFrame(case["exported"].stacker_test, columns=list(PROB_COLUMNS))
    want.index = l2.test_features["sop_uid"].to_numpy()
    got = slices.loc[want.index, list(PROB_COLUMNS)]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_every_family_serves_what_rsna19_predict_gives(case, folder_run, tiny_run, model):
    """Per family: predict-study on the test DICOMs (own conversion, bundle, in-memory embeddings for seq) equals the
    mean over folds of `rsna19 predict`'s test.parquet of the same series in the cache (≤ 1e-4, float32 CPU)."""
    manifest = json.loads((case["bundle"] / "bundle.json").read_text())
    assert {m["name"]: m["family"] for m in manifest["models"]} == FAMILIES
    per_model = pd.read_csv(folder_run / "models.csv")
    got = per_model[per_model["model"] == model].set_index("sop_uid")
    assert (got["family"] == FAMILIES[model]).all()
    folds = [pd.read_parquet(tiny_run / "runs" / model / f"fold_{k}" / "test.parquet") for k in range(2)]
    want = pd.concat(folds).groupby("sop_uid")[list(PROB_COLUMNS)].mean()
    assert set(want.index) <= set(got.index)
    diff = np.abs(got.loc[want.index, list(PROB_COLUMNS)].to_numpy() - want.to_numpy()).max()
    assert diff <= 1e-4, f"{model}: max abs difference {diff:.2e}"


@pytest.fixture(scope="module")
def predictor(case):
    return StudyPredictor.load(case["bundle"])


def _written(folder_run, name, uid):
    df = pd.read_csv(folder_run / name, dtype={"study_uid": str, "series_uid": str, "sop_uid": str})
    return df[df["study_uid"] == uid].reset_index(drop=True)


def test_in_memory_result_equals_what_the_command_writes(case, folder_run, predictor, tmp_path):
    """StudyPredictor.predict on one study's files: its slices, per-model rows, studies.json entry and report picture
    are what `rsna19 predict-study` wrote for that study (same bundle, same options)."""
    uid = case["test_studies"][0]
    index = case["index"]
    files = list(index.loc[index["study_uid"] == uid, "path"])
    result = predictor.predict(files)
    assert result.ok and result.study_uid == uid
    pd.testing.assert_frame_equal(result.slices(), _written(folder_run, "slices.csv", uid), check_dtype=False)
    pd.testing.assert_frame_equal(result.models(), _written(folder_run, "models.csv", uid), check_dtype=False)

    written = next(s for s in json.loads((folder_run / "studies.json").read_text())["studies"] if s["study_uid"] == uid)
    entry = json.loads(json.dumps(result.entry()))
    for key in ("prediction", "study_result", "per_model_max", "result_series", "series_ranking", "report_series"):
        assert entry[key] == written[key], key
    strip = ("seconds", "convert_s", "reformat_s", "models_s", "stack_s")
    used = [{k: v for k, v in d.items() if k not in strip} for d in entry["series_used"]]
    assert used == [{k: v for k, v in d.items() if k not in strip} for d in written["series_used"]]
    assert result.top_slices[0]["sop_uid"] == result.slices().sort_values("p_any")["sop_uid"].iloc[-1]
    assert result.cam is not None and result.cam.ndim == 2
    png = tmp_path / "report.png"
    write_report(result, png)
    assert png.read_bytes() == (folder_run / written["report"]).read_bytes()


def test_predictor_takes_datasets_and_read_studies(case, predictor, tmp_path):
    """The same study given as pydicom datasets, and as a StudyInput already read, gives the same slices."""
    uid = case["test_studies"][1]
    index = case["index"]
    paths = list(index.loc[index["study_uid"] == uid, "path"])
    from_files = predictor.predict(paths).slices()
    assert len(from_files) == len(paths)
    from_datasets = predictor.predict([pydicom.dcmread(p) for p in paths]).slices()
    pd.testing.assert_frame_equal(from_datasets, from_files)
    (tmp_path / "study").mkdir()
    for p in paths:
        shutil.copy(p, tmp_path / "study")
    studies = collect_studies(tmp_path / "study", tmp_path / "work").studies
    assert list(studies) == [uid]
    pd.testing.assert_frame_equal(predictor.predict(studies[uid]).slices(), from_files)


def test_zip_input_gives_the_same_result(case, folder_run, tmp_path):
    archive = tmp_path / "studies.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(case["input"].rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(case["input"]).as_posix())
    out = tmp_path / "out"
    args = ["predict-study", str(archive), "--bundle", str(case["bundle"]), "--out", str(out), "--no-cam"]
    assert main(args) == 0
    a = pd.read_csv(folder_run / "slices.csv").sort_values("sop_uid").reset_index(drop=True)
    b = pd.read_csv(out / "slices.csv").sort_values("sop_uid").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)


def test_only_bad_input_exits_1(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict-study", str(case["input"] / "mr"), "--bundle", str(case["bundle"]), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "error" in printed and "0 of 1 studies" in printed
    assert pd.read_csv(out / "slices.csv").empty
