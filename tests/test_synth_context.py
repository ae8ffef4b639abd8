"""The realism switches of the synthetic data (the ``context`` preset): partial volume, mimics, small bleeds.

Fast: everything runs on a ``tiny``-sized preset (64², 8 studies) with the switches on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna19.cli import main
from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.synth import PRESETS, generate_dataset, get_preset
from rsna19.synth.dataset import render_slab
from rsna19.synth.phantom import SUBTYPE_BIT, BlobBleed
from rsna19.synth.plan import make_plan

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

TINY_CONTEXT = replace(
    get_preset("tiny"),
    name="tiny_context",
    slab_samples=3,
    mimics=True,
    beam_hardening=True,
    small_bleed_fraction=0.5,
)

#: Content hash of the ``tiny`` dataset, seed 0 (decoded pixels, masks and csvs), as written before the realism
#: switches existed. It changes only when the generator's output changes on purpose (then bump VERSION).
TINY_CONTENT_SHA256 = "029e162de03e3a005837cd67701f8356233b003330ec79d43920f1e07dc54a86"


@pytest.fixture(scope="module")
def context_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_ctx") / "data"
    generate_dataset(root, preset=TINY_CONTEXT, seed=0, workers=1, progress=False)
    return root


def _content_hash(root: Path) -> str:
    """SHA-256 of what a reader sees: csv text, decoded pixel arrays and masks (not the container bytes)."""
    h = hashlib.sha256()
    for name in ("stage_2_train.csv", "test_labels.csv", "stage_2_sample_submission.csv"):
        h.update((root / name).read_bytes())
    for path in sorted(root.glob("stage_2_*/*.dcm")):
        h.update(path.name.encode())
        try:
            h.update(np.ascontiguousarray(pydicom.dcmread(path).pixel_array).tobytes())
        except ValueError:  # the truncated file
            h.update(b"corrupt")
    for path in sorted((root / "masks").glob("*.npz")):
        with np.load(path) as npz:
            h.update(npz["mask"].tobytes())
            h.update("|".join(npz["sop_uids"].tolist()).encode())
    return h.hexdigest()


def _labels(csv: Path) -> pd.DataFrame:
    df = pd.read_csv(csv)
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    df["sop"], df["cls"] = parts[0], parts[1]
    return df.pivot(index="sop", columns="cls", values="Label")[list(CLASSES)]


def test_other_presets_unchanged(tiny_dataset: Path) -> None:
    """With every switch off (``tiny``, ``demo``) the generator writes what it wrote before the switches."""
    for name in ("tiny", "demo"):
        assert not get_preset(name).has_context
    assert get_preset("context").has_context
    assert _content_hash(tiny_dataset) == TINY_CONTENT_SHA256
    assert "realism" not in json.loads((tiny_dataset / "synth_summary.json").read_text())


def test_context_preset_is_demo_sized() -> None:
    demo, ctx = get_preset("demo"), get_preset("context")
    same = ("image_size", "n_train_studies", "n_test_studies", "n_slices", "table_step", "slab_offset")
    assert all(getattr(demo, f) == getattr(ctx, f) for f in same)
    assert 3 <= ctx.slab_samples <= 5 and ctx.mimics and ctx.beam_hardening and ctx.small_bleed_fraction > 0
    plans = make_plan(ctx, 0)
    assert all(p.mimics is not None and p.mimics.sinus_hu is not None for p in plans)
    negatives = [p for p in plans if not p.bleeds]
    assert sum(bool(p.mimics.calcifications) for p in negatives) >= len(negatives) // 2, "mimics in negatives too"
    assert sum(len(p.small_bleeds) for p in plans) >= 10


def test_slab_sub_planes_follow_the_tilted_normal() -> None:
    """render_slab moves the sub-planes by ``slab_offsets · normal``: the normal of the tilted plane, not z."""
    g = next(p for p in make_plan(TINY_CONTEXT, 0) if p.geometry.tilt_deg != 0).geometry
    normal = np.asarray(g.normal)
    assert np.isclose(np.linalg.norm(normal), 1)
    assert np.isclose(normal @ g.row_cosines, 0) and np.isclose(normal @ g.col_cosines, 0)
    tilt = np.radians(g.tilt_deg)
    assert np.isclose(abs(normal[2]), np.cos(tilt)) and not np.isclose(abs(normal[2]), 1)
    # The sub-planes split the slab [−T/2, T/2] into equal parts.
    assert np.allclose(g.slab_offsets(4), np.array([-3, -1, 1, 3]) * g.slice_thickness / 8)


def test_mimics_raise_hu_outside_the_masks() -> None:
    plans = make_plan(TINY_CONTEXT, 0)
    raised = 0
    for plan in plans:
        bare = replace(plan, mimics=None)
        for k in range(plan.geometry.n_slices):
            hu, mask = render_slab(plan, k)
            hu0, mask0 = render_slab(bare, k)
            assert np.array_equal(mask, mask0), "mimics are never labelled"
            raised += int(np.count_nonzero((hu - hu0 > 25) & (mask == 0)))
    assert raised > 50
    # The skull base (below the tiny slabs): the petrous ridges add bone, the streaks darken the brain above.
    plan = next(p for p in plans if p.geometry.tilt_deg == 0)
    base = plan.mimics.skull_base
    g = plan.geometry
    for dz, check in ((0.0, "bone"), (4.0, "streak")):
        low = replace(plan, geometry=replace(g, centre=(*g.centre[:2], plan.head.centre[2] + base.z + dz)))
        hu, _ = render_slab(low, 0)
        hu0, _ = render_slab(replace(low, mimics=replace(low.mimics, skull_base=None)), 0)
        if check == "bone":
            assert np.count_nonzero(hu - hu0 > 300) >= 4
        else:
            soft = (hu0 > 0) & (hu0 < 100) & (hu < 200)  # brain, not the ridges themselves
            drop = hu0[soft] - hu[soft]
            assert drop.max() > 0.3 * base.streak_hu and drop.min() > -0.6 * base.streak_hu


def test_partial_volume_makes_the_edge_slice_fainter() -> None:
    """A blob filling 2/3 of slice k's slab and 1/3 of slice k+1's: k+1 shows a faint trace and stays negative."""
    plan = next(p for p in make_plan(TINY_CONTEXT, 0) if p.geometry.tilt_deg == 0)
    g, head = plan.geometry, plan.head
    t = g.slice_thickness
    k = int(np.argmin([abs(g.ipp(i)[2] - head.centre[2]) for i in range(g.n_slices - 1)]))
    centre = np.array([head.centre[0] + 25.0, head.centre[1], g.ipp(k)[2] + 0.4 * t])
    blob = BlobBleed(hu=75.0, centre=tuple(centre), radii=(9.0, 9.0, 0.5 * t), angles=(0, 0, 0), lumps=(0, 0, 0, 0))
    with_blob = replace(plan, bleeds=(blob,), mimics=None)
    without = replace(plan, bleeds=(), mimics=None)
    # The pixel nearest the blob's in-plane centre.
    pts = g.pixel_points(k)
    i, j = np.unravel_index(np.argmin(np.linalg.norm(pts[..., :2] - centre[:2], axis=-1)), pts.shape[:2])
    excess, pixels = [], []
    for z in (k, k + 1):
        hu, mask = render_slab(with_blob, z)
        hu0, _ = render_slab(without, z)
        excess.append(float(hu[i, j] - hu0[i, j]))
        pixels.append(int(np.count_nonzero(mask & SUBTYPE_BIT["intraparenchymal"])))
    assert excess[0] > 1.5 * excess[1] > 0, excess
    assert pixels[0] >= plan.min_pixels and pixels[1] == 0
    # Without partial volume the same blob is all or nothing on a slice.
    hu, _ = render_slab(replace(with_blob, slab_samples=1), k)
    hu0, _ = render_slab(replace(without, slab_samples=1), k)
    assert hu[i, j] - hu0[i, j] > excess[0]


def test_labels_follow_the_slab_masks(context_dataset: Path) -> None:
    summary = json.loads((context_dataset / "synth_summary.json").read_text())
    assert summary["preset"] == "tiny_context" and summary["realism"]["slab_samples"] == 3
    assert any(s["small_bleeds"] for s in summary["series"]) and all(s["mimics"] for s in summary["series"])
    labels = pd.concat([_labels(context_dataset / "stage_2_train.csv"), _labels(context_dataset / "test_labels.csv")])
    assert (labels["any"] == labels[list(SUBTYPES)].max(axis=1)).all()
    checked = 0
    for info in summary["series"]:
        with np.load(context_dataset / "masks" / f"{info['series_uid']}.npz") as npz:
            mask, sops = npz["mask"], npz["sop_uids"].tolist()
        assert mask.shape == (info["n_slices"], 64, 64)
        for z, sop in enumerate(sops):
            if sop not in labels.index:
                continue
            for c, name in enumerate(SUBTYPES):
                covered = int(np.count_nonzero(mask[z] & (1 << c)))
                assert labels.loc[sop, name] == int(covered >= info["min_pixels"])
                checked += 1
    assert checked > 100 and labels["any"].sum() > 0


def test_context_determinism(context_dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, preset=TINY_CONTEXT, seed=0, workers=2, progress=False)
    assert _content_hash(again) == _content_hash(context_dataset)
    assert (again / "synth_summary.json").read_text() == (context_dataset / "synth_summary.json").read_text()
    # Same switches, same seed: the same studies as without them except for what the switches draw.
    assert [p.sop_uids for p in make_plan(TINY_CONTEXT, 0)] == [p.sop_uids for p in make_plan(get_preset("tiny"), 0)]


def test_cli_lists_the_context_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "context:" in text and "partial volume" in text
    assert {"tiny", "demo", "context", "demo60"} <= set(PRESETS)
    assert all(f"{name}:" in text for name in PRESETS)  # every preset explains itself in --help
