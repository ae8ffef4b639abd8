"""Stored pixel values → HU for every storage variant, through real DICOM files written with pydicom."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG4HP41, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom
from rsna19.io.hu import (
    cells_to_hu,
    clamp_hu,
    dataset_to_hu,
    decoder_problem,
    first_value,
    has_wrap12_quirk,
    hu_table,
    native_to_hu,
    stored_to_hu,
    unwrap12,
)

GEOMETRY = SliceGeometry(ipp=(-32.0, -32.0, 10.0), iop=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.5, 0.5))

VARIANTS = {
    "signed16_m1024": StorageVariant(signed=True, intercept=-1024, bits_stored=16),
    "unsigned16_m1024": StorageVariant(signed=False, intercept=-1024, bits_stored=16),
    "signed16_0": StorageVariant(signed=True, intercept=0, bits_stored=16),
    "signed12_0": StorageVariant(signed=True, intercept=0, bits_stored=12),
    "signed12_m1024": StorageVariant(signed=True, intercept=-1024, bits_stored=12),
    "unsigned12_m1024": StorageVariant(signed=False, intercept=-1024, bits_stored=12),
    "slope_half": StorageVariant(signed=True, intercept=-1024, slope=0.5, bits_stored=16),
    "slope_two": StorageVariant(signed=True, intercept=-1000, slope=2.0, bits_stored=16),
    "wrap12": StorageVariant(wrap12=True),
}


def _hu_image(variant: StorageVariant) -> np.ndarray:
    """A 32×32 image with air, soft tissue, blood, bone and out-of-circle values."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 2000, size=(32, 32)).astype(np.float64)
    hu[0, :8] = [-3024, -2000, -1024, -1000, 0, 40, 75, 1000]
    return hu


def _expected(hu: np.ndarray, variant: StorageVariant) -> np.ndarray:
    """What a correct reader returns, exactly: the encodable HU, rounded to the slope (half to even, as the writer
    rounds), below air clamped to −1024."""
    if variant.wrap12:
        hu = np.clip(hu, -1000, 3095)  # the only range the quirk can represent
    else:
        b = variant.bits_stored
        lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if variant.signed else (0, 2**b - 1)
        stored = np.clip(np.rint((hu - variant.intercept) / variant.slope), lo, hi)
        hu = stored * variant.slope + variant.intercept
    return np.maximum(hu, -1024)


def _write(path, hu, variant, **kw):
    with _quiet():
        _write_loud(path, hu, variant, **kw)


def _write_loud(path, hu, variant, **kw):
    write_ct_dicom(
        path,
        hu,
        GEOMETRY,
        sop_uid="ID_000000001",
        series_uid="ID_000000002",
        study_uid="ID_000000003",
        patient_id="ID_000000004",
        instance_number=1,
        variant=variant,
        **kw,
    )


@contextlib.contextmanager
def _quiet():
    """Silence pydicom's UserWarnings about Kaggle's ``ID_<hex>`` UIDs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _read_hu(path) -> np.ndarray:
    with _quiet():
        return dataset_to_hu(pydicom.dcmread(path))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hu_round_trip_every_variant(tmp_path, name):
    variant = VARIANTS[name]
    hu = _hu_image(variant)
    path = tmp_path / f"{name}.dcm"
    _write(path, hu, variant)
    got = _read_hu(path)
    assert got.dtype == np.int16 and got.shape == hu.shape
    # int16 output: a slope of 0.5 may give half-HU values, which the reader rounds (half to even).
    np.testing.assert_array_equal(got, np.rint(_expected(hu, variant)))
    assert got.min() >= -1024


def test_multi_valued_tags_are_read(tmp_path):
    hu = _hu_image(StorageVariant())
    path = tmp_path / "mv.dcm"
    _write(path, hu, StorageVariant(), extra={"WindowCenter": [36, 36], "WindowWidth": [80, 80]})
    with _quiet():
        ds = pydicom.dcmread(path)
    assert first_value(ds.WindowCenter) == 36.0
    np.testing.assert_array_equal(dataset_to_hu(ds), _expected(hu, StorageVariant()))


def _compress(path, syntax: str) -> None:
    """Re-encode a single-frame file in place with a lossless ``syntax``: pydicom's own encoders (RLE, JPEG 2000
    through pylibjpeg, JPEG-LS through pyjpegls) or, for the JPEG (T.81) lossless syntaxes pydicom cannot encode,
    imagecodecs' libjpeg-turbo (predictor 1 for SV1, 7 for process 14)."""
    with _quiet():
        ds = pydicom.dcmread(path)
        if syntax in (JPEGLosslessSV1, JPEGLossless):
            bits = int(ds.BitsStored)
            # The codec takes the unsigned BitsStored-bit pattern (two's complement for signed data).
            cells = ds.pixel_array.view(np.uint16) & ((1 << bits) - 1)
            predictor = 1 if syntax == JPEGLosslessSV1 else 7
            frame = imagecodecs.jpeg8_encode(cells, bitspersample=bits, lossless=True, predictor=predictor)
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            plugin = {RLELossless: "pydicom", JPEGLSLossless: "pyjpegls"}.get(syntax, "pylibjpeg")
            ds.compress(syntax, encoding_plugin=plugin)
        ds.save_as(path, enforce_file_format=True)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax


LOSSLESS = [RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless]


@pytest.mark.parametrize("syntax", LOSSLESS, ids=["rle", "j2k", "jpeg-ls", "jpeg-lossless-sv1", "jpeg-lossless-p14"])
@pytest.mark.parametrize("name", ["signed16_m1024", "unsigned16_m1024", "signed12_m1024", "wrap12"])
def test_lossless_round_trip_is_exact(tmp_path, syntax, name):
    """Every lossless syntax rsna19 reads gives exactly the HU of the uncompressed file (no tolerance)."""
    assert decoder_problem(syntax) is None, decoder_problem(syntax)  # requirements.txt installs every decoder
    variant = VARIANTS[name]
    hu = _hu_image(variant)
    plain, packed = tmp_path / "plain.dcm", tmp_path / "packed.dcm"
    _write(plain, hu, variant)
    _write(packed, hu, variant)
    _compress(packed, syntax)
    assert packed.read_bytes() != plain.read_bytes()
    got = _read_hu(packed)
    np.testing.assert_array_equal(got, _read_hu(plain))
    np.testing.assert_array_equal(got, _expected(hu, variant))


def _jpeg_lossless_file(tmp_path) -> str:
    path = tmp_path / "jpeg_lossless.dcm"
    _write(path, _hu_image(StorageVariant()), StorageVariant())
    _compress(path, JPEGLosslessSV1)
    return str(path)


def test_missing_decoder_is_a_clear_reason(tmp_path):
    """Without a JPEG Lossless decoder (imagecodecs, gdcm and pylibjpeg-libjpeg made unimportable in a fresh
    interpreter), reading a JPEG Lossless file fails with the syntax and what to install."""
    code = (
        "import sys\n"
        "for name in ('imagecodecs', 'gdcm', 'libjpeg'):\n"
        "    sys.modules[name] = None  # import fails: as if not installed\n"
        "import pydicom\n"
        "from rsna19.io.hu import dataset_to_hu, decoder_problem\n"
        "from pydicom.uid import JPEGLosslessSV1\n"
        "print(decoder_problem(JPEGLosslessSV1))\n"
        "try:\n"
        "    dataset_to_hu(pydicom.dcmread(sys.argv[1]))\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, _jpeg_lossless_file(tmp_path)], capture_output=True, text=True, check=True
    )
    reason, error = out.stdout.strip().splitlines()[-2:]
    expected = "no decoder installed for transfer syntax JPEG Lossless, Non-Hierarchical, First-Order Prediction"
    assert reason.startswith(expected) and "pip install imagecodecs" in reason
    assert expected in error and "pip install imagecodecs" in error


def test_syntax_without_any_pixel_decoder_is_a_clear_reason(tmp_path):
    """A video transfer syntax (MPEG-4) has no pixel decoder in pydicom at all: the reason says that."""
    path = tmp_path / "video.dcm"
    _write(path, _hu_image(StorageVariant()), StorageVariant())
    with _quiet():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = MPEG4HP41
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really video"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    assert decoder_problem(MPEG4HP41).startswith("no pixel decoder exists in pydicom for transfer syntax MPEG-4")
    with pytest.raises(ValueError, match="no pixel decoder exists in pydicom for transfer syntax MPEG-4"):
        _read_hu(path)


def test_wrap12_rules():
    assert has_wrap12_quirk(12, 0, 0.0)
    assert has_wrap12_quirk(12, 0, -50.0)
    assert not has_wrap12_quirk(12, 0, -1024.0)
    assert not has_wrap12_quirk(12, 1, 0.0)
    assert not has_wrap12_quirk(16, 0, 0.0)
    stored = np.array([3096, 3500, 0, 40, 3095], dtype=np.uint16)  # air, fat, water, blood, bone
    np.testing.assert_array_equal(unwrap12(stored), [-1000, -596, 0, 40, 3095])
    hu = stored_to_hu(stored, slope=1.0, intercept=0.0, bits_stored=12, pixel_representation=0)
    np.testing.assert_array_equal(hu, [-1000, -596, 0, 40, 3095])


def test_clamp_and_float_path():
    np.testing.assert_array_equal(clamp_hu(np.array([-3024, -2000, -1025, -1024, 0, 40000])), [-1024] * 4 + [0, 32767])
    out = stored_to_hu(np.array([0, 1, 3], dtype=np.int16), slope=0.5, intercept=-1024.5, pixel_representation=1)
    np.testing.assert_array_equal(out, [-1024, -1024, -1023])


@pytest.mark.parametrize("pr", [0, 1])
@pytest.mark.parametrize("bits", [10, 12, 16])
@pytest.mark.parametrize("intercept", [-1024.0, -1000.0, 0.0, -50.0, 1024.0, -2048.0, -31000.0, -1024.5])
def test_fast_integer_path_equals_the_table(pr, bits, intercept):
    """Every 16-bit cell maps to the same HU through the int16 fast path and the general lookup table."""
    cells = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(cells_to_hu(cells, 1.0, intercept, bits, pr), hu_table(1.0, intercept, bits, pr))


def test_table_masks_and_sign_extends_like_pydicom(tmp_path):
    """Cells with bits set above BitsStored: the raw-buffer path and pydicom's pixel_array agree."""
    raw = np.array([[0x0FFF, 0x1FFF, 0xF000, 0x0800], [0x07FF, 0xF800, 0x8001, 1]], dtype=np.uint16)
    for variant in (StorageVariant(signed=False, bits_stored=12), StorageVariant(signed=True, bits_stored=12)):
        path = tmp_path / "bits.dcm"
        _write(path, np.zeros((2, 4)), variant)
        with _quiet():
            ds = pydicom.dcmread(path)
            ds.PixelData = raw.tobytes()
            via_pydicom = stored_to_hu(
                ds.pixel_array, slope=1.0, intercept=-1024.0, bits_stored=12, pixel_representation=int(variant.signed)
            )
        direct = native_to_hu(
            raw.tobytes(), 2, 4, slope=1.0, intercept=-1024.0, bits_stored=12, pixel_representation=int(variant.signed)
        )
        np.testing.assert_array_equal(direct, via_pydicom)


def test_native_buffer_size_is_checked():
    with pytest.raises(ValueError, match="pixel buffer is 6 bytes, expected 8"):
        native_to_hu(b"\0" * 6, 2, 2, slope=1, intercept=0, bits_stored=16, pixel_representation=1)


def test_first_value():
    assert first_value(None, 1.0) == 1.0
    assert first_value("36\\40") == 36.0
    assert first_value([36, 40]) == 36.0
    assert first_value([], 2.0) == 2.0
    assert first_value(b"7") == 7.0
