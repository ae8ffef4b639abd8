"""What the brain reference removes, series by series: its estimate against the phantom's own tissue values.

The synthetic generator draws each patient's grey and white matter HU independently (``rsna19.synth.plan``), and
blood at absolute HU. For every series of a converted demo dataset this script computes the brain reference
(:func:`rsna19.data.reference.brain_reference_hu`) on the cache volume, and again after adding Gaussian noise, and
prints how it relates to the phantom's grey and white matter: the spread of each tissue's level in the network
input with absolute HU and with the reference (docs/benchmarks.md, "Scanner shift", why the reference costs
in-domain skill).

Usage (after ``rsna19 demo --out DEMO --seed S``)::

    python benchmarks/reference_spread.py DEMO --seed S [--noise-sd 12]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.data.reference import brain_reference_hu
from rsna19.synth.plan import make_plan
from rsna19.synth.presets import get_preset


def series_table(work: Path, seed: int, preset: str, noise_sd: float) -> pd.DataFrame:
    """One row a converted series: the phantom's ``grey`` / ``white`` HU, the reference ``ref`` and ``ref_noisy``."""
    rng = np.random.default_rng(0)
    rows = []
    for plan in make_plan(get_preset(preset), seed):
        path = work / "cache" / plan.series_uid / "volume.npy"
        if not path.is_file():
            continue
        volume = np.asarray(np.load(path, mmap_mode="r")[:, ::2, ::2], dtype=np.float32)
        noisy = volume + rng.normal(0.0, noise_sd, volume.shape).astype(np.float32)
        rows.append(
            {
                "grey": plan.head.grey_hu,
                "white": plan.head.white_hu,
                "ref": brain_reference_hu(volume, step=1),
                "ref_noisy": brain_reference_hu(noisy, step=1),
            }
        )
    if not rows:
        raise SystemExit(f"no converted series of preset {preset!r} seed {seed} under {work / 'cache'}")
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="a finished demo folder (its cache/)")
    ap.add_argument("--seed", type=int, default=0, help="the demo's dataset seed")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--noise-sd", type=float, default=12.0, help="Gaussian noise (HU) added for the robustness row")
    args = ap.parse_args()
    d = series_table(args.work, args.seed, args.preset, args.noise_sd)
    print(f"\n**Brain reference vs the phantom's tissues** ({len(d)} series, {args.work}, seed {args.seed})\n")
    print("| quantity | value |")
    print("|---|---:|")
    print(f"| correlation of the reference with white / grey matter HU | {d.ref.corr(d.white):.2f} / "
          f"{d.ref.corr(d.grey):.2f} |")  # fmt: skip
    print(f"| SD of the grey-matter level in the input, absolute HU / referenced (HU) | {d.grey.std():.2f} / "
          f"{(d.grey - d.ref).std():.2f} |")  # fmt: skip
    print(f"| SD of the white-matter level in the input, absolute HU / referenced (HU) | {d.white.std():.2f} / "
          f"{(d.white - d.ref).std():.2f} |")  # fmt: skip
    print(f"| mean change of the reference with noise σ {args.noise_sd:g} HU (HU) | "
          f"{(d.ref_noisy - d.ref).mean():+.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
