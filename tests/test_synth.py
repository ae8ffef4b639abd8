"""The synthetic RSNA-format dataset (``rsna19 synth``): layout, headers, variety, labels, masks, determinism."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna19.cli import main
from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.synth import generate_dataset
from rsna19.synth.phantom import render
from rsna19.synth.plan import make_plan
from rsna19.synth.presets import get_preset

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

ID_RE = re.compile(r"^ID_[0-9a-f]{9}$")


def tilt_from_iop(iop: tuple[float, ...] | list[float] | np.ndarray) -> float:
    """Gantry tilt in degrees from ImageOrientationPatient: ``atan2(−col_z, col_y)`` (the column direction is
    tilted about the patient's x axis)."""
    return math.degrees(math.atan2(-float(iop[5]), float(iop[4])))


def _summary(root: Path) -> dict:
    return json.loads((root / "synth_summary.json").read_text())


def _headers(root: Path) -> pd.DataFrame:
    """One row per file with the header fields the tests need (pixels not read)."""
    rows = []
    for split in ("train", "test"):
        for path in sorted((root / f"stage_2_{split}").glob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            iop = [float(v) for v in ds.ImageOrientationPatient]
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
            normal = np.cross(iop[:3], iop[3:])
            rows.append(
                {
                    "path": path, "split": split, "sop": ds.SOPInstanceUID, "series": ds.SeriesInstanceUID,
                    "study": ds.StudyInstanceUID, "patient": ds.PatientID, "instance": int(ds.InstanceNumber),
                    "iop": iop, "ipp": ipp, "position": float(ipp @ normal),
                    "spacing": [float(v) for v in ds.PixelSpacing], "pr": int(ds.PixelRepresentation),
                    "bits_stored": int(ds.BitsStored), "intercept": float(ds.RescaleIntercept),
                    "slope": float(ds.RescaleSlope), "wc_multi": ds["WindowCenter"].VM > 1,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def _to_hu(ds: pydicom.Dataset) -> np.ndarray:
    """HU decoding, written independently of the generator: slope/intercept and the 12-bit quirk."""
    x = ds.pixel_array.astype(np.float64)
    if int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and float(ds.RescaleIntercept) > -100:
        x = x + 1000
        x[x >= 4096] -= 4096
        x -= 1000
    return x * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _labels(csv: Path) -> pd.DataFrame:
    """Long csv → (sop, 6 classes) frame."""
    df = pd.read_csv(csv)
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    df["sop"], df["cls"] = parts[0], parts[1]
    return df.pivot(index="sop", columns="cls", values="Label")[list(CLASSES)]


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "synth_summary.json"
    }


def test_layout_and_csv_format(tiny_dataset: Path) -> None:
    root = tiny_dataset
    for name in ("stage_2_train", "stage_2_test", "masks"):
        assert (root / name).is_dir()
    summary = _summary(root)
    heads = _headers(root)
    corrupt = summary["corrupt_file"]

    train = pd.read_csv(root / "stage_2_train.csv")
    assert list(train.columns) == ["ID", "Label"]
    assert len(train) % 6 == 0
    # Six rows a slice, in CLASSES order.
    for start in range(0, len(train), 6):
        ids = train["ID"].iloc[start : start + 6].tolist()
        sop = ids[0].rsplit("_", 1)[0]
        assert ids == [f"{sop}_{c}" for c in CLASSES]
        assert ID_RE.match(sop)
    assert set(train["Label"].unique()) <= {0, 1}

    # Every csv row has a readable file; every train file but the corrupt one has rows.
    train_sops = set(heads.loc[heads.split == "train", "sop"])
    csv_sops = set(_labels(root / "stage_2_train.csv").index)
    assert csv_sops == train_sops - {corrupt["sop_uid"]}

    sub = pd.read_csv(root / "stage_2_sample_submission.csv")
    test_labels = pd.read_csv(root / "test_labels.csv")
    assert list(sub.columns) == ["ID", "Label"] and (sub["Label"] == 0.5).all()
    assert sub["ID"].tolist() == test_labels["ID"].tolist()
    assert set(_labels(root / "test_labels.csv").index) == set(heads.loc[heads.split == "test", "sop"])

    # File names look like RSNA's but are unrelated to the SOP UID; every identifier is ID_ + 9 hex digits.
    assert all(ID_RE.match(p.stem) for p in heads["path"])
    assert not any(p.stem == s for p, s in zip(heads["path"], heads["sop"]))
    for col in ("sop", "series", "study", "patient"):
        assert heads[col].map(lambda v: bool(ID_RE.match(v))).all()
    assert heads["sop"].is_unique
    # Test patients never appear in train.
    assert not set(heads.loc[heads.split == "test", "patient"]) & set(heads.loc[heads.split == "train", "patient"])


def test_files_readable_and_headers(tiny_dataset: Path) -> None:
    corrupt = tiny_dataset / _summary(tiny_dataset)["corrupt_file"]["path"]
    paths = sorted(tiny_dataset.glob("stage_2_*/*.dcm"))
    assert corrupt in paths
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT"
        assert 20 <= len(ds) <= 26, f"{path.name}: {len(ds)} elements"
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleIntercept",
                    "RescaleSlope", "WindowCenter", "WindowWidth", "InstanceNumber", "PatientID"):  # fmt: skip
            assert key in ds, f"{path.name}: no {key}"
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        if path == corrupt:
            with pytest.raises(ValueError, match="pixel data"):
                _ = ds.pixel_array
            continue
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == (64, 64)


def test_variety(tiny_dataset: Path) -> None:
    heads = _headers(tiny_dataset)
    summary = _summary(tiny_dataset)
    storage = set(zip(heads.pr, heads.intercept, heads.bits_stored))
    assert (1, -1024.0, 16) in storage  # signed, intercept −1024
    assert (0, -1024.0, 12) in storage  # unsigned, intercept −1024
    assert (1, 0.0, 16) in storage  # signed, intercept 0
    assert (0, 0.0, 12) in storage  # the 12-bit wrap quirk
    assert (heads.slope != 1).any()
    assert heads.wc_multi.any() and not heads.wc_multi.all()
    tilts = heads.iop.map(tilt_from_iop)
    assert (tilts.abs() > 9).any() and (tilts.abs() < 1e-6).any()
    # InstanceNumber follows space in some series and not in others.
    orders = set()
    for _, g in heads.groupby("series"):
        inst = g.sort_values("position")["instance"].to_numpy()
        orders.add("asc" if np.all(np.diff(inst) > 0) else "desc" if np.all(np.diff(inst) < 0) else "shuffled")
    assert "shuffled" in orders and len(orders) >= 2
    studies_per_patient = heads.groupby("patient")["study"].nunique()
    assert (studies_per_patient >= 2).any()
    assert summary["splits"]["train"] == {**summary["splits"]["train"], "patients": 5, "studies": 6, "series": 6}
    assert summary["splits"]["test"]["studies"] == 2

    # Outside the reconstruction circle some series store less than −1024 HU; the wrap quirk stores air ≥ 2048.
    low, wrapped = False, False
    for path in heads.path[heads.groupby("series").cumcount() == 0]:
        ds = pydicom.dcmread(path)
        hu = _to_hu(ds)
        low |= bool((hu < -1500).any())
        if int(ds.BitsStored) == 12 and float(ds.RescaleIntercept) == 0:
            wrapped |= bool((ds.pixel_array >= 2048).any())
    assert low and wrapped


def test_hu_content_is_a_head(tiny_dataset: Path) -> None:
    """Decoded slices hold air, brain-range tissue and bone, whatever the storage variant."""
    heads = _headers(tiny_dataset)
    corrupt = _summary(tiny_dataset)["corrupt_file"]["path"]
    for _, g in heads.groupby("series"):
        mid = g.sort_values("position").iloc[len(g) // 2]
        if str(mid.path).endswith(corrupt):
            mid = g.sort_values("position").iloc[len(g) // 2 - 1]
        hu = np.maximum(_to_hu(pydicom.dcmread(mid.path)), -1024)
        assert (hu < -900).mean() > 0.2, "air"
        assert (hu > 600).mean() > 0.02, "skull"
        soft = hu[(hu > 0) & (hu < 100)]
        assert soft.size > 0.1 * hu.size and 15 < np.median(soft) < 50, "brain"


def test_any_is_or_of_subtypes(tiny_dataset: Path) -> None:
    for name in ("stage_2_train.csv", "test_labels.csv"):
        lab = _labels(tiny_dataset / name)
        assert (lab["any"] == lab[list(SUBTYPES)].max(axis=1)).all()
    train = _labels(tiny_dataset / "stage_2_train.csv")
    assert (train[list(SUBTYPES)].sum() > 0).all(), "every subtype has positive train slices"
    assert 0 < train["any"].mean() < 0.8


def test_masks_consistent_with_labels_and_geometry(tiny_dataset: Path) -> None:
    summary = _summary(tiny_dataset)
    heads = _headers(tiny_dataset)
    labels = pd.concat([_labels(tiny_dataset / "stage_2_train.csv"), _labels(tiny_dataset / "test_labels.csv")])
    for info in summary["series"]:
        with np.load(tiny_dataset / "masks" / f"{info['series_uid']}.npz") as npz:
            mask, sops = npz["mask"], npz["sop_uids"].tolist()
        g = heads[heads.series == info["series_uid"]].sort_values("position")
        assert mask.dtype == np.uint8 and mask.shape == (len(g), 64, 64)
        assert sops == g["sop"].tolist(), "mask slices in spatial order"
        assert mask.max() < 32
        for z, sop in enumerate(sops):
            if sop not in labels.index:  # the corrupt file
                assert sop == summary["corrupt_file"]["sop_uid"]
                continue
            for c, name in enumerate(SUBTYPES):
                covered = int(np.count_nonzero(mask[z] & (1 << c)))
                assert labels.loc[sop, name] == int(covered >= info["min_pixels"]), (sop, name, covered)


def test_bleeds_span_consecutive_slices(tiny_dataset: Path) -> None:
    summary = _summary(tiny_dataset)
    for info in summary["series"]:
        with np.load(tiny_dataset / "masks" / f"{info['series_uid']}.npz") as npz:
            mask = npz["mask"]
        for c, name in enumerate(SUBTYPES):
            present = (mask & (1 << c)).reshape(len(mask), -1).sum(axis=1) >= info["min_pixels"]
            if not present.any():
                continue
            run = best = 0
            for p in present:
                run = run + 1 if p else 0
                best = max(best, run)
            assert best >= 2, f"{info['series_uid']} {name}: a bleed seen on one slice only"


def test_tilted_geometry(tiny_dataset: Path) -> None:
    summary = _summary(tiny_dataset)
    heads = _headers(tiny_dataset)
    assert summary["tilted_series"]
    for info in summary["series"]:
        g = heads[heads.series == info["series_uid"]].sort_values("position")
        iop = np.array(g["iop"].iloc[0])
        assert all(np.allclose(v, iop) for v in g["iop"])
        assert tilt_from_iop(iop) == pytest.approx(info["tilt_deg"], abs=1e-3)
        if info["tilt_deg"] == 0:
            assert np.allclose(iop, [1, 0, 0, 0, 1, 0])
        # Table motion: the IPPs move along z only, by the table step.
        ipp = np.stack(g["ipp"].to_numpy())
        assert np.allclose(ipp[:, :2], ipp[0, :2], atol=1e-4)
        assert np.allclose(np.diff(ipp[:, 2]), info["table_step"], atol=1e-3)
        # Slice spacing along the normal = step · cos(tilt), within 3–5 mm of table motion.
        step = info["table_step"] * math.cos(math.radians(info["tilt_deg"]))
        assert np.allclose(np.diff(g["position"]), step, atol=1e-3)
        assert 3.0 <= info["table_step"] <= 5.0


def test_geometry_pixel_points_follow_dicom_convention() -> None:
    plan = next(p for p in make_plan(get_preset("tiny"), 0) if p.geometry.tilt_deg != 0)
    g = plan.geometry
    sg = g.slice_geometry(3)
    pts = g.pixel_points(3)
    ipp, row, col = np.array(sg.ipp), np.array(sg.iop[:3]), np.array(sg.iop[3:])
    dr, dc = sg.pixel_spacing
    for i, j in ((0, 0), (5, 17), (63, 2)):
        assert np.allclose(pts[i, j], ipp + j * dc * row + i * dr * col)
    # The head fits in the field of view with a margin: no skull on the outer rows and columns.
    hu, _ = render(plan.head, plan.bleeds, pts)
    assert (hu[2:-2, 2:-2] > 600).any()
    border = np.concatenate([hu[:2].ravel(), hu[-2:].ravel(), hu[:, :2].ravel(), hu[:, -2:].ravel()])
    assert (border < 600).all()


def test_determinism_and_worker_independence(tiny_dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, preset="tiny", seed=0, workers=2, progress=False)
    assert _file_digests(again) == _file_digests(tiny_dataset)
    assert _summary(again) == _summary(tiny_dataset)
    other = tmp_path / "other"
    generate_dataset(other, preset="tiny", seed=1, workers=1, progress=False)
    assert _file_digests(other) != _file_digests(tiny_dataset)
    assert not (
        set(_labels(other / "stage_2_train.csv").index) & set(_labels(tiny_dataset / "stage_2_train.csv").index)
    )


def test_demo_plan_statistics() -> None:
    """The demo preset (planned only, not rendered): ~40–50 % studies with a bleed, every variety present."""
    plans = make_plan(get_preset("demo"), 0)
    train = [p for p in plans if p.split == "train"]
    assert len(train) == 80 and len(plans) == 100
    frac = np.mean([bool(p.bleeds) for p in plans])
    assert 0.38 <= frac <= 0.52
    assert sum(len(p.bleeds) > 1 for p in plans) >= 5
    assert {b.subtype for p in plans for b in p.bleeds} == set(SUBTYPES)
    assert {p.variant_name for p in plans} == {p.variant_name for p in make_plan(get_preset("tiny"), 0)}
    assert all(p.geometry.rows == 256 and 20 <= p.geometry.n_slices <= 28 for p in plans)
    assert sum(p.corrupt_slice is not None for p in plans) == 1


def test_cli(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("x")
    assert main(["synth", str(busy), "--preset", "tiny", "--no-progress", "--workers", "1"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (busy / "precious.txt").exists()

    out = tmp_path / "ds"
    assert main(["synth", str(out), "--preset", "tiny", "--seed", "0", "--no-progress", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "corrupt file" in printed
    # Re-running the same preset and seed skips; nothing temporary is left next to OUT.
    assert main(["synth", str(out), "--preset", "tiny", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "ds"]
    assert _file_digests(out) == _file_digests(tiny_dataset)
