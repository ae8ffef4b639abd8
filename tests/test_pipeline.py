"""``rsna19 run``: the tiny pipeline end to end, a re-run that skips everything, the job list and the guards."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from tinyfamilies import EMBEDDINGS, MODELS, PIPELINE, tiny_models

from rsna19.cli import main
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.inference.submission import validate_submission
from rsna19.io.rsna_csv import read_long, split_ids
from rsna19.pipeline.config import load_pipeline
from rsna19.pipeline.layout import check_no_leakage, find_layout
from rsna19.pipeline.stages import STAGES


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


def test_print_jobs_lists_every_job_with_its_dependencies(tiny_dataset, tmp_path, capsys):
    work = tmp_path / "w"
    args = ["run", "--data", str(tiny_dataset), "--out", str(work), "--pipeline", str(PIPELINE), "--print-jobs"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [x for x in out if x.startswith("# job ")]
    cmds = [x for x in out if x and not x.startswith("#")]
    assert len(heads) == len(cmds) - 1  # + the closing `rsna19 run` line
    assert cmds[0].startswith("rsna19 index ") and cmds[1].startswith("rsna19 convert ")
    assert cmds[2].startswith("rsna19 folds ")
    after = {h.split()[2]: h.split("(after: ")[1].split(";")[0] for h in heads}
    for m in MODELS:
        for k in range(2):
            assert any(f"{m}.yaml --fold {k} " in c for c in cmds if c.startswith("rsna19 train "))
            assert f"train/{m}/fold_{k}" in after[f"predict/{m}/fold_{k}"]
    assert all("train.epochs=1" in c and "train.device=cpu" in c for c in cmds if c.startswith("rsna19 train "))
    # A model reading embeddings waits for those of every fold of its image model; they wait for its training.
    assert EMBEDDINGS, "the tiny pipeline has a model that reads embeddings"
    for m, image in EMBEDDINGS.items():
        assert after[f"train/{m}/fold_0"] == f"folds, embed/{image}/fold_0, embed/{image}/fold_1"
        assert after[f"embed/{image}/fold_1"] == f"train/{image}/fold_1"
        assert f"embed/{image}/fold_0" in after[f"predict/{m}/fold_0"]
        # Two TTA views (the tiny pipeline's): the image model predicts with its own pass, beside its embed job.
        assert len(load_pipeline(PIPELINE).tta) == 2 and "embed/" not in after[f"predict/{image}/fold_0"]
    keys = [h.split()[2] for h in heads]
    assert all(keys.index(d) < keys.index(k) for k, deps in after.items() for d in deps.split(", ") if d != "-")
    assert any(" rsna19 stack " in x and f"models=[{','.join(MODELS)}]" in x and "--part finish" in x for x in cmds)
    assert "stack/features" in after["stack"] and "stack/lgbm/fold_1" in after["stack"]
    assert any(x.startswith("rsna19 submit ") for x in cmds)
    assert not work.exists()  # printing the jobs runs nothing


def test_with_one_view_an_embedded_image_model_predicts_after_its_embed_job(tiny_dataset, tmp_path):
    from rsna19.pipeline.stages import plan

    jobs = {j.key: j for j in plan(tiny_dataset, tmp_path / "w", load_pipeline(PIPELINE, ["tta=[none]"]))}
    for image in set(EMBEDDINGS.values()):
        for k in range(2):
            assert f"embed/{image}/fold_{k}" in jobs[f"predict/{image}/fold_{k}"].deps
    others = [m for m in MODELS if m not in EMBEDDINGS.values()]
    assert others and all("embed/" + m not in " ".join(jobs[f"predict/{m}/fold_0"].deps) for m in others)


def test_a_sequence_model_on_its_own_fold_waits_for_the_embed_jobs_it_reads(tiny_dataset, tmp_path):
    """``embedding_source: fold`` reads fold k's embeddings alone; with ``train_logits: oof`` also the other folds'
    held-out logits, so its training waits for every fold's embed job."""
    from rsna19.pipeline.stages import plan

    for extra, reads in (([], [0]), (["data.train_logits=oof"], [0, 1])):
        cfg = load_pipeline(PIPELINE)
        for m in EMBEDDINGS:
            cfg.model_overrides[m] = [*cfg.model_overrides.get(m, []), "data.embedding_source=fold", *extra]
        jobs = {j.key: j for j in plan(tiny_dataset, tmp_path / "w", cfg)}
        for m, image in EMBEDDINGS.items():
            embeds = [d for d in jobs[f"train/{m}/fold_0"].deps if d.startswith("embed/")]
            assert embeds == [f"embed/{image}/fold_{j}" for j in reads]


def test_print_jobs_assigns_a_gpu_slot_to_each_parallel_job(tiny_dataset, tmp_path):
    from rsna19.pipeline.jobs import pipeline_jobs

    cfg = load_pipeline(PIPELINE, ["device=cuda", "jobs=2"])
    lines = pipeline_jobs(tiny_dataset, tmp_path / "w", cfg)
    train = [x for x in lines if "rsna19 train " in x and not x.startswith("#")]
    assert [x.split()[0] for x in train[:4]] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"] * 2
    assert not any(x.startswith("CUDA") for x in lines if "rsna19 index" in x or "rsna19 stack" in x)
    cfg = load_pipeline(PIPELINE, ["device=cuda", "jobs=2", "gpus_per_job=2"])
    lines = pipeline_jobs(tiny_dataset, tmp_path / "w", cfg)
    train = [x for x in lines if "rsna19 train " in x and not x.startswith("#")]
    assert train[1].startswith("CUDA_VISIBLE_DEVICES=2,3 torchrun --standalone --nproc_per_node=2 -m rsna19 train")


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
            "study_uid": ["t1", "t2", "t3"],
            "patient_id": ["p1", "p2", "p3"],
            "split": ["train", "train", "test"],
            **{c: [0.0, 0.0, float("nan")] for c in CLASSES},
        }
    )
    folds = pd.DataFrame({"patient_id": ["p1", "p2"], "fold": [0, 1]})
    check_no_leakage(rows, folds)
    with pytest.raises(UserError, match="more than one fold"):
        check_no_leakage(rows, pd.DataFrame({"patient_id": ["p1", "p1", "p2"], "fold": [0, 1, 1]}))
    assert check_no_leakage(rows, folds) == []
    # A patient with studies on both sides (a split fixed by someone else): a warning with the count, not a stop.
    shared = rows.assign(patient_id=["p1", "p2", "p2"])
    warnings = check_no_leakage(shared, folds)
    assert len(warnings) == 1 and warnings[0].startswith("1 patient(s) have studies in both")
    # The same study, series or slice on both sides is still leakage.
    for col in ("study_uid", "series_uid", "sop_uid"):
        with pytest.raises(UserError, match="leakage"):
            check_no_leakage(shared.assign(**{col: ["a1", "a2", "a2"]}), folds)
    with pytest.raises(UserError, match="test patient p3 has a training fold"):
        check_no_leakage(rows, pd.concat([folds, pd.DataFrame({"patient_id": ["p3"], "fold": [0]})]))
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
    from rsna19.pipeline.layout import DataLayout
    from rsna19.pipeline.layout import submission_frame as _submission_frame

    sample = read_long(tiny_dataset / "stage_2_sample_submission.csv")
    extra = pd.DataFrame({"ID": [f"ID_000000bad_{c}" for c in CLASSES], "Label": "0.5"})
    path = tmp_path / "sample.csv"
    pd.concat([extra, sample]).to_csv(path, index=False)
    layout = DataLayout(tmp_path, tmp_path, path, None, path, None)
    wide, expected, n_filled = _submission_frame(tiny_run / "stack" / "tiny", "blend", layout)
    assert n_filled == 1 and expected[0] == "ID_000000bad" and list(wide["sop_uid"]) == expected
    assert validate_submission(wide, expected_sops=expected) is not None


class _WriteJob:
    """A real job for the executor: writes a file (after its dependencies' files exist)."""

    pooled = True

    def __init__(self, key: str, deps: tuple[str, ...], out: Path, fail: bool = False):
        self.key, self.deps, self.out, self.fail = key, deps, out, fail

    def done(self) -> bool:
        return self.out.is_file()

    def run(self) -> str:
        import os

        for d in self.deps:  # a dependency's output is there before this job starts
            assert (self.out.parent / f"{d}.txt").is_file(), d
        if self.fail:
            raise UserError(f"job {self.key} failed on purpose")
        self.out.write_text(f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')}\n")
        return "written"


def test_graph_runs_in_dependency_order_in_worker_processes_and_reports_failures(tmp_path):
    """``run_graph`` with 2 spawned workers: order, GPU slots, done jobs skipped, a failure stops its dependents."""
    import os

    from rsna19.pipeline.executor import gpu_slots, run_graph

    jobs = [_WriteJob("a", (), tmp_path / "a.txt"), _WriteJob("b", (), tmp_path / "b.txt")]
    jobs += [_WriteJob("c", ("a", "b"), tmp_path / "c.txt"), _WriteJob("d", ("c",), tmp_path / "d.txt")]
    events = run_graph(jobs, n_jobs=2, threads=1, gpu_visible=gpu_slots(2, 1, 2))
    assert [e.key for e in events][-2:] == ["c", "d"] and all(e.state == "ran" for e in events)
    pids = {(tmp_path / f"{k}.txt").read_text().split()[0] for k in "abcd"}
    assert str(os.getpid()) not in pids  # every job ran in a worker
    assert {(tmp_path / f"{k}.txt").read_text().split()[1] for k in "abcd"} <= {"0", "1"}  # each worker its GPU
    assert [e.state for e in run_graph(jobs, n_jobs=2)] == ["skipped"] * 4

    bad = [_WriteJob("x", (), tmp_path / "x.txt", fail=True), _WriteJob("y", ("x",), tmp_path / "y.txt")]
    bad.append(_WriteJob("z", (), tmp_path / "z.txt"))
    with pytest.raises(UserError, match="failed on purpose"):
        run_graph(bad, n_jobs=2)
    assert not (tmp_path / "y.txt").exists()  # the failed job's dependent never started
    assert gpu_slots(3, 1, 0) == [None] * 3 and gpu_slots(2, 2, 4) == ["0,1", "2,3"]
    with pytest.raises(UserError, match="gpus_per_job"):
        gpu_slots(1, 4, 2)


def test_rerun_with_a_changed_model_config_refuses_the_stale_run(tiny_run, tiny_dataset, tmp_path, capsys):
    """A finished fold trained with another config is not reused: the run stops and names the changed key."""
    import shutil

    import yaml

    work = tmp_path / "work"
    shutil.copytree(tiny_run, work)
    cfg = yaml.safe_load(PIPELINE.read_text())
    cfg["models"] = [str((PIPELINE.parent / m).resolve()) for m in cfg["models"]]
    cfg["stack"] = str((PIPELINE.parent / cfg["stack"]).resolve())
    cfg["train_overrides"] = [*cfg["train_overrides"], "train.seed=7"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    before = (work / "runs" / MODELS[0] / "fold_0" / "best.pt").stat().st_mtime_ns
    assert main(["run", "--data", str(tiny_dataset), "--out", str(work), "--pipeline", str(changed)]) != 0
    captured = capsys.readouterr()
    assert "train.seed" in captured.out + captured.err and "different config" in captured.out + captured.err
    assert (work / "runs" / MODELS[0] / "fold_0" / "best.pt").stat().st_mtime_ns == before


def test_versus_best_base_says_when_the_blend_fell_back():
    import pandas as pd

    from rsna19.pipeline.run import versus_best_base

    scores = pd.DataFrame(
        {
            "name": ["clf2d", "seq", "lgbm", "blend"],
            "kind": ["base", "base", "stacker", "blend"],
            "wll_oof": [0.22, 0.18, 0.19, 0.18],
            "wll_test": [0.19, 0.14, 0.13, 0.14],
        }
    )
    lines = versus_best_base(scores)
    assert "OOF 1.000 × seq, test 1.000 × seq" in lines[1]
    assert "the blend is seq" in lines[2]
    scores.loc[3, "wll_oof"] = 0.17
    assert len(versus_best_base(scores)) == 2


def test_embedding_readers_need_an_embedding_run_of_the_pipeline():
    """The job graph's embed jobs follow the `reads_embeddings` trait and the image run's task (`can_embed`)."""
    import copy

    from rsna19.pipeline.stages import embedding_splits

    cfgs = {m.name: m.config for m in tiny_models()}
    assert embedding_splits(cfgs) == {image: ("oof", "test") for image in EMBEDDINGS.values()}
    reader = next(iter(EMBEDDINGS))
    no_embeddings = next(m.name for m in tiny_models() if m.spec.input_layout == "slab")
    for upstream, message in ((no_embeddings, f"a {cfgs[no_embeddings].model.name} model"), ("nope", "not in the")):
        bad = {**cfgs, reader: copy.deepcopy(cfgs[reader])}
        bad[reader].data.embeddings = upstream
        with pytest.raises(UserError, match=message):
            embedding_splits(bad)
