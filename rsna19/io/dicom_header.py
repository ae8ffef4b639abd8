"""Read the header of one DICOM file into an index row, or say in one line why the file cannot be used.

Speed matters (the RSNA data has 870k files). :func:`read_header` parses the elements before the pixel data
with ``pydicom.filereader.data_element_generator`` (ordinary Part 10 files) or
``pydicom.dcmread(stop_before_pixels=True)`` (anything unusual: no preamble, big endian, deflated, a VR that
contradicts the transfer syntax). Either way parsing stops on the PixelData element, whose 8- or 12-byte
element header we read ourselves to learn the buffer length without reading the buffer; the ~25 values we
need are decoded from the raw element bytes, which costs a fraction of pydicom's per-element conversion.
The whole is faster than a bare ``dcmread(stop_before_pixels=True)`` (docs/benchmarks.md, "Index").
:func:`read_header` never raises for any file content.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from typing import Any, NamedTuple

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.valuerep import STANDARD_VR

from rsna19.io.dicom import TAGS, UID_KEYWORDS, is_ct_sop_class
from rsna19.io.multiframe import frame_headers, frame_sop_uid

#: Columns of a header row, in the order of ``index.parquet`` (the index adds split, geometry and labels).
HEADER_COLUMNS: tuple[str, ...] = (
    "path",
    "sop_uid",
    "patient_id",
    "study_uid",
    "series_uid",
    "instance_number",
    "ipp_x",
    "ipp_y",
    "ipp_z",
    "iop_0",
    "iop_1",
    "iop_2",
    "iop_3",
    "iop_4",
    "iop_5",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "slice_thickness",
    "rows",
    "cols",
    "bits_stored",
    "bits_allocated",
    "pixel_representation",
    "rescale_slope",
    "rescale_intercept",
    "window_center",
    "window_width",
    "transfer_syntax",
    "frame",
)

_OTHER_PIXEL_DATA = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_ALL_PIXEL_DATA = {TAGS["PixelData"], *_OTHER_PIXEL_DATA}

_IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
#: Explicit-VR VRs with a 4-byte length (after 2 reserved bytes), PS3.5 7.1.2.
#: The two-letter VRs, as they appear in explicit-VR element headers.
_KNOWN_VRS = {vr.encode() for vr in STANDARD_VR if len(vr) == 2}
_VR_LENGTH_32 = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
#: Values longer than this are skipped, not read: a corrupt length must not make us read gigabytes.
_DEFER_SIZE = 1 << 16
_UNDEFINED_LENGTH = 0xFFFFFFFF
_US_LE = struct.Struct("<H").unpack
_US_BE = struct.Struct(">H").unpack
#: Transfer syntaxes whose pixel data is stored native (not encapsulated).
_NATIVE_SYNTAXES = {_IMPLICIT_VR_LE, _EXPLICIT_VR_LE, _EXPLICIT_VR_BE, _DEFLATED}


class _Bad(Exception):
    """Internal: carries the one-line reason a file is unusable."""


def read_header(path: str | os.PathLike[str], fast: bool = True) -> dict[str, Any] | str:
    """Read one single-frame file's header.

    Args:
        path: the file.
        fast: parse ordinary files element by element (about 2× faster than ``dcmread``); False reads every
            file with ``dcmread`` (same result; kept to check the fast path).

    Returns:
        A dict with :data:`HEADER_COLUMNS` as keys if the file is a usable CT slice, otherwise a one-line
        reason (``"empty file"``, ``"not DICOM: …"``, ``"truncated: …"``, ``"not CT: Modality=MR"``,
        ``"no pixel data"``, ``"no ImagePositionPatient"``, ``"pixel buffer … bytes, expected …"``, …). A
        multi-frame file gives a reason too: read it with :func:`read_slice_headers`. Never raises for any
        file content.
    """
    rows = read_slice_headers(path, fast)
    if isinstance(rows, str):
        return rows
    if rows[0]["frame"]:
        return f"multi-frame image ({len(rows)} frames): read per frame with read_slice_headers"
    return rows[0]


def read_slice_headers(path: str | os.PathLike[str], fast: bool = True) -> list[dict[str, Any]] | str:
    """Read one file's header as the slices it holds: one row for a single-frame file, one per frame otherwise.

    Frames of a multi-frame (Enhanced CT) file become virtual slices (:mod:`rsna19.io.multiframe`): their rows
    share ``path``, have ``frame`` 1…N and ``sop_uid`` ``<SOPInstanceUID>.f<frame>``, and take position,
    orientation, spacing, thickness, rescale and window from the functional groups. Single-frame rows have
    ``frame`` 0.

    Args:
        path: the file.
        fast: as for :func:`read_header`.

    Returns:
        The rows (dicts with :data:`HEADER_COLUMNS` as keys), or a one-line reason why the file cannot be used
        (any unusable frame rejects the file, with the frame named). Never raises for any file content.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                return "empty file"
            with warnings.catch_warnings():
                # Odd files make pydicom warn (truncated values, invalid VRs); the reason we return says it.
                warnings.simplefilter("ignore")
                return _rows(path, fp, size, _parse(fp) if fast else _parse_pydicom(fp))
    except _Bad as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 — any content must give a reason, never a crash
        return f"unreadable: {type(exc).__name__}: {_one_line(str(exc))}"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Parsed(NamedTuple):
    """The top-level elements before the pixel data, and how the file is encoded."""

    elements: dict[int, Any]  # RawDataElement (or DataElement where pydicom converted one), by int tag
    implicit: bool
    little: bool
    transfer_syntax: str
    pixel_pos: int  # file offset where the parser stopped: the pixel data element, or the end of the file


def _parse(fp: Any) -> _Parsed:
    """Parse the header, with the fast path for ordinary files and ``dcmread`` for everything else."""
    try:
        parsed = _parse_fast(fp)
    except Exception:  # noqa: BLE001 — anything odd is left to dcmread, which says what is wrong
        parsed = None
    if parsed is not None:
        return parsed
    fp.seek(0)
    return _parse_pydicom(fp)


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in _ALL_PIXEL_DATA


def _not_meta(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _parse_fast(fp: Any) -> _Parsed | None:
    """Read a standard Part 10 file (preamble, explicit-VR file meta, little-endian dataset) element by element.

    ``pydicom.filereader.data_element_generator`` yields the same raw elements ``dcmread`` would store, without
    building a ``FileDataset`` (about half of ``dcmread``'s time on a 25-element CT header). Returns None for
    anything unusual (no preamble, big endian, deflated, a transfer syntax that disagrees with the data), which
    :func:`_parse_pydicom` then reads with all of pydicom's heuristics.
    """
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    meta = {int(e.tag): e for e in data_element_generator(fp, False, True, stop_when=_not_meta)}
    ts_elem = meta.get(0x00020010)
    if ts_elem is None or not isinstance(ts_elem, RawDataElement) or not ts_elem.value:
        return None
    ts = ts_elem.value.decode("ascii").strip("\x00 ")
    if ts in (_EXPLICIT_VR_BE, _DEFLATED):
        return None
    implicit = ts == _IMPLICIT_VR_LE  # every other syntax, encapsulated ones included, is explicit VR LE
    start = fp.tell()
    vr = fp.read(6)[4:6]
    fp.seek(start)
    if implicit == (vr in _KNOWN_VRS):  # the data contradicts the transfer syntax: let pydicom guess
        return None
    elements = {
        int(e.tag): e
        for e in data_element_generator(fp, implicit, True, stop_when=_at_pixel_data, defer_size=_DEFER_SIZE)
    }
    return _Parsed(elements, implicit, True, ts, fp.tell())


def _parse_pydicom(fp: Any) -> _Parsed:
    """Read with ``dcmread(stop_before_pixels=True)``; files without the DICM preamble are parsed with force."""
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    except InvalidDicomError:
        # No "DICM" preamble: some writers omit it. Parse the bytes as a bare dataset and accept them only if
        # they look like an image header; random bytes either fail here or yield no SOPInstanceUID.
        try:
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER_SIZE, force=True)
        except Exception as exc:  # noqa: BLE001
            raise _Bad("not DICOM: no DICM preamble and not parseable") from exc
        if TAGS["SOPInstanceUID"] not in ds or TAGS["Rows"] not in ds:
            raise _Bad("not DICOM: no DICM preamble and not parseable") from None
    pixel_pos = fp.tell()  # dcmread stopped (and rewound) at the pixel data element, or reached the end
    implicit, little = ds.original_encoding
    meta_ts = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta is not None else None
    if meta_ts:
        ts = str(meta_ts)
    else:  # no file meta (read with force): pydicom guessed the encoding
        ts = _IMPLICIT_VR_LE if implicit else (_EXPLICIT_VR_LE if little else _EXPLICIT_VR_BE)
    return _Parsed({int(tag): elem for tag, elem in ds.items()}, bool(implicit), bool(little), ts, pixel_pos)


def _values(elements: dict[int, Any]) -> dict[int, bytes | str]:
    """Raw value bytes of the top-level elements, by plain int tag; raises if one was cut short.

    pydicom reads a value that the end of the file cuts short without complaint, so a truncated header is
    found here. Deferred (too large) and empty values are left out.
    """
    out: dict[int, bytes | str] = {}
    for tag, elem in elements.items():
        if elem.__class__ is RawDataElement:
            value = elem.value
            if not value:
                continue
            if len(value) < elem.length and elem.length != _UNDEFINED_LENGTH:
                n, length = len(value), elem.length
                raise _Bad(f"truncated: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has {n} of {length} bytes")
        else:  # already converted by pydicom (rare): re-encode the value as DICOM text
            value = elem.value
            if value is None or value == "":
                continue
            if isinstance(value, list | tuple | MultiValue):
                value = "\\".join(str(v) for v in value)
            value = str(value)  # a str, not bytes, marks it as converted
        out[tag] = value
    return out


def _text(values: dict[int, bytes | str], tag: int) -> str | None:
    raw = values.get(tag)
    if raw is None:
        return None
    if raw.__class__ is str:
        return raw.strip(" \x00") or None
    return raw.decode("latin-1").strip(" \x00") or None


def _numbers(values: dict[int, bytes | str], tag: int, name: str) -> list[float] | None:
    """Decode a DS/IS (possibly multi-valued) element; None if absent or empty."""
    text = _text(values, tag)
    if text is None:
        return None
    try:
        numbers = [float(v) for v in text.split("\\")]
    except ValueError:
        raise _Bad(f"bad {name}: {text[:60]!r}") from None
    if not math.isfinite(sum(numbers)):
        raise _Bad(f"bad {name}: {text[:60]!r}")
    return numbers


def _us(values: dict[int, bytes | str], tag: int, little: bool) -> int | None:
    """Decode a US element (2 bytes in the file's byte order); None if absent or empty."""
    raw = values.get(tag)
    if raw is None:
        return None
    if raw.__class__ is str:
        return int(raw)
    if len(raw) < 2:
        raise _Bad(f"bad element ({tag >> 16:04X},{tag & 0xFFFF:04X}): {len(raw)} bytes for a US value")
    return (_US_LE if little else _US_BE)(raw[:2])[0]


def _uids(elems: dict[int, bytes | str]) -> tuple[str, str, str]:
    """The (SOP instance, series, study) UIDs of a CT image, or :class:`_Bad` naming the missing or wrong one."""
    sop_class = _text(elems, TAGS["SOPClassUID"])
    modality = _text(elems, TAGS["Modality"])
    if modality != "CT" and not (modality is None and is_ct_sop_class(sop_class)):
        raise _Bad(f"not CT: Modality={modality}" if modality else "not CT: no Modality")
    uids = []
    for name in UID_KEYWORDS.values():
        uid = _text(elems, TAGS[name])
        if uid is None:
            raise _Bad(f"no {name}")
        if "\\" in uid:  # UIDs have one value; every later stage keys on them
            raise _Bad(f"bad {name}: {uid[:60]!r} has several values")
        uids.append(uid)
    return uids[0], uids[1], uids[2]


def _rows(path: str, fp: Any, size: int, parsed: _Parsed) -> list[dict[str, Any]]:
    """Validate the parsed header and build the row(s) of its slice(s); raises :class:`_Bad` with the reason."""
    elems = _values(parsed.elements)
    little = parsed.little
    # A deflated dataset is parsed from an inflated copy: its offsets say nothing about the file's size.
    if parsed.pixel_pos >= size and parsed.transfer_syntax != _DEFLATED:
        # The parser reached the end of the file without meeting pixel data. If the last element ends before
        # it, the file was cut inside an element header (pydicom stops there silently). Sequences of
        # undefined length hide their end, so the check is skipped where there are any.
        raw = list(parsed.elements.values())
        if all(e.__class__ is RawDataElement and e.length != _UNDEFINED_LENGTH for e in raw) and raw:
            end = max(e.value_tell + e.length for e in raw)
            if end < size:
                raise _Bad(f"truncated: {size - end} stray bytes after the last complete element")

    sop, series, study = _uids(elems)
    patient = _text(elems, TAGS["PatientID"]) or study  # grouping by patient needs a key; a study is the best fallback

    rows, cols = _us(elems, TAGS["Rows"], little), _us(elems, TAGS["Columns"], little)
    if not rows or not cols:
        raise _Bad("no Rows/Columns")
    bits_allocated = _us(elems, TAGS["BitsAllocated"], little)
    if bits_allocated is None:
        raise _Bad("no BitsAllocated")
    bits_stored = _us(elems, TAGS["BitsStored"], little) or bits_allocated
    pixel_representation = _us(elems, TAGS["PixelRepresentation"], little) or 0
    samples = _us(elems, TAGS["SamplesPerPixel"], little) or 1
    frames = _numbers(elems, TAGS["NumberOfFrames"], "NumberOfFrames")
    n_frames = int(frames[0]) if frames else 1
    if n_frames < 1:
        raise _Bad(f"bad NumberOfFrames: {n_frames}")
    multiframe = (
        n_frames != 1
        or TAGS["SharedFunctionalGroupsSequence"] in elems
        or TAGS["PerFrameFunctionalGroupsSequence"] in elems
    )

    transfer_syntax = parsed.transfer_syntax
    _check_pixel_data(fp, parsed, size, rows, cols, samples, bits_allocated, n_frames)

    thickness = _numbers(elems, TAGS["SliceThickness"], "SliceThickness")
    instance = _numbers(elems, TAGS["InstanceNumber"], "InstanceNumber")
    slope = _numbers(elems, TAGS["RescaleSlope"], "RescaleSlope")
    intercept = _numbers(elems, TAGS["RescaleIntercept"], "RescaleIntercept")
    center = _numbers(elems, TAGS["WindowCenter"], "WindowCenter")
    width = _numbers(elems, TAGS["WindowWidth"], "WindowWidth")
    nan = float("nan")
    base = {
        "path": path,
        "sop_uid": sop,
        "patient_id": patient,
        "study_uid": study,
        "series_uid": series,
        # Not needed for ordering (position is): a value that does not fit the int64 column counts as absent.
        "instance_number": int(instance[0]) if instance and abs(instance[0]) < 2**31 else -1,
        "slice_thickness": thickness[0] if thickness else nan,
        "rows": rows,
        "cols": cols,
        "bits_stored": bits_stored,
        "bits_allocated": bits_allocated,
        "pixel_representation": pixel_representation,
        "rescale_slope": slope[0] if slope else 1.0,
        "rescale_intercept": intercept[0] if intercept else 0.0,
        # Multi-valued window tags (e.g. [36, 36]) keep their first value.
        "window_center": center[0] if center else nan,
        "window_width": width[0] if width else nan,
        "transfer_syntax": transfer_syntax,
        "frame": 0,
    }
    if multiframe:
        return _frame_rows(path, base)
    base.update(
        _geometry(
            _numbers(elems, TAGS["ImagePositionPatient"], "ImagePositionPatient"),
            _numbers(elems, TAGS["ImageOrientationPatient"], "ImageOrientationPatient"),
            _numbers(elems, TAGS["PixelSpacing"], "PixelSpacing"),
        )
    )
    return [{c: base[c] for c in HEADER_COLUMNS}]


def _geometry(ipp: list[float] | None, iop: list[float] | None, spacing: list[float] | None) -> dict[str, float]:
    """The geometry columns of a row, or :class:`_Bad` saying which value is missing or wrong."""
    if ipp is None:
        raise _Bad("no ImagePositionPatient")
    if len(ipp) != 3 or not math.isfinite(sum(ipp)):
        raise _Bad(f"bad ImagePositionPatient: {len(ipp)} values" if len(ipp) != 3 else "bad ImagePositionPatient")
    if iop is None:
        raise _Bad("no ImageOrientationPatient")
    if len(iop) != 6 or not math.isfinite(sum(iop)):
        raise _Bad(
            f"bad ImageOrientationPatient: {len(iop)} values" if len(iop) != 6 else "bad ImageOrientationPatient"
        )
    rx, ry, rz, cx, cy, cz = iop
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    if nx * nx + ny * ny + nz * nz < 0.25:  # unit cosines give |n| = sin(angle between them); ~1 for valid IOP
        raise _Bad("bad ImageOrientationPatient: row and column cosines are not orthogonal unit vectors")
    if spacing is None:
        raise _Bad("no PixelSpacing")
    if len(spacing) != 2 or min(spacing) <= 0 or not math.isfinite(sum(spacing)):
        raise _Bad(f"bad PixelSpacing: {spacing}")
    return {
        "ipp_x": ipp[0],
        "ipp_y": ipp[1],
        "ipp_z": ipp[2],
        "iop_0": rx,
        "iop_1": ry,
        "iop_2": rz,
        "iop_3": cx,
        "iop_4": cy,
        "iop_5": cz,
        "pixel_spacing_row": spacing[0],
        "pixel_spacing_col": spacing[1],
    }


def _frame_rows(path: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per frame of a multi-frame file, geometry and rescale from its functional groups."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        frames = frame_headers(ds)
    except ValueError as exc:
        raise _Bad(f"bad functional groups: {_one_line(str(exc))}") from None
    out = []
    nan = float("nan")
    for fh in frames:
        try:
            geometry = _geometry(fh.ipp, fh.iop, fh.pixel_spacing)
        except _Bad as exc:
            raise _Bad(f"frame {fh.frame} of {len(frames)}: {exc}") from None
        row = dict(base)
        row.update(geometry)
        row["frame"] = fh.frame
        row["sop_uid"] = frame_sop_uid(base["sop_uid"], fh.frame)
        if fh.slice_thickness is not None:
            row["slice_thickness"] = fh.slice_thickness
        row["rescale_slope"] = fh.slope if fh.slope is not None else base["rescale_slope"]
        row["rescale_intercept"] = fh.intercept if fh.intercept is not None else base["rescale_intercept"]
        row["window_center"] = fh.window_center if fh.window_center is not None else base["window_center"]
        row["window_width"] = fh.window_width if fh.window_width is not None else base["window_width"]
        if not math.isfinite(row["slice_thickness"]):
            row["slice_thickness"] = nan
        out.append({c: row[c] for c in HEADER_COLUMNS})
    return out


def _check_pixel_data(
    fp: Any, parsed: _Parsed, size: int, rows: int, cols: int, samples: int, bits_allocated: int, frames: int = 1
) -> None:
    """Check that a PixelData element follows the header and that its buffer fits Rows × Columns.

    The element header is parsed by hand from where pydicom stopped, so the buffer itself is never read.
    Encapsulated (compressed) pixel data is only checked for presence: its length says nothing about the
    image size. Deflated files are read by pydicom from an inflated copy, so their position is unknown here.
    """
    transfer_syntax, implicit, little, pos = parsed.transfer_syntax, parsed.implicit, parsed.little, parsed.pixel_pos
    if transfer_syntax == _DEFLATED:
        return
    fp.seek(pos)
    head = fp.read(12)
    if len(head) < 8:
        if head:
            raise _Bad(f"truncated: {len(head)} stray bytes where the next element should start")
        raise _Bad("no pixel data")
    group, elem = struct.unpack("<HH" if little else ">HH", head[:4])
    tag = group << 16 | elem
    if tag != TAGS["PixelData"]:
        if tag in _OTHER_PIXEL_DATA:
            raise _Bad(f"no pixel data: {_OTHER_PIXEL_DATA[tag]} is not supported")
        raise _Bad("no pixel data")
    order = "<" if little else ">"
    if implicit:
        (length,) = struct.unpack(order + "L", head[4:8])
        header_len = 8
    elif head[4:6] in _VR_LENGTH_32:
        if len(head) < 12:
            raise _Bad("truncated: PixelData element header cut short")
        (length,) = struct.unpack(order + "L", head[8:12])
        header_len = 12
    else:
        (length,) = struct.unpack(order + "H", head[6:8])
        header_len = 8
    if length == _UNDEFINED_LENGTH or transfer_syntax not in _NATIVE_SYNTAXES:
        return  # encapsulated: fragments of a compressed stream
    n_bits = rows * cols * samples * bits_allocated * frames
    expected = (n_bits + 7) // 8
    # PixelData values are padded to an even length.
    if length != expected and length != expected + (expected & 1):
        layout = (
            (f"{frames} frames × " if frames != 1 else "")
            + f"{rows}×{cols}"
            + (f"×{samples}" if samples != 1 else "")
            + f"×{bits_allocated} bit"
        )
        raise _Bad(f"pixel buffer {length} bytes, expected {expected} ({layout})")
    available = size - pos - header_len
    if available < length:
        raise _Bad(f"truncated: PixelData has {available} of {length} bytes")
