"""Find the studies and series in what a user hands to ``rsna19 predict-study``.

The input is a folder (nested, several studies and series mixed, stray non-DICOM files) or a ``.zip``. This
module extracts a zip safely, reads every file's DICOM header (no pixels), groups the files as
study → series → files, and decides which series the models can read:

* kept: CT series whose slices share one geometry (image size, orientation, pixel spacing) by the rule the
  converter applies (:func:`rsna19.io.dicom.pick_geometry`: a file that disagrees with a strict majority of the
  series, such as a misfiled slice, is dropped alone with its reason; a slice at the position of another too,
  as the converter does), ordered like the converter orders them, with the slice normal within
  :attr:`SelectionRules.max_axial_angle_deg` (35°) of the patient z axis: plain axials and gantry-tilted axials
  (tilts up to 30°) pass, sagittal and coronal reformats do not;
* skipped, with a reason each: non-CT modality, localizer / scout / topogram (``ImageType``), non-axial
  orientation, mixed orientations, mixed image sizes or pixel spacings, no slice with usable geometry.

A single-slice axial series is kept (the converter reads it); raise :attr:`SelectionRules.min_slices` to drop
such series. Each file of a candidate series (CT, not a localizer) is validated by the index's own
:func:`rsna19.io.dicom_header.read_slice_headers`, so a slice is accepted here exactly when ``rsna19 index`` would
accept it (a multi-frame Enhanced CT file becomes one slice per frame, see :mod:`rsna19.io.multiframe`; a file
whose transfer syntax has no installed decoder is rejected with the syntax and the package to install); a
rejected slice (no position, truncated, wrong pixel buffer, duplicated SOP UID or position) is listed with its
reason under its study and the rest of the series is still used. Files that are not DICOM images at all are
listed as skipped files of the input; nothing here raises for a bad file. Only an unsafe or broken zip stops the
whole input (:class:`UnsafeArchiveError`), because then no member of it can be trusted.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from rsna19.conversion.geometry import order_slices
from rsna19.core.errors import UserError
from rsna19.inference.series_select import SeriesFacts, header_hints, series_facts
from rsna19.io.dicom import (
    LOCALIZER_TOKENS,
    ORIENTATION_TOL,
    UID_KEYWORDS,
    SliceGeometry,
    is_ct_sop_class,
    pick_geometry,
    positions_along_normal,
    series_normal,
    series_orientation,
    slice_normal,
    tilt_deg,
)
from rsna19.io.dicom_header import read_slice_headers
from rsna19.io.hu import decoder_problem


class UnsafeArchiveError(UserError):
    """A zip that cannot be extracted safely (path traversal, links, zip bomb) or cannot be read at all."""


@dataclass(frozen=True)
class ZipLimits:
    """Caps applied when extracting a zip, against zip bombs.

    Attributes:
        max_members: most entries (files and folders) in the archive.
        max_total_bytes: most uncompressed bytes in all, counted while writing (declared sizes can lie).
        max_ratio: most uncompressed/compressed ratio of one member larger than ``ratio_min_bytes``; CT slices
            deflate 2–20×, bombs 1000×.
        ratio_min_bytes: members smaller than this are not ratio-checked (tiny text files compress well).
    """

    max_members: int = 200_000
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1024**2


@dataclass(frozen=True)
class SelectionRules:
    """Which series go to the models.

    Attributes:
        max_axial_angle_deg: largest angle between the slice normal and the z axis (|n_z| ≥ cos of it).
        min_slices: fewest slices a kept series needs.
    """

    max_axial_angle_deg: float = 35.0
    min_slices: int = 1


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not used, and why."""

    path: Path
    reason: str


@dataclass
class SeriesInput:
    """One series of one study, kept or skipped.

    Attributes:
        series_uid, study_uid, patient_id: identifiers from the headers.
        modality: Modality tag ("CT", "MR", ...; several joined by "/" if the files disagree).
        description: SeriesDescription ("" if absent).
        files: the file of each slice; for a kept series in slice order (ascending ``positions``). A multi-frame
            (Enhanced CT) file is expanded into one slice per frame, so its path repeats.
        sop_uids: slice UID of each slice, same order: the SOPInstanceUID, or ``<SOPInstanceUID>.f<frame>`` for a
            frame of a multi-frame file.
        positions: IPP · (row × col) of each file (mm), ascending; empty for a skipped series.
        tilt_deg: gantry tilt from the orientation (``atan2(-col_z, col_y)``); None for a skipped series.
        reason: why the series is skipped; None when it is kept.
        facts: header facts for the series ranking (:mod:`rsna19.inference.series_select`); None when skipped here.
        selection: the ranking's verdict (rank, score, criteria), set by ``predict-study``.
    """

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    files: list[Path]
    sop_uids: list[str]
    positions: list[float] = field(default_factory=list)
    tilt_deg: float | None = None
    reason: str | None = None
    frames: list[int] = field(default_factory=list)
    facts: SeriesFacts | None = None
    selection: dict[str, Any] | None = None

    @property
    def used(self) -> bool:
        """True when the series goes to the models."""
        return self.reason is None

    def slice_refs(self) -> list[dict[str, Any]]:
        """The slices as rows for :func:`rsna19.conversion.series.convert_series`: ``path``, ``frame``
        (1-based within a multi-frame file, 0 for a single-frame file) and ``sop_uid``, in slice order."""
        frames = self.frames or [0] * len(self.files)
        return [{"path": str(p), "frame": f, "sop_uid": u} for p, f, u in zip(self.files, frames, self.sop_uids)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no file lists) for ``studies.json``."""
        out: dict[str, Any] = {
            "series_uid": self.series_uid,
            "modality": self.modality,
            "description": self.description,
            "n_files": len(set(self.files)),
        }
        if self.used:
            out["tilt_deg"] = None if self.tilt_deg is None else round(self.tilt_deg, 3)
        else:
            out["reason"] = self.reason
        if self.selection is not None:
            out["selection"] = self.selection
        elif self.facts is not None:
            out["header"] = self.facts.to_dict()
        return out


@dataclass
class StudyInput:
    """The series of one study, split into kept and skipped ones.

    Attributes:
        study_uid, patient_id: identifiers from the headers.
        used: kept series, ordered by series UID.
        skipped: skipped series with their reasons, ordered by series UID.
        skipped_files: files of this study left out of a kept series (no geometry, duplicated SOP UID).
    """

    study_uid: str
    patient_id: str
    used: list[SeriesInput] = field(default_factory=list)
    skipped: list[SeriesInput] = field(default_factory=list)
    skipped_files: list[SkippedFile] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        """A one-line message when the study has nothing to predict, else None."""
        if self.used:
            return None
        reasons = "; ".join(f"{s.series_uid}: {s.reason}" for s in self.skipped)
        return f"study {self.study_uid}: no usable axial CT series ({reasons or 'no series'})"

    def to_dict(self, root: Path | None = None) -> dict[str, Any]:
        """A JSON-ready summary for ``studies.json``; file paths are made relative to ``root`` when given."""
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "series_used": [s.to_dict() for s in self.used],
            "series_skipped": [s.to_dict() for s in self.skipped],
            "files_skipped": [{"path": _show(f.path, root), "reason": f.reason} for f in self.skipped_files],
            "problem": self.problem,
            "folder": self.folder(root),
        }

    def folder(self, root: Path | None = None) -> str:
        """The deepest folder holding every file of the study (kept, skipped and left-out ones), relative to
        ``root`` when it lies below it (``.`` for ``root`` itself): where the study sits in the input, e.g. the
        study folder of a dataset laid out one folder a study (CQ500)."""
        files = [f for s in (*self.used, *self.skipped) for f in s.files] + [f.path for f in self.skipped_files]
        if not files:
            return "."
        common = Path(os.path.commonpath([str(Path(f).parent) for f in files]))
        return _show(common, root)


@dataclass
class StudyInputs:
    """Everything found in one input.

    Attributes:
        source: the folder or zip the user gave.
        root: the folder that was scanned (the extraction folder for a zip, inside ``workdir``).
        studies: study UID → :class:`StudyInput`, sorted by UID.
        skipped_files: files that belong to no study (not DICOM, unreadable, no UIDs), with reasons.
    """

    source: Path
    root: Path
    studies: dict[str, StudyInput]
    skipped_files: list[SkippedFile]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary of every study and every skipped file."""
        return {
            "source": str(self.source),
            "studies": {uid: s.to_dict(self.root) for uid, s in self.studies.items()},
            "files_skipped": [{"path": _show(f.path, self.root), "reason": f.reason} for f in self.skipped_files],
        }


def _show(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` when it lies below it (shorter, and stable across temp folders)."""
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Safe zip extraction


def _unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a member name or type must not be extracted, judged from the archive alone; None if acceptable."""
    name = info.filename
    if "\x00" in name:
        return "NUL byte in the name"
    # Zip names use "/", but archives written on Windows may hold "\": judge both spellings.
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return "absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "'..' component (path traversal)"
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # 3 = Unix: the high 16 bits are st_mode
        return "symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted member"
    return None


def safe_extract_zip(
    zip_path: str | os.PathLike[str], dest_parent: str | os.PathLike[str], limits: ZipLimits = ZipLimits()
) -> Path:
    """Extract ``zip_path`` into a new temporary folder inside ``dest_parent``.

    Every member is checked before anything is written: absolute names, drive letters, ``..`` components,
    symbolic links and encrypted members are refused, as is any name whose resolved path leaves the folder;
    the member count, the declared total size and each member's compression ratio are capped. While writing,
    the bytes actually produced are counted again (a header can lie). On any refusal the folder is removed and
    :class:`UnsafeArchiveError` names the member and the reason; nothing is ever written outside the folder.

    Args:
        zip_path: the archive.
        dest_parent: existing or new folder in which the extraction folder is created.
        limits: caps against zip bombs.

    Returns:
        The extraction folder (``dest_parent/zip-XXXX``); the caller removes it when done.

    Raises:
        UnsafeArchiveError: the archive is unreadable, unsafe or over a limit.
    """
    zip_path = Path(zip_path)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchiveError(f"{zip_path}: not a readable zip file ({exc})") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise UnsafeArchiveError(
                f"{zip_path}: rejected: {len(infos)} members, more than the limit of {limits.max_members} (zip bomb?)"
            )
        declared = 0
        for info in infos:
            reason = _unsafe_member_reason(info)
            if reason is None and info.file_size >= limits.ratio_min_bytes:
                ratio = info.file_size / max(info.compress_size, 1)
                if ratio > limits.max_ratio:
                    reason = f"compression ratio {ratio:.0f}, above the limit of {limits.max_ratio:.0f} (zip bomb?)"
            if reason is not None:
                raise UnsafeArchiveError(f"{zip_path}: rejected: member {info.filename!r}: {reason}")
            declared += info.file_size
        if declared > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{zip_path}: rejected: {declared} bytes uncompressed, more than the limit of "
                f"{limits.max_total_bytes} (zip bomb?)"
            )

        dest_parent = Path(dest_parent)
        dest_parent.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="zip-", dir=dest_parent)).resolve()
        try:
            _extract_members(archive, infos, dest, zip_path, limits)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


def _extract_members(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, zip_path: Path, limits: ZipLimits
) -> None:
    """Write the (already vetted) members below ``dest``, re-checking each target path and the byte count."""
    written = 0
    for info in infos:
        target = (dest / info.filename).resolve()
        # The names were vetted; this catches anything the name rules missed (e.g. platform quirks).
        if target != dest and dest not in target.parents:
            raise UnsafeArchiveError(f"{zip_path}: rejected: member {info.filename!r} resolves outside the folder")
        try:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_total_bytes:
                        raise UnsafeArchiveError(
                            f"{zip_path}: rejected: more than {limits.max_total_bytes} bytes uncompressed "
                            f"while extracting {info.filename!r} (zip bomb?)"
                        )
                    dst.write(chunk)
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError) as exc:
            # A corrupt member, an unsupported compression or a name clash (a file where a folder must go).
            raise UnsafeArchiveError(f"{zip_path}: member {info.filename!r} cannot be extracted ({exc})") from exc


# --------------------------------------------------------------------------------------------------------------
# Header reading


def read_identity(path: str | os.PathLike[str]) -> dict[str, Any] | str:
    """Read what grouping and series selection need from one file: UIDs, modality, image type, description.

    This is deliberately light: it only has to place a file in a study and series and tell CT from MR and a
    localizer from an image series. Files of candidate series are then validated by the index's own
    :func:`rsna19.io.dicom_header.read_slice_headers` (geometry, truncation, pixel buffer), so predict-study accepts and
    rejects slices exactly like ``rsna19 index``.

    Args:
        path: any file.

    Returns:
        ``{"sop_uid", "study_uid", "series_uid", "patient_id", "modality", "image_type", "description"}``
        (``image_type`` a tuple of upper-case str, ``modality`` upper case, "CT" for a CT SOP class without a
        Modality element), or a one-line reason why the file is not a DICOM image. Never raises for a bad file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with open(path, "rb") as fp, warnings.catch_warnings():
            # Kaggle-style "ID_<hex>" UIDs and vendor quirks warn on every file; the checks below judge the file.
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=1 << 16)
            except InvalidDicomError:
                # Old files without the 128-byte preamble start directly with a group 0002 or 0008 element;
                # forcing anything else would parse random bytes as tags.
                fp.seek(0)
                if fp.read(2) not in (b"\x02\x00", b"\x08\x00"):
                    return "not a DICOM file (no 'DICM' prefix)"
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=1 << 16, force=True)
            get = ds.get
            ident: dict[str, Any] = {key: str(get(tag, "") or "").strip() for key, tag in UID_KEYWORDS.items()}
            modality = str(get("Modality", "") or "").strip().upper()
            if not modality and is_ct_sop_class(str(get("SOPClassUID", "")).strip()):
                modality = "CT"
            ident.update(
                patient_id=str(get("PatientID", "") or "").strip(),
                modality=modality,
                image_type=tuple(str(v).strip().upper() for v in _as_list(get("ImageType"))),
                description=str(get("SeriesDescription", "") or "").strip(),
                hints=header_hints(ds),  # kernel, body part, contrast, temporal position: for the series ranking
            )
    except Exception as exc:  # noqa: BLE001 - a bad file must become a reason, whatever pydicom raises
        return " ".join(f"unreadable DICOM header ({type(exc).__name__}: {exc})".split())[:200]

    missing = [tag for key, tag in UID_KEYWORDS.items() if not ident[key]]
    if len(missing) == len(UID_KEYWORDS):
        return "not a DICOM image (no SOP, series or study UID; a DICOMDIR or a file cut short?)"
    if missing:
        return f"no {' / '.join(missing)}"
    return ident


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _localizer_tokens(ident: dict[str, Any]) -> list[str]:
    return sorted({t for t in ident["image_type"] if t in LOCALIZER_TOKENS})


def _read_file(path: Path) -> tuple[dict[str, Any] | str, list[dict[str, Any]] | str | None]:
    """Identity of one file and, for a CT image that is not a localizer, its validated index rows (or reason).

    A multi-frame file gives one row per frame. A file whose transfer syntax no installed package decodes is
    rejected here, with the syntax and what to install in the reason, so that studies.json names it.
    """
    ident = read_identity(path)
    if isinstance(ident, str) or ident["modality"] != "CT" or _localizer_tokens(ident):
        return ident, None
    rows = read_slice_headers(path)
    if isinstance(rows, list):
        problem = decoder_problem(rows[0]["transfer_syntax"])
        if problem:
            return ident, problem
    return ident, rows


# --------------------------------------------------------------------------------------------------------------
# Grouping and series selection


def _is_ct_image(ident: dict[str, Any]) -> bool:
    return ident["modality"] == "CT" and not _localizer_tokens(ident)


def _not_ct_image_reason(ident: dict[str, Any]) -> str:
    if ident["modality"] != "CT":
        return f"modality {ident['modality'] or 'none'} in a CT series"
    return f"localizer image (ImageType contains {'/'.join(_localizer_tokens(ident))}) in a CT series"


_FileInfo = tuple[Path, dict[str, Any], "dict[str, Any] | str | None"]


def _select_series(
    series_uid: str, files: list[_FileInfo], rules: SelectionRules, root: Path
) -> tuple[SeriesInput, list[SkippedFile]]:
    """Decide whether one series is kept; returns it (with a reason if skipped) and the files dropped from it."""
    files = sorted(files, key=lambda f: str(f[0]))
    # A file whose Modality or ImageType disagrees with CT image files of the same series UID is a damaged or
    # misfiled file: it is dropped alone (with its reason) rather than taking the whole series down with it.
    odd: list[SkippedFile] = []
    if any(_is_ct_image(ident) for _, ident, _ in files) and not all(_is_ct_image(ident) for _, ident, _ in files):
        odd = [SkippedFile(p, _not_ct_image_reason(ident)) for p, ident, _ in files if not _is_ct_image(ident)]
        files = [f for f in files if _is_ct_image(f[1])]
    first = files[0][1]
    modalities = sorted({ident["modality"] or "none" for _, ident, _ in files})

    def make(kept: list[_FileInfo], reason: str | None, **kwargs: Any) -> SeriesInput:
        return SeriesInput(
            series_uid=series_uid,
            study_uid=first["study_uid"],
            patient_id=first["patient_id"],
            modality="/".join(modalities),
            description=first["description"],
            files=[p for p, _, _ in kept],
            sop_uids=[ident["sop_uid"] for _, ident, _ in kept],
            frames=[row["frame"] if isinstance(row, dict) else 0 for _, _, row in kept],
            reason=reason,
            **kwargs,
        )

    if modalities != ["CT"]:
        return make(files, f"modality {'/'.join(modalities)}, not CT"), []
    localizer = sorted({t for _, ident, _ in files for t in _localizer_tokens(ident)})
    if localizer:
        return make(files, f"localizer image (ImageType contains {'/'.join(localizer)})"), []

    dropped: list[SkippedFile] = odd
    kept: list[_FileInfo] = []
    seen: dict[str, Path] = {}
    for path, ident, row in files:
        if not isinstance(row, dict):  # the index's reason: no position, truncated, wrong buffer size …
            dropped.append(SkippedFile(path, str(row)))
        elif ident["sop_uid"] in seen:
            sop = ident["sop_uid"]
            dropped.append(SkippedFile(path, f"duplicate SOPInstanceUID {sop} (also in {_show(seen[sop], root)})"))
        else:
            seen[ident["sop_uid"]] = path
            kept.append((path, ident, row))
    if not kept:
        reasons = sorted({f.reason for f in dropped})
        return make(files, f"no usable slice ({'; '.join(reasons)})"), dropped

    kept = _pick_geometry(kept, dropped)
    reason = _geometry_problem([row for _, _, row in kept], rules)
    if reason is not None:
        return make(kept, reason), dropped
    return _ordered_series(make, kept, dropped), dropped


def _slice_geometry(row: dict[str, Any]) -> SliceGeometry:
    """What must agree between the slices of a series (:func:`rsna19.io.dicom.pick_geometry`), from an index row."""
    return SliceGeometry(
        (int(row["rows"]), int(row["cols"])),
        tuple(float(row[f"iop_{i}"]) for i in range(6)),
        (float(row["pixel_spacing_row"]), float(row["pixel_spacing_col"])),
    )


def _pick_geometry(kept: list[_FileInfo], dropped: list[SkippedFile]) -> list[_FileInfo]:
    """The slices that agree with the series geometry (the converter's rule, :func:`rsna19.io.dicom.pick_geometry`);
    the others (damaged or misfiled files, stray localizers) go to ``dropped`` with their reasons."""
    indices, off = pick_geometry([_slice_geometry(row) for _, _, row in kept])
    dropped.extend(SkippedFile(kept[i][0], why) for i, why in off)
    return [kept[i] for i in indices]


def _geometry_problem(rows: list[dict[str, Any]], rules: SelectionRules) -> str | None:
    """Why the slices cannot form one axial volume (mixed geometry, not axial, too few), or None."""
    geometries = [_slice_geometry(r) for r in rows]
    ref = geometries[0]
    if any(max(abs(a - b) for a, b in zip(g.iop, ref.iop)) > ORIENTATION_TOL for g in geometries):
        return "mixed orientations within the series"
    sizes = sorted({g.shape for g in geometries})
    if len(sizes) > 1:
        return f"mixed image sizes within the series ({', '.join(f'{a}x{b}' for a, b in sizes)})"
    if not all(g.agrees(ref) for g in geometries):
        return "mixed pixel spacings within the series"
    normal = series_normal(np.array([g.iop for g in geometries]))
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > rules.max_axial_angle_deg:
        return (
            f"not axial: slice normal {angle:.0f}° from the z axis (limit {rules.max_axial_angle_deg:g}°; "
            "a sagittal or coronal reformat?)"
        )
    if len(rows) < rules.min_slices:
        return f"{len(rows)} slice(s), fewer than {rules.min_slices}"
    return None


def _ordered_series(make: Any, kept: list[_FileInfo], dropped: list[SkippedFile]) -> SeriesInput:
    """The kept series in the converter's slice order (:func:`rsna19.conversion.geometry.order_slices`: position
    along the series normal, ties by slice UID; a slice at the position of another is dropped), with its facts."""
    rows = [row for _, _, row in kept]
    iop = series_orientation(np.array([[r[f"iop_{i}"] for i in range(6)] for r in rows], dtype=np.float64))
    ipps = np.array([[r["ipp_x"], r["ipp_y"], r["ipp_z"]] for r in rows], dtype=np.float64)
    positions = positions_along_normal(ipps, slice_normal(iop))
    order, duplicates = order_slices(positions, [ident["sop_uid"] for _, ident, _ in kept])
    for dup, first_at in duplicates:
        why = f"duplicate position {positions[dup]:.3f} mm (kept {kept[first_at][1]['sop_uid']})"
        dropped.append(SkippedFile(kept[dup][0], why))
    series = make(
        [kept[i] for i in order], None, positions=[float(positions[i]) for i in order], tilt_deg=tilt_deg(iop)
    )
    first_row, first = rows[0], kept[0][1]
    window = (first_row["window_center"], first_row["window_width"])
    series.facts = series_facts(
        series.series_uid,
        series.description,
        first["image_type"],
        [ident["hints"] for _, ident, _ in kept],
        series.positions,
        [r["slice_thickness"] for r in rows],
        (first_row["pixel_spacing_row"], first_row["pixel_spacing_col"]),
        (first_row["rows"], first_row["cols"]),
        None if any(v is None or not math.isfinite(float(v)) for v in window) else window,
        [r["transfer_syntax"] for r in rows],
    )
    return series


def _walk(root: Path, exclude: Path | None) -> list[Path]:
    """Every regular file below ``root`` (symlinked folders are not followed), sorted, skipping ``exclude``."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and (here == exclude or exclude in here.parents):
            dirnames[:] = []
            continue
        dirnames.sort()
        files.extend(here / name for name in sorted(filenames))
    return files


def collect_studies(
    path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    rules: SelectionRules = SelectionRules(),
    limits: ZipLimits = ZipLimits(),
    workers: int = 1,
) -> StudyInputs:
    """Group the DICOM files of a folder or zip into studies and series and pick the series to predict.

    Args:
        path: a folder (walked recursively), a ``.zip`` (extracted safely into a new folder inside ``workdir``)
            or a single file.
        workdir: scratch folder owned by the caller; a zip's extraction folder is created in it and stays there
            (the converter reads the files later): remove ``workdir`` when done.
        rules: series selection rules.
        limits: zip-bomb caps.
        workers: processes reading headers (1 reads in this process).

    Returns:
        The studies (kept and skipped series with reasons) and the files that belong to no study.

    Raises:
        UserError: ``path`` does not exist.
        UnsafeArchiveError: the zip is unreadable, unsafe or over a limit.
    """
    source = Path(path)
    workdir = Path(workdir)
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    if source.is_dir():
        root = source.resolve()
        # A workdir inside the input folder holds our own extracted copies: never read them as input.
        files = _walk(root, workdir.resolve())
    elif zipfile.is_zipfile(source):
        root = safe_extract_zip(source, workdir, limits)
        files = _walk(root, None)
    else:
        root = source.resolve().parent
        files = [source.resolve()]

    return group_files(files, source, root, rules=rules, workers=workers)


def group_files(
    files: list[Path],
    source: Path,
    root: Path,
    *,
    rules: SelectionRules = SelectionRules(),
    workers: int = 1,
) -> StudyInputs:
    """Read the headers of ``files`` and group them into studies and series (:func:`collect_studies` after the
    files were found).

    Args:
        files: the files to read (any file: the unusable ones become skipped files with their reasons).
        source: what the user gave (recorded in the result).
        root: the folder the files are shown relative to.
        rules: series selection rules.
        workers: processes reading headers (1 reads in this process).
    """
    if workers > 1 and len(files) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            infos = list(pool.map(_read_file, files, chunksize=max(1, len(files) // (4 * workers))))
    else:
        infos = [_read_file(f) for f in files]

    skipped_files: list[SkippedFile] = []
    by_series: dict[tuple[str, str], list[_FileInfo]] = defaultdict(list)
    for file, (ident, rows) in zip(files, infos):
        if isinstance(ident, str):
            skipped_files.append(SkippedFile(file, ident))
        elif isinstance(rows, list):
            # One entry a slice: the frames of a multi-frame file become slices with their own UIDs from here on.
            for row in rows:
                by_series[(ident["study_uid"], ident["series_uid"])].append(
                    (file, {**ident, "sop_uid": row["sop_uid"]}, row)
                )
        else:
            by_series[(ident["study_uid"], ident["series_uid"])].append((file, ident, rows))

    studies: dict[str, StudyInput] = {}
    for (study_uid, series_uid), members in sorted(by_series.items()):
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = StudyInput(study_uid=study_uid, patient_id=members[0][1]["patient_id"])
        series, dropped = _select_series(series_uid, members, rules, root)
        (study.used if series.used else study.skipped).append(series)
        study.skipped_files.extend(dropped)
    return StudyInputs(source=source, root=root, studies=studies, skipped_files=skipped_files)
