"""``rsna19 run``: the tiny pipeline end to end, a re-run that skips everything, the job list and the guards."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rsna19.cli import main
from rsna19.constants import CLASSES, PROB_COLUMNS
from rsna19.errors import UserError
from rsna19.io.rsna_csv import read_long, split_ids
from rsna19.pipeline.config import load_pipeline
from rsna19.pipeline.run import STAGES, check_no_leakage, find_layout
from rsna19.submission import validate_submission

PIPELINE = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "tiny.yaml"
MODELS = ["clf2d", "clf2dc_5c", "combine_last"]


def test_run_writes_submission_scores_and_every_fold(tiny_run, tiny_dataset):
    work = tiny_run
    sample = read_long(tiny_dataset / "stage_2_sample_submission.csv")
    expected = pd.unique(split_ids(sample["ID"])[0])
    sub = validate_submission(work / "submission.csv", expected_sops=expected)
    assert len(sub) == 6 * len(expected)
    scores = pd.read_csv(work / "scores.csv")
    assert list(scores.loc[scores["kind"] == "base", "name"]) == MODELS
    assert {"mean", "blend"} <= set(scores["name"])
    assert scores["wll_test"].notna().all()  # the tiny dataset has test_labels.csv
    pd.testing.assert_frame_equal(scores, pd.read_csv(work / "stack" / "tiny" / "scores.csv"))

    cache_index = pd.read_parquet(work / "cache" / "cache_index.parquet")
    train_sops = set(cache_index.loc[cache_index["split"] == "train", "sop_uid"])
    test_sops = set(cache_index.loc[cache_index["split"] == "test", "sop_uid"])
    for m in MODELS:
        oof = pd.concat([pd.read_parquet(work / "runs" / m / f"fold_{k}" / "oof.parquet") for k in range(2)])
        assert oof["sop_uid"].is_unique and set(oof["sop_uid"]) == train_sops
        for k in range(2):
            test = pd.read_parquet(work / "runs" / m / f"fold_{k}" / "test.parquet")
            assert set(test["sop_uid"]) == test_sops
            assert test[list(PROB_COLUMNS)].notna().all().all()

    summary = json.loads((work / "pipeline_summary.json").read_text())
    assert list(summary["timings_s"]) == list(STAGES)
    assert summary["models"] == MODELS
    assert summary["submission_scores"]["wll"] > 0


def test_rerun_skips_every_stage(tiny_run, tiny_dataset, capsys):
    before = (tiny_run / "submission.csv").stat().st_mtime_ns
    assert main(["run", "--data", str(tiny_dataset), "--out", str(tiny_run), "--pipeline", str(PIPELINE)]) == 0
    out = capsys.readouterr().out
    stage_lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(stage_lines) == len(STAGES)
    assert all("skipped" in line for line in stage_lines), stage_lines
    assert "blend" in out and "total" in out and "test wll" in out
    assert (tiny_run / "submission.csv").stat().st_mtime_ns == before


def test_print_jobs_lists_every_model_and_fold(tiny_dataset, tmp_path, capsys):
    work = tmp_path / "w"
    args = ["run", "--data", str(tiny_dataset), "--out", str(work), "--pipeline", str(PIPELINE), "--print-jobs"]
    assert main(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x and not x.startswith("#")]
    assert lines[0].startswith("rsna19 index ") and lines[1].startswith("rsna19 convert ")
    assert lines[2].startswith("rsna19 folds ")
    jobs = [x for x in lines if x.startswith("rsna19 train ")]
    assert len(jobs) == len(MODELS) * 2
    for m in MODELS:
        for k in range(2):
            assert any(f"{m}.yaml --fold {k} " in j and "--split test" in j for j in jobs)
    assert all("train.epochs=1" in j and "train.device=cpu" in j for j in jobs)
    assert any(x.startswith("rsna19 stack ") and "models=[clf2d,clf2dc_5c,combine_last]" in x for x in lines)
    assert any(x.startswith("rsna19 submit ") for x in lines)
    assert not work.exists()  # printing the jobs runs nothing


def test_layout_accepts_stage_1_names_and_explains_a_wrong_folder(tmp_path):
    (tmp_path / "stage_1_train").mkdir()
    (tmp_path / "stage_1_train.csv").write_text("ID,Label\n")
    (tmp_path / "stage_1_test").mkdir()
    layout = find_layout(tmp_path)
    assert layout.train_dir.name == "stage_1_train" and layout.test_dir.name == "stage_1_test"
    assert layout.test_labels is None
    with pytest.raises(UserError, match="RSNA layout"):
        find_layout(tmp_path / "stage_1_test")


def test_leakage_guard():
    rows = pd.DataFrame(
        {
            "sop_uid": ["a", "b", "c"],
            "series_uid": ["s1", "s2", "s3"],
            "patient_id": ["p1", "p2", "p3"],
            "split": ["train", "train", "test"],
            **{c: [0.0, 0.0, float("nan")] for c in CLASSES},
        }
    )
    folds = pd.DataFrame({"patient_id": ["p1", "p2"], "fold": [0, 1]})
    check_no_leakage(rows, folds)
    with pytest.raises(UserError, match="more than one fold"):
        check_no_leakage(rows, pd.DataFrame({"patient_id": ["p1", "p1", "p2"], "fold": [0, 1, 1]}))
    shared = rows.assign(patient_id=["p1", "p2", "p2"])
    with pytest.raises(UserError, match="test patient"):
        check_no_leakage(shared, folds)
    with pytest.raises(UserError, match="no fold"):
        check_no_leakage(rows, folds.iloc[:1])


def test_pipeline_config_errors(tmp_path):
    cfg = load_pipeline(PIPELINE, ["n_folds=2"])
    assert cfg.model_names == MODELS and Path(cfg.stack).is_file()
    with pytest.raises(UserError, match="unknown key"):
        load_pipeline(PIPELINE, ["n_fold=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [nope.yaml]\nstack: ../stack/tiny.yaml\n")
    with pytest.raises(UserError, match="nope.yaml"):
        load_pipeline(bad)
    with pytest.raises(UserError, match="not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_submission_fills_unreadable_test_slices(tiny_run, tiny_dataset, tmp_path):
    from rsna19.pipeline.run import DataLayout, _submission_frame

    sample = read_long(tiny_dataset / "stage_2_sample_submission.csv")
    extra = pd.DataFrame({"ID": [f"ID_000000bad_{c}" for c in CLASSES], "Label": "0.5"})
    path = tmp_path / "sample.csv"
    pd.concat([extra, sample]).to_csv(path, index=False)
    layout = DataLayout(tmp_path, tmp_path, path, None, path, None)
    wide, expected, n_filled = _submission_frame(tiny_run / "stack" / "tiny", "blend", layout)
    assert n_filled == 1 and expected[0] == "ID_000000bad" and list(wide["sop_uid"]) == expected
    assert validate_submission(wide, expected_sops=expected) is not None


def test_parallel_jobs_run_in_their_own_processes_and_report_failures(tmp_path):
    """``run_jobs`` with 2 spawned processes: every job runs, results come back, and a failing job is raised."""
    from rsna19.pipeline.run import run_jobs
    from rsna19.utils.atomic import OutputError, write_text

    done: dict[str, float] = {}
    jobs = [(f"job{i}", write_text, (f"payload {i}\n", tmp_path / f"out{i}.txt")) for i in range(3)]
    run_jobs(jobs, n_jobs=2, threads_per_job=1, on_done=lambda key, s: done.__setitem__(key, s))
    assert sorted(done) == ["job0", "job1", "job2"] and all(s >= 0 for s in done.values())
    assert [(tmp_path / f"out{i}.txt").read_text() for i in range(3)] == [f"payload {i}\n" for i in range(3)]

    # A job whose output folder is a file fails in its worker; the error reaches the caller with its reason.
    (tmp_path / "afile").write_text("")
    bad = [("ok", write_text, ("x\n", tmp_path / "ok.txt")), ("bad", write_text, ("x\n", tmp_path / "afile" / "f"))]
    with pytest.raises(OutputError, match="not a folder"):
        run_jobs(bad, n_jobs=2)
    assert (tmp_path / "ok.txt").read_text() == "x\n"  # the other job still finished
