"""Stored pixel values → HU for every storage variant, through real DICOM files written with pydicom."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

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
    """What a correct reader returns: the encodable HU, rounded to the slope, below air clamped to −1024."""
    if variant.wrap12:
        hu = np.clip(hu, -1000, 3095)  # the only range the quirk can represent
    else:
        b = variant.bits_stored
        lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if variant.signed else (0, 2**b - 1)
        hu = np.clip(hu, lo * variant.slope + variant.intercept, hi * variant.slope + variant.intercept)
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
    np.testing.assert_allclose(got, _expected(hu, variant), atol=1.0)
    assert got.min() >= -1024


def test_multi_valued_tags_are_read(tmp_path):
    hu = _hu_image(StorageVariant())
    path = tmp_path / "mv.dcm"
    _write(path, hu, StorageVariant(), window_center=[36, 36], window_width=[80, 80])
    with _quiet():
        ds = pydicom.dcmread(path)
    assert first_value(ds.WindowCenter) == 36.0
    np.testing.assert_allclose(dataset_to_hu(ds), _expected(hu, StorageVariant()), atol=1.0)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
@pytest.mark.parametrize("name", ["signed16_m1024", "unsigned16_m1024", "wrap12"])
def test_compressed_round_trip(tmp_path, syntax, name):
    variant = VARIANTS[name]
    hu = _hu_image(variant)
    path = tmp_path / "c.dcm"
    _write(path, hu, variant)
    with _quiet():
        ds = pydicom.dcmread(path)
        ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "pydicom")
        ds.save_as(path, enforce_file_format=True)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_allclose(_read_hu(path), _expected(hu, variant), atol=1.0)


def test_missing_decoder_is_a_clear_reason(tmp_path):
    """JPEG Lossless needs pylibjpeg-libjpeg or gdcm, which are not installed: the reason says so."""
    if decoder_problem(JPEGLosslessSV1) is None:
        pytest.skip("a JPEG Lossless decoder is installed here")
    path = tmp_path / "jpegls.dcm"
    _write(path, _hu_image(StorageVariant()), StorageVariant())
    with _quiet():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8not really jpeg\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
        ds = pydicom.dcmread(path)
    with pytest.raises(ValueError, match="no decoder installed for transfer syntax JPEG Lossless"):
        dataset_to_hu(ds)


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
