"""Datasets, windows and augmentation against hand-indexed cache slices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cachefactory import write_cache

from rsna19.constants import AIR_HU, CLASSES, WINDOWS
from rsna19.data.augment import AugmentConfig
from rsna19.data.datasets import SliceDataset, read_cache_index
from rsna19.data.transforms import CdfMapping, MultiWindow, Window
from rsna19.errors import UserError


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
    (rsna19.utils.cv2_threads), so the pool never exists. Run in a subprocess: a regression is a timeout, not a hang.
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", FORKED_WORKERS_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "4"
