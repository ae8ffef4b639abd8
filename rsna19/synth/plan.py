"""Draw everything random about a synthetic dataset up front, from one seed, in the main process.

The plan fixes patients, identifiers, geometry, storage, heads and bleeds of every series; rendering then only
adds per-series noise from a seed derived from (dataset seed, series index). So the output does not depend on
the number of worker processes.

A preset's realism switches (mimics, small bleeds) draw from a second generator, seeded from (seed, 15): the
main stream, hence every preset without them, is unchanged by their existence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from rsna19.core.constants import SUBTYPES
from rsna19.io.dicom_write import StorageVariant
from rsna19.synth.geometry import SeriesGeometry
from rsna19.synth.mimics import Mimics, random_mimics
from rsna19.synth.phantom import Bleed, BlobBleed, HeadParams, SurfaceBleed, VentricleBleed
from rsna19.synth.presets import Preset

if TYPE_CHECKING:
    from rsna19.synth.shift import Acquisition

#: Pixel storage conventions seen in the RSNA data; every preset uses each at least once.
STORAGE_VARIANTS: dict[str, StorageVariant] = {
    "signed/-1024": StorageVariant(signed=True, intercept=-1024.0),
    "unsigned12/-1024": StorageVariant(signed=False, intercept=-1024.0, bits_stored=12),
    "signed/0": StorageVariant(signed=True, intercept=0.0),
    "wrap12": StorageVariant(wrap12=True),
    "signed/-1024/slope0.5": StorageVariant(signed=True, intercept=-1024.0, slope=0.5),
}
_VARIANT_P = (0.35, 0.25, 0.15, 0.15, 0.10)

#: Relative frequency of the subtypes among bleeds.
_SUBTYPE_P = {"epidural": 0.14, "intraparenchymal": 0.26, "intraventricular": 0.16, "subarachnoid": 0.22,
              "subdural": 0.22}  # fmt: skip

INSTANCE_ORDERS = ("ascending", "descending", "shuffled")

#: Smallest mask area (mm²) that makes a slice positive for a subtype (and never fewer than 4 pixels).
MIN_BLEED_AREA_MM2 = 20.0


@dataclass(frozen=True)
class SeriesPlan:
    """Everything needed to render and write one series (one study: RSNA has one series a study).

    Attributes:
        index: position in the dataset (also seeds the series' noise).
        split: ``train`` or ``test``.
        patient_id, study_uid, series_uid: hashed identifiers.
        sop_uids: (Z,) SOPInstanceUIDs in spatial order (slice 0 = smallest position).
        file_names: (Z,) ``ID_<hex>.dcm`` names, unrelated to the SOP UIDs.
        instance_numbers: (Z,) InstanceNumber of each spatial slice.
        instance_order: how InstanceNumber relates to space (ascending, descending, shuffled).
        geometry: slice geometry (tilt included).
        head: the patient's head at this visit.
        bleeds: hemorrhages of this study.
        variant_name: key of ``STORAGE_VARIANTS``.
        outside_hu: value written outside the reconstruction circle (−1024, −2000 or −3024).
        window_center, window_width: header window, a list for multi-valued tags.
        noise_sd: Gaussian noise (HU) before the blur.
        blur_px: Gaussian blur sigma in pixels.
        min_pixels: mask pixels that make a slice positive for a subtype.
        seed: entropy for the series' noise generator.
        corrupt_slice: spatial index of the slice written truncated, or None.
        slab_samples: sub-planes averaged across the slab of each slice (1: no partial volume).
        mimics: non-blood hyperdensities and skull-base streaks (None: none).
        small_bleeds: indices into ``bleeds`` of the ones drawn small or thin.
        acquisition: a scanner change applied to the rendered pixels (:mod:`rsna19.synth.shift`; None: none).
    """

    index: int
    split: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    file_names: tuple[str, ...]
    instance_numbers: tuple[int, ...]
    instance_order: str
    geometry: SeriesGeometry
    head: HeadParams
    bleeds: tuple[Bleed, ...]
    variant_name: str
    outside_hu: float
    window_center: float | list[float]
    window_width: float | list[float]
    noise_sd: float
    blur_px: float
    min_pixels: int
    seed: tuple[int, int]
    corrupt_slice: int | None = None
    slab_samples: int = 1
    mimics: Mimics | None = None
    small_bleeds: tuple[int, ...] = ()
    acquisition: Acquisition | None = None

    @property
    def variant(self) -> StorageVariant:
        """The pixel storage convention."""
        return STORAGE_VARIANTS[self.variant_name]


class Ids:
    """Kaggle-style hashed identifiers ``ID_`` + 9 hex digits, unique within a dataset."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def new(self) -> str:
        while True:
            ident = f"ID_{int(self.rng.integers(16**9)):09x}"
            if ident not in self.used:
                self.used.add(ident)
                return ident


def _cover(rng: np.random.Generator, n: int, options: list, p: tuple[float, ...] | None = None) -> list:
    """``n`` draws from ``options`` (probabilities ``p``) in which every option appears once if n allows."""
    k = min(n, len(options))
    first = [options[i] for i in rng.permutation(len(options))[:k]]
    rest = [options[i] for i in rng.choice(len(options), size=n - k, p=p)]
    out = first + rest
    return [out[i] for i in rng.permutation(n)]


def random_anatomy(rng: np.random.Generator, head_scale: tuple[float, float] = (0.92, 1.05)) -> dict:
    """The parts of a head that belong to the patient (kept across their studies)."""
    scale = rng.uniform(*head_scale)
    dirs = rng.normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    sulci = np.column_stack([dirs, rng.uniform(9.0, 16.0, 6), rng.uniform(0, 2 * math.pi, 6)])
    tex = rng.normal(size=(3, 3))
    tex = tex / np.linalg.norm(tex, axis=1, keepdims=True) * rng.uniform(0.03, 0.08, (3, 1))
    texture = np.column_stack([tex, rng.uniform(0, 2 * math.pi, 3)])
    return {
        "axes": tuple(float(v) for v in np.array([66.0, 84.0, 64.0]) * scale * rng.uniform(0.96, 1.04, 3)),
        "skull_mm": float(rng.uniform(6.0, 9.0)),
        "scalp_mm": float(rng.uniform(4.0, 7.0)),
        "grey_hu": float(rng.uniform(36.0, 40.0)),
        "white_hu": float(rng.uniform(26.0, 30.0)),
        "csf_hu": float(rng.uniform(2.0, 8.0)),
        "scalp_hu": float(rng.uniform(20.0, 45.0)),
        "ventricle_scale": float(rng.uniform(0.85, 1.35)),
        "sulci": tuple(tuple(float(v) for v in row) for row in sulci),
        "texture": tuple(tuple(float(v) for v in row) for row in texture),
    }


def random_geometry(rng: np.random.Generator, preset: Preset, head_centre: np.ndarray, tilted: bool) -> SeriesGeometry:
    """A series whose field of view holds the head with a margin and whose slab crosses the brain."""
    n = int(rng.integers(preset.n_slices[0], preset.n_slices[1] + 1))
    step = float(rng.uniform(*preset.table_step))
    spacing = float(rng.uniform(*preset.pixel_spacing_512)) * 512 / preset.image_size
    tilt = 0.0
    if tilted:
        tilt = float(rng.uniform(10.0, 30.0)) * (1.0 if rng.random() < 0.75 else -1.0)
    # The image centre sits ~8 mm behind the head centre so the headrest fits under the head. A plane through
    # (x, y_iso, z_k) meets the head's vertical axis at z_k + (y_iso − c_y)·tan θ: aim that at the slab.
    x_iso = head_centre[0] + rng.uniform(*preset.iso_offset)
    y_iso = head_centre[1] + 8.0 + rng.uniform(*preset.iso_offset)
    slab_mid = head_centre[2] + rng.uniform(*preset.slab_offset)
    z0 = slab_mid - (n - 1) / 2 * step - (y_iso - head_centre[1]) * math.tan(math.radians(tilt))
    return SeriesGeometry(
        rows=preset.image_size,
        cols=preset.image_size,
        pixel_spacing=(spacing, spacing),
        table_step=step,
        tilt_deg=tilt,
        n_slices=n,
        centre=(float(x_iso), float(y_iso), float(z0)),
        slice_thickness=round(step * math.cos(math.radians(tilt)), 2),
    )


def _plane_start(geom: SeriesGeometry, head: HeadParams, k: float) -> np.ndarray:
    """(3,) where plane ``k`` meets the head's vertical axis (a point well inside the head)."""
    t = math.radians(geom.tilt_deg)
    v = (head.centre[1] - geom.centre[1]) / math.cos(t)
    return geom.plane_point(k, head.centre[0] - geom.centre[0], v)


def random_bleed(rng: np.random.Generator, subtype: str, head: HeadParams, geom: SeriesGeometry) -> Bleed:
    """A hemorrhage of ``subtype`` centred on a plane well inside the series, so it spans several slices."""
    n = geom.n_slices
    hu = float(rng.uniform(55.0, 85.0))
    row, col = geom.row_cosines, geom.col_cosines
    for _ in range(200):
        k = float(rng.uniform(1.0, n - 2.0)) if n > 3 else (n - 1) / 2
        start = _plane_start(geom, head, k)
        if head.signed_distance(start) > -30.0:  # plane skims the top of the head: too little brain
            continue
        if subtype in ("epidural", "subdural", "subarachnoid"):
            spread = {"epidural": 1.0, "subdural": 1.3, "subarachnoid": math.pi}[subtype]
            phi = (0.0 if rng.random() < 0.5 else math.pi) + rng.uniform(-spread, spread)
            # Lateral more than anterior/posterior: the head is wider in y, blood collects on the convexity.
            anchor = head.surface_point(start, math.cos(phi) * row + math.sin(phi) * col)
            normal = head.inward_normal(anchor)
            if subtype == "epidural":
                radius, thick = rng.uniform(18.0, 32.0), rng.uniform(7.0, 14.0)
            elif subtype == "subdural":
                radius, thick = rng.uniform(35.0, 65.0), rng.uniform(4.0, 9.0)
            else:
                radius, thick = rng.uniform(22.0, 38.0), rng.uniform(8.0, 14.0)
            return SurfaceBleed(
                subtype=subtype, hu=hu, anchor=tuple(float(v) for v in anchor),
                normal=tuple(float(v) for v in normal), radius=float(radius), thickness=float(thick),
            )  # fmt: skip
        if subtype == "intraparenchymal":
            radii = rng.uniform(6.0, 15.0, 3)
            radii[2] = max(radii[2], 1.2 * geom.table_step)  # reach the neighbouring slices
            u, v = rng.uniform(-45.0, 45.0, 2)
            centre = start + u * row + v * col
            if head.signed_distance(centre) > -(radii.max() + 8.0):
                continue
            return BlobBleed(
                hu=hu, centre=tuple(float(c) for c in centre), radii=tuple(float(r) for r in radii),
                angles=(float(rng.uniform(0, 180)), float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20))),
                lumps=(float(rng.uniform(0.08, 0.2)), *(float(p) for p in rng.uniform(0, 2 * math.pi, 3))),
            )  # fmt: skip
        if subtype == "intraventricular":
            sides = [(1, 2, 3), (1, 2), (1,), (2,)][int(rng.integers(4))]
            cast = rng.random() < 0.3
            level = -math.inf if cast else head.centre[1] + rng.uniform(6.0, 16.0) * head.ventricle_scale
            return VentricleBleed(hu=hu, level_y=float(level), sides=sides)
        raise ValueError(f"unknown subtype {subtype!r}")
    raise RuntimeError(f"could not place a {subtype} bleed in a series of {n} slices")


def shrink_bleed(rng: np.random.Generator, bleed: Bleed, head: HeadParams) -> Bleed:
    """A small or thin version of ``bleed`` (same place and subtype): a few mm, near the label threshold."""
    if isinstance(bleed, BlobBleed):
        radii = (*rng.uniform(2.5, 5.5, 2), rng.uniform(1.5, 3.5))
        return replace(bleed, radii=tuple(float(r) for r in radii))
    if isinstance(bleed, VentricleBleed):  # a thin dependent layer in one occipital horn
        level = head.centre[1] + rng.uniform(20.0, 26.0) * head.ventricle_scale
        return replace(bleed, level_y=float(level), sides=((1,), (2,))[int(rng.integers(2))])
    radius, thick = {
        "epidural": (rng.uniform(9.0, 15.0), rng.uniform(2.5, 4.5)),
        "subdural": (rng.uniform(14.0, 28.0), rng.uniform(1.5, 3.0)),
        "subarachnoid": (rng.uniform(8.0, 15.0), rng.uniform(2.0, 4.0)),
    }[bleed.subtype]
    return replace(bleed, radius=float(radius), thickness=float(thick))


def _bleed_sets(rng: np.random.Generator, n: int, fraction: float) -> list[list[str]]:
    """Subtypes of each of ``n`` studies: ~``fraction`` positive, every subtype present when n allows."""
    n_pos = max(1, round(fraction * n))
    positive = rng.permutation(n)[:n_pos]
    sets: list[list[str]] = [[] for _ in range(n)]
    names, p = list(_SUBTYPE_P), np.array(list(_SUBTYPE_P.values()))
    for i in positive:
        k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        sets[i] = [names[j] for j in rng.choice(len(names), size=k, replace=False, p=p / p.sum())]
    missing = [s for s in SUBTYPES if not any(s in st for st in sets)]
    for j, s in enumerate(missing):  # coverage: every subtype at least once per split
        sets[positive[j % n_pos]].append(s)
    return [sorted(st, key=SUBTYPES.index) for st in sets]


def make_plan(preset: Preset, seed: int) -> list[SeriesPlan]:
    """Draw the whole dataset for ``preset`` and ``seed``: a list of series, train first then test."""
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng([int(seed), 15])  # realism switches only: the main stream stays as it was
    ids = Ids(rng)
    plans: list[SeriesPlan] = []
    corrupt_series = int(rng.integers(preset.n_train_studies))
    for split, n_studies in (("train", preset.n_train_studies), ("test", preset.n_test_studies)):
        repeats = preset.n_repeat_patients if split == "train" else 0
        n_patients = n_studies - repeats
        patient_of_study = list(range(n_patients)) + [int(i) for i in rng.permutation(n_patients)[:repeats]]
        patient_of_study = [patient_of_study[i] for i in rng.permutation(n_studies)]
        patients = [(ids.new(), random_anatomy(rng, preset.head_scale)) for _ in range(n_patients)]
        variants = _cover(rng, n_studies, list(STORAGE_VARIANTS), _VARIANT_P)
        tilts = _cover(rng, n_studies, [True, False], (preset.tilt_fraction, 1 - preset.tilt_fraction))
        orders = _cover(rng, n_studies, list(INSTANCE_ORDERS), (0.5, 0.3, 0.2))
        multi_windows = _cover(rng, n_studies, [True, False], (0.3, 0.7))
        bleed_sets = _bleed_sets(rng, n_studies, preset.bleed_fraction)
        outside_done = False
        for s in range(n_studies):
            patient_id, anatomy = patients[patient_of_study[s]]
            centre = np.array([rng.uniform(-5, 5), rng.uniform(-15, 15), rng.uniform(-80, 120)])
            angles = (float(rng.uniform(-6, 6)), float(rng.uniform(-10, 10)), float(rng.uniform(-4, 4)))
            geom = random_geometry(rng, preset, centre, tilts[s])
            head = HeadParams(
                centre=tuple(float(c) for c in centre), angles=angles, min_feature_mm=geom.pixel_spacing[0],
                headrest_radius=float(rng.uniform(85.0, 110.0)), **anatomy,
            )  # fmt: skip
            bleeds = tuple(random_bleed(rng, st, head, geom) for st in bleed_sets[s])
            mimics, small = None, ()
            if preset.has_context:
                small = tuple(i for i in range(len(bleeds)) if extra.random() < preset.small_bleed_fraction)
                bleeds = tuple(shrink_bleed(extra, b, head) if i in small else b for i, b in enumerate(bleeds))
                if preset.mimics or preset.beam_hardening:
                    mimics = random_mimics(extra, head.ventricle_scale, head.axes, calcified=preset.mimics,
                                           skull_base=preset.beam_hardening)  # fmt: skip
            n = geom.n_slices
            order = orders[s]
            numbers = instance_numbers(rng, n, order)
            variant_name = variants[s]
            outside = -1024.0
            signed = STORAGE_VARIANTS[variant_name].signed and not STORAGE_VARIANTS[variant_name].wrap12
            # Only signed storage can hold values under −1024; make sure each split shows one such series.
            if signed and (not outside_done or rng.random() < 0.6):
                outside = float(rng.choice([-2000.0, -3024.0]))
                outside_done = True
            wc, ww = _header_window(rng, multi_windows[s])
            dr, dc = geom.pixel_spacing
            study_uid, series_uid = ids.new(), ids.new()
            plans.append(
                SeriesPlan(
                    index=len(plans),
                    split=split,
                    patient_id=patient_id,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uids=tuple(ids.new() for _ in range(n)),
                    file_names=tuple(f"{ids.new()}.dcm" for _ in range(n)),
                    instance_numbers=numbers,
                    instance_order=order,
                    geometry=geom,
                    head=head,
                    bleeds=bleeds,
                    variant_name=variant_name,
                    outside_hu=outside,
                    window_center=wc,
                    window_width=ww,
                    noise_sd=float(rng.uniform(6.0, 11.0)),
                    blur_px=float(rng.uniform(0.5, 0.8)),
                    min_pixels=max(4, math.ceil(MIN_BLEED_AREA_MM2 / (dr * dc))),
                    seed=(int(seed), len(plans)),
                    corrupt_slice=(n // 2) if (split == "train" and s == corrupt_series) else None,
                    slab_samples=preset.slab_samples,
                    mimics=mimics,
                    small_bleeds=small,
                )
            )
    return plans


def instance_numbers(rng: np.random.Generator, n: int, order: str) -> tuple[int, ...]:
    """InstanceNumbers of ``n`` slices in spatial order for an ``order`` of :data:`INSTANCE_ORDERS`."""
    if order == "ascending":
        numbers = np.arange(1, n + 1)
    elif order == "descending":
        numbers = np.arange(n, 0, -1)
    else:
        numbers = rng.permutation(n) + 1
        if n > 1 and np.all(np.diff(numbers) > 0):  # a shuffle that came out sorted is no shuffle
            numbers = numbers[::-1].copy()
    return tuple(int(v) for v in numbers)


def _header_window(rng: np.random.Generator, multi: bool) -> tuple[float | list[float], float | list[float]]:
    """The header's (WindowCenter, WindowWidth): a multi-valued pair when ``multi``, else one of three windows."""
    if multi:
        return ([36.0, 36.0], [80.0, 80.0]) if rng.random() < 0.5 else ([40.0, 600.0], [80.0, 2800.0])
    return [(40.0, 80.0), (30.0, 80.0), (35.0, 100.0)][int(rng.integers(3))]
