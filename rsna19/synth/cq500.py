"""A synthetic stand-in for CQ500 (Chilamkurthy et al., 2018): the phantom's heads in CQ500's folder layout, with a
``reads.csv`` of three readers who disagree on a few studies.

::

    OUT/CQ500CT<i> CQ500CT<i>/Unknown Study/CT 5mm/CT000000.dcm ...       soft tissue, 5 mm (the one predicted)
    OUT/CQ500CT<i> CQ500CT<i>/Unknown Study/CT BONE/CT000000.dcm ...      bone kernel, same positions
    OUT/CQ500CT<i> CQ500CT<i>/Unknown Study/CT PLAIN THIN/CT000000.dcm    0.625 mm, same head and coverage
    OUT/reads.csv      name (CQ500-CT-<i>), Category, R1:ICH ... R3:MidlineShift (rsna19.io.cq500)
    OUT/truth.csv      name and the six classes as the phantom drew them (what the readers' majority aims at)
    OUT/study_labels.csv   the same truth keyed by study_uid (StudyInstanceUID): ``validate --format studies``
    OUT/synth_summary.json

The heads and bleeds come from :func:`rsna19.synth.plan.make_plan` (untilted); a study's truth for a subtype is
that some 5 mm slice shows at least ``min_pixels`` of it (the RSNA labelling rule). Each reader starts from the
truth; on about one study in six one reader calls one subtype the other way (their ICH follows their subtypes), and
on one study two readers make the same call, so the majority there differs from the phantom, as real reads can.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from threadpoolctl import threadpool_limits

from rsna19.core.atomic import atomic_path
from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.core.errors import UserError
from rsna19.io.cq500 import FINDINGS, OTHER_FINDINGS, READERS
from rsna19.io.dicom_write import SliceGeometry, write_ct_dicom
from rsna19.synth.dataset import existing_summary
from rsna19.synth.geometry import SeriesGeometry
from rsna19.synth.phantom import SUBTYPE_BIT, render
from rsna19.synth.plan import SeriesPlan, make_plan
from rsna19.synth.presets import Preset

GENERATOR = "rsna19.synth.cq500"
VERSION = 1
SUMMARY_NAME = "synth_summary.json"
#: Root of the synthetic UIDs (valid DICOM UIDs, so that outputs made from the studies validate).
UID_ROOT = "1.2.826.0.1.3680043.10.1226.5"
THICK_MM = 5.0
THIN_MM = 0.625
SOFT = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "ConvolutionKernel": "STANDARD", "BodyPartExamined": "HEAD"}
#: Series folder → (step mm, bone kernel, extra header elements).
SERIES: dict[str, tuple[float, bool, dict[str, Any]]] = {
    "CT 5mm": (THICK_MM, False, {**SOFT, "SeriesDescription": "CT 5mm"}),
    "CT BONE": (THICK_MM, True, {**SOFT, "ConvolutionKernel": "BONE", "SeriesDescription": "CT BONE"}),
    "CT PLAIN THIN": (THIN_MM, False, {**SOFT, "SeriesDescription": "CT PLAIN THIN"}),
}


def study_folder(i: int) -> str:
    """The folder of study ``i`` as CQ500 names it (``CQ500CT<i> CQ500CT<i>``)."""
    return f"CQ500CT{i} CQ500CT{i}"


def study_uid(seed: int, i: int) -> str:
    """The StudyInstanceUID of study ``i``."""
    return f"{UID_ROOT}.{seed}.{i + 1}"


def cq500_plans(n_studies: int, seed: int, image_size: int, n_slices: tuple[int, int]) -> list[SeriesPlan]:
    """The heads and bleeds of ``n_studies`` studies (untilted, 5 mm apart, no corrupt file)."""
    preset = Preset(
        name="cq500",
        image_size=image_size,
        n_train_studies=n_studies,
        n_test_studies=1,  # make_plan draws a test split too; it is not used
        n_repeat_patients=0,
        n_slices=n_slices,
        table_step=(THICK_MM, THICK_MM),
        slab_offset=(-2.0, 10.0),
        bleed_fraction=0.45,
        tilt_fraction=0.0,
    )
    plans = make_plan(preset, seed)[:n_studies]
    return [dataclasses.replace(p, corrupt_slice=None) for p in plans]


def series_geometry(plan: SeriesPlan, step: float) -> SeriesGeometry:
    """The geometry of ``plan``'s slab cut into slices ``step`` mm thick and apart: the slices tile the plan's own
    (8 × 0.625 mm per 5 mm slice), centred alike."""
    g = plan.geometry
    n = round(g.n_slices * g.table_step / step)
    z_shift = -g.table_step / 2 + step / 2
    centre = (g.centre[0], g.centre[1], g.centre[2] + z_shift)
    return dataclasses.replace(g, table_step=step, n_slices=n, centre=centre, slice_thickness=step)


def write_series(
    folder: Path,
    plan: SeriesPlan,
    *,
    study_uid: str,
    series_uid: str,
    step: float,
    sharpen: bool,
    attrs: dict[str, Any],
    patient: dict[str, Any],
) -> np.ndarray:
    """Render ``plan``'s head as one series of slices ``step`` mm apart over the plan's slab; returns the mask
    pixels of each subtype per slice, (Z, 5).

    Thin slices tile the thick ones (8 × 0.625 mm per 5 mm slice, centred alike) and are noisier
    (SD ∝ 1/√thickness); a bone kernel enhances edges and noise.
    """
    geom = series_geometry(plan, step)
    n = geom.n_slices
    rng = np.random.default_rng([*plan.seed, int(step * 1000), int(sharpen)])
    circle = geom.recon_circle()
    noise = plan.noise_sd * math.sqrt(THICK_MM / step)
    window = (600.0, 2800.0) if sharpen else (40.0, 80.0)
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.zeros((n, len(SUBTYPES)), dtype=np.int64)
    for k in range(n):
        hu, mask = render(plan.head, plan.bleeds, geom.pixel_points(k))
        counts[k] = [np.count_nonzero(mask & SUBTYPE_BIT[name]) for name in SUBTYPES]
        hu = gaussian_filter(hu + rng.normal(0.0, noise, hu.shape), plan.blur_px)
        if sharpen:
            hu = hu + 2.0 * (hu - gaussian_filter(hu, 1.0)) + rng.normal(0.0, 40.0, hu.shape)
        hu[~circle] = -1024.0
        sg = geom.slice_geometry(k)
        write_ct_dicom(
            folder / f"CT{k:06d}.dcm",
            hu,
            SliceGeometry(sg.ipp, sg.iop, sg.pixel_spacing, step),
            sop_uid=f"{series_uid}.{k + 1}",
            series_uid=series_uid,
            study_uid=study_uid,
            patient_id=patient["PatientID"],
            instance_number=k + 1,
            extra={"WindowCenter": window[0], "WindowWidth": window[1], **patient, **attrs},
        )
    return counts


def write_study(root: Path, i: int, plan: SeriesPlan, seed: int) -> np.ndarray:
    """Write the three series of study ``i`` under ``root``; returns its truth, (6,) 0/1 in ``CLASSES`` order."""
    uid = study_uid(seed, i)
    name = f"CQ500-CT-{i}"
    patient = {"PatientID": name, "PatientName": name, "StudyDescription": "CT HEAD PLAIN", "StudyID": str(i)}
    base = root / study_folder(i) / "Unknown Study"
    truth = np.zeros(len(SUBTYPES), dtype=np.uint8)
    with threadpool_limits(limits=1):  # many tiny products in the phantom: threads only spin
        for j, (folder, (step, sharpen, attrs)) in enumerate(SERIES.items()):
            counts = write_series(
                base / folder,
                plan,
                study_uid=uid,
                series_uid=f"{uid}.{j + 1}",
                step=step,
                sharpen=sharpen,
                attrs=attrs,
                patient=patient,
            )
            if j == 0:  # the truth is what the 5 mm series shows
                truth = (counts >= plan.min_pixels).any(axis=0).astype(np.uint8)
    return np.concatenate([truth, [truth.max()]])


def _write_study_job(args: tuple[str, int, SeriesPlan, int]) -> tuple[int, np.ndarray]:
    root, i, plan, seed = args
    return i, write_study(Path(root), i, plan, seed)


def draw_reads(truth: np.ndarray, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Three readers' hemorrhage reads from the truth, with a few disagreements.

    Args:
        truth: (N, 6) 0/1 in ``CLASSES`` order.
        seed: seed of the disagreements.

    Returns:
        ``(reads, changes)``: reads (3, N, 6) 0/1 in ``CLASSES`` order (each reader's ``any`` is the OR of their
        subtypes); ``changes`` one dict a changed call (``study``, ``readers``, ``class``).
    """
    rng = np.random.default_rng([seed, 500])
    n = len(truth)
    reads = np.repeat(truth[None].astype(np.uint8), len(READERS), axis=0)
    changes = []
    n_single = max(1, round(n / 6)) if n >= 2 else 0
    studies = rng.permutation(n)
    picks = [(int(s), 1) for s in studies[:n_single]] + ([(int(studies[n_single]), 2)] if n > n_single else [])
    for s, k in picks:
        c = int(rng.integers(len(SUBTYPES)))
        readers = sorted(int(r) for r in rng.choice(len(READERS), size=k, replace=False))
        for r in readers:
            reads[r, s, c] = 1 - reads[r, s, c]
            reads[r, s, -1] = reads[r, s, :-1].max()
        changes.append({"study": f"CQ500-CT-{s}", "readers": [READERS[r] for r in readers], "class": SUBTYPES[c]})
    return reads, changes


def reads_frame(reads: np.ndarray, seed: int) -> pd.DataFrame:
    """``reads.csv`` of (3, N, 6) reads: ``name, Category`` and every reader column of the published file."""
    rng = np.random.default_rng([seed, 501])
    n = reads.shape[1]
    df = pd.DataFrame(
        {"name": [f"CQ500-CT-{i}" for i in range(n)], "Category": ["B1"] * (n // 2) + ["B2"] * (n - n // 2)}
    )
    for r, reader in enumerate(READERS):
        for finding, cls in FINDINGS.items():
            df[f"{reader}:{finding}"] = reads[r, :, CLASSES.index(cls)].astype(int)
        for other in OTHER_FINDINGS:
            if other.startswith("BleedLocation"):
                df[f"{reader}:{other}"] = reads[r, :, -1] * (rng.random(n) < 0.6)
            else:
                df[f"{reader}:{other}"] = (rng.random(n) < 0.05).astype(int)
    return df


def generate_cq500(
    out_dir: str | os.PathLike[str],
    n_studies: int = 40,
    seed: int = 0,
    *,
    image_size: int = 256,
    n_slices: tuple[int, int] | None = None,
    workers: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Write the synthetic CQ500-shaped dataset (see the module docstring), atomically.

    Args:
        out_dir: dataset folder to create.
        n_studies: studies (CQ500 has 491).
        seed: seed of everything random; the same arguments give the same files.
        image_size: rows = columns (256: the demo bundle's images; 64: the tests' tiny bundle).
        n_slices: range of 5 mm slices a study (default 20–28, or 6–8 below 128 pixels).
        workers: processes writing studies.
        force: replace ``out_dir`` whatever it holds, and regenerate an identical dataset.

    Returns:
        The summary (``synth_summary.json``), with ``elapsed_s`` and ``skipped``.

    Raises:
        UserError: fewer than 2 studies, ``out_dir`` a file or a non-empty folder of something else (without force).
    """
    if n_studies < 2:
        raise UserError(f"--studies {n_studies}: a CQ500-shaped dataset needs at least 2 studies")
    out = Path(out_dir)
    n_slices = n_slices or ((6, 8) if image_size < 128 else (20, 28))
    params = {"studies": int(n_studies), "seed": int(seed), "image_size": int(image_size), "n_slices": list(n_slices)}
    old = existing_summary(out, GENERATOR, force)
    if old is not None and old.get("version") == VERSION and old.get("params") == params:
        return {**old, "elapsed_s": 0.0, "skipped": True}
    start = time.perf_counter()
    plans = cq500_plans(n_studies, seed, image_size, n_slices)
    truth = np.zeros((n_studies, len(CLASSES)), dtype=np.uint8)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        jobs = [(str(tmp), i, plan, int(seed)) for i, plan in enumerate(plans)]
        if workers <= 1:
            results = map(_write_study_job, jobs)
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_write_study_job, jobs)
        for i, t in results:
            truth[i] = t
        if workers > 1:
            pool.shutdown()
        reads, changes = draw_reads(truth, seed)
        reads_frame(reads, seed).to_csv(tmp / "reads.csv", index=False)
        truth_df = pd.DataFrame(truth, columns=list(CLASSES))
        truth_df.insert(0, "name", [f"CQ500-CT-{i}" for i in range(n_studies)])
        truth_df.to_csv(tmp / "truth.csv", index=False)
        # The same truth keyed by StudyInstanceUID: labels of `rsna19 validate --format studies`.
        truth_df.assign(name=[study_uid(seed, i) for i in range(n_studies)]).rename(
            columns={"name": "study_uid"}
        ).to_csv(tmp / "study_labels.csv", index=False)
        summary = {
            "generator": GENERATOR,
            "version": VERSION,
            "preset": "cq500",
            "params": params,
            "series": {name: {"step_mm": s[0], "bone_kernel": s[1]} for name, s in SERIES.items()},
            "n_studies": int(n_studies),
            "n_positive": {c: int(truth[:, j].sum()) for j, c in enumerate(CLASSES)},
            "reader_changes": changes,
        }
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return {**summary, "elapsed_s": round(time.perf_counter() - start, 2), "skipped": False}


def format_cq500_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    pos = ", ".join(f"{c} {n}" for c, n in summary["n_positive"].items())
    lines = [
        f"synthetic CQ500: {summary['n_studies']} studies × {len(summary['series'])} series "
        f"({', '.join(summary['series'])}), {summary['params']['image_size']} px",
        f"positive studies (phantom): {pos}",
        f"reader disagreements: {len(summary['reader_changes'])} studies",
    ]
    return "\n".join(lines)
