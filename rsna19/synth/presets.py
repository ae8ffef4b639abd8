"""Named sizes of the synthetic dataset: ``tiny`` for tests, ``demo`` for an end-to-end run that learns."""

from __future__ import annotations

from dataclasses import dataclass

from rsna19.errors import UserError


@dataclass(frozen=True)
class Preset:
    """How many studies of which size a synthetic dataset holds.

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
    ),
    "demo": Preset(
        name="demo",
        image_size=256,
        n_train_studies=80,
        n_test_studies=20,
        n_repeat_patients=8,
        n_slices=(20, 28),
        table_step=(4.0, 5.0),
        slab_offset=(-2.0, 10.0),
    ),
    # A second, smaller dataset of demo-sized studies: checks that the second level carries over to data nobody
    # tuned it to (another seed, fewer training patients).
    "demo60": Preset(
        name="demo60",
        image_size=256,
        n_train_studies=60,
        n_test_studies=20,
        n_repeat_patients=6,
        n_slices=(20, 28),
        table_step=(4.0, 5.0),
        slab_offset=(-2.0, 10.0),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown synth preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
