"""The trainer: run directory contents, determinism, resume after SIGKILL, config checks, DDP on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cachefactory import write_cache_and_folds

from rsna19.cli import main
from rsna19.core.config import load_config, to_dict
from rsna19.core.constants import PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.data.datasets import read_cache_index
from rsna19.engine.checkpoint import load_checkpoint, save_checkpoint
from rsna19.engine.config import TrainConfig, resolve_paths
from rsna19.engine.embed import CheckpointOptions
from rsna19.engine.forward import finish_rows, predict_rows
from rsna19.engine.predictor import build_net
from rsna19.engine.runtime import Runtime
from rsna19.engine.tasks import get_task
from rsna19.inference.predict import predict
from rsna19.pipeline.layout import trained_config_diff
from rsna19.training.trainer import LOG_COLUMNS, epoch_indices, lr_factor, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cache_and_folds(tmp_path_factory.mktemp("data"), n_patients=6, n_test_patients=1, size=32)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(data, runs, name="clf2d", overrides=()):
    cache, folds = data
    cfg = load_config(TrainConfig, TINY / f"{name}.yaml", list(overrides))
    return resolve_paths(cfg, str(cache), str(folds), str(runs))


def _env(data, runs):
    cache, folds = data
    return {
        **os.environ,
        "RSNA19_CACHE": str(cache),
        "RSNA19_FOLDS": str(folds),
        "RSNA19_RUNS": str(runs),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }


def test_run_dir_contents_and_checkpoint(data, tmp_path):
    run = train(_cfg(data, tmp_path, overrides=["train.epochs=2"]), fold=0)
    assert run == tmp_path / "clf2d" / "fold_0"
    assert {"config.yaml", "log.csv", "best.pt", "last.pt"} <= {p.name for p in run.iterdir()}
    log = pd.read_csv(run / "log.csv")
    assert list(log.columns) == list(LOG_COLUMNS) and log["epoch"].tolist() == [0, 1]
    assert log["val_wll"].notna().all() and (log["time_s"] > 0).all()
    state = load_checkpoint(run / "last.pt")
    assert state["model_name"] == "clf2d" and state["epoch"] == 1 and state["seed"] == 42
    assert state["model_kwargs"]["backbone"] == "test_resnet" and state["model_kwargs"]["n_windows"] == 3
    assert state["config"]["data"]["cache"] == str(data[0]) and "state" in state["optimizer"]
    best = load_checkpoint(run / "best.pt")
    assert best["best_wll"] == pytest.approx(log["val_wll"].min())
    # best.pt is for predicting: weights and config, no resume state.
    assert "model" in best and not set(best) & {"optimizer", "scheduler", "scaler", "torch_rng"}
    saved = load_config(TrainConfig, run / "config.yaml")
    assert saved.train.epochs == 2 and saved.name == "clf2d"


def test_two_runs_give_identical_oof(data, tmp_path):
    preds = []
    for k in range(2):
        runs = tmp_path / f"r{k}"
        train(_cfg(data, runs, overrides=["train.epochs=1", "optim.name=radam", "sched.name=onecycle"]), fold=1)
        preds.append(
            pd.read_parquet(predict(runs / "clf2d", 1, "oof", CheckpointOptions(tta=["none", "hflip"]), progress=False))
        )
    pd.testing.assert_frame_equal(preds[0], preds[1])


def test_uint8_images_train_and_predict_like_float_images(data, tmp_path):
    """``data.image_dtype: uint8``: the loader sends bytes, the trainer and predict decode them on the device (here
    with the shift-scale-rotate applied there too)."""
    overrides = ["train.epochs=1", "data.image_dtype=uint8", "data.augment.affine_on_device=true"]
    run = train(_cfg(data, tmp_path, overrides=overrides), fold=0)
    saved = load_config(TrainConfig, run / "config.yaml")
    assert saved.data.image_dtype == "uint8" and saved.data.augment.affine_on_device
    oof = pd.read_parquet(predict(tmp_path / "clf2d", 0, "oof", CheckpointOptions(tta=["none"]), progress=False))
    state = load_checkpoint(run / "best.pt")
    net = build_net(state["model_name"], state["model_kwargs"], state["model"], torch.device("cpu"))
    rows = read_cache_index(data[0]).set_index("sop_uid").loc[oof["sop_uid"]].reset_index()
    probs = {}
    for dtype in ("uint8", "float32"):
        saved.data.image_dtype = dtype
        task = get_task(saved)
        ds = task.cache_dataset(data[0], rows, state["hu_mapping"])
        assert ds[0]["image"].dtype == getattr(torch, dtype)
        probs[dtype] = finish_rows(*predict_rows(task, net, ds, len(rows), Runtime(torch.device("cpu")), 8))
    np.testing.assert_allclose(probs["uint8"], oof[list(PROB_COLUMNS)].to_numpy(), atol=1e-5)
    # The same net on float images: 8-bit windows move the probabilities by a hair.
    np.testing.assert_allclose(probs["uint8"], probs["float32"], atol=2e-3)


def test_resume_after_sigkill_matches_uninterrupted(data, tmp_path):
    overrides = ["train.epochs=3", "data.samples_per_epoch=48", "train.freeze_backbone_epochs=1"]
    ref = train(_cfg(data, tmp_path / "ref", overrides=overrides), fold=2)

    runs = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rsna19.cli", "train", str(TINY / "clf2d.yaml"), "--fold", "2", *overrides]
    proc = subprocess.Popen(cmd, env=_env(data, runs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = runs / "clf2d" / "fold_2" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), proc.stderr.read().decode()[-2000:]
    killed_at = load_checkpoint(last)["epoch"]
    if killed_at == 2:
        pytest.skip("the run finished before it could be killed")

    # The same command again resumes from last.pt and finishes.
    assert (
        main(
            [
                "train",
                str(TINY / "clf2d.yaml"),
                "--fold",
                "2",
                "--cache",
                str(data[0]),
                "--folds",
                str(data[1]),
                "--runs",
                str(runs),
                *overrides,
            ]
        )
        == 0
    )
    log = pd.read_csv(runs / "clf2d" / "fold_2" / "log.csv")
    assert log["epoch"].tolist() == [0, 1, 2]
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(last)
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=f"{k} differs after resume")
    pd.testing.assert_frame_equal(pd.read_csv(ref / "log.csv").drop(columns="time_s"), log.drop(columns="time_s"))


def test_resume_refuses_another_config(data, tmp_path):
    train(_cfg(data, tmp_path, overrides=["train.epochs=1"]), fold=0)
    with pytest.raises(UserError, match="optim.lr"):
        train(_cfg(data, tmp_path, overrides=["train.epochs=1", "optim.lr=0.1"]), fold=0)
    # A finished run with the same config is a no-op.
    assert train(_cfg(data, tmp_path, overrides=["train.epochs=1"]), fold=0).is_dir()


def test_a_run_from_before_a_config_key_existed_still_matches_at_its_default(data, tmp_path):
    """A config key added after a run was trained (here ``data.smooth_px``, dropped from what the run saved) reads
    as its default: the run resumes and counts as trained, until the config sets the key to something else."""
    run = train(_cfg(data, tmp_path, overrides=["train.epochs=1"]), fold=0)
    state = load_checkpoint(run / "last.pt")
    del state["config"]["data"]["smooth_px"]
    save_checkpoint(state, run / "last.pt")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["data"]["smooth_px"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    mtime = (run / "best.pt").stat().st_mtime_ns

    current = to_dict(_cfg(data, tmp_path, overrides=["train.epochs=1"]))
    assert trained_config_diff(run, current) == []
    assert train(_cfg(data, tmp_path, overrides=["train.epochs=1"]), fold=0) == run
    assert (run / "best.pt").stat().st_mtime_ns == mtime  # nothing retrained

    changed = to_dict(_cfg(data, tmp_path, overrides=["train.epochs=1", "data.smooth_px=0.5"]))
    assert trained_config_diff(run, changed) == ["data.smooth_px"]
    with pytest.raises(UserError, match="data.smooth_px"):
        train(_cfg(data, tmp_path, overrides=["train.epochs=1", "data.smooth_px=0.5"]), fold=0)


def test_config_errors(data, tmp_path, monkeypatch):
    for var in ("RSNA19_CACHE", "RSNA19_FOLDS", "RSNA19_RUNS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="--cache"):
        resolve_paths(load_config(TrainConfig, TINY / "clf2d.yaml"))
    with pytest.raises(UserError, match="unknown key"):
        load_config(TrainConfig, TINY / "clf2d.yaml", ["optim.lrr=1"])
    with pytest.raises(UserError, match="layout"):
        train(_cfg(data, tmp_path, overrides=["model.name=combine_last", "data.slices=3"]), fold=0)
    with pytest.raises(UserError, match="fp16"):
        train(_cfg(data, tmp_path, overrides=["train.amp=fp16"]), fold=0)


BASE_CONFIGS = [
    "tiny/clf2d",
    "tiny/clf2dc_5c",
    "tiny/combine_last",
    "demo/clf2d",
    "demo/clf2dc_5c",
    "demo/combine_last_3s",
    "rsna2019/clf2d_resnet34_384",
    "rsna2019/clf2dc_resnet34_5c_400",
    "rsna2019/clf2dc_resnet34_3x3_384",
    "rsna2019/clf2dc_seresnext50_5c_384",
    "rsna2019/clf2dc_resnet50_7c_400",
    "rsna2019/combine_last_resnet34_5s_400",
]


@pytest.mark.parametrize("name", BASE_CONFIGS)
def test_configs_load_and_match_their_model(name):
    from rsna19.nets import get_model_spec

    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(TrainConfig, path)
    assert get_model_spec(cfg.model.name).input_layout == cfg.data.layout
    assert cfg.name == path.stem


def test_sampling_and_schedule():
    a = epoch_indices(10, 25, seed=1, epoch=3)
    assert len(a) == 25 and set(a) == set(range(10))
    assert (a == epoch_indices(10, 25, seed=1, epoch=3)).all()
    shards = [epoch_indices(10, 7, 1, 0, rank=r, world=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    cfg = TrainConfig()
    cfg.train.epochs, cfg.sched.warmup_epochs = 4, 1
    f = [lr_factor(cfg, s, 10) for s in range(40)]
    assert f[0] < f[9] <= 1.0 and f[-1] < 0.05 and max(f) <= 1.0
    cfg.sched.name = "onecycle"
    g = [lr_factor(cfg, s, 10) for s in range(40)]
    assert g[0] == pytest.approx(1 / 25) and max(g) == pytest.approx(1.0, abs=0.01) and g[-1] < 0.05


@pytest.mark.ddp
def test_ddp_two_processes_gloo(data, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rsna19.cli",
        "train",
        str(TINY / "clf2d.yaml"),
        "--fold",
        "0",
        "train.epochs=1",
    ]
    res = subprocess.run(cmd, env=_env(data, tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "clf2d" / "fold_0"
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [0] and log["val_wll"].notna().all()
    assert load_checkpoint(run / "last.pt")["epoch"] == 0


def test_lr_rule_under_ddp_is_none_unless_linear_scaling_is_asked_for():
    """``optim.lr`` is used as written on any number of processes; ``lr_scaling: linear`` multiplies it by them."""
    from torch import nn

    from rsna19.training.trainer import build_optimizer, effective_lr

    model = nn.Linear(4, 6)
    cfg = load_config(TrainConfig, TINY / "clf2d.yaml", ["optim.lr=1e-3"])
    assert effective_lr(cfg, 4) == pytest.approx(1e-3)
    assert all(g["lr"] == pytest.approx(1e-3) for g in build_optimizer(cfg, model, 4).param_groups)
    cfg = load_config(TrainConfig, TINY / "clf2d.yaml", ["optim.lr=1e-3", "optim.lr_scaling=linear"])
    assert effective_lr(cfg, 1) == pytest.approx(1e-3) and effective_lr(cfg, 4) == pytest.approx(4e-3)
    assert all(g["lr"] == pytest.approx(4e-3) for g in build_optimizer(cfg, model, 4).param_groups)


def test_val_every_validates_on_schedule_and_always_last(data, tmp_path):
    overrides = ["train.epochs=3", "train.val_every=2", "data.samples_per_epoch=16"]
    run = train(_cfg(data, tmp_path, overrides=overrides), fold=0)
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [0, 1, 2]
    assert log["val_wll"].isna().tolist() == [True, False, False]  # epoch 1 on schedule, epoch 2 the last
    state = load_checkpoint(run / "best.pt")
    assert state["epoch"] in (1, 2) and state["best_wll"] == pytest.approx(log["val_wll"].min())
    assert (run / "curves.png").is_file()
