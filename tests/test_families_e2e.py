"""clf3d, seg_aux and seq through the one trainer and ``rsna19 predict``, end to end on the tiny synthetic set.

The tiny preset is indexed, converted (crop 64) and split into 2 folds once per module; each family then trains
one short epoch through the real CLI and predicts OOF and test. The prediction parquet must have the contract
schema (docs/contracts.md) and the OOF must hold every slice of the fold's held-out patients exactly once, even
where a family predicts windows of slices (clf3d) or whole series (seq).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna19.cli import main
from rsna19.core.config import load_config
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.data.datasets import read_cache_index
from rsna19.data.embeddings import LOGIT_COLUMNS, SequenceDataset, read_embeddings
from rsna19.data.folds import read_folds, split_by_fold
from rsna19.engine.checkpoint import load_checkpoint
from rsna19.engine.config import TrainConfig, model_kwargs, resolve_paths
from rsna19.engine.embed import ensure_embeddings
from rsna19.engine.tasks import SegAuxTask, get_task
from rsna19.nets import build_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
META = ["sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx", "fold", "model"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prepared(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """index → cache (crop 64) → 2 folds of the tiny dataset, shared by the module's tests."""
    from rsna19.conversion.run import run_convert
    from rsna19.data.folds import write_folds
    from rsna19.io.index import build_index

    root = tmp_path_factory.mktemp("families_e2e")
    index = root / "index.parquet"
    build_index(
        [tiny_dataset / "stage_2_train", tiny_dataset / "stage_2_test"],
        tiny_dataset / "stage_2_train.csv",
        out=index,
        progress=False,
    )
    run_convert(index, root / "cache", crop=64, progress=False)
    write_folds(root / "cache" / "cache_index.parquet", root / "folds.csv", n_folds=2, seed=0)
    return {
        "cache": root / "cache",
        "folds": root / "folds.csv",
        "runs": root / "runs",
        "masks": tiny_dataset / "masks",
    }


def _paths(p: dict[str, Path]) -> list[str]:
    return ["--cache", str(p["cache"]), "--folds", str(p["folds"]), "--runs", str(p["runs"])]


def _train(p: dict[str, Path], name: str, *extra: str, fold: int = 0) -> Path:
    assert main(["train", str(TINY / f"{name}.yaml"), "--fold", str(fold), *_paths(p), *extra]) == 0
    run = p["runs"] / name / f"fold_{fold}"
    log = pd.read_csv(run / "log.csv")
    assert len(log) >= 1 and np.isfinite(log[["train_loss", "val_wll"]].to_numpy()).all()
    return run


def _predict_and_check(p: dict[str, Path], name: str, tta: tuple[str, ...] = ("none", "hflip")) -> pd.DataFrame:
    """Predict OOF and test of fold 0; check the schema and that each slice is predicted exactly once."""
    index = read_cache_index(p["cache"])
    _, held_out = split_by_fold(index, read_folds(p["folds"]), 0)
    test = index[index["split"] == "test"]
    for split, rows in (("oof", held_out), ("test", test)):
        args = ["predict", str(p["runs"] / name), "--fold", "0", "--split", split, "--device", "cpu"]
        assert main([*args, "--cache", str(p["cache"]), "--tta", *tta]) == 0
        df = pd.read_parquet(p["runs"] / name / "fold_0" / f"{split}.parquet")
        labels = list(CLASSES) if split == "oof" else []
        assert list(df.columns) == [*META, *PROB_COLUMNS, *labels]
        assert df["sop_uid"].is_unique and set(df["sop_uid"]) == set(rows["sop_uid"]) and len(df) == len(rows)
        probs = df[list(PROB_COLUMNS)].to_numpy()
        assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
        assert (df["model"] == name).all() and (df["fold"] == 0).all()
        # slice_idx is the cache z of that very slice, labels are the slice's own.
        ref = rows.set_index("sop_uid").loc[df["sop_uid"]]
        assert (df["slice_idx"].to_numpy() == ref["z"].to_numpy()).all()
        if labels:
            np.testing.assert_array_equal(df[labels].to_numpy(), ref[labels].to_numpy(dtype=np.float64))
        if split == "oof":
            oof = df
    return oof


def test_clf3d_trains_and_predicts_every_slice_once(prepared):
    run = _train(prepared, "clf3d")
    state = load_checkpoint(run / "best.pt")
    assert state["model_name"] == "clf3d" and state["hu_mapping"] is not None
    _predict_and_check(prepared, "clf3d")


def test_seg_aux_trains_with_masks_and_predicts(prepared):
    # The tiny set has a masks/<series>.npz for its series: training items carry them (the mask loss is on).
    cfg = resolve_paths(
        load_config(TrainConfig, TINY / "seg_aux.yaml"),
        str(prepared["cache"]),
        str(prepared["folds"]),
        str(prepared["runs"]),
        str(prepared["masks"]),
    )
    task = get_task(cfg)
    assert isinstance(task, SegAuxTask)
    train_ds = task.fold_data(0, torch.device("cpu")).train
    assert any(train_ds[i]["has_mask"] for i in range(0, len(train_ds), 4))

    run = _train(prepared, "seg_aux", "--masks", str(prepared["masks"]))
    assert load_config(TrainConfig, run / "config.yaml").data.masks == str(prepared["masks"])
    _predict_and_check(prepared, "seg_aux")


def test_seg_aux_without_masks_trains_as_a_classifier(prepared, monkeypatch):
    """No data.masks (the real RSNA data has none): plain slice items (no zero masks through the loader), the decoder
    never runs and its weights stay as initialised (frozen); prediction is the classifier's."""
    from rsna19.data.masks import SegSliceDataset

    cfg = resolve_paths(
        load_config(TrainConfig, TINY / "seg_aux.yaml"),
        str(prepared["cache"]),
        str(prepared["folds"]),
        str(prepared["runs"]),
    )
    monkeypatch.delenv("RSNA19_MASKS", raising=False)
    assert cfg.data.masks is None
    train_ds = get_task(cfg).fold_data(0, torch.device("cpu")).train
    assert not isinstance(train_ds, SegSliceDataset) and "mask" not in train_ds[0]

    torch.manual_seed(cfg.train.seed)
    init_model = build_model("seg_aux", **model_kwargs(cfg))
    init = {k: v.clone() for k, v in init_model.state_dict().items()}
    decoder_cls = type(init_model.net.decoder)
    calls = {"decoder": 0}
    real_forward = decoder_cls.forward

    def counting(self, *args, **kwargs):  # the real decoder, counted
        calls["decoder"] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(decoder_cls, "forward", counting)
    paths = {**prepared, "runs": prepared["runs"] / "nomask"}
    run = _train(paths, "seg_aux", "train.epochs=2")
    assert calls["decoder"] == 0
    state = load_checkpoint(run / "best.pt")["model"]
    decoder = [k for k in state if k.startswith(("net.decoder.", "net.segmentation_head."))]
    assert decoder and all(torch.equal(state[k], init[k]) for k in decoder if "running" not in k)
    encoder = [k for k in state if k.startswith("net.encoder.") and state[k].is_floating_point()]
    assert any(not torch.equal(state[k], init[k]) for k in encoder)  # the classifier did learn


def test_seq_trains_on_the_oof_embeddings_of_every_fold_and_predicts(prepared, capsys):
    # Without the image run there is nothing to read: a one-line error names the missing fold runs.
    assert main(["train", str(TINY / "seq.yaml"), "--fold", "0", *_paths(prepared)]) == 1
    err = capsys.readouterr().err
    assert "train the image run first" in err and "fold_0" in err and "fold_1" in err
    # embedding_source "oof" (the default) needs every fold of the image run, not only fold 0.
    image = prepared["runs"] / "clf2d"
    _train(prepared, "clf2d", "train.epochs=1", "data.samples_per_epoch=16")
    assert main(["train", str(TINY / "seq.yaml"), "--fold", "0", *_paths(prepared)]) == 1
    err = capsys.readouterr().err
    assert str(image / "fold_1") in err and str(image / "fold_0") not in err
    _train(prepared, "clf2d", "train.epochs=1", "data.samples_per_epoch=16", fold=1)

    # The seq trainer computes the missing OOF embeddings of both folds itself ...
    run = _train(prepared, "seq", "train.epochs=1")
    for k in (0, 1):
        assert (image / f"fold_{k}" / "embeddings_oof.json").is_file()
    assert not (image / "fold_0" / "embeddings_train.json").exists()  # fold 0's own training embeddings: unused
    state = load_checkpoint(run / "best.pt")
    assert state["hu_mapping"] is None and state["model_kwargs"]["in_features"] > 0
    # ... and fold 0 trained on fold 1's patients embedded by fold 1's image model (held out for it), validated
    # on fold 0's patients embedded by fold 0's.
    cfg = resolve_paths(
        load_config(TrainConfig, run / "config.yaml"),
        str(prepared["cache"]),
        str(prepared["folds"]),
        str(prepared["runs"]),
        None,
    )
    assert cfg.data.embedding_source == "oof"
    data = get_task(cfg).fold_data(0, torch.device("cpu"))
    folds = read_folds(prepared["folds"])
    fold1 = set(folds.loc[folds["fold"] == 1, "patient_id"])
    frame1, x1, _ = read_embeddings(image / "fold_1", "oof")
    train = data.train
    assert isinstance(train, SequenceDataset) and set(train.frame["patient_id"]) == fold1
    np.testing.assert_array_equal(train.features, x1)
    assert train.frame["sop_uid"].tolist() == frame1["sop_uid"].tolist()
    frame0, _, _ = read_embeddings(image / "fold_0", "oof")
    assert data.val_frame["sop_uid"].tolist() == frame0["sop_uid"].tolist()

    # ... and prediction those of the test split; TTA views do not apply to a sequence model.
    _predict_and_check(prepared, "seq", tta=("none", "hflip", "vflip"))
    assert (image / "fold_0" / "embeddings_test.json").is_file()

    # embedding_source "fold" (the old way): fold 0's image model's own training patients.
    cfg.data.embedding_source = "fold"
    task = get_task(cfg)
    with pytest.raises(UserError, match="missing embeddings"):  # a task reads them, it never computes them
        task.fold_data(0, torch.device("cpu"))
    ensure_embeddings(task.required_embeddings(cfg.runs, 0, ()), cfg.data.cache, cfg.data.folds, "cpu")
    train = task.fold_data(0, torch.device("cpu")).train
    frame_tr, _, _ = read_embeddings(image / "fold_0", "train")
    assert isinstance(train, SequenceDataset) and train.frame["sop_uid"].tolist() == frame_tr["sop_uid"].tolist()
    assert set(train.frame["patient_id"]) == fold1  # 2 folds: the same patients, but fold 0's model's view

    # train_logits "oof": the same in-sample embeddings, but each slice's held-out logits (fold 1's image model,
    # which never trained on fold 1's patients), as confident as a validation or test series' logits.
    cfg.data.train_logits = "oof"
    task = get_task(cfg)
    assert task.train_sources(0, 2) == {0: ("train", "oof"), 1: ("oof",)}
    held = task.fold_data(0, torch.device("cpu")).train
    assert isinstance(held, SequenceDataset)
    assert held.frame["sop_uid"].tolist() == frame_tr["sop_uid"].tolist()
    np.testing.assert_array_equal(held.features, train.features)
    oof1 = frame1.set_index("sop_uid").loc[frame_tr["sop_uid"], list(LOGIT_COLUMNS)].to_numpy(np.float32)
    np.testing.assert_array_equal(held.logits, oof1)
    assert not np.array_equal(held.logits, train.logits)


CONFIGS = sorted(p for p in TINY.parent.glob("*/*.yaml") if p.parent.name not in ("stack", "pipelines"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_model_config_loads_and_has_a_task(path):
    """Every base-model config is a valid TrainConfig whose model and layout agree (unknown keys would fail)."""
    cfg = load_config(TrainConfig, path)
    assert get_task(cfg) is not None


@pytest.mark.ddp
def test_clf3d_ddp_validation_equals_single_process_prediction(prepared, tmp_path):
    """Under DDP each process validates every other slab window; the gathered per-slice average must be exactly
    what one process predicts from the saved model (no TTA)."""
    import os
    import subprocess
    import sys

    from rsna19.core.metrics import weighted_log_loss
    from rsna19.engine.embed import CheckpointOptions
    from rsna19.inference.predict import predict

    env = {
        **os.environ,
        "RSNA19_CACHE": str(prepared["cache"]),
        "RSNA19_FOLDS": str(prepared["folds"]),
        "RSNA19_RUNS": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "rsna19.cli", "train", str(TINY / "clf3d.yaml"), "--fold", "1", "data.samples_per_epoch=4"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    val_wll = pd.read_csv(tmp_path / "clf3d" / "fold_1" / "log.csv")["val_wll"].iloc[-1]
    df = pd.read_parquet(
        predict(tmp_path / "clf3d", 1, "oof", CheckpointOptions(tta=["none"], device="cpu"), progress=False)
    )
    wll = weighted_log_loss(df[list(CLASSES)].to_numpy(), df[list(PROB_COLUMNS)].to_numpy())
    assert wll == pytest.approx(val_wll, rel=1e-5)
