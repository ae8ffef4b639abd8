"""Stored pixel values → Hounsfield units, for every storage convention found in head CT (DESIGN §2).

HU = stored × RescaleSlope + RescaleIntercept, computed in float and rounded to int16. Two corrections:

* the RSNA 12-bit wrap quirk: unsigned 12-bit data with an intercept above −100 whose negative values (air)
  wrapped modulo 4096; :func:`unwrap12` undoes it;
* values outside the reconstruction circle (−2000, −3024 …) become −1024, :data:`rsna19.constants.AIR_HU`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from rsna19.constants import AIR_HU

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
    """Whether a file's header matches the RSNA 12-bit wrap quirk (DESIGN §2)."""
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
    if has_wrap12_quirk(bits_stored, pixel_representation, intercept):
        stored = unwrap12(stored)
    if slope == 1.0 and float(intercept).is_integer():
        # The common case stays in integers: exact and about twice as fast as the float path.
        hu = stored.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    return clamp_hu(hu)


def clamp_hu(hu: np.ndarray) -> np.ndarray:
    """Clamp to [−1024, 32767] and cast to int16; values below air (outside the scan circle) become air."""
    return np.clip(hu, AIR_HU, np.iinfo(np.int16).max).astype(np.int16)


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
    missing = "; ".join(decoder.missing_dependencies) or "no plugin"
    return f"no decoder installed for transfer syntax {uid.name} ({uid}): {missing}"


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
    if "PixelData" not in ds:
        raise ValueError("no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and UID(ts).is_compressed:
        problem = decoder_problem(ts)
        if problem:
            raise ValueError(problem)
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for broken buffers; all mean "unreadable"
        raise ValueError(f"cannot decode pixel data: {exc}") from exc
    if stored.shape != (rows, cols):
        raise ValueError(f"pixel array shape {tuple(stored.shape)} does not match Rows×Columns {(rows, cols)}")
    return stored_to_hu(
        stored,
        slope=first_value(ds.get("RescaleSlope"), 1.0),
        intercept=first_value(ds.get("RescaleIntercept"), 0.0),
        bits_stored=int(ds.get("BitsStored", 16)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
    )
