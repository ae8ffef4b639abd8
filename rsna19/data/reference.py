"""Intensities referenced to the series' own brain tissue (docs/architecture.md, "Model inputs").

CT numbers drift between scanners: water may read a few HU off on one scanner and the kernel and beam hardening
move brain parenchyma by a few more. The fixed windows of :mod:`rsna19.data.transforms` read absolute HU, so a
5 HU calibration difference moves every pixel of the network input and, through it, the probability of every
slice (docs/benchmarks.md, "Scanner shift"). With ``data.hu_reference: brain`` the HU of a series are shifted by
one number before windowing, so that its brain parenchyma reads :data:`BRAIN_HU`:

    hu' = hu − (brain_reference_hu(series) − BRAIN_HU)

The reference is a robust estimate of the parenchyma's HU from the whole series (:func:`brain_reference_hu`): the
median of the soft-tissue voxels, then the mode of their smoothed histogram near that median, then the mean of the
voxels within ±10 HU of the mode. Every step after the first moves with the data, so an HU offset of the whole
head moves the reference by the same amount and the network input does not change (up to the voxels at the edges
of the first band: a 10 HU offset moves the reference by ~0.01 HU on the synthetic heads, tests/test_reference.py).
Hemorrhage (55–90 HU) and CSF (0–10 HU) are minorities of the soft-tissue voxels; they pull the median a little,
never the mode.

The offset is a property of the series, not of the slice, so every slice of a series (and every neighbour of a
2.5D or 3D sample) is shifted alike. It is computed on the cache volume once per series in each loader process:
training, ``predict`` and ``predict-study`` (which converts a new study to the same cache layout) compute it the
same way. It is recorded in the checkpoint's HU mapping (``reference_hu``), so a model trained with it is always
fed referenced HU.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from scipy.ndimage import gaussian_filter1d

from rsna19.core.errors import UserError

#: HU that the brain parenchyma of every series is moved to (the mean of the phantom's grey and white matter,
#: and typical of real unenhanced head CT).
BRAIN_HU = 32.0

#: Values of ``data.hu_reference``.
HU_REFERENCES: tuple[str, ...] = ("none", "brain")

#: Soft-tissue band (HU) of the first estimate: excludes air, fat and bone, holds CSF, parenchyma, blood, scalp.
_SOFT_BAND = (-100.0, 200.0)
#: Half-width (HU) of the histogram around the median, and of the mean around the mode.
_HIST_HALF = 40
_MEAN_HALF = 10.0
#: Fewer soft-tissue voxels than this: no estimate (the series is no head, or all but empty).
_MIN_VOXELS = 500


def brain_reference_hu(volume: np.ndarray, step: int = 2) -> float:
    """Robust HU of the brain parenchyma of one series.

    Args:
        volume: (Z, H, W) HU, any numeric dtype (a memory map is fine: only every ``step``-th row and column of
            every slice is read).
        step: in-plane subsampling of the voxels used.

    Returns:
        the estimate in HU, or NaN when the volume holds fewer than 500 soft-tissue voxels.
    """
    v = np.asarray(volume[:, ::step, ::step], dtype=np.float32).ravel()
    v = v[(v > _SOFT_BAND[0]) & (v < _SOFT_BAND[1])]
    if v.size < _MIN_VOXELS:
        return math.nan
    m0 = float(np.median(v))
    near = v[np.abs(v - m0) <= _HIST_HALF]
    # 1 HU bins centred on m0 + k: the histogram moves with the data, so does its mode.
    edges = m0 + np.arange(-_HIST_HALF - 0.5, _HIST_HALF + 1.0)
    counts, _ = np.histogram(near, bins=edges)
    smooth = gaussian_filter1d(counts.astype(np.float64), sigma=3.0, mode="constant")
    mode = m0 + float(np.argmax(smooth)) - _HIST_HALF
    core = near[np.abs(near - mode) <= _MEAN_HALF]
    return float(core.mean()) if core.size else mode


def reference_target(name: str) -> float | None:
    """The HU mapping's ``reference_hu`` for a ``data.hu_reference`` value: :data:`BRAIN_HU` or None.

    Raises:
        UserError: not one of :data:`HU_REFERENCES`.
    """
    if name not in HU_REFERENCES:
        raise UserError(f"data.hu_reference must be one of {', '.join(HU_REFERENCES)}, got {name!r}")
    return BRAIN_HU if name == "brain" else None


class SeriesReference:
    """Per-series HU offsets ``brain_reference_hu(series) − target`` of one dataset, computed once per series.

    Args:
        target: the HU the parenchyma is moved to (:data:`BRAIN_HU`); None turns referencing off (offset 0).
        capacity: series whose offsets are kept.
    """

    def __init__(self, target: float | None, capacity: int = 4096) -> None:
        self.target = target
        self.capacity = capacity
        self._offsets: OrderedDict[str, float] = OrderedDict()

    def __call__(self, series_uid: str, volume: np.ndarray) -> float:
        """The HU to subtract from every voxel of ``series_uid`` (0.0 when off or when no estimate exists).

        Args:
            series_uid: key of the cache.
            volume: the series' (Z, H, W) HU volume.
        """
        if self.target is None:
            return 0.0
        off = self._offsets.get(series_uid)
        if off is None:
            ref = brain_reference_hu(volume)
            off = 0.0 if math.isnan(ref) else ref - float(self.target)
            self._offsets[series_uid] = off
            if len(self._offsets) > self.capacity:
                self._offsets.popitem(last=False)
        return off
