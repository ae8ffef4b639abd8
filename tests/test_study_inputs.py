"""Tests for rsna19.inference.inputs: grouping a messy folder or zip into studies/series, and safe unzipping."""

from __future__ import annotations

import math
import stat
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from rsna19.conversion.series import convert_series
from rsna19.core.errors import UserError
from rsna19.inference.inputs import (
    SelectionRules,
    UnsafeArchiveError,
    ZipLimits,
    collect_studies,
    read_identity,
    safe_extract_zip,
)
from rsna19.io.dicom_write import SliceGeometry, write_ct_dicom
from rsna19.io.index import build_index

# Kaggle-style "ID_..." UIDs (and a lower-case ImageType) are invalid values: pydicom warns when re-saving.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _tilted(deg: float) -> tuple[float, ...]:
    """Axial orientation with the column vector tilted about x by ``deg`` (gantry tilt)."""
    t = math.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))


def _write(
    path: Path,
    *,
    sop: str,
    series: str,
    study: str,
    z: float,
    iop=AXIAL,
    spacing=(0.5, 0.5),
    shape=(16, 16),
    modality: str = "CT",
    extra: dict | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Write one tiny slice; ``extra`` attributes are set and ``drop`` ones deleted by re-saving with pydicom."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hu = np.full(shape, -1024.0)
    hu[4:12, 4:12] = 40.0
    write_ct_dicom(
        path,
        hu,
        SliceGeometry((0.0, 0.0, z), iop, spacing),
        sop_uid=sop,
        series_uid=series,
        study_uid=study,
        patient_id="ID_p" + study[-1],
        instance_number=int(abs(z)) + 1,
        extra={"Modality": modality},
    )
    if extra or drop:
        ds = pydicom.dcmread(path)
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        for key in drop:
            delattr(ds, key)
        ds.save_as(path, enforce_file_format=True)
    return path


def _series(root: Path, folder: str, series: str, study: str, n: int, **kw) -> list[Path]:
    # Shuffled write order and names: selection must order by position, not by name.
    zs = [5.0 * i for i in np.random.default_rng(n).permutation(n)]
    return [
        _write(root / folder / f"x{series}_{k}.dcm", sop=f"{series}_s{int(z)}", series=series, study=study, z=z, **kw)
        for k, z in enumerate(zs)
    ]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """Two studies in nested folders with good, reformatted, MR, localizer, tilted and broken series, and junk."""
    root = tmp_path_factory.mktemp("messy") / "input"
    # Study A: an axial CT (split over two folders), a sagittal reformat, an MR, a localizer, a tilted axial.
    _series(root, "A/ct/part1", "ID_ax", "ID_stA", 3)
    _write(root / "A/ct/part2/late.dcm", sop="ID_ax_late", series="ID_ax", study="ID_stA", z=-5.0)
    _series(root, "A/sag", "ID_sag", "ID_stA", 3, iop=SAGITTAL)
    _series(root, "A/mr", "ID_mr", "ID_stA", 2, modality="MR")
    _series(root, "A/loc", "ID_loc", "ID_stA", 1, extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    _series(root, "A/tilt", "ID_tilt", "ID_stA", 3, iop=_tilted(25.0))
    # Study B, all in one flat folder: a good axial with a file lacking IPP and a duplicated file, a 40° oblique,
    # a series of mixed orientations and one of mixed pixel spacings.
    _series(root, "B", "ID_bx", "ID_stB", 4)
    _write(
        root / "B/nopos.dcm", sop="ID_bx_nopos", series="ID_bx", study="ID_stB", z=50.0, drop=("ImagePositionPatient",)
    )
    (root / "B/copy").mkdir(parents=True)
    (root / "B/copy/dup.dcm").write_bytes((root / "B/xID_bx_0.dcm").read_bytes())
    _series(root, "B", "ID_obl", "ID_stB", 2, iop=_tilted(40.0))
    _write(root / "B/mix1.dcm", sop="ID_mix1", series="ID_mix", study="ID_stB", z=0.0)
    _write(root / "B/mix2.dcm", sop="ID_mix2", series="ID_mix", study="ID_stB", z=5.0, iop=SAGITTAL)
    _write(root / "B/sp1.dcm", sop="ID_sp1", series="ID_sp", study="ID_stB", z=0.0, spacing=(0.5, 0.5))
    _write(root / "B/sp2.dcm", sop="ID_sp2", series="ID_sp", study="ID_stB", z=5.0, spacing=(0.7, 0.7))
    # Junk.
    (root / "README.txt").write_text("not an image\n")
    (root / "A/empty.dcm").write_bytes(b"")
    (root / "A/noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    good = (root / "A/ct/part1/xID_ax_0.dcm").read_bytes()
    (root / "B/cut_header.dcm").write_bytes(good[:300])
    (root / "B/cut_pixels.dcm").write_bytes(good[:-200])
    return root


def _check_messy(found) -> None:
    assert sorted(found.studies) == ["ID_stA", "ID_stB"]
    a, b = found.studies["ID_stA"], found.studies["ID_stB"]

    assert [s.series_uid for s in a.used] == ["ID_ax", "ID_tilt"]
    ax = a.used[0]
    assert ax.sop_uids == ["ID_ax_late", "ID_ax_s0", "ID_ax_s5", "ID_ax_s10"]  # position order across folders
    assert ax.positions == [-5.0, 0.0, 5.0, 10.0]
    assert ax.tilt_deg == pytest.approx(0.0)
    assert all(p.is_file() for p in ax.files)
    assert a.used[1].tilt_deg == pytest.approx(25.0, abs=1e-3)
    reasons = {s.series_uid: s.reason for s in a.skipped}
    assert set(reasons) == {"ID_sag", "ID_mr", "ID_loc"}
    assert reasons["ID_sag"].startswith("not axial: slice normal 90°")
    assert reasons["ID_mr"] == "modality MR, not CT"
    assert "LOCALIZER" in reasons["ID_loc"]
    assert a.problem is None
    # A byte copy of ID_ax_s10 cut short: attributable to its study, rejected by the index's header check.
    assert [(f.path.name, f.reason.split(":")[0]) for f in a.skipped_files] == [("cut_pixels.dcm", "truncated")]

    assert [s.series_uid for s in b.used] == ["ID_bx"]
    assert b.used[0].sop_uids == ["ID_bx_s0", "ID_bx_s5", "ID_bx_s10", "ID_bx_s15"]
    dropped = {f.path.name: f.reason for f in b.skipped_files}
    assert set(dropped) == {"nopos.dcm", "xID_bx_0.dcm"}
    assert dropped["nopos.dcm"] == "no ImagePositionPatient"
    # Byte copies: the first path in sorted order (B/copy/dup.dcm) is kept, the other reported.
    assert dropped["xID_bx_0.dcm"] == "duplicate SOPInstanceUID ID_bx_s15 (also in B/copy/dup.dcm)"
    reasons = {s.series_uid: s.reason for s in b.skipped}
    assert reasons["ID_obl"].startswith("not axial: slice normal 40°")
    assert reasons["ID_mix"] == "mixed orientations within the series"
    assert reasons["ID_sp"] == "mixed pixel spacings within the series"

    junk = {f.path.name: f.reason for f in found.skipped_files}
    assert set(junk) == {"README.txt", "empty.dcm", "noise.bin", "cut_header.dcm"}
    assert junk["empty.dcm"] == "empty file"
    assert junk["README.txt"].startswith("not a DICOM file")
    assert junk["noise.bin"].startswith("not a DICOM file")
    assert junk["cut_header.dcm"].startswith("not a DICOM image (no SOP, series or study UID")


def test_folder_groups_and_reasons(messy, tmp_path):
    found = collect_studies(messy, tmp_path / "work")
    _check_messy(found)
    assert found.root == messy.resolve()
    summary = found.to_dict()
    study_a = summary["studies"]["ID_stA"]
    assert [s["series_uid"] for s in study_a["series_used"]] == ["ID_ax", "ID_tilt"]
    assert {s["series_uid"]: s["reason"] for s in study_a["series_skipped"]}["ID_mr"] == "modality MR, not CT"
    assert {f["path"] for f in summary["files_skipped"]} >= {"README.txt", "A/empty.dcm"}


def test_folder_with_worker_processes_matches(messy, tmp_path):
    one = collect_studies(messy, tmp_path / "w1").to_dict()
    two = collect_studies(messy, tmp_path / "w2", workers=2).to_dict()
    assert one == two


def test_zip_same_result(messy, tmp_path):
    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(messy.rglob("*")):
            zf.write(path, path.relative_to(messy).as_posix())
    work = tmp_path / "work"
    found = collect_studies(archive, work)
    _check_messy(found)
    assert found.source == archive
    assert work.resolve() in found.root.parents  # extracted inside the workdir
    assert found.to_dict()["studies"] == collect_studies(messy, tmp_path / "w2").to_dict()["studies"]


def test_workdir_inside_input_is_not_scanned(messy, tmp_path):
    src = tmp_path / "in"
    _series(src, "s", "ID_one", "ID_st1", 2)
    (src / "work" / "zip-old").mkdir(parents=True)
    (src / "work" / "zip-old" / "stale.dcm").write_bytes((src / "s" / "xID_one_0.dcm").read_bytes())
    found = collect_studies(src, src / "work")
    assert [s.sop_uids for s in found.studies["ID_st1"].used] == [["ID_one_s0", "ID_one_s5"]]
    assert found.skipped_files == [] and found.studies["ID_st1"].skipped_files == []


def test_single_slice_series_policy(tmp_path):
    _write(tmp_path / "in/one.dcm", sop="ID_1", series="ID_s", study="ID_st1", z=0.0)
    assert collect_studies(tmp_path / "in", tmp_path / "w").studies["ID_st1"].used[0].sop_uids == ["ID_1"]
    strict = collect_studies(tmp_path / "in", tmp_path / "w", rules=SelectionRules(min_slices=3))
    study = strict.studies["ID_st1"]
    assert study.skipped[0].reason == "1 slice(s), fewer than 3"
    assert study.problem.startswith("study ID_st1: no usable axial CT series")


def test_missing_path_and_single_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        collect_studies(tmp_path / "nope", tmp_path / "w")
    f = _write(tmp_path / "one.dcm", sop="ID_1", series="ID_s", study="ID_st1", z=0.0)
    assert collect_studies(f, tmp_path / "w").studies["ID_st1"].used[0].files == [f.resolve()]


def test_read_identity(tmp_path):
    f = _write(
        tmp_path / "a.dcm",
        sop="ID_1",
        series="ID_s",
        study="ID_st1",
        z=2.5,
        extra={"ImageType": ["DERIVED", "SECONDARY", "localizer"], "SeriesDescription": "Scout"},
    )
    ident = read_identity(f)
    hints = ident.pop("hints")  # what the series ranking reads (tests/test_series_select.py)
    assert hints["kernel"] == "" and hints["n_temporal"] == 0
    assert ident == {
        "sop_uid": "ID_1",
        "series_uid": "ID_s",
        "study_uid": "ID_st1",
        "patient_id": "ID_p1",
        "modality": "CT",
        "image_type": ("DERIVED", "SECONDARY", "LOCALIZER"),
        "description": "Scout",
    }
    g = _write(tmp_path / "b.dcm", sop="ID_2", series="ID_s", study="ID_st1", z=0.0, drop=("StudyInstanceUID",))
    assert read_identity(g) == "no StudyInstanceUID"
    # No Modality element: a CT SOP class still counts as CT (as in the index).
    h = _write(
        tmp_path / "c.dcm",
        sop="ID_3",
        series="ID_s",
        study="ID_st1",
        z=0.0,
        extra={"SOPClassUID": CTImageStorage},
        drop=("Modality",),
    )
    assert read_identity(h)["modality"] == "CT"


# ----------------------------------------------------------------------------------------------------------------
# Malicious archives


def _zip_with(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("members", "limits", "match"),
    [
        ([("ok.txt", b"x"), ("../evil.txt", b"pwned")], ZipLimits(), r"'\.\.' component"),
        ([("a/../../evil.txt", b"pwned")], ZipLimits(), r"'\.\.' component"),
        ([("..\\evil.txt", b"pwned")], ZipLimits(), r"'\.\.' component"),
        ([("/tmp/evil.txt", b"pwned")], ZipLimits(), "absolute path"),
        ([("C:/evil.txt", b"pwned")], ZipLimits(), "absolute path"),
        ([(_symlink_info("link"), b"/etc/passwd"), ("link/evil.txt", b"pwned")], ZipLimits(), "symbolic link"),
        ([(f"f{i}.txt", b"x") for i in range(6)], ZipLimits(max_members=5), "6 members, more than the limit of 5"),
        ([("big.bin", b"\0" * 5000)], ZipLimits(max_total_bytes=4000), "5000 bytes uncompressed"),
        ([("bomb.bin", b"\0" * (2 << 20))], ZipLimits(), "compression ratio"),
    ],
    ids=["dotdot", "nested-dotdot", "backslash", "absolute", "drive", "symlink", "members", "size", "ratio"],
)
def test_malicious_zip_rejected(tmp_path, members, limits, match):
    sandbox = tmp_path / "sandbox"
    work = sandbox / "deep" / "work"
    archive = _zip_with(tmp_path / "bad.zip", members)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match=match):
        collect_studies(archive, work, limits=limits)
    # Nothing written anywhere: no evil file, no leftover extraction folder.
    after = set(tmp_path.rglob("*"))
    assert {p for p in after - before if not p.is_dir()} == set()
    assert not any(work.glob("zip-*"))


def test_broken_zip_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(UnsafeArchiveError, match="not a readable zip"):
        safe_extract_zip(bad, tmp_path / "w")


def test_safe_extract_keeps_tree(tmp_path):
    archive = _zip_with(tmp_path / "ok.zip", [("a/b/c.txt", b"hello"), ("a/d/", b""), ("e.txt", b"e")])
    dest = safe_extract_zip(archive, tmp_path / "w")
    assert dest.parent == (tmp_path / "w").resolve()
    assert (dest / "a/b/c.txt").read_bytes() == b"hello" and (dest / "a/d").is_dir() and (dest / "e.txt").is_file()


def test_index_convert_and_predict_study_keep_the_same_slices(tmp_path):
    """One DICOM reading rule (rsna19.io.dicom) for training and new studies: a series whose orientation jitters at
    the third decimal, with a misfiled slice of a coronal reformat and a stray localizer under its series UID,
    keeps the same slices in the same order and drops the same files through `index` + `convert` as through
    predict-study's input collection (whose slices then convert without another drop)."""
    root = tmp_path / "in"
    jitter = [0.0, 0.002, -0.003, 0.001, 0.004, -0.002, 0.003, -0.001]
    for k, j in enumerate(jitter):
        iop = (1.0, j, 0.0, 0.0, 1.0, -j / 2)
        _write(root / f"s{k}.dcm", sop=f"ID_s{k}", series="ID_ser", study="ID_st", z=5.0 * k, iop=iop)
    _write(root / "misfiled.dcm", sop="ID_mis", series="ID_ser", study="ID_st", z=12.0, iop=(1, 0, 0, 0, 0, -1))
    localizer = {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    _write(root / "loc.dcm", sop="ID_loc", series="ID_ser", study="ID_st", z=0.0, iop=SAGITTAL, extra=localizer)
    want = [f"ID_s{k}" for k in range(len(jitter))]

    index = build_index([root], out=tmp_path / "index.parquet", workers=1, progress=False)
    assert set(index["sop_uid"]) == {*want, "ID_mis", "ID_loc"}  # the index lists every readable slice
    _, meta = convert_series(index)
    assert meta["sop_uids"] == want
    assert {Path(d["path"]).name for d in meta["dropped"]} == {"misfiled.dcm", "loc.dcm"}

    found = collect_studies(root, tmp_path / "work")
    study = found.studies["ID_st"]
    assert [s.series_uid for s in study.used] == ["ID_ser"]
    assert study.used[0].sop_uids == want
    assert study.used[0].positions == pytest.approx(meta["positions"], abs=1e-6)
    assert {f.path.name for f in study.skipped_files} == {"misfiled.dcm", "loc.dcm"}
    _, again = convert_series(study.used[0].slice_refs())
    assert again["sop_uids"] == want and again["dropped"] == []
    assert again["positions"] == meta["positions"] and again["tilt_deg"] == meta["tilt_deg"]
