"""The synthetic RSNA-format dataset: a 3D head phantom with hemorrhages, written as RSNA DICOMs.

Modules: :mod:`~rsna19.synth.geometry` (slice geometries, gantry tilt, slabs), :mod:`~rsna19.synth.phantom`
(anatomy and bleeds as functions of patient-space coordinates), :mod:`~rsna19.synth.mimics` (calcifications,
dense sinuses, skull-base streaks: what single slices confuse with blood), :mod:`~rsna19.synth.presets`
(``tiny``, ``demo``, ``context``), :mod:`~rsna19.synth.plan` (everything random, drawn from one seed) and
:mod:`~rsna19.synth.dataset` (writes the layout; partial volume across the slab).
"""

from rsna19.synth.dataset import format_summary, generate_dataset, is_synth_output
from rsna19.synth.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "format_summary", "generate_dataset", "get_preset", "is_synth_output"]
