"""The blocked training order (``data.sampler: blocked``, rsna19/data/sampler.py) and its hook in the trainer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cachefactory import write_cache, write_cache_and_folds

from rsna19.core.config import load_config
from rsna19.core.errors import ConfigError, UserError
from rsna19.data.datasets import SliceDataset, read_cache_index
from rsna19.data.embeddings import SequenceDataset
from rsna19.data.sampler import blocked_indices, epoch_sampler, item_series
from rsna19.data.slab import SlabDataset
from rsna19.engine.config import DataConfig, TrainConfig, resolve_paths
from rsna19.training.trainer import epoch_indices, train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _series(sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Items of series ``S0, S1, …`` with ``sizes[i]`` slices each, rows shuffled (as a frame may come)."""
    series = np.repeat([f"S{i}" for i in range(len(sizes))], sizes)
    z = np.concatenate([np.arange(s) for s in sizes])
    perm = np.random.default_rng(1).permutation(len(series))
    return series[perm], z[perm]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of equal consecutive values as (start, stop)."""
    cuts = np.r_[0, np.flatnonzero(values[1:] != values[:-1]) + 1, len(values)]
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


SIZES = [3, 17, 40, 8, 25, 1, 33, 12]


@pytest.mark.parametrize("contiguous", [True, False])
def test_deterministic_from_seed_and_epoch(contiguous):
    series, z = _series(SIZES)
    a = blocked_indices(series, z, 8, None, 42, 3, contiguous=contiguous)
    assert np.array_equal(a, blocked_indices(series, z, 8, None, 42, 3, contiguous=contiguous))
    assert not np.array_equal(a, blocked_indices(series, z, 8, None, 42, 4, contiguous=contiguous))
    assert not np.array_equal(a, blocked_indices(series, z, 8, None, 43, 3, contiguous=contiguous))
    assert a.dtype == np.int64


@pytest.mark.parametrize("contiguous", [True, False])
def test_one_pass_covers_every_item_once(contiguous):
    series, z = _series(SIZES)
    order = blocked_indices(series, z, 8, None, 0, 0, contiguous=contiguous)
    assert np.array_equal(np.sort(order), np.arange(len(series)))
    # More samples than items: whole passes, each item 2 or 3 times in 2.5 passes.
    n = len(series)
    counts = np.bincount(blocked_indices(series, z, 8, int(2.5 * n), 0, 0, contiguous=contiguous), minlength=n)
    assert counts.sum() == int(2.5 * n) and counts.min() == 2 and counts.max() == 3


@pytest.mark.parametrize("samples", [None, 10, 97, 1000])
def test_samples_per_epoch_is_respected(samples):
    series, z = _series(SIZES)
    order = blocked_indices(series, z, 8, samples, 5, 1)
    assert len(order) == (samples or len(series))
    if samples and samples <= len(series):  # within one pass: no repeats
        assert len(np.unique(order)) == samples


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("samples", [None, 97])
def test_ddp_ranks_get_equal_lengths_like_epoch_indices(world, samples):
    series, z = _series(SIZES)
    n = len(series)
    parts = [blocked_indices(series, z, 8, samples, 7, 2, rank=r, world=world) for r in range(world)]
    want = samples or n
    lengths = {len(p) for p in parts}
    assert lengths == {math.ceil(want / world)}
    # The same lengths as the random order, so the trainer's steps per epoch hold for both samplers.
    assert lengths == {len(epoch_indices(n, samples, 7, 2, r, world)) for r in range(world)}
    # Together: the single-process order, padded with its own first items.
    single = blocked_indices(series, z, 8, samples, 7, 2)
    whole = np.concatenate(parts)
    assert np.array_equal(whole[:want], single)
    assert np.array_equal(whole[want:], single[: len(whole) - want])


@pytest.mark.parametrize("block", [1, 4, 8])
def test_blocks_share_a_series(block):
    series, z = _series(SIZES)
    order = blocked_indices(series, z, block, None, 11, 0)
    runs = _runs(series[order])
    # Each series is visited in at most ceil(size / block) + 1 blocks (the random phase can cut one more).
    assert len(runs) <= sum(math.ceil(s / block) + 1 for s in SIZES)
    if block > 1:
        random_runs = _runs(series[epoch_indices(len(series), None, 11, 0)])
        assert len(runs) < len(random_runs) / 2


def test_contiguous_blocks_are_neighbouring_slices():
    series, z = _series([40, 40, 40])
    order = blocked_indices(series, z, 8, None, 3, 0, contiguous=True)
    s, zz = series[order], z[order]
    # Every step inside a run of one series goes to the next slice, except where two blocks of it meet.
    steps = [(s[i] == s[i + 1], zz[i + 1] - zz[i]) for i in range(len(order) - 1)]
    inside = [d for same, d in steps if same]
    assert sum(d == 1 for d in inside) >= len(inside) - 3 * 6  # at most ~1 junction per block
    # The phase moves the block boundaries between epochs.
    firsts = [
        tuple(sorted(z[o][np.r_[0, np.flatnonzero(np.diff(z[o]) != 1) + 1]]))
        for o in (blocked_indices(series, z, 8, None, 3, e) for e in range(4))
    ]
    assert len(set(firsts)) > 1


def test_random_slices_of_a_series_in_a_block():
    series, z = _series([40, 40])
    order = blocked_indices(series, z, 8, None, 3, 0, contiguous=False)
    runs = _runs(series[order])
    assert len(runs) <= 2 * 5 + 1
    assert any(np.any(np.abs(np.diff(z[order[a:b]])) > 1) for a, b in runs)


def test_bad_block_and_config_values():
    series, z = _series(SIZES)
    with pytest.raises(UserError, match="block_slices"):
        blocked_indices(series, z, 0, None, 0, 0)
    with pytest.raises(ConfigError, match="data.sampler"):
        load_config(TrainConfig, TINY / "clf2d.yaml", ["data.sampler=sequential"])
    with pytest.raises(ConfigError, match="data.block_slices"):
        load_config(TrainConfig, TINY / "clf2d.yaml", ["data.block_slices=eight"])
    cfg = load_config(TrainConfig, TINY / "clf2d.yaml", ["data.sampler=blocked", "data.block_slices=0"])
    with pytest.raises(UserError, match="block_slices"):
        epoch_sampler(cfg.data, None, epoch_indices)
    assert DataConfig().sampler == "random"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"), n_patients=6, n_test_patients=0, size=16, slices=(12, 20))


def test_epoch_sampler_picks_by_config(cache):
    frame = read_cache_index(cache)
    ds = SliceDataset(cache, frame, ["brain"])
    assert epoch_sampler(DataConfig(), ds, epoch_indices) is epoch_indices
    blocked = epoch_sampler(DataConfig(sampler="blocked", block_slices=4), ds, epoch_indices)
    order = blocked(len(ds), 30, 1, 0, 0, 1)
    assert np.array_equal(order, blocked_indices(frame["series_uid"], frame["z"], 4, 30, 1, 0))
    with pytest.raises(UserError, match="built for"):
        blocked(len(ds) + 1, None, 1, 0, 0, 1)
    # Items that are not slices of series (the sequence model): the random order.
    seq = SequenceDataset(frame.assign(slice_idx=frame["z"]), np.zeros((len(frame), 2), np.float32))
    assert epoch_sampler(DataConfig(sampler="blocked"), seq, epoch_indices) is epoch_indices


def test_a_block_opens_its_volume_once(cache, monkeypatch):
    frame = read_cache_index(cache)
    ds = SliceDataset(cache, frame, ["brain"])
    ds.volumes.capacity = 1  # even keeping a single memory map, one open per visit
    opened = []
    real_load = np.load
    monkeypatch.setattr(
        np, "load", lambda path, *a, **k: opened.append(Path(path).parent.name) or real_load(path, *a, **k)
    )
    order = blocked_indices(ds.series, ds.z, 8, None, 0, 0)
    for i in order:
        ds[int(i)]
    visits = _runs(ds.series[order])
    assert len(opened) == len(visits)
    n_series = frame["series_uid"].nunique()
    assert len(opened) <= sum(math.ceil(n / 8) + 1 for n in frame.groupby("series_uid").size())
    opened.clear()
    for i in epoch_indices(len(ds), None, 0, 0):
        ds[int(i)]
    assert len(opened) > 3 * n_series  # the random order reopens volumes all the time


def test_slab_items_are_grouped_by_series(cache):
    frame = read_cache_index(cache)
    ds = SlabDataset(cache, frame, ["brain"], slab=4, train=True)
    series, position = item_series(ds)
    assert len(series) == len(ds)
    for s in np.unique(series):
        assert sorted(position[series == s]) == list(range(int((series == s).sum())))
    order = epoch_sampler(DataConfig(sampler="blocked", block_slices=2), ds, epoch_indices)(len(ds), None, 0, 0, 0, 1)
    assert np.array_equal(np.sort(order), np.arange(len(ds)))
    assert len(_runs(series[order])) < len(ds)


def test_trainer_trains_with_the_blocked_order(tmp_path):
    cache, folds = write_cache_and_folds(tmp_path / "data", n_patients=6, n_test_patients=1, size=32)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(
            TrainConfig, TINY / "clf2d.yaml", ["train.epochs=1", "data.sampler=blocked", "data.block_slices=4"]
        )
        run = train(resolve_paths(cfg, str(cache), str(folds), str(tmp_path / "runs")), 0)
    finally:
        torch.set_num_threads(old)
    log = pd.read_csv(run / "log.csv")
    assert len(log) == 1 and np.isfinite(log["train_loss"]).all()
    assert "sampler: blocked" in (run / "config.yaml").read_text()
