"""Datasets, windows and augmentation against hand-indexed cache slices."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from cachefactory import write_cache

from rsna19.core.constants import AIR_HU, CLASSES, WINDOWS
from rsna19.core.errors import UserError
from rsna19.data.augment import (
    AugmentConfig,
    StackAugment,
    affine_matrix,
    device_affine,
    dihedral_matrix,
    pixel_view,
)
from rsna19.data.datasets import SliceDataset, read_cache_index
from rsna19.data.transforms import CdfMapping, MultiWindow, Window, decode_image
from rsna19.engine.runtime import Runtime


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"), n_patients=3, n_test_patients=1, size=24, slices=(5, 7))


def _window(hu: np.ndarray, name: str) -> np.ndarray:
    c, w = WINDOWS[name]
    return np.clip((hu.astype(np.float64) - (c - w / 2)) / w, 0, 1)


def test_window_and_multiwindow_match_formula():
    hu = np.random.default_rng(0).integers(-1100, 2000, (3, 5, 7)).astype(np.int16)
    for name in WINDOWS:
        np.testing.assert_allclose(Window.named(name)(hu), _window(hu, name), atol=1e-6)
        np.testing.assert_allclose(Window.named(name)(hu.astype(np.float64)), _window(hu, name), atol=1e-6)
    mw = MultiWindow(["brain", "bone"])
    out = mw(hu, axis=-1)
    assert out.shape == (3, 5, 7, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 1], _window(hu, "bone"), atol=1e-6)
    with pytest.raises(UserError, match="unknown window"):
        MultiWindow(["lung"])


def test_cdf_mapping_is_monotone_and_fits_quantiles():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(30, 10, 5000), rng.normal(700, 100, 1000)])
    cdf = CdfMapping.fit(values)
    x = np.linspace(-1024, 2000, 500)
    y = cdf(x)
    assert y.min() == -1 and y.max() == 1 and np.all(np.diff(y) >= 0)
    # The median of the fitted voxels maps to ~0.
    inside = values[(values >= -400) & (values <= 1000)]
    assert abs(float(cdf(np.array([np.median(inside)]))[0])) < 0.05
    again = MultiWindow.from_state(MultiWindow(["cdf"], cdf).state())
    np.testing.assert_array_equal(again(x), MultiWindow(["cdf"], cdf)(x))


def test_2d_sample_channels_are_windows_of_the_slice(cache):
    index = read_cache_index(cache)
    ds = SliceDataset(cache, index, ["brain", "subdural", "bone"], slices=1)
    i = 3
    row = index.iloc[i]
    vol = np.load(cache / row["series_uid"] / "volume.npy")
    item = ds[i]
    assert item["image"].shape == (3, 24, 24)
    for c, name in enumerate(["brain", "subdural", "bone"]):
        np.testing.assert_allclose(item["image"][c].numpy(), _window(vol[row["z"]], name), atol=1e-6)
    np.testing.assert_array_equal(item["target"].numpy(), row[list(CLASSES)].to_numpy(dtype=np.float32))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_25d_neighbours_and_air_padding(cache, where):
    index = read_cache_index(cache)
    series = index[index["series_uid"] == index["series_uid"].iloc[0]]
    n = int(series["n_slices"].iloc[0])
    z = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    frame = series[series["z"] == z]
    vol = np.load(cache / frame["series_uid"].iloc[0] / "volume.npy")
    windows = ["brain", "bone"]
    ds = SliceDataset(cache, frame, windows, slices=5, layout="channels")
    image = ds[0]["image"].numpy()
    assert image.shape == (10, 24, 24)
    for s, off in enumerate(range(-2, 3)):
        zz = z + off
        hu = vol[zz] if 0 <= zz < n else np.full(vol.shape[1:], AIR_HU, np.int16)
        for c, name in enumerate(windows):
            np.testing.assert_allclose(image[s * len(windows) + c], _window(hu, name), atol=1e-6)
    stack = SliceDataset(cache, frame, windows, slices=5, layout="stack")[0]["image"].numpy()
    assert stack.shape == (5, 2, 24, 24)
    np.testing.assert_array_equal(stack.reshape(10, 24, 24), image)


def test_centre_crop_and_resize(cache):
    index = read_cache_index(cache)
    row = index.iloc[0]
    vol = np.load(cache / row["series_uid"] / "volume.npy")
    img = SliceDataset(cache, index.iloc[:1], ["brain"], size=16)[0]["image"].numpy()
    np.testing.assert_allclose(img[0], _window(vol[row["z"]][4:20, 4:20], "brain"), atol=1e-6)
    assert SliceDataset(cache, index.iloc[:1], ["brain"], resize=12)[0]["image"].shape == (1, 12, 12)
    assert SliceDataset(cache, index.iloc[:1], ["brain"], size=32)[0]["image"].shape == (1, 32, 32)  # padded


def test_augmentation_identical_across_slices_and_seeded(tmp_path):
    # A series whose slices are all the same image: any augmentation must keep the slices equal.
    rng = np.random.default_rng(0)
    img = rng.integers(-100, 200, (32, 32)).astype(np.int16)
    (tmp_path / "S").mkdir()
    np.save(tmp_path / "S" / "volume.npy", np.stack([img] * 6))
    frame = pd.DataFrame({"series_uid": ["S"] * 4, "z": [1, 2, 3, 4]})
    aug = AugmentConfig(hflip=0.5, vflip=0.5, transpose=0.5, rot90=0.5, affine=1.0)
    ds = SliceDataset(tmp_path, frame, ["brain", "subdural"], slices=3, size=24, augment=aug, train=True, seed=1)
    draws = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x = ds[i]["image"].numpy()  # (6, 24, 24), slice-major
            np.testing.assert_array_equal(x[0:2], x[2:4])
            np.testing.assert_array_equal(x[2:4], x[4:6])
            np.testing.assert_array_equal(x, ds[i]["image"].numpy())  # same (seed, epoch, index) → same
            draws.append(x)
    assert not np.array_equal(draws[0], draws[4])  # another epoch, another draw
    assert np.isnan(ds[0]["target"].numpy()).all()  # no labels in the frame → NaN targets


def test_errors(cache, tmp_path):
    index = read_cache_index(cache)
    with pytest.raises(UserError, match="odd"):
        SliceDataset(cache, index, ["brain"], slices=4)
    with pytest.raises(UserError, match="cache index not found"):
        read_cache_index(tmp_path)
    ds = SliceDataset(tmp_path, index.iloc[:1], ["brain"])
    with pytest.raises(UserError, match="volume not found"):
        ds[0]


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("vflip", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_dihedral_matrix_matches_numpy(hflip, vflip, transpose, quarter):
    """The fused map of flips, transpose and quarter turns equals the numpy ops applied in that order."""
    img = np.random.default_rng(0).normal(size=(9, 9)).astype(np.float32)
    want = img
    if hflip:
        want = want[:, ::-1]
    if vflip:
        want = want[::-1]
    if transpose:
        want = want.T
    want = np.rot90(want, k=quarter)
    m = dihedral_matrix(9, hflip, vflip, transpose, quarter)[:2]
    got = cv2.warpAffine(img, m, (9, 9), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    np.testing.assert_array_equal(got, want)


def test_pixel_view_equals_the_nearest_warp():
    """Crops, flips and transposes are served as numpy views; they must equal OpenCV's warp of the same map."""
    rng = np.random.default_rng(3)
    img = rng.normal(size=(13, 13)).astype(np.float32)
    seen = {True: 0, False: 0}
    for _ in range(200):
        flips = rng.random(3) < 0.5
        m = np.array([[1.0, 0.0, rng.integers(-2, 6)], [0.0, 1.0, rng.integers(-2, 6)], [0.0, 0.0, 1.0]])
        m = m @ dihedral_matrix(10, *flips, int(rng.integers(0, 4)))
        index = pixel_view(m, (10, 10), img.shape)
        want = cv2.warpAffine(img, m[:2], (10, 10), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=-99.0)
        seen[index is None] += 1
        if index is None:
            assert (want == -99.0).any()  # None only when the map reads outside the image
            continue
        rows, cols, transposed = index
        got = img[rows, cols].T if transposed else img[rows, cols]
        np.testing.assert_array_equal(got, want)
    assert seen[True] and seen[False]
    assert pixel_view(affine_matrix((10, 10), 1.1, 5.0, (0.0, 0.0)), (10, 10), (13, 13)) is None  # resamples


def test_affine_matrix_rotates_zooms_and_shifts_about_the_centre():
    img = np.random.default_rng(1).normal(size=(11, 11)).astype(np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

    def warp(m: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(img, m[:2], (11, 11), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=-9.0)

    # 90° about the centre is a quarter turn (image y points down: clockwise on screen = np.rot90 with k = -1).
    np.testing.assert_allclose(warp(affine_matrix((11, 11), 1.0, 90.0, (0.0, 0.0))), np.rot90(img, -1), atol=1e-4)
    # A shift of (2, 1) pixels moves the content right 2 and down 1; what comes in is the border (air).
    shifted = warp(affine_matrix((11, 11), 1.0, 0.0, (2.0, 1.0)))
    np.testing.assert_allclose(shifted[1:, 2:], img[:-1, :-2], atol=1e-5)
    assert (shifted[0] == -9.0).all() and (shifted[:, :2] == -9.0).all()
    # A zoom by 2 keeps the centre pixel and doubles distances from it.
    zoomed = warp(affine_matrix((11, 11), 2.0, 0.0, (0.0, 0.0)))
    assert zoomed[5, 5] == pytest.approx(img[5, 5], abs=1e-5)
    assert zoomed[5, 9] == pytest.approx(img[5, 7], abs=1e-5)


def test_stack_augment_crop_resize_and_air(tmp_path):
    rng = np.random.default_rng(2)
    planes = [rng.integers(-500, 500, (20, 20)).astype(np.int16) for _ in range(3)]
    # Centre crop without augmentation: a plain copy of the middle.
    out = StackAugment(12, None, None, train=False)(planes)
    assert out.shape == (3, 12, 12) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.stack(planes)[:, 4:16, 4:16])
    # A crop larger than the slice is centred in air.
    big = StackAugment(24, None, None, train=False)(planes)
    np.testing.assert_array_equal(big[:, 2:22, 2:22], np.stack(planes))
    assert (big[:, :2] == AIR_HU).all() and (big[:, :, 22:] == AIR_HU).all()
    # Resize is area averaging: 20 → 10 averages 2 × 2 blocks.
    small = StackAugment(None, 10, None, train=False)(planes)
    np.testing.assert_allclose(small[0], planes[0].reshape(10, 2, 10, 2).mean(axis=(1, 3)), atol=1e-3)
    # Flips only (no affine): whole pixels move, exactly (nearest), from a random crop of the slice.
    cfg = AugmentConfig(affine=0.0, hflip=1.0, vflip=0.0, transpose=1.0)
    flips = StackAugment(16, None, cfg, train=True)
    origins = set()
    for seed in range(8):
        got = flips(planes, seed)
        undone = got.transpose(0, 2, 1)[:, :, ::-1]  # undo the transpose, then the hflip
        found = [
            (oy, ox)
            for oy in range(5)
            for ox in range(5)
            if np.array_equal(undone, np.stack(planes)[:, oy : oy + 16, ox : ox + 16])
        ]
        assert len(found) == 1
        origins.add(found[0])
    assert len(origins) > 1  # the crop is random


@pytest.mark.parametrize("image_dtype", ["float32", "uint8"])
def test_device_affine_matches_the_loader_affine(tmp_path, image_dtype):
    """``affine_on_device``: the loader leaves the shift-scale-rotate to the device; the result is the same image."""
    yy, xx = np.mgrid[:40, :40]
    smooth = 40 + 30 * np.sin(yy / 7.0) * np.cos(xx / 9.0)  # 10…70 HU: inside the brain window, no clipping
    smooth[:, :3] = AIR_HU  # some air at the edge
    (tmp_path / "S").mkdir()
    np.save(tmp_path / "S" / "volume.npy", np.stack([smooth, smooth + 5, smooth - 5]).astype(np.int16))
    frame = pd.DataFrame({"series_uid": ["S"], "z": [1]})
    windows = ["brain", "cdf"]
    no_flips = {"hflip": 0.0, "vflip": 0.0, "transpose": 0.0, "affine": 1.0, "rotate": 20.0}
    kwargs = {"slices": 3, "size": 40, "train": True, "image_dtype": image_dtype}
    rt = Runtime(torch.device("cpu"))
    for seed in range(4):
        on_loader = SliceDataset(tmp_path, frame, windows, augment=AugmentConfig(**no_flips), seed=seed, **kwargs)
        on_device = SliceDataset(
            tmp_path, frame, windows, augment=AugmentConfig(**no_flips, affine_on_device=True), seed=seed, **kwargs
        )
        want = rt.image(torch.utils.data.default_collate([on_loader[0]]))
        item = on_device[0]
        assert item["affine"].shape == (2, 3) and item["fill"].shape == (6,)
        assert not torch.equal(item["affine"], torch.eye(3)[:2])
        got = rt.image(torch.utils.data.default_collate([item]))
        # Same transform: inside the image (away from the air column and the borders, where interpolating HU and
        # interpolating windowed values differ) the two paths agree to float precision.
        inner = (slice(None), slice(None), slice(12, 28), slice(12, 28))
        step = 1 / 255 if image_dtype == "uint8" else 0.0  # uint8: rounding before vs after the interpolation
        torch.testing.assert_close(got[inner], want[inner], atol=1e-4 + step, rtol=0)
        assert (got - want).abs().mean() < 0.02


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_device_affine_shift_brings_in_the_fill(fill):
    x = torch.arange(2 * 3 * 8 * 10, dtype=torch.float32).reshape(2, 3, 8, 10)
    theta = torch.tensor([[1.0, 0.0, -0.4], [0.0, 1.0, 0.0]]).expand(2, 2, 3)  # output x reads input x − 2 px
    got = device_affine(x, theta, torch.full((2, 3), fill))
    torch.testing.assert_close(got[..., 2:], x[..., :-2])
    assert (got[..., :2] == fill).all()
    stack = device_affine(x.reshape(2, 3, 1, 8, 10), theta, fill).reshape(x.shape)  # (B, S, C, H, W) as well
    torch.testing.assert_close(stack, got)


@pytest.mark.parametrize("image_dtype", ["float32", "uint8"])
def test_extra_albumentations_transforms_are_seeded_and_pixel_level(cache, image_dtype):
    index = read_cache_index(cache)
    extra = [{"name": "GaussNoise", "std_range": [0.05, 0.1], "p": 1.0}, {"name": "RandomGamma", "p": 0.5}]
    kwargs = {"slices": 3, "size": 20, "train": True, "seed": 4, "image_dtype": image_dtype}
    plain = SliceDataset(cache, index, ["brain", "bone"], augment=AugmentConfig(), **kwargs)
    noisy = SliceDataset(cache, index, ["brain", "bone"], augment=AugmentConfig(extra=extra), **kwargs)
    a, b = plain[2]["image"], noisy[2]["image"]
    assert b.shape == a.shape == (6, 20, 20) and b.dtype == a.dtype
    assert not torch.equal(a, b)  # the noise is there ...
    scale = 255.0 if image_dtype == "uint8" else 1.0
    assert (b.float() - a.float()).abs().mean() < 0.2 * scale  # ... on the same geometry
    torch.testing.assert_close(noisy[2]["image"], b)  # same (seed, epoch, index) → same draws
    assert not torch.equal(noisy[3]["image"][:1], b[:1])
    # Not in evaluation; geometric or unknown transforms are refused with the entry's position.
    evaluation = SliceDataset(cache, index, ["brain"], augment=AugmentConfig(extra=extra), train=False)
    torch.testing.assert_close(evaluation[2]["image"], SliceDataset(cache, index, ["brain"])[2]["image"])
    with pytest.raises(UserError, match=r"extra\[0\]: HorizontalFlip is not a pixel-level transform"):
        SliceDataset(cache, index, ["brain"], augment=AugmentConfig(extra=[{"name": "HorizontalFlip"}]), train=True)
    with pytest.raises(UserError, match=r"extra\[1\]: 'Sparkle' is not an albumentations transform"):
        SliceDataset(
            cache, index, ["brain"], augment=AugmentConfig(extra=[*extra[:1], {"name": "Sparkle"}]), train=True
        )


def test_uint8_images_decode_to_the_float_images(cache):
    index = read_cache_index(cache)
    windows = ["brain", "subdural", "bone", "cdf"]
    kwargs = {"slices": 3, "size": 20, "augment": AugmentConfig(affine=1.0), "train": True, "seed": 3}
    f32 = SliceDataset(cache, index, windows, **kwargs)
    u8 = SliceDataset(cache, index, windows, image_dtype="uint8", **kwargs)
    for i in range(0, len(index), 5):
        a, b = f32[i]["image"], u8[i]["image"]
        assert b.dtype == torch.uint8 and b.shape == a.shape
        decoded = decode_image(b)
        assert decoded.dtype == torch.float32
        want = a.clone()
        want[3::4] = (want[3::4] + 1) / 2  # the CDF channel: [-1, 1] → [0, 1] in uint8 images
        torch.testing.assert_close(decoded, want, atol=0.5 / 255 + 1e-6, rtol=0)
    assert decode_image(a) is a  # float passes unchanged
    with pytest.raises(UserError, match="image_dtype"):
        SliceDataset(cache, index, windows, image_dtype="float16")


FORKED_WORKERS_SCRIPT = """
import numpy as np
import torch
from rsna19.data.augment import AugmentConfig, StackAugment
from rsna19.training.trainer import _worker_init

aug = StackAugment(384, None, AugmentConfig(affine=1.0), True)
x = np.random.default_rng(0).random((400, 400, 5), dtype=np.float32)
aug(x, 1)  # an OpenCV warp in the parent: with OpenCV's default thread pool this creates the pool


class Stack(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(aug(x, i)))


loader = torch.utils.data.DataLoader(
    Stack(), batch_size=2, num_workers=2, multiprocessing_context="fork", worker_init_fn=_worker_init
)
print(sum(len(b) for b in loader))
"""


def test_forked_loader_workers_do_not_hang_after_opencv_ran_in_the_parent():
    """Regression: forked workers hung in ``cv2.setNumThreads`` once the parent had used OpenCV's thread pool.

    With ``cv2.setNumThreads(4)`` added after the imports this script hangs; rsna19 keeps OpenCV single-threaded
    (rsna19.core.cv2_threads), so the pool never exists. Run in a subprocess: a regression is a timeout, not a hang.
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", FORKED_WORKERS_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "4"
