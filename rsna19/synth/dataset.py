"""Write a synthetic dataset in the RSNA layout (docs/contracts.md, "RSNA layout").

::

    OUT/stage_2_train/ID_<hex>.dcm         flat, names unrelated to the SOP UIDs
    OUT/stage_2_test/ID_<hex>.dcm
    OUT/stage_2_train.csv                  ID,Label  (ID_<sop>_<class>, six rows a slice in CLASSES order)
    OUT/stage_2_sample_submission.csv      ID,Label = 0.5 for every test slice
    OUT/test_labels.csv                    ID,Label of the test slices (kept apart, as Kaggle did)
    OUT/masks/<series_uid>.npz             train AND test series: mask uint8 (Z, rows, cols), sop_uids (Z,)
    OUT/synth_summary.json                 what was generated (also returned by generate_dataset)

One train file is written truncated (a corrupt file, as in the real data). Its slice has no rows in
``stage_2_train.csv``, so every csv row has a readable file; it is still a slice of its series' mask, and its
path is in the summary (``corrupt_file``).

A slice is positive for a subtype where its mask covers at least ``min_pixels`` pixels (≥ 20 mm² and ≥ 4
pixels, stored per series in the summary); ``any`` is the OR of the subtypes.

Presets with partial volume (``slab_samples`` > 1) render each slice as the mean of ``slab_samples`` sub-planes
across its SliceThickness; a mask pixel is set where the subtype covers at least half of the sub-planes there, so
the mask (and the labels drawn from it) describe the slab-mean image: a bleed grazing a slab shows as a faint
trace on that slice and leaves it negative.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from rsna19.core.atomic import atomic_path
from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.core.errors import UserError
from rsna19.io.dicom_write import write_ct_dicom
from rsna19.synth.phantom import SUBTYPE_BIT, render
from rsna19.synth.plan import SeriesPlan, make_plan
from rsna19.synth.presets import Preset, get_preset

#: Marks a folder as written by this generator; bump VERSION when the output changes for a given seed.
GENERATOR = "rsna19.synth"
VERSION = 1
SUMMARY_NAME = "synth_summary.json"
SPLIT_DIRS = {"train": "stage_2_train", "test": "stage_2_test"}


@dataclass(frozen=True)
class SeriesResult:
    """What rendering one series produced (returned from worker processes)."""

    index: int
    labels: np.ndarray  # (Z, 6) uint8 in spatial order, CLASSES columns
    mask_pixels: np.ndarray  # (Z, 5) int, mask pixels of each subtype


def render_series(plan: SeriesPlan, out_dir: str | os.PathLike[str]) -> SeriesResult:
    """Render one series, write its DICOM files and its mask under ``out_dir``.

    Args:
        plan: the series to write.
        out_dir: dataset root (``stage_2_*`` and ``masks`` must exist).

    Returns:
        The per-slice labels and mask pixel counts, in spatial order.
    """
    out_dir = Path(out_dir)
    g = plan.geometry
    rng = np.random.default_rng(np.random.SeedSequence(list(plan.seed)))
    circle = g.recon_circle()
    masks = np.zeros((g.n_slices, g.rows, g.cols), dtype=np.uint8)
    counts = np.zeros((g.n_slices, len(SUBTYPES)), dtype=np.int64)
    split_dir = out_dir / SPLIT_DIRS[plan.split]
    # The phantom does many tiny (M, 3) @ (3, k) products: a multi-threaded BLAS only spins on them, and
    # stalls badly when worker processes share the cores.
    with threadpool_limits(limits=1):
        for k in range(g.n_slices):
            _render_slice(plan, k, rng, circle, masks, counts, split_dir)
    np.savez_compressed(out_dir / "masks" / f"{plan.series_uid}.npz", mask=masks, sop_uids=np.array(plan.sop_uids))
    sub = (counts >= plan.min_pixels).astype(np.uint8)
    labels = np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1)
    return SeriesResult(index=plan.index, labels=labels, mask_pixels=counts)


def _render_slice(
    plan: SeriesPlan,
    k: int,
    rng: np.random.Generator,
    circle: np.ndarray,
    masks: np.ndarray,
    counts: np.ndarray,
    split_dir: Path,
) -> None:
    """Render spatial slice ``k`` of ``plan``, write its file, fill ``masks[k]`` and ``counts[k]``."""
    g = plan.geometry
    if plan.slab_samples > 1 or plan.mimics is not None:
        hu, mask = render_slab(plan, k)
    else:
        hu, mask = render(plan.head, plan.bleeds, g.pixel_points(k))
    body = hu > -900.0 if plan.acquisition is not None else None  # the patient and the headrest, noiseless
    hu = hu + rng.normal(0.0, plan.noise_sd, hu.shape)
    hu = gaussian_filter(hu, plan.blur_px)  # scanner blur; also correlates the noise like real CT
    if plan.acquisition is not None and body is not None:
        hu = plan.acquisition.apply(hu, body, plan, k)
    hu[~circle] = plan.outside_hu
    masks[k] = mask
    counts[k] = [np.count_nonzero(mask & SUBTYPE_BIT[name]) for name in SUBTYPES]
    path = split_dir / plan.file_names[k]
    with _quiet_pydicom():
        write_ct_dicom(
            path,
            hu,
            g.slice_geometry(k),
            sop_uid=plan.sop_uids[k],
            series_uid=plan.series_uid,
            study_uid=plan.study_uid,
            patient_id=plan.patient_id,
            instance_number=plan.instance_numbers[k],
            variant=plan.variant,
            extra={"WindowCenter": plan.window_center, "WindowWidth": plan.window_width},
        )
    if k == plan.corrupt_slice:
        # A transfer cut short: the header survives, half of the pixel data is missing.
        size = path.stat().st_size
        os.truncate(path, size - g.rows * g.cols)


def render_slab(plan: SeriesPlan, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless slice ``k`` of ``plan`` as the mean of its slab, and its mask.

    Only pixels of the head (the central plane's pixels within a slice thickness of the scalp) are sampled on
    every sub-plane; outside it (air, headrest, table: nearly constant along z) the central plane stands for
    the slab, which saves about half of the rendering.

    Returns:
        hu: (rows, cols) float32, mean HU of ``plan.slab_samples`` sub-planes across the slice thickness.
        mask: (rows, cols) uint8, bit ``c`` set where ``SUBTYPES[c]`` covers at least half of the sub-planes.
    """
    g, head, n = plan.geometry, plan.head, plan.slab_samples
    plane = g.pixel_points(k)
    hu, mask = render(head, plan.bleeds, plane, plan.mimics)
    if n == 1:
        return hu, mask
    near = head.signed_distance(plane) <= head.skull_mm + head.scalp_mm + g.slice_thickness
    pts = plane[near]
    total = np.zeros(len(pts), dtype=np.float64)
    covered = np.zeros((len(SUBTYPES), len(pts)), dtype=np.int64)
    for offset in g.slab_offsets(n):
        if abs(offset) < 1e-9:  # the central plane, already rendered
            sub_hu, sub_mask = hu[near], mask[near]
        else:
            sub_hu, sub_mask = render(head, plan.bleeds, pts + offset * g.normal, plan.mimics)
        total += sub_hu
        for c, bit in enumerate(SUBTYPE_BIT.values()):
            covered[c] += (sub_mask & bit) > 0
    hu = hu.copy()
    hu[near] = total / n
    slab_mask = np.zeros(len(pts), dtype=np.uint8)
    for c, bit in enumerate(SUBTYPE_BIT.values()):
        slab_mask[2 * covered[c] >= n] |= bit
    mask = np.zeros_like(mask)
    mask[near] = slab_mask
    return hu, mask


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while writing: it warns *and logs* about Kaggle's deliberate ``ID_<hex>`` UI values
    (validated again on write) and about the writer's pydicom-2-style endianness attributes."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Invalid value for VR UI", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*will be removed in v4.0", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _render_job(args: tuple[SeriesPlan, str]) -> SeriesResult:
    return render_series(*args)


def synth_summary(path: str | os.PathLike[str], generator: str = GENERATOR) -> dict[str, Any] | None:
    """The ``synth_summary.json`` of a dataset ``generator`` wrote at ``path``; None where there is none."""
    try:
        summary = json.loads((Path(path) / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("generator") == generator else None


def is_synth_output(path: str | os.PathLike[str]) -> bool:
    """True where ``path`` holds a dataset written by this generator."""
    return synth_summary(path) is not None


def existing_summary(out: Path, generator: str, force: bool) -> dict[str, Any] | None:
    """The summary of the dataset ``generator`` wrote at ``out`` earlier; None where there is none, or with ``force``.

    Raises:
        UserError: ``out`` is a file, or a non-empty folder ``generator`` did not write (without ``force``).
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    old = synth_summary(out, generator)
    if old is None and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder is not empty and is not a synthetic dataset; use --force to replace it")
    return None if force else old


def generate_dataset(
    out_dir: str | os.PathLike[str],
    preset: str | Preset = "tiny",
    seed: int = 0,
    workers: int = 1,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate a synthetic RSNA-format dataset.

    The dataset is written into a temporary folder next to ``out_dir`` and renamed onto it at the end, so an
    interrupted run never leaves a half dataset that looks complete. The same preset and seed give the same
    files byte for byte, whatever ``workers``.

    Args:
        out_dir: dataset root to create (or replace, if it holds a previous synthetic dataset).
        preset: a preset name (``tiny``, ``demo``, ``context``; see :mod:`rsna19.synth.presets`) or a
            :class:`~rsna19.synth.presets.Preset` (e.g. a tiny one with the realism switches on, in tests).
        seed: seed of everything random.
        workers: processes rendering series in parallel (1: in this process).
        force: replace ``out_dir`` even if it is a non-empty folder that is not a synthetic dataset, and
            regenerate even if it already holds this preset and seed.
        progress: show a tqdm progress bar.

    Returns:
        The summary (also written to ``out_dir/synth_summary.json``); ``elapsed_s`` and ``skipped`` are only
        in the returned dict.

    Raises:
        UserError: ``out_dir`` is a file, or a non-empty folder not written by this generator (without force).
    """
    out = Path(out_dir)
    spec = preset if isinstance(preset, Preset) else get_preset(preset)
    old = existing_summary(out, GENERATOR, force)
    wanted = (VERSION, spec.name, int(seed), _realism(spec))
    if old is not None and (old.get("version"), old.get("preset"), old.get("seed"), old.get("realism")) == wanted:
        return {**old, "elapsed_s": 0.0, "skipped": True}

    start = time.perf_counter()
    plans = make_plan(spec, int(seed))
    with atomic_path(out) as tmp:
        for name in (*SPLIT_DIRS.values(), "masks"):
            (tmp / name).mkdir(parents=True)
        results: list[SeriesResult | None] = [None] * len(plans)
        bar = tqdm(total=len(plans), desc=f"synth {spec.name}", unit="series", disable=not progress)
        if workers <= 1:
            for plan in plans:
                results[plan.index] = render_series(plan, tmp)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_render_job, (plan, str(tmp))) for plan in plans]
                for fut in as_completed(futures):
                    res = fut.result()
                    results[res.index] = res
                    bar.update()
        bar.close()
        summary = _write_tables(tmp, plans, [r for r in results if r is not None], spec, int(seed))
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {**summary, "elapsed_s": round(time.perf_counter() - start, 2), "skipped": False}


def _label_frame(rows: list[tuple[str, np.ndarray]]) -> pd.DataFrame:
    """Kaggle's long format: six rows a slice (``ID_<sop>_<class>``), slices sorted by SOP UID."""
    rows = sorted(rows, key=lambda r: r[0])
    ids = [f"{sop}_{name}" for sop, _ in rows for name in CLASSES]
    labels = np.concatenate([lab for _, lab in rows]) if rows else np.zeros(0, dtype=np.uint8)
    return pd.DataFrame({"ID": ids, "Label": labels.astype(int)})


def _write_tables(root: Path, plans: list[SeriesPlan], results: list[SeriesResult], spec: Preset, seed: int) -> dict:
    """Write the three csv files and build the summary."""
    label_rows: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    corrupt = None
    series_info = []
    for plan, res in zip(plans, results):
        for k, sop in enumerate(plan.sop_uids):
            if k == plan.corrupt_slice:
                corrupt = {
                    "path": f"{SPLIT_DIRS[plan.split]}/{plan.file_names[k]}",
                    "sop_uid": sop,
                    "series_uid": plan.series_uid,
                }
                continue
            label_rows[plan.split].append((sop, res.labels[k]))
        series_info.append(
            {
                "series_uid": plan.series_uid,
                "study_uid": plan.study_uid,
                "patient_id": plan.patient_id,
                "split": plan.split,
                "n_slices": plan.geometry.n_slices,
                "rows": plan.geometry.rows,
                "pixel_spacing": round(plan.geometry.pixel_spacing[0], 4),
                "table_step": round(plan.geometry.table_step, 4),
                "tilt_deg": round(plan.geometry.tilt_deg, 3),
                "storage": plan.variant_name,
                "outside_hu": plan.outside_hu,
                "window_center": plan.window_center,
                "window_width": plan.window_width,
                "instance_order": plan.instance_order,
                "bleeds": [b.subtype for b in plan.bleeds],
                "positive_slices": {c: int(res.labels[:, j].sum()) for j, c in enumerate(CLASSES)},
                "min_pixels": plan.min_pixels,
            }
        )
        if spec.has_context:  # only then: the summaries of the other presets stay as they were
            series_info[-1]["small_bleeds"] = [plan.bleeds[i].subtype for i in plan.small_bleeds]
            series_info[-1]["mimics"] = plan.mimics.names() if plan.mimics is not None else []
    train = _label_frame(label_rows["train"])
    test = _label_frame(label_rows["test"])
    train.to_csv(root / "stage_2_train.csv", index=False)
    test.to_csv(root / "test_labels.csv", index=False)
    test.assign(Label=0.5).to_csv(root / "stage_2_sample_submission.csv", index=False)

    splits, rates = {}, {}
    for split in ("train", "test"):
        sel = [s for s in series_info if s["split"] == split]
        lab = np.stack([r[1] for r in label_rows[split]]) if label_rows[split] else np.zeros((0, 6))
        splits[split] = {
            "patients": len({s["patient_id"] for s in sel}),
            "studies": len({s["study_uid"] for s in sel}),
            "series": len(sel),
            "slices": int(sum(s["n_slices"] for s in sel)),
            "labelled_slices": len(lab),
            "studies_with_bleed": sum(1 for s in sel if s["positive_slices"]["any"] > 0),
        }
        rates[split] = {c: round(float(lab[:, j].mean()), 4) if len(lab) else 0.0 for j, c in enumerate(CLASSES)}
    studies_per_patient = Counter(s["patient_id"] for s in series_info)
    summary = {
        "generator": GENERATOR,
        "version": VERSION,
        "preset": spec.name,
        "seed": seed,
        "image_size": plans[0].geometry.rows,
        "splits": splits,
        "positive_rate": rates,
        "patients_with_several_studies": sorted(p for p, n in studies_per_patient.items() if n > 1),
        "tilted_series": [s["series_uid"] for s in series_info if s["tilt_deg"] != 0],
        "storage_variants": dict(Counter(s["storage"] for s in series_info)),
        "corrupt_file": corrupt,
        "series": series_info,
    }
    if spec.has_context:
        summary["realism"] = _realism(spec)
    return summary


def _realism(spec: Preset) -> dict[str, Any] | None:
    """The realism switches of ``spec`` as the summary records them (None where all are off)."""
    if not spec.has_context:
        return None
    return {
        "slab_samples": spec.slab_samples,
        "mimics": spec.mimics,
        "beam_hardening": spec.beam_hardening,
        "small_bleed_fraction": spec.small_bleed_fraction,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable account of a summary (what the CLI prints)."""
    lines = [f"synthetic dataset: preset={summary['preset']} seed={summary['seed']} size={summary['image_size']}"]
    for split, s in summary["splits"].items():
        rates = " ".join(f"{c[:5]}={r:.3f}" for c, r in summary["positive_rate"][split].items())
        lines.append(
            f"  {split:5s}: {s['patients']} patients, {s['studies']} studies, {s['series']} series, "
            f"{s['slices']} slices ({s['studies_with_bleed']} studies with a bleed); positive rate {rates}"
        )
    tilted = {s["series_uid"]: s["tilt_deg"] for s in summary["series"] if s["tilt_deg"] != 0}
    lines.append(f"  tilted series: {len(tilted)} ({', '.join(f'{k} {v:+.1f}°' for k, v in list(tilted.items())[:6])}"
                 f"{', …' if len(tilted) > 6 else ''})")  # fmt: skip
    lines.append(f"  storage variants: {summary['storage_variants']}")
    lines.append(f"  patients with two studies: {len(summary['patients_with_several_studies'])}")
    if summary.get("realism"):
        r = summary["realism"]
        n_small = sum(len(s.get("small_bleeds", [])) for s in summary["series"])
        n_mimic = sum(bool(s.get("mimics")) for s in summary["series"])
        lines.append(
            f"  realism: slab of {r['slab_samples']} sub-planes, mimics={r['mimics']}, "
            f"beam hardening={r['beam_hardening']}; {n_small} small bleeds, {n_mimic} series with mimics"
        )
    if summary.get("corrupt_file"):
        lines.append(f"  corrupt file (no csv rows): {summary['corrupt_file']['path']}")
    return "\n".join(lines)
