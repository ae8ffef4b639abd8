"""Volume-aware conversion of DICOM series into the HU cache every model reads (docs/architecture.md, "Conversion")."""

from rsna19.conversion.series import (
    CONVERSION_VERSION,
    ConvertParams,
    SeriesError,
    convert_mask,
    convert_series,
    read_meta,
    write_series,
)

__all__ = [
    "CONVERSION_VERSION",
    "ConvertParams",
    "SeriesError",
    "convert_mask",
    "convert_series",
    "read_meta",
    "write_series",
]
