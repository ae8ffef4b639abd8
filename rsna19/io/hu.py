"""Stored pixel values → Hounsfield units, for every storage convention found in head CT.

HU = stored × RescaleSlope + RescaleIntercept, computed in float and rounded to int16. Two corrections:

* the RSNA 12-bit wrap quirk: unsigned 12-bit data with an intercept above −100 whose negative values (air)
  wrapped modulo 4096; :func:`unwrap12` undoes it;
* values outside the reconstruction circle (−2000, −3024 …) become −1024, :data:`rsna19.core.constants.AIR_HU`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from rsna19.core.constants import AIR_HU
from rsna19.io import decoders

# Every process that decodes pixels imports this module: the JPEG plugin is then known to pydicom.
decoders.register()

#: The wrap quirk only applies where the intercept says the data is not already offset for air.
_WRAP_MAX_INTERCEPT = -100.0


def first_value(value: Any, default: float | None = None) -> float | None:
    """The first value of a possibly multi-valued DICOM element (``[36, 36]`` → 36.0), as float.

    Args:
        value: a number, a string, a pydicom MultiValue/list, or None.
        default: returned where ``value`` is None or empty.
    """
    if value is None:
        return default
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 0:
            return default
        value = value[0]
    if isinstance(value, str | bytes):
        text = value.decode() if isinstance(value, bytes) else value
        text = text.split("\\")[0].strip()
        if not text:
            return default
        return float(text)
    return float(value)


def has_wrap12_quirk(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """Whether a file's header matches the RSNA 12-bit wrap quirk."""
    return int(bits_stored) == 12 and int(pixel_representation) == 0 and float(intercept) > _WRAP_MAX_INTERCEPT


def unwrap12(stored: np.ndarray) -> np.ndarray:
    """Undo the 12-bit wrap: x = stored + 1000; x −= 4096 where x ≥ 4096; return x − 1000.

    Args:
        stored: (H, W) unsigned stored values (< 4096).

    Returns:
        (H, W) int32 stored values with air back at about −1000.
    """
    x = stored.astype(np.int32) + 1000
    x[x >= 4096] -= 4096
    return x - 1000


def stored_to_hu(
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    bits_stored: int = 16,
    pixel_representation: int = 1,
) -> np.ndarray:
    """Convert stored pixel values to HU (int16), with the wrap fix and the clamp at −1024.

    Args:
        stored: (H, W) pixel values as decoded (``pixel_array``), signed or unsigned.
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        bits_stored: BitsStored.
        pixel_representation: 0 unsigned, 1 signed.

    Returns:
        (H, W) int16 Hounsfield units, ≥ −1024.
    """
    stored = np.asarray(stored)
    if stored.dtype in (np.uint16, np.int16):
        return cells_to_hu(stored.view(np.uint16), slope, intercept, bits_stored, pixel_representation)
    return _stored_to_hu(stored, float(slope), float(intercept), int(bits_stored), int(pixel_representation))


def _stored_to_hu(
    stored: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int
) -> np.ndarray:
    if has_wrap12_quirk(bits_stored, pixel_representation, intercept):
        stored = unwrap12(stored)
    hu = np.rint(stored.astype(np.float64) * slope + intercept)
    return clamp_hu(hu)


def cells_to_hu(
    cells: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int
) -> np.ndarray:
    """HU of 16-bit pixel cells (their bits as uint16), exactly as :func:`hu_table` maps them.

    The usual case (slope 1, integer intercept, no wrap quirk) is computed in int16 with a clip, about four times
    faster than the table lookup used for everything else.
    """
    slope, intercept = float(slope), float(intercept)
    bits = min(max(int(bits_stored), 1), 16)
    pr = int(pixel_representation)
    if slope != 1.0 or not intercept.is_integer() or abs(intercept) > 30000 or has_wrap12_quirk(bits, pr, intercept):
        return np.take(hu_table(slope, intercept, bits, pr), cells)
    icpt = int(intercept)
    if pr == 1:
        values = cells.view(np.int16)
        if bits < 16:  # sign-extend the low bits (shift up, arithmetic shift down)
            values = (values << (16 - bits)) >> (16 - bits)
        lo, hi = max(-32768, AIR_HU - icpt), min(32767, 32767 - icpt)
    else:
        values = cells & np.uint16((1 << bits) - 1) if bits < 16 else cells
        lo, hi = max(0, AIR_HU - icpt), min(65535, 32767 - icpt)
    # After the clip, value + intercept lies in [−1024, 32767]: adding in wrapping int16 arithmetic is exact.
    out = np.clip(values, lo, hi).astype(np.int16)
    out += np.int16(icpt)
    return out


def hu_table(slope: float, intercept: float, bits_stored: int, pixel_representation: int) -> np.ndarray:
    """HU of every 16-bit pixel cell, indexed by its bits read as uint16: (65536,) int16.

    The table also does what a decoder does with the cell: keep the low ``bits_stored`` bits and, for signed
    data, sign-extend them (like pydicom's ``pixel_array``), so it applies to raw buffers and decoded arrays alike.
    """
    return _hu_table(float(slope), float(intercept), int(bits_stored), int(pixel_representation))


@functools.lru_cache(maxsize=64)
def _hu_table(slope: float, intercept: float, bits_stored: int, pixel_representation: int) -> np.ndarray:
    bits = min(max(bits_stored, 1), 16)
    cells = np.arange(65536, dtype=np.int64) & ((1 << bits) - 1)
    if pixel_representation == 1:
        cells = np.where(cells >= 1 << (bits - 1), cells - (1 << bits), cells)
    table = _stored_to_hu(cells, slope, intercept, bits, pixel_representation)
    table.flags.writeable = False
    return table


def clamp_hu(hu: np.ndarray) -> np.ndarray:
    """Clamp to [−1024, 32767] and cast to int16; values below air (outside the scan circle) become air."""
    return np.clip(hu, AIR_HU, np.iinfo(np.int16).max).astype(np.int16)


def native_to_hu(
    buffer: bytes,
    rows: int,
    cols: int,
    *,
    slope: float,
    intercept: float,
    bits_stored: int,
    pixel_representation: int,
) -> np.ndarray:
    """HU straight from an uncompressed little-endian 16-bit PixelData buffer (no decoder round trip).

    Args:
        buffer: the PixelData bytes.
        rows, cols: Rows, Columns.
        slope, intercept, bits_stored, pixel_representation: as in the header.

    Returns:
        (rows, cols) int16 HU, identical to decoding with pydicom and :func:`stored_to_hu`.

    Raises:
        ValueError: the buffer does not hold Rows × Columns 16-bit pixels.
    """
    expected = rows * cols * 2
    if len(buffer) != expected:
        raise ValueError(f"pixel buffer is {len(buffer)} bytes, expected {expected} for {rows}×{cols}×16 bit")
    cells = np.frombuffer(buffer, dtype="<u2").reshape(rows, cols)
    return cells_to_hu(cells, slope, intercept, bits_stored, pixel_representation)


def decoder_problem(transfer_syntax: str | UID) -> str | None:
    """Why pixel data of ``transfer_syntax`` cannot be decoded here, or None where a decoder is installed.

    Args:
        transfer_syntax: a TransferSyntaxUID.
    """
    uid = UID(str(transfer_syntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no pixel decoder exists in pydicom for transfer syntax {uid.name} ({uid})"
    if decoder.is_available:
        return None
    hint = decoders.install_hint(uid)
    missing = f"pip install {hint}" if hint else ("; ".join(decoder.missing_dependencies) or "no plugin")
    return f"no decoder installed for transfer syntax {uid.name} ({uid}): {missing}"


def decode_stored(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the stored pixel values of every frame of a dataset, with a one-line reason on failure.

    Args:
        ds: a dataset read with pixels.

    Returns:
        (frames, Rows, Columns) stored values as pydicom decodes them (frames is 1 for a single-frame file).

    Raises:
        ValueError: no pixel data, no decoder for the transfer syntax (the message names the syntax and what to
            install), or pixels that do not match Rows × Columns.
    """
    if "PixelData" not in ds:
        raise ValueError("no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and UID(ts).is_compressed:
        problem = decoder_problem(ts)
        if problem:
            raise ValueError(problem)
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for broken buffers; all mean "unreadable"
        name = f" ({UID(ts).name})" if ts is not None else ""
        # pydicom lists each plugin's failure on its own line: keep them, on one line (reasons are one line).
        text = " ".join(str(exc).split())
        text = text if len(text) <= 400 else text[:399] + "…"
        raise ValueError(f"cannot decode pixel data{name}: {text}") from exc
    if stored.ndim == 2:
        stored = stored[None]
    if stored.shape != (n_frames, rows, cols):
        want = (rows, cols) if n_frames == 1 else (n_frames, rows, cols)
        got = tuple(stored.shape[1:]) if n_frames == 1 and stored.shape[0] == 1 else tuple(stored.shape)
        raise ValueError(f"pixel array shape {got} does not match Rows×Columns {want}")
    return stored


def dataset_to_hu(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the pixels of one CT slice and convert them to HU.

    Args:
        ds: a dataset read with pixels.

    Returns:
        (Rows, Columns) int16 HU.

    Raises:
        ValueError: no pixel data, no decoder for the transfer syntax, or a buffer that does not match
            Rows × Columns (the message is the reason reported for the file).
    """
    stored = decode_stored(ds)
    if stored.shape[0] != 1:
        raise ValueError(f"multi-frame image ({stored.shape[0]} frames): read it per frame")
    return frame_to_hu(
        stored[0],
        slope=first_value(ds.get("RescaleSlope"), 1.0),
        intercept=first_value(ds.get("RescaleIntercept"), 0.0),
        bits_stored=int(ds.get("BitsStored", 16)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
    )


def frame_to_hu(
    stored: np.ndarray, *, slope: float, intercept: float, bits_stored: int, pixel_representation: int
) -> np.ndarray:
    """HU of one decoded frame, whatever dtype the decoder gave: (Rows, Columns) int16."""
    if stored.dtype not in (np.uint16, np.int16):
        return _stored_to_hu(stored, float(slope), float(intercept), int(bits_stored), int(pixel_representation))
    return stored_to_hu(
        stored, slope=slope, intercept=intercept, bits_stored=bits_stored, pixel_representation=pixel_representation
    )
