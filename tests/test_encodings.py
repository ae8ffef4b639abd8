"""Every common transfer syntax and multi-frame Enhanced CT, through the real read paths: index → convert, and
predict-study's input collection.

Each test series is written with the project's DICOM writer and transcoded by the test itself: pydicom encodes
implicit VR, big endian, deflate, RLE, JPEG-LS and JPEG 2000; imagecodecs (libjpeg-turbo) encodes the JPEG
family (baseline 8 bit, extended 12 bit, lossless process 14 and SV1), which no pydicom encoder writes. Real
files encoded by other software come from pydicom's bundled test data (offline, inside the wheel).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pydicom
import pytest
from enhanced import write_enhanced_ct_dicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from rsna19.conversion.series import convert_series
from rsna19.inference.inputs import collect_studies
from rsna19.io.dicom_header import read_header, read_slice_headers
from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom
from rsna19.io.hu import decode_stored, decoder_problem
from rsna19.io.index import build_index
from rsna19.tools.doctor import check_dicom

SIZE, N = 32, 3
STUDY = "1.2.826.0.1.3680043.10.1226.9"
SIGNED = StorageVariant()  # int16, intercept −1024
U12 = StorageVariant(signed=False, bits_stored=12)  # uint16 holding 12 bits, intercept −1024


def _phantom(k: int) -> np.ndarray:
    """(SIZE, SIZE) integer HU: air, a 1200 HU skull ring, brain with a gentle texture (k shifts it)."""
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(x, y) / (SIZE / 2)
    hu = np.where(r < 0.85, 35.0 + 5 * k + 15 * np.sin(x / 3.0 + k), -1000.0)
    hu = np.where((r >= 0.7) & (r < 0.85), 1200.0, hu)
    return np.rint(hu)


def _geometry(k: int) -> SliceGeometry:
    return SliceGeometry((-8.0, -8.0, 5.0 * k), (1, 0, 0, 0, 1, 0), (0.5, 0.5), 5.0)


# --------------------------------------------------------------------------------------------- transcoders


def _native(syntax: str):
    def go(ds: pydicom.Dataset) -> None:
        if syntax == ExplicitVRBigEndian:
            ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
            ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = syntax  # pydicom writes (and deflates) as the meta says

    return go


def _compress(syntax: str, **kwargs):
    def go(ds: pydicom.Dataset) -> None:
        ds.compress(syntax, **kwargs)

    return go


def _jpeg(syntax: str, **kwargs):
    """Encode each frame with imagecodecs' libjpeg-turbo and encapsulate it."""

    def go(ds: pydicom.Dataset) -> None:
        stored = ds.pixel_array
        frames = stored[None] if stored.ndim == 2 else stored
        if syntax == JPEGBaseline8Bit:  # 8-bit CT: HU = 16 × stored − 1024
            hu = frames.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            frames = np.clip(np.rint((hu + 1024) / 16), 0, 255).astype(np.uint8)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.RescaleSlope, ds.RescaleIntercept = "16", "-1024"
        bits = int(ds.BitsStored)
        cells = frames.view(np.uint16) if frames.dtype == np.int16 else frames
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(f, bitspersample=bits, **kwargs) for f in cells])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax

    return go


@dataclass(frozen=True)
class Case:
    name: str
    syntax: str
    transcode: object
    variant: StorageVariant = SIGNED
    max_err: float = 0.0  # largest |HU difference| allowed (0: lossless)
    mean_err: float = 0.0


CASES = [
    Case("explicit_le", ExplicitVRLittleEndian, None),
    Case("implicit_le", ImplicitVRLittleEndian, _native(ImplicitVRLittleEndian)),
    Case("big_endian", ExplicitVRBigEndian, _native(ExplicitVRBigEndian)),
    Case("deflated", DeflatedExplicitVRLittleEndian, _native(DeflatedExplicitVRLittleEndian)),
    Case("rle", RLELossless, _compress(RLELossless)),
    Case("jpeg_baseline", JPEGBaseline8Bit, _jpeg(JPEGBaseline8Bit, level=95), max_err=200, mean_err=25),
    Case("jpeg_extended12", JPEGExtended12Bit, _jpeg(JPEGExtended12Bit, level=95), U12, max_err=200, mean_err=15),
    Case("jpeg_lossless57", JPEGLossless, _jpeg(JPEGLossless, lossless=True, predictor=6), U12),
    Case("jpeg_lossless70", JPEGLosslessSV1, _jpeg(JPEGLosslessSV1, lossless=True, predictor=1)),
    Case("jpegls", JPEGLSLossless, _compress(JPEGLSLossless)),
    Case("jpegls_near", JPEGLSNearLossless, _compress(JPEGLSNearLossless, jls_error=2), max_err=2, mean_err=2),
    Case("j2k_lossless", JPEG2000Lossless, _compress(JPEG2000Lossless)),
    Case("j2k_lossy", JPEG2000, _compress(JPEG2000, j2k_psnr=[75]), max_err=100, mean_err=15),
]


def write_case(folder: Path, case: Case, series: str) -> list[Path]:
    """N slices of the phantom as one series, transcoded to ``case.syntax``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(N):
        path = folder / f"{k}.dcm"
        write_ct_dicom(
            path,
            _phantom(k),
            _geometry(k),
            sop_uid=f"{series}.{k + 1}",
            series_uid=series,
            study_uid=STUDY,
            patient_id="P1",
            instance_number=k + 1,
            variant=case.variant,
        )
        if case.transcode is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                case.transcode(ds)
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _expected() -> np.ndarray:
    return np.stack([_phantom(k) for k in range(N)]).astype(np.int16)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, dict[str, str], pd.DataFrame]:
    """Every case as its own series under one folder, and the index of that folder."""
    root = tmp_path_factory.mktemp("encodings")
    series = {}
    for i, case in enumerate(CASES):
        uid = f"{STUDY}.{i + 1}"
        write_case(root / "dicom" / case.name, case, uid)
        series[case.name] = uid
    index = build_index([root / "dicom"], out=root / "index.parquet", workers=1, progress=False)
    return root, series, index


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_index_and_convert_read_every_syntax(encoded, case: Case) -> None:
    root, series, index = encoded
    errors = pd.read_csv(root / "index_errors.csv")
    assert errors.empty, errors.to_dict("records")
    rows = index[index["series_uid"] == series[case.name]]
    assert len(rows) == N and set(rows["transfer_syntax"]) == {case.syntax}
    assert (rows["frame"] == 0).all()
    assert decoder_problem(case.syntax) is None
    volume, meta = convert_series(rows, crop=None)
    assert meta["dropped"] == [] and volume.shape == (N, SIZE, SIZE)
    diff = np.abs(volume.astype(np.int32) - _expected())
    if case.max_err == 0:
        assert diff.max() == 0
    else:
        assert diff.max() <= case.max_err and diff.mean() <= case.mean_err, (diff.max(), diff.mean())


def test_predict_study_reader_keeps_every_syntax(encoded, tmp_path) -> None:
    root, series, _ = encoded
    inputs = collect_studies(root / "dicom", tmp_path / "work")
    assert inputs.skipped_files == []
    study = inputs.studies[STUDY]
    assert study.skipped == [] and study.skipped_files == []
    assert {s.series_uid: len(s.files) for s in study.used} == {uid: N for uid in series.values()}
    lossless = next(s for s in study.used if s.series_uid == series["jpeg_lossless70"])
    volume, _ = convert_series(lossless.slice_refs(), crop=None)
    np.testing.assert_array_equal(volume, _expected())


@pytest.mark.parametrize(
    ("encoded_file", "plain_file"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("MR_small_implicit.dcm", "MR_small.dcm"),
        ("JPGExtended.dcm", None),
        ("JPEG-lossy.dcm", None),
        ("JPEGLSNearLossless_16.dcm", None),
        ("693_J2KI.dcm", None),
        ("image_dfl.dcm", None),
    ],
)
def test_files_encoded_by_other_software_decode(encoded_file: str, plain_file: str | None) -> None:
    """pydicom's bundled files (other encoders): lossless ones equal their uncompressed original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(encoded_file))
        stored = decode_stored(ds)
        assert stored.shape[0] == int(ds.get("NumberOfFrames") or 1)
        assert stored.shape[1:3] == (ds.Rows, ds.Columns)
        if plain_file is not None:
            np.testing.assert_array_equal(stored[0], pydicom.dcmread(get_testdata_file(plain_file)).pixel_array)
        if encoded_file in (
            "JPGExtended.dcm",
            "JPEG-lossy.dcm",
        ):  # 12-bit lossy: decoded values stay within 12 bits, not all zero
            assert 0 <= stored.min() < stored.max() < 4096


# --------------------------------------------------------------------------------------------- multi-frame


def _write_enhanced(path: Path, series: str, *, shared_geometry: bool = True, syntax: str | None = None) -> None:
    # Per-frame rescale: frames use different storage conventions, which only the per-frame groups can tell.
    variants = [SIGNED, StorageVariant(intercept=-1000.0), StorageVariant(intercept=-2000.0)]
    write_enhanced_ct_dicom(
        path,
        _expected()[::-1],
        [_geometry(k) for k in range(N)][::-1],  # frames in reverse spatial order: order comes from positions
        sop_uid=f"{series}.1",
        series_uid=series,
        study_uid=STUDY,
        patient_id="P1",
        variants=variants[::-1],
        shared_geometry=shared_geometry,
    )
    if syntax is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            _jpeg(syntax, lossless=True, predictor=1)(ds)
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
    # The phantom was written reversed: frame f holds slice N − f.


@pytest.mark.parametrize(
    ("shared", "syntax"), [(True, None), (False, None), (True, JPEGLosslessSV1)], ids=["shared", "per_frame", "jpeg"]
)
def test_enhanced_ct_gives_the_single_frame_volume(tmp_path, shared: bool, syntax: str | None) -> None:
    single = f"{STUDY}.100"
    multi = f"{STUDY}.200"
    write_case(tmp_path / "dicom" / "single", CASES[0], single)
    (tmp_path / "dicom" / "multi").mkdir()
    mf = tmp_path / "dicom" / "multi" / "enhanced.dcm"
    _write_enhanced(mf, multi, shared_geometry=shared, syntax=syntax)

    index = build_index([tmp_path / "dicom"], out=tmp_path / "index.parquet", workers=1, progress=False)
    frames = index[index["series_uid"] == multi]
    assert sorted(frames["frame"]) == [1, 2, 3] and set(frames["path"]) == {str(mf)}
    assert sorted(frames["sop_uid"]) == [f"{multi}.1.f{f}" for f in (1, 2, 3)]
    ref = index[index["series_uid"] == single]
    np.testing.assert_allclose(np.sort(frames["position"]), np.sort(ref["position"]))
    assert (frames["slice_thickness"] == 5.0).all() and (frames["pixel_spacing_row"] == 0.5).all()
    assert sorted(frames["rescale_intercept"]) == [-2000.0, -1024.0, -1000.0]

    volume, meta = convert_series(frames, crop=None)
    expected, _ = convert_series(ref, crop=None)
    np.testing.assert_array_equal(volume, expected)
    np.testing.assert_array_equal(volume, _expected())
    # Slice order comes from the positions: frame 3 is the lowest slice.
    assert meta["sop_uids"] == [f"{multi}.1.f{f}" for f in (3, 2, 1)]
    assert meta["positions"] == [0.0, 5.0, 10.0] and meta["spacing"][0] == 5.0

    # predict-study: the file is expanded into its frames; a bare path converts to all of them.
    inputs = collect_studies(tmp_path / "dicom", tmp_path / "work")
    series = next(s for s in inputs.studies[STUDY].used if s.series_uid == multi)
    assert series.sop_uids == meta["sop_uids"] and series.frames == [3, 2, 1]
    assert series.to_dict()["n_files"] == 1
    np.testing.assert_array_equal(convert_series(series.slice_refs(), crop=None)[0], expected)
    np.testing.assert_array_equal(convert_series([str(f) for f in series.files], crop=None)[0], expected)


def test_enhanced_ct_without_frame_positions_is_refused_with_the_frame(tmp_path) -> None:
    path = tmp_path / "mf.dcm"
    _write_enhanced(path, f"{STUDY}.300")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
        ds.save_as(path, enforce_file_format=True)
    assert read_slice_headers(path) == "frame 2 of 3: no ImagePositionPatient"
    assert read_header(path) == "frame 2 of 3: no ImagePositionPatient"


# --------------------------------------------------------------------------------------------- no decoder

_NO_IMAGECODECS = """
import json, sys
sys.modules["imagecodecs"] = None  # as if imagecodecs were not installed
from pydicom.uid import JPEGLosslessSV1
from rsna19.conversion.series import convert_series
from rsna19.inference.inputs import collect_studies
from rsna19.io.hu import decoder_problem
good, bad = sys.argv[1], sys.argv[2]
paths = [str(p) for p in sorted(__import__("pathlib").Path(good).glob("*.dcm"))]
bad_paths = [str(p) for p in sorted(__import__("pathlib").Path(bad).glob("*.dcm"))]
volume, meta = convert_series(paths + bad_paths, crop=None)
inputs = collect_studies(sys.argv[3], sys.argv[4])
print(json.dumps({
    "problem": decoder_problem(JPEGLosslessSV1),
    "shape": list(volume.shape),
    "dropped": meta["dropped"],
    "skipped": [{"path": str(f.path), "reason": f.reason} for s in inputs.studies.values() for f in s.skipped_files],
    "used": [len(s.files) for st in inputs.studies.values() for s in st.used],
}))
"""


def test_missing_decoder_names_file_syntax_and_package(tmp_path) -> None:
    """Without imagecodecs, JPEG Lossless files are reported (file, syntax, what to install); the rest goes on."""
    good = write_case(tmp_path / "dicom" / "good", CASES[0], f"{STUDY}.400")
    bad = write_case(tmp_path / "dicom" / "bad", CASES[8], f"{STUDY}.400")  # same series, JPEG Lossless SV1
    for k, p in enumerate(bad):  # other positions, so that only the decoder is missing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p)
            ds.SOPInstanceUID = f"{STUDY}.400.9{k}"
            ds.ImagePositionPatient = [-8.0, -8.0, 100.0 + 5 * k]
            ds.save_as(p, enforce_file_format=True)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_IMAGECODECS,
            str(good[0].parent),
            str(bad[0].parent),
            str(tmp_path / "dicom"),
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    want = "no decoder installed for transfer syntax JPEG Lossless, Non-Hierarchical, First-Order Prediction"
    assert got["problem"].startswith(want) and got["problem"].endswith("pip install imagecodecs")
    assert got["shape"] == [N, SIZE, SIZE]  # the good slices were converted
    assert sorted(d["path"] for d in got["dropped"]) == [str(p) for p in bad]
    assert all(d["reason"] == got["problem"] for d in got["dropped"])
    assert sorted(s["path"] for s in got["skipped"]) == [str(p) for p in bad]
    assert all("pip install imagecodecs" in s["reason"] for s in got["skipped"]) and got["used"] == [N]


def test_doctor_reports_every_common_syntax_decodable() -> None:
    check = check_dicom()
    rows = {r["uid"]: r for r in check.data["syntaxes"]}
    for case in CASES:
        assert rows[case.syntax]["available"] is True, case.name
    assert check.status == "ok", check.message
    assert "imagecodecs" in rows[JPEGLosslessSV1]["plugins"] and "pyjpegls" in rows[JPEGLSLossless]["plugins"]
