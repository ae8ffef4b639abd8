"""`rsna19 index`: header reading, bad-file reasons, geometry, slice order, labels and splits on real files."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from rsna19.cli import main
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.io.dicom_header import read_header
from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom
from rsna19.io.index import INDEX_COLUMNS, build_index, errors_path

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # Kaggle-style UIDs

SIZE = 16  # pixels: tiny images keep the test fast; the header logic does not care


@dataclass
class Series:
    uid: str
    tilt_deg: float
    z: list[float]  # IPP z of each slice, in writing order (shuffled on purpose)
    sops: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def _hex(text: str, n: int) -> str:
    return hashlib.md5(text.encode()).hexdigest()[:n]


def _write_series(
    folders: list[Path], s: Series, study: str, patient: str, variant: StorageVariant | None = None
) -> None:
    t = math.radians(s.tilt_deg)
    iop = (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))
    for k, z in enumerate(s.z):
        sop = f"ID_{_hex(f'{s.uid}/{k}', 9)}"
        folder = folders[k % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ID_{_hex(sop, 8)}.dcm"  # file names unrelated to the order
        write_ct_dicom(
            path,
            np.full((SIZE, SIZE), 30.0),
            SliceGeometry(ipp=(-5.0, -7.0, z), iop=iop, pixel_spacing=(0.5, 0.6)),
            sop_uid=sop,
            series_uid=s.uid,
            study_uid=study,
            patient_id=patient,
            instance_number=100 - k,  # InstanceNumber deliberately disagrees with space
            variant=variant or StorageVariant(),
            extra={"WindowCenter": [36.0, 36.0], "WindowWidth": [80.0, 80.0]},
        )
        s.sops.append(sop)
        s.paths.append(path)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    ds = pydicom.dcmread(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Kaggle-style "ID_…" UIDs are not valid UI values
        edit(ds)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@dataclass
class Layout:
    root: Path
    straight: Series
    tilted: Series
    test: Series
    bad: dict[str, tuple[Path, str]]  # name -> (path, expected reason prefix)
    labels: Path


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    root = tmp_path / "data"
    train = root / "stage_2_train"
    straight = Series("ID_series0a", 0.0, [15.0, 0.0, 10.0, 5.0, 20.0])
    tilted = Series("ID_series0b", 20.0, [3.0, 9.0, -3.0, 6.0])
    test = Series("ID_series0c", 0.0, [2.5, -2.5, 0.0])
    # Nested folders, and the two train series mixed in the same folders.
    _write_series([train / "a", train / "a" / "deeper"], straight, "ID_study0a", "ID_patient0a")
    _write_series([train / "a", train / "b"], tilted, "ID_study0b", "ID_patient0a", StorageVariant(wrap12=True))
    _write_series([root / "stage_2_test"], test, "ID_study0c", "ID_patient0c", StorageVariant(signed=False))

    good = straight.paths[0]
    raw = good.read_bytes()
    bad_dir = train / "bad"
    bad_dir.mkdir()
    bad: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (bad_dir / name).write_bytes(data)
        bad[name] = (bad_dir / name, reason)

    put("truncated_pixels.dcm", raw[: len(raw) - 100], "truncated: PixelData has")
    put("truncated_header.dcm", raw[:400], "truncated")
    put("random.dcm", np.random.default_rng(0).bytes(3000), "not DICOM")
    put("empty.dcm", b"", "empty file")
    (root / "stage_2_test" / "README.txt").write_text("these are test images\n")
    bad["README.txt"] = (root / "stage_2_test" / "README.txt", "not DICOM")
    (train / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(200))
    bad[".DS_Store"] = (train / ".DS_Store", "not DICOM")

    def edit(name: str, fn, reason: str) -> None:
        def wrapped(ds: pydicom.Dataset) -> None:
            ds.SOPInstanceUID = f"ID_bad{len(bad):05d}"
            fn(ds)

        bad[name] = (_rewrite(good, bad_dir / name, wrapped), reason)

    edit("mr.dcm", lambda ds: setattr(ds, "Modality", "MR"), "not CT: Modality=MR")
    edit("no_pixels.dcm", lambda ds: ds.__delitem__("PixelData"), "no pixel data")
    edit("no_ipp.dcm", lambda ds: ds.__delitem__("ImagePositionPatient"), "no ImagePositionPatient")
    edit("no_iop.dcm", lambda ds: ds.__delitem__("ImageOrientationPatient"), "no ImageOrientationPatient")
    edit(
        "short_pixels.dcm",
        lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]),
        f"pixel buffer 100 bytes, expected {SIZE * SIZE * 2} ({SIZE}×{SIZE}×16 bit)",
    )
    # Same SOP as a good file, in a path that sorts after it: the first by path is kept.
    dup = _rewrite(good, train / "zz_copy.dcm", lambda ds: None)
    bad["zz_copy.dcm"] = (dup, f"duplicate SOPInstanceUID {straight.sops[0]}")

    # Labels: the straight series positive for subdural on its first two written slices; a duplicate row with
    # a different value (the first one wins); a label of a SOP that has no file.
    rows = []
    for k, sop in enumerate(straight.sops + tilted.sops):
        for c in CLASSES:
            rows.append((f"{sop}_{c}", int(k < 2 and c in ("subdural", "any"))))
    rows.insert(6, (f"{straight.sops[0]}_subdural", 0))  # duplicate after the original: conflicts, ignored
    rows.append((f"{straight.sops[1]}_any", 1))  # duplicate, same value
    rows += [(f"ID_0rphan0000_{c}", 0) for c in CLASSES]
    labels = tmp_path / "stage_2_train.csv"
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(labels, index=False)
    return Layout(root, straight, tilted, test, bad, labels)


def _check_order(df: pd.DataFrame, s: Series) -> None:
    rows = df[df["series_uid"] == s.uid]
    expected = [s.sops[k] for k in np.argsort(s.z)]
    assert rows["sop_uid"].tolist() == expected
    assert rows["slice_idx"].tolist() == list(range(len(s.z)))
    assert (rows["n_slices"] == len(s.z)).all()
    assert np.all(np.diff(rows["position"].to_numpy()) > 0)


def test_index_good_and_bad_files(layout: Layout, tmp_path: Path) -> None:
    out = tmp_path / "out" / "index.parquet"
    df = build_index([layout.root], labels_csv=layout.labels, out=out, workers=1, progress=False)
    assert tuple(df.columns) == INDEX_COLUMNS
    on_disk = pd.read_parquet(out)
    pd.testing.assert_frame_equal(on_disk, df, check_dtype=False)

    # Every good file is there, once.
    good = {str(p.resolve()) for s in (layout.straight, layout.tilted, layout.test) for p in s.paths}
    assert set(df["path"]) == good and len(df) == len(good)
    assert df["sop_uid"].is_unique

    # Every bad file is reported with its reason, and nothing else.
    errors = pd.read_csv(errors_path(out))
    assert list(errors.columns) == ["path", "reason"]
    reasons = dict(zip(errors["path"], errors["reason"]))
    assert set(reasons) == {str(p.resolve()) for p, _ in layout.bad.values()}
    for name, (path, reason) in layout.bad.items():
        assert reasons[str(path.resolve())].startswith(reason), (name, reasons[str(path.resolve())])
        assert "\n" not in reasons[str(path.resolve())]

    # Slice order by position (not InstanceNumber, not file name), ties none here.
    for s in (layout.straight, layout.tilted, layout.test):
        _check_order(df, s)
    assert list(df["series_uid"]) == sorted(df["series_uid"])

    # Geometry: straight series position = z; tilted series tilt and position = y·sinθ + z·cosθ.
    straight = df[df["series_uid"] == layout.straight.uid]
    np.testing.assert_allclose(straight["position"], sorted(layout.straight.z), atol=1e-5)
    np.testing.assert_allclose(straight["tilt_deg"], 0.0, atol=1e-6)
    tilted = df[df["series_uid"] == layout.tilted.uid]
    t = math.radians(20.0)
    np.testing.assert_allclose(tilted["tilt_deg"], 20.0, atol=1e-5)
    np.testing.assert_allclose(
        tilted["position"], -7.0 * math.sin(t) + np.sort(layout.tilted.z) * math.cos(t), atol=1e-5
    )
    np.testing.assert_allclose(tilted[["iop_3", "iop_4", "iop_5"]].iloc[0], [0, math.cos(t), -math.sin(t)], atol=1e-7)

    # Header values.
    row = straight.iloc[0]
    assert (row["rows"], row["cols"], row["bits_allocated"], row["bits_stored"]) == (SIZE, SIZE, 16, 16)
    assert (row["pixel_spacing_row"], row["pixel_spacing_col"]) == (0.5, 0.6)
    assert (row["ipp_x"], row["ipp_y"]) == (-5.0, -7.0)
    assert (row["window_center"], row["window_width"]) == (36.0, 80.0)  # first of the multi-valued tags
    assert (row["rescale_slope"], row["rescale_intercept"], row["pixel_representation"]) == (1.0, -1024.0, 1)
    assert row["patient_id"] == "ID_patient0a" and row["study_uid"] == "ID_study0a"
    assert row["transfer_syntax"] == "1.2.840.10008.1.2.1" and row["slice_thickness"] == 5.0
    wrap = tilted.iloc[0]
    assert (wrap["bits_stored"], wrap["pixel_representation"], wrap["rescale_intercept"]) == (12, 0, 0.0)
    assert df["instance_number"].between(96, 100).all()

    # Splits and labels: train by folder and labels, test otherwise; the first of duplicate label rows wins.
    assert set(df.loc[df["series_uid"] == layout.test.uid, "split"]) == {"test"}
    assert set(df.loc[df["series_uid"] != layout.test.uid, "split"]) == {"train"}
    assert df.loc[df["split"] == "test", list(CLASSES)].isna().all().all()
    lab = df.set_index("sop_uid")
    for k, sop in enumerate(layout.straight.sops):
        expected = [float(k < 2 and c in ("subdural", "any")) for c in CLASSES]
        assert lab.loc[sop, list(CLASSES)].tolist() == expected
    assert lab.loc[layout.tilted.sops[0], "any"] == 0.0


def test_index_pool_matches_single_process(layout: Layout, tmp_path: Path) -> None:
    one = build_index([layout.root], layout.labels, out=tmp_path / "1" / "index.parquet", workers=1, progress=False)
    two = build_index([layout.root], layout.labels, out=tmp_path / "2" / "index.parquet", workers=2, progress=False)
    pd.testing.assert_frame_equal(one, two)
    e1, e2 = (pd.read_csv(tmp_path / d / "index_errors.csv") for d in ("1", "2"))
    pd.testing.assert_frame_equal(e1, e2)


def test_split_from_labels_and_no_labels(layout: Layout, tmp_path: Path) -> None:
    # Without labels, only the folder decides; a labelled SOP outside a train folder is train.
    df = build_index([layout.root], out=tmp_path / "index.parquet", progress=False)
    assert df[list(CLASSES)].isna().all().all()
    assert set(df.loc[df["series_uid"] == layout.test.uid, "split"]) == {"test"}
    test_labels = tmp_path / "labels.csv"
    sop = layout.test.sops[0]
    pd.DataFrame({"ID": [f"{sop}_{c}" for c in CLASSES], "Label": 1}).to_csv(test_labels, index=False)
    df = build_index([layout.root / "stage_2_test"], test_labels, out=tmp_path / "t.parquet", progress=False)
    assert df.set_index("sop_uid").loc[sop, "split"] == "train"
    assert (df["split"] == "test").sum() == len(layout.test.sops) - 1


def test_restart_and_cli(layout: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "index.parquet"
    code = main(["index", str(layout.root / "stage_2_test"), "--out", str(out), "--workers", "1", "--no-progress"])
    assert code == 0 and out.is_file() and errors_path(out).is_file()
    assert "3 slices in 1 series" in capsys.readouterr().out
    # A finished output is not rebuilt unless asked.
    mtime = out.stat().st_mtime_ns
    build_index([layout.root], out=out, progress=False)
    assert out.stat().st_mtime_ns == mtime
    df = build_index([layout.root], out=out, progress=False, overwrite=True)
    assert len(df) == 12
    assert main(["index", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.parquet")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files"):
        build_index([tmp_path / "empty"], out=tmp_path / "index.parquet", progress=False)


def test_header_variants(tmp_path: Path) -> None:
    src = tmp_path / "src.dcm"
    write_ct_dicom(
        src,
        np.zeros((SIZE, SIZE)),
        SliceGeometry((0, 0, 0), (1, 0, 0, 0, 1, 0), (1, 1)),
        sop_uid="ID_000000001",
        series_uid="ID_s",
        study_uid="ID_t",
        patient_id="ID_p",
        instance_number=1,
    )
    # Implicit VR without preamble or file meta (old writers): parsed with force.
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    with_meta = read_header(bare)  # implicit VR with a file meta: the fast parser's implicit branch
    assert isinstance(with_meta, dict) and with_meta == read_header(bare, fast=False)
    raw = bare.read_bytes()
    assert raw[128:132] == b"DICM"
    meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) group length value
    bare.write_bytes(raw[144 + meta_len :])
    row = read_header(bare)
    assert isinstance(row, dict), row
    assert row["transfer_syntax"] == ImplicitVRLittleEndian and row["rows"] == SIZE

    # Encapsulated pixel data: the buffer size check is skipped, not failed.
    ds = pydicom.dcmread(src)
    ds.PixelData = encapsulate([b"\x00" * 10])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle, enforce_file_format=True)
    row = read_header(rle)
    assert isinstance(row, dict), row
    assert row["transfer_syntax"] == RLELossless and row == read_header(rle, fast=False)

    # Degenerate orientation, garbage numbers, not CT without modality.
    def variant(name: str, fn) -> str | dict:
        d = pydicom.dcmread(src)
        fn(d)
        d.save_as(tmp_path / name, enforce_file_format=True)
        return read_header(tmp_path / name)

    assert variant("iop0.dcm", lambda d: setattr(d, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0])).startswith(
        "bad ImageOrientationPatient"
    )
    assert variant("ipp2.dcm", lambda d: setattr(d, "ImagePositionPatient", [1, 2])).startswith(
        "bad ImagePositionPatient"
    )
    assert variant("nomod.dcm", lambda d: d.__delitem__("Modality")) == "not CT: no Modality"
    assert read_header(tmp_path / "missing.dcm").startswith("unreadable")
    for n in (1, 60, 131, 133, 200, 300):  # truncated anywhere in the header never raises
        cut = tmp_path / f"cut{n}.dcm"
        cut.write_bytes(src.read_bytes()[:n])
        assert isinstance(read_header(cut), str) and isinstance(read_header(cut, fast=False), str)


@pytest.fixture
def tiny_root(tiny_dataset: Path) -> Path:
    """The shared tiny synthetic dataset (tests/conftest.py); read-only."""
    return Path(tiny_dataset)


def test_tiny_synthetic_dataset(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index" / "index.parquet"
    df = build_index(
        [tiny_root / "stage_2_train", tiny_root / "stage_2_test"],
        tiny_root / "stage_2_train.csv",
        out,
        progress=False,
    )
    errors = pd.read_csv(errors_path(out))
    assert len(errors) == 1, errors
    assert Path(errors["path"][0]).parent.name == "stage_2_train" and errors["reason"][0].startswith("truncated")
    ids = pd.read_csv(tiny_root / "stage_2_train.csv")["ID"]
    train_sops = set(ids.str.rsplit("_", n=1).str[0])
    train = df[df["split"] == "train"]
    assert set(train["sop_uid"]) == train_sops  # the corrupt file has no csv rows
    assert train[list(CLASSES)].notna().all().all()
    sample = pd.read_csv(tiny_root / "stage_2_sample_submission.csv")["ID"]
    assert set(df.loc[df["split"] == "test", "sop_uid"]) == set(sample.str.rsplit("_", n=1).str[0])
    # Slice counts per series match the masks written by the generator (the corrupt slice is missing here).
    for series_uid, group in df.groupby("series_uid"):
        mask_sops = np.load(tiny_root / "masks" / f"{series_uid}.npz")["sop_uids"].tolist()
        assert group["sop_uid"].tolist() == [s for s in mask_sops if s in set(group["sop_uid"])]
        assert len(mask_sops) - len(group) in (0, 1)
        assert (group["n_slices"] == len(group)).all()


def test_fast_parser_matches_dcmread(layout: Layout) -> None:
    files = [p for p in layout.root.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        fast, slow = read_header(path), read_header(path, fast=False)
        if isinstance(slow, dict):
            assert fast == slow, path
        else:
            assert isinstance(fast, str) and fast.split(":")[0] == slow.split(":")[0], (path, fast, slow)


def test_mutated_files_never_raise(layout: Layout) -> None:
    raw = bytearray(layout.straight.paths[1].read_bytes()[:2000])  # the header and some pixels
    rng = np.random.default_rng(0)
    mutant = layout.root / "mutant.dcm"
    for _ in range(60):
        data = bytearray(raw)
        for pos in rng.integers(0, 700, size=int(rng.integers(1, 6))):  # flip bytes in the header
            data[pos] = int(rng.integers(0, 256))
        mutant.write_bytes(bytes(data[: int(rng.integers(100, len(data)))]))
        for fast in (True, False):
            out = read_header(mutant, fast=fast)
            assert isinstance(out, str | dict)
            if isinstance(out, str):
                assert out and "\n" not in out
