"""Training orders that visit each cached volume once for several samples (``data.sampler: blocked``).

The real cache (~280 GB of ``CACHE/<series>/volume.npy``) does not fit in the page cache. With the default
``random`` order (:func:`rsna19.training.trainer.epoch_indices`) consecutive samples come from different series, so
nearly every sample pays a cold read of its volume (and the kernel's read-around pulls in far more of the file than
the few slices the sample needs). The ``blocked`` order cuts every series' training items into *blocks* of
``data.block_slices`` items — neighbouring slices (``data.block_contiguous``, the default) or random slices of the
series — and shuffles the blocks: a block is one visit to one volume, which the dataset's
:class:`~rsna19.data.datasets.VolumeCache` opens once and whose pages the block's samples share, so the samples
of a batch come from a few volumes. Measurements: ``docs/benchmarks.md``, "Loader, cold page cache".

Like :func:`~rsna19.training.trainer.epoch_indices`, the order is a function of ``(seed, epoch)`` only, every item
appears once per pass (passes are repeated and cut to ``data.samples_per_epoch``), and the order is padded to a
multiple of the number of processes with its own first items so that every process gets the same number of
samples. It is then dealt in contiguous shards (process ``r`` of ``w`` gets the ``r``-th ``1/w`` of the padded
order) rather than round-robin: dealing single items round-robin would split every block across the processes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from rsna19.core.errors import UserError
from rsna19.data.datasets import SliceDataset
from rsna19.data.slab import SlabDataset

if TYPE_CHECKING:
    from rsna19.engine.config import DataConfig

log = logging.getLogger(__name__)

#: The values of ``data.sampler``.
SAMPLERS: tuple[str, ...] = ("random", "blocked")

#: ``(n, samples, seed, epoch, rank, world) -> this process's item indices``: the signature of
#: :func:`~rsna19.training.trainer.epoch_indices` and of the samplers :func:`epoch_sampler` returns.
EpochSampler = Callable[[int, int | None, int, int, int, int], np.ndarray]

# Stream tag of the blocked order's generator: (seed, epoch) never draws the same numbers as the random order.
_BLOCKED_STREAM = 0xB10C


def item_series(dataset: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The series and the position in it of every item of a training dataset, or None when items are not slices.

    Args:
        dataset: a :class:`~rsna19.data.datasets.SliceDataset` (and subclasses: one item = one slice ``z``) or a
            :class:`~rsna19.data.slab.SlabDataset` (one item = one slab of a series; position = its number).

    Returns:
        ``(series, position)``: two arrays of ``len(dataset)``; ``series`` any comparable values (uids or
        codes), ``position`` int64. None for other datasets (e.g. the sequence model's, whose item already is a
        whole series held in memory).
    """
    if isinstance(dataset, SlabDataset):
        series = dataset.items[:, 0].astype(np.int64)
        order = np.argsort(series, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(series[order])) + 1] if len(series) else np.zeros(0, np.int64)
        sizes = np.diff(np.r_[starts, len(series)])
        position = np.empty(len(series), dtype=np.int64)
        position[order] = np.arange(len(series)) - np.repeat(starts, sizes)
        return series, position
    if isinstance(dataset, SliceDataset):
        return np.asarray(dataset.series), np.asarray(dataset.z, dtype=np.int64)
    return None


def _one_pass(codes: np.ndarray, position: np.ndarray, block: int, contiguous: bool, rng: np.random.Generator):
    """Every item once: the series' items cut into blocks of at most ``block``, the blocks in a random order."""
    n = len(codes)
    n_series = int(codes.max()) + 1
    if contiguous:
        key = position.astype(np.float64)
        # A random phase per series and pass: the block boundaries move between epochs.
        phase = rng.integers(0, block, n_series)
    else:
        key = rng.random(n)
        phase = np.zeros(n_series, dtype=np.int64)
    by_series = np.lexsort((np.arange(n), key, codes))  # series, then position (or a random key), then row
    g = codes[by_series]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank_in_series = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    block_in_series = (rank_in_series + phase[g]) // block
    blocks_per_series = block_in_series[np.r_[starts[1:] - 1, n - 1]] + 1
    first_block = np.r_[0, np.cumsum(blocks_per_series)[:-1]]
    block_id = first_block[g] + block_in_series
    slot = rng.permutation(int(blocks_per_series.sum()))  # the place of each block in the pass
    return by_series[np.lexsort((rank_in_series, slot[block_id]))]


def blocked_indices(
    series: np.ndarray,
    position: np.ndarray | None,
    block: int,
    samples: int | None,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    contiguous: bool = True,
) -> np.ndarray:
    """This process's training items for ``epoch`` in blocks of ``block`` items of one series.

    Args:
        series: (n,) the series of every item (uids or codes).
        position: (n,) the item's place in its series (slice ``z``); None: the item order.
        block: items per block (``data.block_slices``); the last block of a series (and, with ``contiguous``, the
            first one: the boundaries get a random phase per series and epoch) may be shorter.
        samples: items per epoch over all processes (``data.samples_per_epoch``; None: n). Passes over all items
            are repeated and the last one is cut.
        seed, epoch: the order is a function of these only.
        rank, world: this process and the number of processes.
        contiguous: blocks of neighbouring items (by ``position``) or of random items of the series.

    Returns:
        int64 item indices, ``ceil(samples / world)`` of them on every process; consecutive items of a block are
        consecutive here.

    Raises:
        UserError: ``block < 1``, or ``series`` and ``position`` of different lengths.
    """
    if block < 1:
        raise UserError(f"data.block_slices must be >= 1, got {block}")
    series = np.asarray(series)
    n = len(series)
    position = np.arange(n, dtype=np.int64) if position is None else np.asarray(position, dtype=np.int64)
    if len(position) != n:
        raise UserError(f"{n} series but {len(position)} positions")
    want = samples or n
    if n == 0 or want == 0:
        return np.zeros(0, dtype=np.int64)
    codes = np.unique(series, return_inverse=True)[1].reshape(-1).astype(np.int64)
    rng = np.random.default_rng([seed, epoch, _BLOCKED_STREAM])
    passes = [_one_pass(codes, position, block, contiguous, rng) for _ in range(math.ceil(want / n))]
    order = np.concatenate(passes)[:want]
    pad = (-len(order)) % world
    order = np.concatenate([order, order[:pad]]).astype(np.int64)
    per = len(order) // world
    return order[rank * per : (rank + 1) * per]


def epoch_sampler(data: DataConfig, dataset: Dataset, random: EpochSampler) -> EpochSampler:
    """The epoch order ``data.sampler`` asks for, over ``dataset``.

    Args:
        data: the config's ``data`` section (``sampler``, ``block_slices``, ``block_contiguous``).
        dataset: the training dataset.
        random: the ``random`` order (:func:`rsna19.training.trainer.epoch_indices`); also what a dataset whose
            items are not slices of series gets (with a warning).

    Returns:
        A function with the signature of ``random``.

    Raises:
        UserError: an unknown sampler or ``block_slices < 1``.
    """
    if data.sampler not in SAMPLERS:
        raise UserError(f"data.sampler must be one of {list(SAMPLERS)}, got {data.sampler!r}")
    if data.block_slices < 1:
        raise UserError(f"data.block_slices must be >= 1, got {data.block_slices}")
    if data.sampler == "random":
        return random
    groups = item_series(dataset)
    if groups is None:
        log.warning(
            "data.sampler=blocked: %s items are not slices of series; using the random order", type(dataset).__name__
        )
        return random
    series, position = groups
    block, contiguous = int(data.block_slices), bool(data.block_contiguous)

    def blocked(n: int, samples: int | None, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        if n != len(series):
            raise UserError(f"the sampler was built for {len(series)} items, asked for {n}")
        return blocked_indices(series, position, block, samples, seed, epoch, rank, world, contiguous)

    return blocked
