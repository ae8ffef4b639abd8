"""Scanner-shift presets: the demo's test heads as another hospital's scanners would write them (issue 23;
docs/benchmarks.md, "Scanner shift").

Each preset changes **one acquisition factor** of the ``demo`` preset, or several at once (``hospital``):

* pixel factors (:class:`Acquisition`, applied to every rendered slice after the scanner's noise and blur):
  HU calibration offset and gain inside the body, reconstruction kernel (smoother or sharper: an unsharp mask),
  dose (noise SD), motion (a ghost of the slice shifted by a few mm), metal-like streaks, and the vendor's
  padding value outside the reconstruction circle;
* geometry factors: in-plane resolution (a 512² matrix), field of view, beam hardening at the skull base, patient
  size and position in the field of view (:class:`~rsna19.synth.presets.Preset` fields that draw the same random
  numbers), and the slice geometry of each drawn series, changed afterwards: slice thickness (2.5 / 5 / 7 mm slabs
  with partial volume over the same stretch of the head) and gantry tilt on every series.

All presets draw their heads and bleeds from one seed (:data:`SHIFT_SEED`, which the demo's own training data does
not use) and keep them: a factor changes how the same heads and bleeds are imaged, never which ones are imaged. (The
slice geometry is therefore changed on the drawn plans, not through the preset: a preset with other slice counts
or tilts would consume the generator differently and draw other patients and bleeds, which is what the first
version of this suite did, so its thickness rows compared other studies.) ``none`` is the same studies as the demo
writes them: the in-domain reference.

:func:`write_shift_preset` writes one preset's test studies in the RSNA layout (``stage_2_test/`` flat DICOM files,
``masks/``) plus ``labels.csv`` (``study_uid, series_uid, sop_uid, z`` and the six classes), atomically: a folder
with its ``shift_summary.json`` is complete and is not written again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift

from rsna19.core.atomic import atomic_path
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.synth.dataset import SPLIT_DIRS, render_series
from rsna19.synth.geometry import SeriesGeometry
from rsna19.synth.plan import Ids, instance_numbers, make_plan
from rsna19.synth.presets import PRESETS, Preset

if TYPE_CHECKING:
    from rsna19.synth.plan import SeriesPlan

#: Seed of the shift studies' heads and bleeds (the demo trains on seed 0 … 2).
SHIFT_SEED = 23
SUMMARY_NAME = "shift_summary.json"
VERSION = 2  # 2: the slice geometry (thickness, tilt) changes on the drawn plans: the same heads and bleeds


@dataclass(frozen=True)
class Acquisition:
    """A scanner's change to the pixels of a rendered slice (identity by default).

    Attributes:
        hu_offset: HU added inside the body (a calibration offset).
        hu_scale: gain about 0 HU (water) inside the body.
        sharpen: unsharp-mask amount on top of the scanner blur (σ 1 pixel); negative values blur.
        motion_mm: a ghost of the slice shifted by this many mm (random direction per series), weight 0.35.
        streaks: metal-like streaks (bright and dark lines through a point near the skull), HU amplitude.
        outside_hu: the value written outside the reconstruction circle (None: the plan's).
    """

    hu_offset: float = 0.0
    hu_scale: float = 1.0
    sharpen: float = 0.0
    motion_mm: float = 0.0
    streaks: float = 0.0
    outside_hu: float | None = None

    def apply(self, hu: np.ndarray, body: np.ndarray, plan: SeriesPlan, k: int) -> np.ndarray:
        """The slice as this scanner writes it.

        Args:
            hu: (rows, cols) HU after the plan's noise and blur.
            body: (rows, cols) bool, where the noiseless slice is patient or headrest (not air).
            plan: the series (its geometry and seed).
            k: spatial slice index.

        Returns:
            (rows, cols) float64 HU.
        """
        rng = np.random.default_rng([*plan.seed, 23])  # per series: the same direction on every slice
        angle = float(rng.uniform(0, 2 * math.pi))
        hu = np.asarray(hu, dtype=np.float64)
        if self.sharpen:
            hu = hu + self.sharpen * (hu - gaussian_filter(hu, 1.0))
        if self.motion_mm:
            px = self.motion_mm / plan.geometry.pixel_spacing[0]
            ghost = nd_shift(hu, (px * math.sin(angle), px * math.cos(angle)), order=1, mode="nearest")
            hu = 0.65 * hu + 0.35 * ghost
        if self.streaks:
            hu = hu + self._streaks(hu.shape, rng) * body
        if self.hu_scale != 1.0 or self.hu_offset:
            hu = np.where(body, hu * self.hu_scale + self.hu_offset, hu)
        return hu

    def _streaks(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """(rows, cols) alternating bright and dark lines through a point 60 % of the way to the edge."""
        rows, cols = shape
        a = rng.uniform(0, 2 * math.pi)
        cy, cx = rows / 2 + 0.3 * rows * math.sin(a), cols / 2 + 0.3 * cols * math.cos(a)
        yy, xx = np.mgrid[:rows, :cols].astype(np.float64)
        theta = np.arctan2(yy - cy, xx - cx)
        r = np.hypot(yy - cy, xx - cx)
        # Thin lines: a high power of the cosine of 6 angular periods, signs alternating, fading with distance.
        lines = np.cos(6 * (theta - rng.uniform(0, math.pi))) ** 21
        sign = np.sign(np.sin(3 * (theta - rng.uniform(0, math.pi))))
        return self.streaks * lines * sign * np.exp(-r / (0.5 * rows))


@dataclass(frozen=True)
class ShiftPreset:
    """One scanner-shift preset: the factor it changes, geometry overrides and the pixel change.

    Attributes:
        name: preset name (``none`` is the in-domain reference).
        factor: what it changes, for the tables.
        preset: :class:`Preset` field overrides of the demo preset (in-plane geometry, head size, realism
            switches): only fields that leave the number of random draws alone, so the heads stay those of ``none``.
        acquisition: the pixel change.
        noise_scale: factor on the plan's noise SD (dose: 2 = a quarter of the dose).
        blur_px: the scanner blur's σ in pixels (None: the plan's 0.5–0.8).
        tilt_all: every series tilted (10–30°), not ~30 %.
        padding_all: every series stored signed with ``acquisition.outside_hu`` outside the circle.
        table_step: slices every this many mm over the same stretch of the head (None: the plan's 4–5 mm).
        slab_samples: sub-planes averaged across each slice's thickness (partial volume; None: the plan's).
    """

    name: str
    factor: str
    preset: dict[str, Any] = dataclasses.field(default_factory=dict)
    acquisition: Acquisition = Acquisition()
    noise_scale: float = 1.0
    blur_px: float | None = None
    tilt_all: bool = False
    padding_all: bool = False
    table_step: float | None = None
    slab_samples: int | None = None


_HOSPITAL = Acquisition(hu_offset=6.0, hu_scale=1.03, sharpen=0.5, outside_hu=-2000.0)

#: Presets, one factor each, then the combined ``hospital``.
SHIFT_PRESETS: dict[str, ShiftPreset] = {
    p.name: p
    for p in (
        ShiftPreset("none", "in-domain (the demo's acquisition)"),
        ShiftPreset("hu_plus10", "HU offset +10 inside the body", acquisition=Acquisition(hu_offset=10.0)),
        ShiftPreset("hu_minus10", "HU offset −10 inside the body", acquisition=Acquisition(hu_offset=-10.0)),
        ShiftPreset("hu_plus5", "HU offset +5 inside the body", acquisition=Acquisition(hu_offset=5.0)),
        ShiftPreset("hu_gain", "HU gain ×1.06 about water", acquisition=Acquisition(hu_scale=1.06)),
        ShiftPreset("kernel_sharp", "sharper kernel (unsharp 0.8)", acquisition=Acquisition(sharpen=0.8)),
        ShiftPreset("kernel_smooth", "smoother kernel (blur σ 1.2 px)", blur_px=1.2),
        ShiftPreset("dose_low", "low dose (noise ×2)", noise_scale=2.0),
        ShiftPreset("matrix512", "in-plane resolution: 512² matrix", preset={"image_size": 512}),
        ShiftPreset("fov_large", "field of view 360–410 mm", preset={"pixel_spacing_512": (0.7, 0.8)}),
        ShiftPreset("thick2.5", "2.5 mm slices (partial volume)", table_step=2.5, slab_samples=3),
        ShiftPreset("thick5", "4–5 mm slices with partial volume (the demo's spacing)", slab_samples=3),
        ShiftPreset("thick7", "7 mm slices (partial volume)", table_step=7.0, slab_samples=3),
        ShiftPreset("tilt", "gantry tilt 10–30° on every series", tilt_all=True),
        ShiftPreset("beam_hardening", "beam hardening at the skull base", preset={"beam_hardening": True}),
        ShiftPreset("streaks", "metal-like streaks (±80 HU)", acquisition=Acquisition(streaks=80.0)),
        ShiftPreset("motion", "motion (3 mm ghost)", acquisition=Acquisition(motion_mm=3.0)),
        ShiftPreset("patient", "small/large heads, off-centre", preset={"head_scale": (0.85, 1.12),
                                                                        "iso_offset": (-20.0, 20.0)}),
        ShiftPreset("padding", "padding −2000 outside the circle", acquisition=Acquisition(outside_hu=-2000.0),
                    padding_all=True),
        ShiftPreset(
            "hospital",
            "another hospital: HU +6 ×1.03, sharp 0.5, noise ×1.5, 7 mm, tilt, padding −2000",
            table_step=7.0,
            slab_samples=3,
            acquisition=_HOSPITAL,
            noise_scale=1.5,
            tilt_all=True,
            padding_all=True,
        ),
    )
}  # fmt: skip


def get_shift_preset(name: str) -> ShiftPreset:
    """The shift preset called ``name``; a clear error lists the valid names."""
    try:
        return SHIFT_PRESETS[name]
    except KeyError:
        raise UserError(f"unknown shift preset {name!r}; choose one of: {', '.join(SHIFT_PRESETS)}") from None


def shift_plans(spec: ShiftPreset, n_studies: int, seed: int = SHIFT_SEED, base: str = "demo") -> list[SeriesPlan]:
    """The ``n_studies`` test series of ``spec`` (one per study) on top of preset ``base``, drawn from ``seed``."""
    base_preset = PRESETS[base]
    fields = {**spec.preset, "n_train_studies": 1, "n_test_studies": n_studies, "n_repeat_patients": 0}
    preset: Preset = dataclasses.replace(base_preset, name=f"shift-{spec.name}", **fields)
    plans = [p for p in make_plan(preset, seed) if p.split == "test"]
    # New slice identifiers (a series with other slices) from a generator of their own, unique in the dataset.
    ids = Ids(np.random.default_rng([seed, 24]))
    ids.used.update(u for p in plans for u in (p.study_uid, p.series_uid, *p.sop_uids))
    out = []
    for p in plans:
        change: dict[str, Any] = {"noise_sd": p.noise_sd * spec.noise_scale}
        if spec.slab_samples is not None:
            change["slab_samples"] = spec.slab_samples
        geom = p.geometry
        if spec.tilt_all and geom.tilt_deg == 0.0:
            geom = tilted(geom, p.head.centre, np.random.default_rng([*p.seed, 24]))
        if spec.table_step is not None:
            geom = restepped(geom, spec.table_step)
        if geom != p.geometry:
            change["geometry"] = geom
        if geom.n_slices != p.geometry.n_slices:
            n = geom.n_slices
            change["sop_uids"] = tuple(ids.new() for _ in range(n))
            change["file_names"] = tuple(f"{ids.new()}.dcm" for _ in range(n))
            change["instance_numbers"] = instance_numbers(np.random.default_rng([*p.seed, 25]), n, p.instance_order)
        if spec.blur_px is not None:
            change["blur_px"] = spec.blur_px
        if spec.acquisition != Acquisition():
            change["acquisition"] = spec.acquisition
        if spec.padding_all and spec.acquisition.outside_hu is not None:
            change["variant_name"] = "signed/-1024"  # only signed storage holds values under −1024
            change["outside_hu"] = spec.acquisition.outside_hu
        out.append(dataclasses.replace(p, **change))
    return out


def tilted(geom: SeriesGeometry, head_centre: tuple[float, float, float], rng: np.random.Generator) -> SeriesGeometry:
    """``geom`` with a gantry tilt of 10–30° (either way), its middle plane still crossing the head where it did.

    Args:
        geom: an untilted series.
        head_centre: (3,) the head's centre (LPS mm).
        rng: the series' generator.
    """
    tilt = float(rng.uniform(10.0, 30.0)) * (1.0 if rng.random() < 0.75 else -1.0)
    # An untilted plane k meets the head's vertical axis at z0 + k·step; a tilted one at
    # z0 + k·step + (y_iso − c_y)·tan θ (rsna19.synth.plan.random_geometry): move z0 to cancel that.
    dz = (geom.centre[1] - head_centre[1]) * math.tan(math.radians(tilt))
    return dataclasses.replace(
        geom,
        tilt_deg=tilt,
        centre=(geom.centre[0], geom.centre[1], geom.centre[2] - dz),
        slice_thickness=round(geom.table_step * math.cos(math.radians(tilt)), 2),
    )


def restepped(geom: SeriesGeometry, step: float) -> SeriesGeometry:
    """``geom`` with slices every ``step`` mm (thickness to match) over the same stretch of the head.

    The first and last planes of ``geom`` bound the stretch; the middle plane stays where it was.
    """
    extent = (geom.n_slices - 1) * geom.table_step
    n = max(3, round(extent / step) + 1)
    z0 = geom.centre[2] + (extent - (n - 1) * step) / 2
    return dataclasses.replace(
        geom,
        table_step=float(step),
        n_slices=n,
        centre=(geom.centre[0], geom.centre[1], z0),
        slice_thickness=round(step * math.cos(math.radians(geom.tilt_deg)), 2),
    )


def write_shift_preset(
    out_dir: str | os.PathLike[str],
    name: str,
    n_studies: int = 24,
    seed: int = SHIFT_SEED,
    workers: int = 1,
    base: str = "demo",
) -> dict[str, Any]:
    """Write the test studies of shift preset ``name`` into ``out_dir`` (skipped when already complete).

    Args:
        out_dir: the preset's folder (created; replaced only when incomplete).
        name: a key of :data:`SHIFT_PRESETS`.
        n_studies: studies to write.
        seed: seed of the heads and bleeds.
        workers: processes rendering series.
        base: the synthetic preset the factor changes (``demo``; ``tiny`` for tests).

    Returns:
        the summary (``preset, factor, n_studies, seed, version, n_slices, n_positive_studies, elapsed_s``).
    """
    from concurrent.futures import ProcessPoolExecutor

    spec = get_shift_preset(name)
    out = Path(out_dir)
    summary_path = out / SUMMARY_NAME
    if summary_path.is_file():
        old = json.loads(summary_path.read_text())
        if (old.get("version"), old.get("n_studies"), old.get("seed"), old.get("base")) == (
            VERSION,
            n_studies,
            seed,
            base,
        ):
            return old
    start = time.perf_counter()
    plans = shift_plans(spec, n_studies, seed, base)
    with atomic_path(out) as tmp:
        for d in ("stage_2_test", "masks"):
            (tmp / d).mkdir(parents=True)
        assert SPLIT_DIRS["test"] == "stage_2_test"
        if workers <= 1:
            results = [render_series(p, tmp) for p in plans]
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(render_series, plans, [tmp] * len(plans)))
        rows = []
        for p, r in zip(plans, results, strict=True):
            for z, sop in enumerate(p.sop_uids):
                rows.append([p.study_uid, p.series_uid, sop, z, *r.labels[z].tolist()])
        labels = pd.DataFrame(rows, columns=["study_uid", "series_uid", "sop_uid", "z", *CLASSES])
        labels.to_csv(tmp / "labels.csv", index=False)
        summary = {
            "preset": name,
            "factor": spec.factor,
            "n_studies": n_studies,
            "seed": seed,
            "base": base,
            "version": VERSION,
            "n_slices": len(labels),
            "n_positive_studies": int(labels.groupby("study_uid")["any"].max().sum()),
            "elapsed_s": round(time.perf_counter() - start, 1),
        }
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    return summary
