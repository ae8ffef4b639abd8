"""Brain-referenced HU and the acquisition augmentations (issue 23) on phantom heads from the synthetic generator."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rsna19.conversion.read import read_slice
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.data.augment import AugmentConfig
from rsna19.data.datasets import SliceDataset
from rsna19.data.intensity import IntensityAugment
from rsna19.data.reference import BRAIN_HU, SeriesReference, brain_reference_hu, reference_target
from rsna19.data.slab import SlabDataset
from rsna19.data.transforms import MultiWindow
from rsna19.synth.phantom import render
from rsna19.synth.plan import make_plan
from rsna19.synth.presets import get_preset

WINDOWS = ["brain", "stroke", "subdural"]


def _phantom_volume(index: int) -> np.ndarray:
    """(Z, 64, 64) float HU of one tiny-preset head with its bleeds, plus scanner-like noise."""
    plan = make_plan(get_preset("tiny"), 0)[index]
    g = plan.geometry
    vol = np.stack([render(plan.head, plan.bleeds, g.pixel_points(k))[0] for k in range(g.n_slices)])
    return vol + np.random.default_rng(index).normal(0.0, 6.0, vol.shape)


def _write_cache(root, volumes: dict[str, np.ndarray]) -> None:
    """A conversion cache of ``volumes`` (series name → (Z, H, W) HU), one study and patient each, no bleed labels."""
    rows = []
    for name, v in volumes.items():
        (root / name).mkdir()
        np.save(root / name / "volume.npy", np.round(v).astype(np.int16))
        (root / name / "meta.json").write_text(json.dumps({"sop_uids": [f"{name}_{z}" for z in range(len(v))]}))
        for z in range(len(v)):
            rows.append({"sop_uid": f"{name}_{z}", "series_uid": name, "study_uid": name, "patient_id": name,
                         "split": "train", "z": z, "n_slices": len(v), **dict.fromkeys(CLASSES, 0.0)})  # fmt: skip
    pd.DataFrame(rows).to_parquet(root / "cache_index.parquet", index=False)


@pytest.fixture(scope="module")
def shifted_cache(tmp_path_factory):
    """A cache of one phantom head written three times: as rendered, and with HU +10 / −10 inside the body."""
    root = tmp_path_factory.mktemp("refcache")
    vol = _phantom_volume(0)
    body = vol > -500
    _write_cache(root, {n: np.where(body, vol + off, vol) for n, off in (("ID_base", 0.0), ("ID_plus", 10.0),
                                                                         ("ID_minus", -10.0))})  # fmt: skip
    return root, body


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """One phantom head as rendered, through a sharper kernel (unsharp mask 0.8: the edges overshoot by hundreds of
    HU at the skull) and through a smoother one (Gaussian), as the shift suite's kernels at the scale the demo's
    network sees them: σ 1 and 1.2 mm of the scanner in pixels of 1.78 mm (0.56 and 0.67 px)."""
    from scipy.ndimage import gaussian_filter

    root = tmp_path_factory.mktemp("kernelcache")
    vol = _phantom_volume(1)
    sharp = vol + 0.8 * (vol - gaussian_filter(vol, (0, 0.56, 0.56)))
    _write_cache(root, {"ID_base": vol, "ID_sharp": sharp, "ID_smooth": gaussian_filter(vol, (0, 0.67, 0.67))})
    return root


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_brain_reference_moves_with_an_hu_offset_of_the_head(index):
    vol = _phantom_volume(index)
    body = vol > -500
    refs = [brain_reference_hu(np.round(np.where(body, vol + d, vol)).astype(np.int16)) for d in (-10, 0, 10)]
    assert 20.0 < refs[1] < 40.0  # the phantom's parenchyma: white 26–30, grey 36–40 HU
    np.testing.assert_allclose(np.diff(refs), [10.0, 10.0], atol=0.05)


def test_no_reference_without_soft_tissue():
    assert np.isnan(brain_reference_hu(np.full((3, 32, 32), -1024, np.int16)))
    assert SeriesReference(BRAIN_HU)("air", np.full((3, 32, 32), -1024, np.int16)) == 0.0
    assert SeriesReference(None)("any", np.zeros((3, 32, 32), np.int16)) == 0.0
    assert reference_target("none") is None and reference_target("brain") == BRAIN_HU
    with pytest.raises(UserError, match="hu_reference"):
        reference_target("water")


def _images(cache, mapping: MultiWindow, series: str, dataset: str = "slice") -> np.ndarray:
    index = pd.read_parquet(cache / "cache_index.parquet")
    rows = index[index["series_uid"] == series].reset_index(drop=True)
    if dataset == "slab":
        ds = SlabDataset(cache, rows, mapping, slab=4, train=False)
    else:
        ds = SliceDataset(cache, rows, mapping, slices=3, train=False)
    return np.stack([ds[i]["image"].numpy() for i in range(len(ds))])


@pytest.mark.parametrize("dataset", ["slice", "slab"])
def test_model_input_inside_the_head_does_not_move_with_an_hu_offset(shifted_cache, dataset):
    cache, _ = shifted_cache
    referenced = MultiWindow(WINDOWS, reference_hu=BRAIN_HU)
    base = _images(cache, referenced, "ID_base", dataset)
    for other in ("ID_plus", "ID_minus"):
        diff = np.abs(_images(cache, referenced, other, dataset) - base)
        assert diff.max() < 2e-3, f"{other}: referenced input moved by up to {diff.max():.4f}"
    # Absolute HU (the old input): the same offset moves the brain window by 10/80 of its range.
    absolute = MultiWindow(WINDOWS)
    moved = np.abs(_images(cache, absolute, "ID_plus", dataset) - _images(cache, absolute, "ID_base", dataset))
    assert np.median(moved[moved > 0]) > 0.1


def test_reference_survives_the_checkpoint_state():
    state = MultiWindow(WINDOWS, reference_hu=BRAIN_HU).state()
    assert MultiWindow.from_state(state).reference_hu == BRAIN_HU
    old = {k: v for k, v in state.items() if k != "reference_hu"}  # a checkpoint from before the reference
    assert MultiWindow.from_state(old).reference_hu is None


def test_input_smoothing_brings_sharper_and_smoother_kernels_together(kernel_cache):
    plain, smoothed = MultiWindow(WINDOWS), MultiWindow(WINDOWS, smooth_px=1.0)
    for other in ("ID_sharp", "ID_smooth"):
        gaps = [
            np.abs(_images(kernel_cache, m, other) - _images(kernel_cache, m, "ID_base")).mean()
            for m in (plain, smoothed)
        ]
        # The blur is wider than the kernels' difference: what a network sees moves at most a third as much.
        assert gaps[1] < gaps[0] / 3, f"{other}: mean |Δ input| {gaps[0]:.4f} unsmoothed, {gaps[1]:.4f} smoothed"
    # The loader's in-place per-slice path and the any-shape path agree.
    hu = _phantom_volume(1)[3].astype(np.float32)
    out = np.empty((len(WINDOWS), *hu.shape), np.float32)
    np.testing.assert_allclose(smoothed.map_slice(hu.copy(), out), smoothed(hu[None])[0], atol=1e-6)
    assert np.abs(out - plain(hu[None])[0]).max() > 0.05
    strided = np.repeat(hu, 2, axis=1)[:, ::2]  # a non-contiguous view of the same slice
    np.testing.assert_allclose(smoothed.map_slice(strided, np.empty_like(out)), out, atol=1e-6)
    with pytest.raises(UserError, match="smooth_px"):
        MultiWindow(WINDOWS, smooth_px=-1.0)


def test_input_smoothing_survives_the_checkpoint_state():
    state = MultiWindow(WINDOWS, smooth_px=0.75).state()
    assert MultiWindow.from_state(state).smooth_px == 0.75
    old = {k: v for k, v in state.items() if k != "smooth_px"}  # a checkpoint from before the blur
    assert MultiWindow.from_state(old).smooth_px == 0.0


def test_intensity_augment_draws_per_sample_and_applies_each_factor():
    cfg = AugmentConfig(intensity_p=1.0, sharpen=[-0.8, 0.8], noise_sd=5.0, hu_scale=0.05, hu_offset=4.0)
    aug = IntensityAugment(cfg, train=True)
    assert aug.draw(3) == aug.draw(3) and aug.draw(3) != aug.draw(4)
    assert IntensityAugment(cfg, train=False).draw(3) is None
    assert IntensityAugment(AugmentConfig(), train=True).draw(3) is None  # off by default
    # Offset and gain only: a constant slice moves by exactly s·x + o.
    only = IntensityAugment(AugmentConfig(intensity_p=1.0, hu_scale=0.05, hu_offset=4.0), train=True)
    d = only.draw(11)
    assert d is not None
    out = only.apply(np.full((16, 16), 30.0, np.float32), d, 0)
    np.testing.assert_allclose(out, 30.0 * d.scale + d.offset, rtol=1e-5)
    # Kernel: blurring lowers the spread of a noisy slice, sharpening raises it.
    noisy = np.random.default_rng(0).normal(30, 10, (64, 64)).astype(np.float32)
    for amount, sign in ((-0.8, -1), (0.8, 1)):
        k = IntensityAugment(AugmentConfig(intensity_p=1.0, sharpen=[amount, amount]), train=True)
        d = k.draw(0)
        assert d is not None
        assert np.sign(k.apply(noisy.copy(), d, 0).std() - noisy.std()) == sign
    with pytest.raises(UserError, match="sharpen"):
        IntensityAugment(AugmentConfig(intensity_p=1.0, sharpen=[0.5, -0.5]), train=True)


def test_streaks_draw_lines_inside_the_body_only_and_keep_the_other_draws():
    body = np.full((96, 96), 30.0, np.float32)
    body[:, :20] = -1000.0  # air on the left
    cfg = AugmentConfig(streak_p=1.0, streak_hu=100.0)
    aug = IntensityAugment(cfg, train=True)
    d = aug.draw(5)
    assert d is not None and d.streak_seed is not None and d == aug.draw(5)
    out = aug.apply(body.copy(), d, 0)
    np.testing.assert_array_equal(out[:, :20], -1000.0)  # air is left alone
    delta = out[:, 20:] - 30.0
    assert delta.max() > 20.0 or delta.min() < -20.0  # a line of tens of HU
    assert 0.02 < np.mean(np.abs(delta) > 5.0) < 0.6  # lines, not a change of the whole slice
    np.testing.assert_array_equal(aug.apply(body.copy(), d, 3), out)  # the same object on every slice
    # Off by default, and adding streaks to a config leaves its other draws as they were.
    assert IntensityAugment(AugmentConfig(streak_hu=100.0), train=True).draw(5) is None
    base = AugmentConfig(intensity_p=0.5, noise_sd=5.0, hu_offset=4.0)
    both = AugmentConfig(intensity_p=0.5, noise_sd=5.0, hu_offset=4.0, streak_p=0.5)
    for seed in range(20):
        a, b = IntensityAugment(base, train=True).draw(seed), IntensityAugment(both, train=True).draw(seed)
        assert b is not None or a is None  # streaks only add to a draw
        if a is not None:
            assert (a.noise_sd, a.offset, a.noise_seed) == (b.noise_sd, b.offset, b.noise_seed)
        elif b is not None:
            assert b.streak_seed is not None and (b.noise_sd, b.offset) == (0.0, 0.0)
    with pytest.raises(UserError, match="streak_p"):
        IntensityAugment(AugmentConfig(streak_p=-0.1), train=True)


def test_training_items_are_augmented_reproducibly(shifted_cache):
    cache, _ = shifted_cache
    index = pd.read_parquet(cache / "cache_index.parquet")
    cfg = AugmentConfig(intensity_p=1.0, noise_sd=6.0, hu_offset=5.0, affine=0.0, hflip=0, vflip=0, transpose=0)
    mapping = MultiWindow(WINDOWS, reference_hu=BRAIN_HU)
    ds = SliceDataset(cache, index, mapping, slices=1, augment=cfg, train=True, seed=1)
    plain = SliceDataset(cache, index, mapping, slices=1, train=False)
    i = 5
    a, b = ds[i]["image"].numpy(), ds[i]["image"].numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain[i]["image"].numpy()).max() > 0.05


def test_shift_preset_changes_only_the_pixels_inside_the_body(tmp_path):
    from rsna19.synth.shift import write_shift_preset

    base = write_shift_preset(tmp_path / "none", "none", n_studies=1, base="tiny")
    plus = write_shift_preset(tmp_path / "plus", "hu_plus10", n_studies=1, base="tiny")
    assert base["n_slices"] == plus["n_slices"] > 0
    labels = pd.read_csv(tmp_path / "plus" / "labels.csv")
    assert list(labels.columns) == ["study_uid", "series_uid", "sop_uid", "z", *CLASSES]
    pd.testing.assert_frame_equal(labels, pd.read_csv(tmp_path / "none" / "labels.csv"))
    name = sorted((tmp_path / "none" / "stage_2_test").iterdir())[0].name
    hu = [read_slice(tmp_path / d / "stage_2_test" / name).hu.astype(np.float64) for d in ("none", "plus")]
    diff = hu[1] - hu[0]
    tissue, air = hu[0] > -100, hu[0] < -990  # well inside the body / well outside it
    assert tissue.sum() > 500 and np.all(np.abs(diff[tissue] - 10.0) <= 1.0) and np.all(diff[air] == 0)
    again = write_shift_preset(tmp_path / "plus", "hu_plus10", n_studies=1, base="tiny")  # complete: not written again
    assert again == plus


@pytest.mark.parametrize("name", ["thick2.5", "thick5", "thick7", "tilt", "hospital"])
def test_slice_geometry_presets_image_the_same_heads_and_bleeds(name):
    from rsna19.synth.shift import get_shift_preset, shift_plans

    spec = get_shift_preset(name)
    base, shifted = shift_plans(get_shift_preset("none"), 6, base="tiny"), shift_plans(spec, 6, base="tiny")
    for a, b in zip(base, shifted, strict=True):
        assert (a.study_uid, a.head, a.bleeds) == (b.study_uid, b.head, b.bleeds)  # the same patient and bleeds
        ga, gb = a.geometry, b.geometry
        # The middle plane crosses the head's vertical axis where it did (tilt moves the planes, not the stretch).
        mid_a = ga.centre[2] + (ga.n_slices - 1) / 2 * ga.table_step
        mid_b = gb.centre[2] + (gb.n_slices - 1) / 2 * gb.table_step
        lift = (gb.centre[1] - b.head.centre[1]) * np.tan(np.radians(gb.tilt_deg))
        lift_a = (ga.centre[1] - a.head.centre[1]) * np.tan(np.radians(ga.tilt_deg))
        assert mid_b + lift == pytest.approx(mid_a + lift_a, abs=1e-6)
        assert len(b.sop_uids) == len(b.file_names) == len(b.instance_numbers) == gb.n_slices
        if spec.table_step is not None:
            assert gb.table_step == spec.table_step
            extent = (ga.n_slices - 1) * ga.table_step
            assert (gb.n_slices - 1) * gb.table_step == pytest.approx(extent, abs=spec.table_step)
        if spec.tilt_all:
            assert 10.0 <= abs(gb.tilt_deg) <= 30.0
        assert b.slab_samples == (spec.slab_samples or a.slab_samples)
    uids = [u for p in shifted for u in (p.study_uid, p.series_uid, *p.sop_uids)]
    assert len(uids) == len(set(uids))


def test_a_model_trained_with_the_reference_records_it_and_predicts_with_it(tmp_path):
    from pathlib import Path

    import torch
    from cachefactory import write_cache_and_folds

    from rsna19.core.config import load_config
    from rsna19.engine.checkpoint import load_checkpoint
    from rsna19.engine.config import TrainConfig, resolve_paths
    from rsna19.engine.embed import CheckpointOptions
    from rsna19.inference.predict import predict
    from rsna19.training.trainer import train

    cache, folds = write_cache_and_folds(tmp_path / "data", n_patients=6, n_test_patients=1, size=32)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "clf2d.yaml"
    overrides = [
        "train.epochs=1",
        "data.hu_reference=brain",
        "data.augment.intensity_p=1.0",
        "data.augment.noise_sd=4.0",
        "data.augment.sharpen=[-0.5,0.8]",
        "data.augment.hu_offset=3.0",
    ]
    cfg = resolve_paths(load_config(TrainConfig, tiny, overrides), str(cache), str(folds), str(tmp_path / "runs"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(cfg, fold=0)
        state = load_checkpoint(run / "best.pt")
        assert state["hu_mapping"]["reference_hu"] == BRAIN_HU
        oof = pd.read_parquet(
            predict(tmp_path / "runs" / "clf2d", 0, "oof", CheckpointOptions(tta=["none"]), progress=False)
        )
    finally:
        torch.set_num_threads(threads)
    assert len(oof) > 0 and oof["p_any"].between(0, 1).all()
