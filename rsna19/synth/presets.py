"""Named synthetic datasets: ``tiny`` for tests, ``demo`` for an end-to-end run that learns, ``context`` for a
demo-sized set whose single slices are ambiguous the way real head CT is (see :class:`Preset`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rsna19.core.errors import UserError


@dataclass(frozen=True)
class Preset:
    """How many studies of which size a synthetic dataset holds, and how realistic their rendering is.

    The realism switches (``slab_samples``, ``mimics``, ``beam_hardening``, ``small_bleed_fraction``) default to
    off; with all of them off a preset writes exactly what the generator wrote before they existed.

    Attributes:
        name: preset name.
        image_size: Rows = Columns of every slice.
        n_train_studies: studies in ``stage_2_train`` (one series each, as in RSNA).
        n_test_studies: studies in ``stage_2_test``; test patients never appear in train.
        n_repeat_patients: train patients with two studies (so patients < studies).
        n_slices: inclusive range of slices per series.
        table_step: range of the table motion between slices (mm).
        pixel_spacing_512: range of the pixel spacing of a 512-pixel image (mm); scaled by 512 / image_size so
            the field of view (230–307 mm) holds the head with a margin at every image size.
        slab_offset: range of the slab centre above the head centre (mm): thin tiny slabs sit at the level
            of the ventricles, demo slabs cover most of the brain.
        bleed_fraction: fraction of studies with at least one hemorrhage.
        tilt_fraction: fraction of series acquired with a tilted gantry (10–30°).
        description: one line for ``rsna19 synth --help``.
        slab_samples: sub-planes averaged across the SliceThickness, along the slice normal (tilt honoured), to
            render each slice as the mean of its slab (partial volume). 1: a single plane, no partial volume.
            Above 1, a pixel's mask bit is set where the bleed covers at least half of the sub-planes, so the
            slice labels (≥ ``min_pixels`` mask pixels) follow the slab-mean image.
        mimics: paint hyperdense structures that are not blood, in every study: choroid-plexus and pineal
            calcification, falx calcification, dense superior sagittal and transverse sinuses.
        beam_hardening: add petrous ridges at the skull base and the dark streaks (with brighter flanks)
            that beam hardening draws between them on the lowest slices.
        small_bleed_fraction: share of bleeds drawn small or thin (a few mm), so that the slices at their
            edges only show a faint partial-volume trace.
        head_scale: range of the patients' head size (a factor on the phantom's axes).
        iso_offset: range (mm) of the offset of the image centre from the head, left-right and front-back (the
            patient's position in the field of view); the front-back offset adds to the headrest's 8 mm.
    """

    name: str
    image_size: int
    n_train_studies: int
    n_test_studies: int
    n_repeat_patients: int
    n_slices: tuple[int, int]
    table_step: tuple[float, float]
    pixel_spacing_512: tuple[float, float] = (0.46, 0.6)
    slab_offset: tuple[float, float] = (0.0, 10.0)
    bleed_fraction: float = 0.45
    tilt_fraction: float = 0.3
    description: str = ""
    slab_samples: int = 1
    mimics: bool = False
    beam_hardening: bool = False
    small_bleed_fraction: float = 0.0
    head_scale: tuple[float, float] = (0.92, 1.05)
    iso_offset: tuple[float, float] = (-3.0, 3.0)

    @property
    def has_context(self) -> bool:
        """True where any realism switch is on (the plan then draws mimics and small bleeds)."""
        return self.slab_samples > 1 or self.mimics or self.beam_hardening or self.small_bleed_fraction > 0


_DEMO = Preset(
    name="demo",
    image_size=256,
    n_train_studies=80,
    n_test_studies=20,
    n_repeat_patients=8,
    n_slices=(20, 28),
    table_step=(4.0, 5.0),
    slab_offset=(-2.0, 10.0),
    description="100 studies of 256x256 for an end-to-end run that learns",
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        image_size=64,
        n_train_studies=6,
        n_test_studies=2,
        n_repeat_patients=1,
        n_slices=(6, 10),
        table_step=(3.0, 5.0),
        slab_offset=(4.0, 12.0),
        description="8 studies of 64x64 for tests (about a second)",
    ),
    "demo": _DEMO,
    "context": replace(
        _DEMO,
        name="context",
        description="demo-sized, with partial volume, blood mimics, skull-base streaks and small bleeds",
        slab_samples=3,
        mimics=True,
        beam_hardening=True,
        small_bleed_fraction=0.3,
    ),
    # A second, smaller dataset of demo-sized studies: checks that the second level carries over to data nobody
    # tuned it to (another seed, fewer training patients).
    "demo60": replace(
        _DEMO,
        name="demo60",
        description="demo-sized, 60 train + 20 test studies: a second dataset for the second level",
        n_train_studies=60,
        n_repeat_patients=6,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown synth preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
