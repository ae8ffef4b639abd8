"""The convert stage on real DICOM files written in tmp_path: order, tilt geometry, crop, cache, restart, errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from rsna19.conversion import convert_mask, convert_series
from rsna19.conversion.run import run_convert
from rsna19.core.constants import AIR_HU, CLASSES
from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom
from rsna19.io.index import build_index

# ----------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet():
    """Silence pydicom's UserWarnings about Kaggle's ``ID_<hex>`` UIDs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def tilted_iop(tilt_deg: float) -> tuple[float, ...]:
    """Rows along x, columns in the y–z plane tilted by ``tilt_deg`` (tilt = atan2(−col_z, col_y))."""
    t = np.deg2rad(tilt_deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))


def pixel_points(ipp, iop, pixel_spacing, shape) -> np.ndarray:
    """(rows, cols, 3) patient coordinates of every pixel centre: IPP + j·Δc·r + i·Δr·c."""
    r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
    i, j = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return np.asarray(ipp) + (j * pixel_spacing[1])[..., None] * r + (i * pixel_spacing[0])[..., None] * c


def rod_hu(points: np.ndarray, point, direction, radius: float, edge: float = 1.0) -> np.ndarray:
    """HU of an infinite rod (1000 HU in air, −1000) with a linear partial-volume edge ``edge`` mm wide."""
    direction = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    d = points - np.asarray(point, dtype=np.float64)
    d = d - (d @ direction)[..., None] * direction
    inside = np.clip((radius - np.linalg.norm(d, axis=-1)) / edge + 0.5, 0.0, 1.0)
    return -1000.0 + 2000.0 * inside


def write_series(
    folder: Path,
    series: str,
    n: int,
    *,
    tilt: float = 0.0,
    dz: float = 5.0,
    shape: tuple[int, int] = (64, 64),
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    variant: StorageVariant | None = None,
    hu_fn=None,
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` slices of a series with shuffled file names and InstanceNumbers; returns paths in spatial order.

    ``hu_fn(k, points) → (rows, cols) HU`` draws slice k from its pixel coordinates; the default is a rod along
    the slice normal through the middle of the field of view.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    iop = tilted_iop(tilt)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-shape[1] * pixel_spacing[1] / 2, -shape[0] * pixel_spacing[0] / 2, 0.0])
    centre = origin + np.array([shape[1] * pixel_spacing[1] * 0.55, shape[0] * pixel_spacing[0] * 0.45, 0.0])
    if hu_fn is None:

        def hu_fn(k, pts):
            return rod_hu(pts, centre, normal, radius=8.0)

    instance = rng.permutation(n) + 1
    names = rng.permutation(n)
    paths = []
    for k in range(n):
        ipp = origin + np.array([0.0, 0.0, k * dz])  # the table moves along z only, also when tilted
        pts = pixel_points(ipp, iop, pixel_spacing, shape)
        path = folder / f"ID_{series}_{names[k]:03d}.dcm"
        with _quiet():
            write_ct_dicom(
                path,
                hu_fn(k, pts),
                SliceGeometry(tuple(ipp), iop, pixel_spacing),
                sop_uid=f"ID_{series}{k:03d}",
                series_uid=f"ID_{series}",
                study_uid=f"ID_st{series}",
                patient_id=f"ID_pt{series}",
                instance_number=int(instance[k]),
                variant=variant or StorageVariant(),
                extra={"WindowCenter": [36, 36], "WindowWidth": [80, 80]},
            )
        paths.append(path)
    return paths


def index_of(paths, labels: dict[str, dict[str, float]] | None = None, split: str = "train") -> pd.DataFrame:
    """A minimal index (docs/contracts.md columns the converter reads) from the files' headers."""
    rows = []
    for p in paths:
        with _quiet():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            sop = str(ds.SOPInstanceUID)
            row = {
                "path": str(p),
                "sop_uid": sop,
                "patient_id": str(ds.PatientID),
                "study_uid": str(ds.StudyInstanceUID),
                "series_uid": str(ds.SeriesInstanceUID),
                "split": split,
                "instance_number": int(ds.InstanceNumber),
            }
        for c in CLASSES:
            row[c] = (labels or {}).get(sop, {}).get(c, 0.0) if split == "train" else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def centroids(volume: np.ndarray) -> np.ndarray:
    """(Z, 2) row/col centroids of the rod per slice, weighted by (HU + 1000) / 2000 in [0, 1]."""
    w = np.clip((volume.astype(np.float64) + 1000.0) / 2000.0, 0.0, 1.0)
    rows = np.arange(volume.shape[1])
    cols = np.arange(volume.shape[2])
    total = w.sum(axis=(1, 2))
    return np.stack([w.sum(axis=2) @ rows / total, w.sum(axis=1) @ cols / total], axis=1)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ one series


def test_order_by_position_not_instance_number(tmp_path):
    # Slice k is filled with 10·k HU: the output must run 0, 10, 20 … whatever the names and InstanceNumbers say.
    paths = write_series(tmp_path, "a", 7, hu_fn=lambda k, pts: np.full(pts.shape[:2], 10.0 * k))
    rng = np.random.default_rng(1)
    shuffled = [paths[i] for i in rng.permutation(len(paths))]
    volume, meta = convert_series(shuffled, crop=32)
    assert volume.dtype == np.int16 and volume.shape == (7, 32, 32)
    np.testing.assert_array_equal(volume[:, 16, 16], 10 * np.arange(7))
    assert meta["sop_uids"] == [f"ID_a{k:03d}" for k in range(7)]
    assert np.all(np.diff(meta["positions"]) > 0)
    assert meta["spacing"] == [5.0, 1.0, 1.0]
    assert meta["original_shape"] == [7, 64, 64] and meta["tilt_deg"] == 0.0 and not meta["tilt_corrected"]


def test_duplicate_positions_keep_one_and_report(tmp_path):
    paths = write_series(tmp_path / "a", "a", 4)
    dup = write_series(tmp_path / "b", "a", 1, seed=5)[0]  # same position as slice 0, another file
    renamed = tmp_path / "a" / "ID_dup.dcm"
    with _quiet():
        ds = pydicom.dcmread(dup)
        ds.SOPInstanceUID = "ID_azz"
        ds.save_as(renamed, enforce_file_format=True)
    volume, meta = convert_series([*paths, renamed], crop=None)
    assert volume.shape[0] == 4 and "ID_azz" not in meta["sop_uids"]
    assert len(meta["dropped"]) == 1
    assert meta["dropped"][0]["path"] == str(renamed)
    assert "duplicate position" in meta["dropped"][0]["reason"] and "ID_a000" in meta["dropped"][0]["reason"]


def test_single_slice_series_is_written(tmp_path):
    paths = write_series(tmp_path / "d", "one", 1)
    summary = run_convert(index_of(paths), tmp_path / "cache", crop=32, progress=False)
    assert summary.converted == 1
    vol = np.load(tmp_path / "cache" / "ID_one" / "volume.npy", mmap_mode="r")
    assert vol.shape == (1, 32, 32)


@pytest.mark.parametrize("tilt", [20.0, -15.0])
def test_tilt_correction_puts_the_rod_on_one_row(tmp_path, tilt):
    """A rod along the slice normal, rendered at the tilted DICOM geometry: after correction its cross-section
    centroid sits on the same pixel in every slice; before, it drifts by dz·sin(tilt)/Δr rows per slice."""
    dz, dr = 5.0, 1.0
    paths = write_series(tmp_path, "t", 8, tilt=tilt, dz=dz, pixel_spacing=(dr, dr))
    raw, meta_raw = convert_series(paths, crop=None, correct_tilt=False)
    fixed, meta = convert_series(paths, crop=None, correct_tilt=True)
    assert meta["tilt_deg"] == pytest.approx(tilt, abs=1e-4) and meta["tilt_corrected"]
    assert not meta_raw["tilt_corrected"]

    before = centroids(raw)
    drift = np.diff(before[:, 0])
    np.testing.assert_allclose(drift, dz * np.sin(np.deg2rad(tilt)) / dr, atol=0.25)
    np.testing.assert_allclose(np.diff(before[:, 1]), 0.0, atol=0.25)

    after = centroids(fixed)
    assert np.ptp(after[:, 0]) < 0.25 and np.ptp(after[:, 1]) < 0.25
    # Each output slice is still one input slice, in order.
    assert meta["sop_uids"] == meta_raw["sop_uids"] == [f"ID_t{k:03d}" for k in range(8)]
    # Positions are along the tilted normal: spacing dz·cos(tilt).
    assert meta["spacing"][0] == pytest.approx(dz * np.cos(np.deg2rad(tilt)), abs=1e-4)


def test_small_tilt_is_left_alone(tmp_path):
    paths = write_series(tmp_path, "s", 3, tilt=0.3)
    volume, meta = convert_series(paths, crop=None)
    assert not meta["tilt_corrected"] and meta["slice_shifts_px"] == [[0.0, 0.0]] * 3


def test_crop_centres_on_the_head_and_pads_with_air(tmp_path):
    # A disc of tissue (40 HU) off-centre in a 64×64 field of air.
    def disc(k, pts):
        yy, xx = np.mgrid[0:64, 0:64]
        return np.where((yy - 20) ** 2 + (xx - 44) ** 2 <= 6**2, 40.0, -1000.0)

    paths = write_series(tmp_path, "c", 3, hu_fn=disc)
    volume, meta = convert_series(paths, crop=48)
    assert volume.shape == (3, 48, 48)
    y0, x0, y1, x1 = meta["crop_box"]
    assert (y1 - y0, x1 - x0) == (48, 48)
    assert (y0 + y1 - 1) / 2 == pytest.approx(20, abs=0.5) and (x0 + x1 - 1) / 2 == pytest.approx(44, abs=0.5)
    tissue = np.argwhere(volume[1] == 40)
    np.testing.assert_allclose(tissue.mean(axis=0), [23.5, 23.5], atol=0.6)
    # The window runs past the right edge (x1 = 68 > 64): those columns are padding.
    assert x1 > 64
    assert np.all(volume[:, :, 64 - x0 :] == AIR_HU)
    assert y0 < 0 and np.all(volume[:, :-y0] == AIR_HU)  # and above the top edge
    assert np.all(volume[:, -y0:, : 64 - x0] >= -1000)  # inside the image: no padding
    # Larger than the image: all of it is there, surrounded by padding.
    big, meta_big = convert_series(paths, crop=96)
    assert big.shape == (3, 96, 96) and (big == 40).sum() == (volume == 40).sum()


def test_empty_series_crops_the_middle(tmp_path):
    paths = write_series(tmp_path, "e", 2, hu_fn=lambda k, pts: np.full(pts.shape[:2], -1000.0))
    _, meta = convert_series(paths, crop=32)
    assert meta["crop_box"] == [16, 16, 48, 48]


def test_resample_to_fixed_spacing(tmp_path):
    paths = write_series(tmp_path, "r", 2, pixel_spacing=(0.5, 0.5), shape=(96, 96))
    volume, meta = convert_series(paths, crop=None, spacing=1.0)
    assert volume.shape == (2, 48, 48) and meta["spacing"][1:] == [1.0, 1.0]
    area = ((volume[0] + 1000) / 2000).clip(0, 1).sum()
    assert area == pytest.approx(np.pi * 8.0**2, rel=0.05)  # the 8 mm rod is 8 px at 1 mm/px


def test_mask_follows_the_volume(tmp_path):
    """A mask of the rod in the DICOM frame, moved by convert_mask, lands where the converted rod is."""
    dz, tilt = 5.0, 25.0
    paths = write_series(tmp_path, "m", 6, tilt=tilt, dz=dz, pixel_spacing=(0.8, 0.8), shape=(80, 80))
    volume, meta = convert_series(paths, crop=56, spacing=1.0)
    masks = []
    for k in range(6):
        with _quiet():
            ds = pydicom.dcmread(paths[k])
        pts = pixel_points([float(v) for v in ds.ImagePositionPatient], tilted_iop(tilt), (0.8, 0.8), (80, 80))
        masks.append(rod_hu(pts, *_rod_of(tilt, (80, 80), (0.8, 0.8)), radius=8.0, edge=1e-6) > 0)
    mask = np.stack(masks).astype(np.uint8)
    out = convert_mask(mask, meta)
    assert out.shape == volume.shape and out.dtype == np.uint8
    inside = volume > 0
    iou = (inside & (out > 0)).sum() / (inside | (out > 0)).sum()
    assert iou > 0.9
    np.testing.assert_allclose(centroids(np.where(out > 0, 1000, -1000)), centroids(volume), atol=0.3)
    # With SOP UIDs the mask may hold extra slices, in any order.
    uids = list(meta["sop_uids"])
    extra = np.concatenate([mask[::-1], np.zeros_like(mask[:1])])
    np.testing.assert_array_equal(convert_mask(extra, meta, sop_uids=[*uids[::-1], "ID_other"]), out)
    with pytest.raises(ValueError, match="does not match"):
        convert_mask(mask[:3], meta)


def _rod_of(tilt, shape, pixel_spacing):
    iop = tilted_iop(tilt)
    origin = np.array([-shape[1] * pixel_spacing[1] / 2, -shape[0] * pixel_spacing[0] / 2, 0.0])
    centre = origin + np.array([shape[1] * pixel_spacing[1] * 0.55, shape[0] * pixel_spacing[0] * 0.45, 0.0])
    return centre, np.cross(iop[:3], iop[3:])


def test_storage_variants_convert_alike(tmp_path):
    """The same rod stored signed, unsigned, 12-bit wrapped or with slope 2 gives the same volume (±1 HU)."""
    variants = [
        StorageVariant(),
        StorageVariant(signed=False, intercept=-1024),
        StorageVariant(wrap12=True),
        StorageVariant(slope=2.0, intercept=-1000),
    ]
    vols = [
        convert_series(write_series(tmp_path / str(i), "v", 3, variant=v), crop=48)[0] for i, v in enumerate(variants)
    ]
    for v in vols[1:]:
        assert np.abs(v.astype(int) - vols[0].astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------------ the stage


def _bad_files(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    """A good series with one corrupt file, and a series whose every file has no decoder (MPEG-2 video)."""
    good = write_series(tmp_path / "g", "good", 4)
    corrupt = good[2]
    corrupt.write_bytes(corrupt.read_bytes()[:400])  # truncated mid-header
    nodec = write_series(tmp_path / "n", "nodec", 2)
    for p in nodec:
        with _quiet():
            ds = pydicom.dcmread(p)
            ds.file_meta.TransferSyntaxUID = MPEG2MPML
            ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
            ds["PixelData"].VR = "OB"
            ds.save_as(p, enforce_file_format=True)
    return good + nodec, corrupt, nodec[0]


def test_bad_series_reported_good_ones_converted(tmp_path):
    paths, corrupt, nodec = _bad_files(tmp_path)
    index = index_of([p for p in paths if p != corrupt])
    # The corrupt file was fine when the index was built; a file vanished since.
    index = pd.concat([index, index.iloc[[0]].assign(path=str(corrupt), sop_uid="ID_good002")], ignore_index=True)
    index = pd.concat(
        [index, index.iloc[[0]].assign(path=str(tmp_path / "gone.dcm"), sop_uid="ID_gone")], ignore_index=True
    )
    ok = write_series(tmp_path / "ok", "ok", 3)
    index = pd.concat([index, index_of(ok)], ignore_index=True)
    cache = tmp_path / "cache"
    summary = run_convert(index, cache, crop=32, progress=False)
    assert (summary.converted, summary.failed) == (2, 1)

    errors = pd.read_csv(cache / "convert_errors.csv", keep_default_na=False)
    assert list(errors.columns) == ["series_uid", "path", "reason"]
    by_path = dict(zip(errors["path"], errors["reason"]))
    assert str(corrupt) in by_path and str(tmp_path / "gone.dcm") in by_path
    series_failure = errors[(errors["series_uid"] == "ID_nodec") & (errors["path"] == "")]
    assert "no pixel decoder exists in pydicom for transfer syntax MPEG2" in series_failure["reason"].iloc[0]
    assert "no pixel decoder exists in pydicom for transfer syntax MPEG2" in by_path[str(nodec)]

    ci = pd.read_parquet(cache / "cache_index.parquet")
    assert set(ci["series_uid"]) == {"ID_good", "ID_ok"}
    good = ci[ci["series_uid"] == "ID_good"].sort_values("z")
    assert list(good["sop_uid"]) == ["ID_good000", "ID_good001", "ID_good003"]
    assert list(good["z"]) == [0, 1, 2] and set(good["n_slices"]) == {3}
    assert list(ci.columns) == ["sop_uid", "series_uid", "study_uid", "patient_id", "split", "z", "n_slices", *CLASSES]
    assert not (cache / "ID_nodec").exists()

    # A re-run keeps reporting the dropped slices of skipped series and retries the failed one.
    again = run_convert(index, cache, crop=32, progress=False)
    assert (again.converted, again.skipped, again.failed) == (0, 2, 1)
    assert pd.read_csv(cache / "convert_errors.csv", keep_default_na=False).equals(errors)


def test_cache_contents_and_labels(tmp_path):
    paths = write_series(tmp_path / "s", "lab", 5)
    labels = {"ID_lab002": {"subdural": 1.0, "any": 1.0}}
    train = index_of(paths, labels)
    test_paths = write_series(tmp_path / "t", "tst", 2)
    index = pd.concat([train, index_of(test_paths, split="test")], ignore_index=True)
    cache = tmp_path / "cache"
    run_convert(index, cache, crop=32, progress=False)
    meta = json.loads((cache / "ID_lab" / "meta.json").read_text())
    for key in ("sop_uids", "positions", "spacing", "tilt_deg", "crop_box", "original_shape", "conversion_version"):
        assert key in meta
    assert (meta["study_uid"], meta["patient_id"], meta["split"]) == ("ID_stlab", "ID_ptlab", "train")
    vol = np.load(cache / "ID_lab" / "volume.npy", mmap_mode="r")
    assert isinstance(vol, np.memmap) and vol.dtype == np.int16 and vol.shape == (5, 32, 32)
    assert (cache / "ID_lab" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ci = pd.read_parquet(cache / "cache_index.parquet")
    row = ci[ci["sop_uid"] == "ID_lab002"].iloc[0]
    assert (row["z"], row["subdural"], row["any"], row["epidural"]) == (2, 1.0, 1.0, 0.0)
    assert ci[ci["split"] == "test"][list(CLASSES)].isna().all().all()


def test_rerun_converts_only_what_is_missing_or_stale(tmp_path):
    a = write_series(tmp_path / "a", "a", 3)
    b = write_series(tmp_path / "b", "b", 3)
    index = index_of(a + b)
    cache = tmp_path / "cache"
    assert run_convert(index, cache, crop=32, progress=False).converted == 2
    assert run_convert(index, cache, crop=32, progress=False).skipped == 2
    # A changed input file makes its series stale.
    st = os.stat(a[0])
    os.utime(a[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = run_convert(index, cache, crop=32, progress=False)
    assert (s.converted, s.skipped) == (1, 1)
    # Other parameters, or --force, redo everything.
    assert run_convert(index, cache, crop=40, progress=False).converted == 2
    assert np.load(cache / "ID_a" / "volume.npy").shape == (3, 40, 40)
    assert run_convert(index, cache, crop=40, force=True, progress=False).converted == 2
    # Leftovers of a killed run (its pid is gone) are removed; a series directory without meta.json is redone.
    (cache / ".ID_a.tmp-999999999-abc").mkdir()
    (cache / ".ID_b.old-999999999").mkdir()
    (cache / ".cache_index.parquet.tmp-999999999-abc").write_bytes(b"partial")
    (cache / "ID_b" / "meta.json").unlink()
    assert run_convert(index, cache, crop=40, progress=False).converted == 1
    assert sorted(p.name for p in cache.iterdir()) == ["ID_a", "ID_b", "cache_index.parquet", "convert_errors.csv"]


def test_kill_and_resume_is_byte_identical(tmp_path):
    """SIGKILL a run after its first series appears, run again: the cache equals an uninterrupted run's."""
    for i in range(12):
        write_series(tmp_path / "stage_2_train", f"k{i:02d}", 10, tilt=20.0 if i % 2 else 0.0, shape=(128, 128))
    index_path = tmp_path / "index.parquet"
    # The real index stage (rsna19 index), so the converter is checked against its actual output.
    build_index([tmp_path / "stage_2_train"], out=index_path, progress=False)
    # The thin script starts fastest (it imports the convert stage only); the reference run uses the CLI.
    script = str(Path(__file__).resolve().parents[1] / "data_scripts" / "convert_dataset.py")
    cmd = [sys.executable, script, str(index_path), "--crop", "96", "--no-progress"]
    cli = [sys.executable, "-m", "rsna19.cli", "convert", str(index_path), "--crop", "96", "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.is_dir() and any(p.name.startswith("ID_") for p in killed.iterdir()):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p for p in killed.iterdir() if p.name.startswith("ID_")]
    assert 1 <= len(done) < 12, "the run finished before it could be killed"
    assert all((p / "meta.json").is_file() for p in done)
    assert not (killed / "cache_index.parquet").exists()

    subprocess.run([*cmd, "--out", str(killed)], env=env, check=True, capture_output=True)
    reference = tmp_path / "reference"
    subprocess.run([*cli, "--out", str(reference), "--workers", "2"], env=env, check=True, capture_output=True)
    got, want = tree_bytes(killed), tree_bytes(reference)
    assert sorted(got) == sorted(want) and len(want) == 12 * 3 + 2
    assert [k for k in want if got[k] != want[k]] == []


def test_data_script_and_cli_errors(tmp_path, capsys):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [
            sys.executable,
            str(root / "data_scripts" / "convert_dataset.py"),
            str(tmp_path / "nope.parquet"),
            "--out",
            "x",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "index not found" in res.stderr
    from rsna19.cli import main

    assert main(["convert", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "c")]) == 1
    assert "index not found" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"path": ["a"]}).to_parquet(bad)
    assert main(["convert", str(bad), "--out", str(tmp_path / "c"), "--workers", "2"]) == 1
    assert "lacks column(s) sop_uid, series_uid" in capsys.readouterr().err
