"""Level-2 features from the base models' per-slice probabilities (docs/architecture.md, "Second level").

Per base model and class: the probability at slice offsets −k..+k within the series (a neighbour outside the
series takes the slice's own value, a neutral choice, and a flag says it is missing), centred rolling mean and
max over 3 and 5 slices (over the neighbours that exist), and the series max and mean. Per slice: the
missing-neighbour flags, the relative position in the series (0..1) and the series length.

Everything is vectorised over one array sorted by (series, slice): a neighbour at offset k of row i is row i + k
when ``0 ≤ pos + k < n_slices``, so no per-series Python loop is needed (870k slices × 10 models in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.stacking.inputs import KEY_COLUMNS

#: Separator between model, class and statistic in feature names (LightGBM accepts it in names).
SEP = "__"


def _series_layout(keys: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the rows of ``keys`` (sorted by series, slice) inside their series.

    Returns:
        starts: (S,) first row of each series; seg: (N,) series number of each row; pos: (N,) index of the row
        in its series; length: (N,) length of the row's series.
    """
    series = keys["series_uid"].to_numpy()
    n = len(series)
    change = np.ones(n, dtype=bool)
    change[1:] = series[1:] != series[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(np.append(starts, n))
    seg = np.repeat(np.arange(len(starts)), lengths)
    pos = np.arange(n) - starts[seg]
    return starts, seg, pos, lengths[seg]


def _stat_names(offsets: int, windows: tuple[int, ...]) -> list[str]:
    stats = [f"off{k:+d}" for k in range(-offsets, offsets + 1)]
    stats += [f"{agg}{w}" for w in windows for agg in ("mean", "max")]
    return [*stats, "smax", "smean"]


def build_features(
    preds: dict[str, pd.DataFrame], offsets: int = 2, windows: tuple[int, ...] | list[int] = (3, 5)
) -> pd.DataFrame:
    """Build the level-2 feature frame.

    Args:
        preds: base model name → prediction frame (key columns and ``p_<class>``); all with the same
            ``sop_uid`` set (see :func:`rsna19.stacking.inputs.check_alignment`).
        offsets: neighbours at −offsets..+offsets.
        windows: odd lengths of the centred rolling windows.

    Returns:
        (N, 5 + F) frame sorted by ``series_uid, slice_idx``: the key columns, then ``missing-2 …
        missing+2`` flags, ``rel_pos``, ``n_slices`` and per model 6 × (2·offsets + 1 + 2·len(windows) + 2)
        float32 features named ``<model>__<class>__<stat>``.
    """
    names = list(preds)
    if not names:
        raise UserError("build_features needs at least one base model")
    windows = tuple(int(w) for w in windows)
    if any(w < 1 or w % 2 == 0 for w in windows):
        raise UserError(f"rolling windows must be odd and positive, got {list(windows)}")
    keys = (
        preds[names[0]][list(KEY_COLUMNS)]
        .sort_values(["series_uid", "slice_idx"], kind="stable")
        .reset_index(drop=True)
    )
    starts, seg, pos, length = _series_layout(keys)
    reach = max([offsets, *(w // 2 for w in windows)])
    shifts = range(-reach, reach + 1)
    # valid[k][i]: row i has a neighbour at offset k inside its own series.
    valid = {k: (pos + k >= 0) & (pos + k < length) for k in shifts}

    stat_names = _stat_names(offsets, windows)
    common = [f"missing{k:+d}" for k in range(-offsets, offsets + 1) if k] + ["rel_pos", "n_slices"]
    names_out = common + [f"{m}{SEP}{c}{SEP}{s}" for m in names for c in CLASSES for s in stat_names]
    # One preallocated column-major block: each feature is a contiguous column, and pandas wraps the block
    # without the copy-and-consolidate it would do for hundreds of separate arrays.
    block = np.empty((len(keys), len(names_out)), dtype=np.float32, order="F")
    j = 0
    for k in range(-offsets, offsets + 1):
        if k:
            block[:, j] = ~valid[k]
            j += 1
    block[:, j] = pos / np.maximum(length - 1, 1)
    block[:, j + 1] = length
    j += 2

    # One hash index of the reference order, reused by every model (string hashing dominates at 870k rows).
    order = pd.Index(keys["sop_uid"].to_numpy(dtype=object), dtype=object)
    counts = np.diff(np.append(starts, len(keys)))[:, None]
    for m in names:
        df = preds[m]
        where = order.get_indexer(df["sop_uid"].to_numpy(dtype=object))
        if len(df) != len(keys) or (where < 0).any():
            raise UserError(
                f"model {m!r} has {len(df)} rows, {int((where < 0).sum())} of them not among the "
                f"{len(keys)} slices of model {names[0]!r}"
            )
        p = np.empty((len(keys), len(CLASSES)), dtype=np.float32)
        p[where] = df[list(PROB_COLUMNS)].to_numpy(np.float32)  # (N, 6) in sorted order
        feats = _model_features(p, valid, offsets, windows)
        feats["smax"] = np.maximum.reduceat(p, starts, axis=0)[seg]
        feats["smean"] = (np.add.reduceat(p.astype(np.float64), starts, axis=0) / counts)[seg]
        for ci in range(len(CLASSES)):
            for s in stat_names:
                block[:, j] = feats[s][:, ci]
                j += 1
    assert j == len(names_out)
    return pd.concat([keys, pd.DataFrame(block, columns=names_out, copy=False)], axis=1)


def _model_features(
    p: np.ndarray, valid: dict[int, np.ndarray], offsets: int, windows: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """The neighbour (``off±k``) and rolling-window (``mean<w>``, ``max<w>``) features of one model's (N, 6)
    probabilities ``p`` in sorted order; ``valid[k]`` masks the rows without a neighbour at offset k."""
    # shifted[k][i] = p[i + k]; rows that wrap around are masked by valid[k].
    shifted = {k: np.roll(p, -k, axis=0) for k in valid}
    feats: dict[str, np.ndarray] = {}
    for k in range(-offsets, offsets + 1):
        feats[f"off{k:+d}"] = np.where(valid[k][:, None], shifted[k], p)
    for w in windows:
        h = w // 2
        total = np.zeros_like(p)
        count = np.zeros((len(p), 1), dtype=np.float32)
        peak = np.full_like(p, -np.inf)
        for k in range(-h, h + 1):
            ok = valid[k][:, None]
            total += np.where(ok, shifted[k], 0.0)
            count += ok
            peak = np.maximum(peak, np.where(ok, shifted[k], -np.inf))
        feats[f"mean{w}"] = total / count
        feats[f"max{w}"] = peak
    return feats


def feature_columns(features: pd.DataFrame) -> list[str]:
    """The feature columns of a frame from :func:`build_features` (everything but the key columns)."""
    return [c for c in features.columns if c not in KEY_COLUMNS]


@dataclass
class Level2Data:
    """What a stacker sees: the feature matrix, the base models' own probabilities and the patient of each row.

    Attributes:
        X: (N, F) float32 features.
        feature_names: (F,) names.
        prob_mask: (F,) True where a feature is a probability (MLP takes its logit).
        base: (N, M, 6) float32 probabilities of each base model at the slice itself.
        groups: (N,) patient ids, for patient-grouped inner splits.
    """

    X: np.ndarray
    feature_names: list[str]
    prob_mask: np.ndarray
    base: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.X)

    def take(self, idx: np.ndarray) -> Level2Data:
        """The rows ``idx`` (an index array or a boolean mask)."""
        return Level2Data(self.X[idx], self.feature_names, self.prob_mask, self.base[idx], self.groups[idx])

    @classmethod
    def from_features(cls, features: pd.DataFrame, models: list[str]) -> Level2Data:
        """Build from a :func:`build_features` frame; ``models`` gives the order of ``base``'s second axis."""
        names = feature_columns(features)
        # Row-major (C order): rows are what the stackers take, and a saved copy (rsna19.stacking.parts) has the
        # same layout, so the same numbers come out of numpy's sums.
        X = np.ascontiguousarray(features[names].to_numpy(np.float32))
        prob_mask = np.array([SEP in n for n in names])
        base = np.ascontiguousarray(
            np.stack(
                [features[[f"{m}{SEP}{c}{SEP}off+0" for c in CLASSES]].to_numpy(np.float32) for m in models], axis=1
            )
        )
        return cls(X, names, prob_mask, base, features["patient_id"].to_numpy())
