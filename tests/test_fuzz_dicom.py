"""Fuzzing the DICOM input stages: mutated files mixed with good ones never crash or stall a stage.

Valid slices are written with :func:`rsna19.io.dicom_write.write_ct_dicom`; one more slice of the same series is
mutated (truncated, bytes flipped, elements dropped, values replaced by wrong-VR / non-numeric / NaN / zero /
huge ones, Rows × Columns that do not match the buffer) and put in the folder with the good ones. Then
``build_index``, ``run_convert`` and ``collect_studies`` (predict-study's input stage) each run on the folder, and:

* no exception escapes;
* the mutated file is either processed or listed with a non-empty reason (``index_errors.csv``,
  ``convert_errors.csv``, skipped files / series of predict-study);
* every good file is indexed, converted and kept for prediction (a good slice may only give way to the mutant
  where both claim the same SOPInstanceUID or slice position, and then with that reason);
* each stage stays within a time bound, and a file that claims a huge image does not make anything allocate it.

Profiles: ``ci`` (default: a few dozen derandomised examples, part of ``make test``) and ``fuzz`` (thousands of
random examples: ``HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz_dicom.py`` or ``make fuzz``).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsna19.conversion.read import read_slice
from rsna19.conversion.run import run_convert
from rsna19.inference.inputs import collect_studies
from rsna19.io.dicom_header import read_header
from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom
from rsna19.io.index import build_index, errors_path

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile("fuzz", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Generous bounds for one tiny file / one stage on a busy 2-core machine; a hang or a GB allocation blows them.
HEADER_SECONDS = 2.0
STAGE_SECONDS = 30.0
SIZE = 32
N_GOOD = 4

# Elements the mutations target (explicit VR little endian, as written by write_ct_dicom).
TAGS = {
    "Modality": 0x00080060,
    "SOPInstanceUID": 0x00080018,
    "PatientID": 0x00100020,
    "SliceThickness": 0x00180050,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "InstanceNumber": 0x00200013,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "SamplesPerPixel": 0x00280002,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
    "WindowCenter": 0x00281050,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
    "PixelData": 0x7FE00010,
}
TEXT_TAGS = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "InstanceNumber",
    "RescaleIntercept",
    "RescaleSlope",
    "WindowCenter",
    "Modality",
    "SOPInstanceUID",
]
BAD_TEXT = [
    b"NaN",
    b"nan\\nan\\nan",
    b"0\\0\\inf",
    b"-inf",
    b"0\\0",
    b"0",
    b"-1\\-1",
    b"1e309\\1\\1",
    b"abc",
    b"",
    b"1\\2",
    b"1\\2\\3",
    b"1\\0\\0\\1\\0\\0",  # parallel row / column cosines
    b"0\\0\\0\\0\\0\\0",
    b"\\\\\\",
    b"9" * 80,
    b"\xff\xfe\x00\x01",
    b"MR",
]
VRS = ["DS", "IS", "LO", "CS", "US", "UL", "SS", "FD", "OB", "UN", "SQ", "XX"]
US_VALUES = [0, 1, 2, 7, 12, 16, 17, 64, SIZE * 2, 65535]
_VR_LENGTH_32 = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


# ----------------------------------------------------------------------------------------------------------------
# A tiny explicit-VR-little-endian element editor (the files written by write_ct_dicom have no sequences)


def split_elements(data: bytes) -> tuple[bytes, list[tuple[int, bytes, bytes]]]:
    """``(head, [(tag, vr, value)])``: the preamble + file meta kept as one block, then the dataset elements."""
    pos, elements, head_end = 132, [], None
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4 : pos + 6]
        if vr in _VR_LENGTH_32:
            if pos + 12 > len(data):
                break
            (length,) = struct.unpack_from("<L", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if group != 0x0002 and head_end is None:
            head_end = pos
        if group != 0x0002:
            elements.append((group << 16 | elem, vr, data[start : start + length]))
        pos = start + length
    if head_end is None:  # cut inside the file meta: nothing to edit
        return data, []
    return data[:head_end], elements


def join_elements(head: bytes, elements: list[tuple[int, bytes, bytes]]) -> bytes:
    out = [head]
    for tag, vr, value in elements:
        if len(value) % 2:
            value += b" " if vr not in (b"OB", b"UN", b"US", b"UL") else b"\0"
        if vr in _VR_LENGTH_32:
            out.append(struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value)
        else:
            out.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value) & 0xFFFF) + value)
    return b"".join(out)


def set_element(data: bytes, name: str, vr: bytes | None, value: bytes | None) -> bytes:
    """Replace (``value``), retype (``vr``) or drop (``value is None``) one dataset element."""
    head, elements = split_elements(data)
    if not elements:
        return data
    tag = TAGS[name]
    out = []
    for t, v, val in elements:
        if t != tag:
            out.append((t, v, val))
        elif value is not None:
            out.append((t, vr or v, value))
    return join_elements(head, out)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """Apply mutation operations in turn (see :func:`mutations`)."""
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            data = data[: int(op[1] * len(data))]
        elif kind == "flip":
            buf = bytearray(data)
            for where, mask in op[1]:
                if buf:
                    buf[min(int(where * len(buf)), len(buf) - 1)] ^= mask
            data = bytes(buf)
        elif kind == "drop":
            data = set_element(data, op[1], None, None)
        elif kind == "text":
            data = set_element(data, op[1], op[3].encode(), op[2])
        elif kind == "us":  # Rows / Columns / bits that disagree with the buffer, possibly as a 4-byte UL
            name, value, vr = op[1], op[2], op[3]
            raw = struct.pack("<L", value) if vr == "UL" else struct.pack("<H", value & 0xFFFF)
            data = set_element(data, name, vr.encode(), raw)
    return data


def mutations() -> st.SearchStrategy[list[tuple]]:
    """One to three mutation operations."""
    frac = st.floats(0.0, 1.0, allow_nan=False)
    op = st.one_of(
        st.tuples(st.just("truncate"), frac),
        st.tuples(st.just("flip"), st.lists(st.tuples(frac, st.integers(1, 255)), min_size=1, max_size=8)),
        st.tuples(st.just("drop"), st.sampled_from(sorted(TAGS))),
        st.tuples(st.just("text"), st.sampled_from(TEXT_TAGS), st.sampled_from(BAD_TEXT), st.sampled_from(VRS)),
        st.tuples(
            st.just("us"),
            st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"]),
            st.sampled_from([*US_VALUES, 10**9]),
            st.sampled_from(["US", "UL"]),
        ),
    )
    return st.lists(op, min_size=1, max_size=3)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _write_slice(path: Path, k: int) -> None:
    rng = np.random.default_rng(k)
    hu = np.full((SIZE, SIZE), -1024.0)
    hu[4:-4, 4:-4] = 40 + rng.normal(0, 5, (SIZE - 8, SIZE - 8))  # a "head", so the crop centre is defined
    write_ct_dicom(
        path,
        hu,
        SliceGeometry(ipp=(-16.0, -16.0, 100.0 + 5 * k), iop=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.5, 0.5)),
        sop_uid=f"ID_sop{k:04d}",
        series_uid="ID_series",
        study_uid="ID_study",
        patient_id="ID_patient",
        instance_number=k + 1,
        variant=StorageVariant(signed=bool(k % 2)),
    )


class _Templates(tuple):
    """(good files by name, template bytes), with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<{len(self[0])} good files and a {len(self[1])}-byte template>"


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> tuple[dict[str, bytes], bytes]:
    """The good files (name → bytes) and the bytes of one more valid slice of the same series, to mutate."""
    root = tmp_path_factory.mktemp("fuzz_templates")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(N_GOOD + 1):
            _write_slice(root / f"good_{k}.dcm", k)
    good = {f"good_{k}.dcm": (root / f"good_{k}.dcm").read_bytes() for k in range(N_GOOD)}
    return _Templates((good, (root / f"good_{N_GOOD}.dcm").read_bytes()))


GOOD_SOPS = {f"ID_sop{k:04d}" for k in range(N_GOOD)}
#: The only reasons for which a good slice may give way to the mutant (they claim the same identity or place).
CONFLICT = ("duplicate SOPInstanceUID", "duplicate position")


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    elapsed = time.perf_counter() - t0
    assert elapsed < STAGE_SECONDS, f"{fn.__name__} took {elapsed:.1f} s"
    return out


def check_stages(folder: Path, work: Path, mutant: Path) -> None:
    """Run the three input stages on ``folder`` and check the properties of the module docstring."""
    good_paths = {str(p) for p in folder.glob("good_*.dcm")}
    t0 = time.perf_counter()
    header = read_header(mutant)
    assert time.perf_counter() - t0 < HEADER_SECONDS
    assert isinstance(header, dict) or (isinstance(header, str) and header.strip())

    # index
    index = _timed(build_index, [folder], out=work / "index.parquet", workers=1, progress=False, overwrite=True)
    errors = pd.read_csv(errors_path(work / "index.parquet"), keep_default_na=False)
    assert (errors["reason"].str.strip() != "").all()
    indexed, reported = set(index["path"]), dict(zip(errors["path"], errors["reason"]))
    assert str(mutant) in indexed or str(mutant) in reported
    for p in good_paths - indexed:
        assert reported[p].startswith(CONFLICT), (p, reported[p])

    # convert
    summary = _timed(run_convert, index, work / "cache", workers=1, force=True, progress=False)
    cache_index = pd.read_parquet(work / "cache" / "cache_index.parquet")
    conv_errors = pd.read_csv(work / "cache" / "convert_errors.csv", keep_default_na=False)
    assert (conv_errors["reason"].str.strip() != "").all()
    converted = set(cache_index["sop_uid"])
    by_sop = dict(zip(index["sop_uid"], index["path"]))
    for sop, path in by_sop.items():
        if sop not in converted:
            reasons = conv_errors.loc[conv_errors["path"].isin([path, ""]), "reason"].tolist()
            assert reasons, f"{path} neither converted nor reported"
            if path in good_paths:
                assert any(r.startswith(CONFLICT) for r in reasons), (path, reasons)
    assert summary.n_series == index["series_uid"].nunique()

    # predict-study's input stage
    inputs = _timed(collect_studies, folder, work / "ps")
    used = {str(f) for s in inputs.studies.values() for series in s.used for f in series.files}
    skipped = {str(f.path): f.reason for f in inputs.skipped_files}
    for study in inputs.studies.values():
        skipped.update({str(f.path): f.reason for f in study.skipped_files})
        for series in study.skipped:
            assert series.reason and series.reason.strip()
            skipped.update({str(f): series.reason for f in series.files})
    assert all(r and r.strip() for r in skipped.values())
    assert str(mutant) in used or str(mutant) in skipped
    for p in good_paths - used:
        assert skipped[p].startswith(CONFLICT), (p, skipped[p])


@PROFILE
@given(ops=mutations())
def test_mutated_file_among_good_ones(templates, ops):
    good, template = templates
    with tempfile.TemporaryDirectory(prefix="rsna19-fuzz-") as tmp:
        folder, work = Path(tmp) / "in", Path(tmp) / "work"
        folder.mkdir()
        for name, data in good.items():
            (folder / name).write_bytes(data)
        mutant = folder / "zz_mutant.dcm"  # sorts last: where identities clash, the good file is the first seen
        mutant.write_bytes(mutate(template, ops))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_stages(folder, work, mutant)


def test_editor_round_trip(templates):
    good, template = templates
    head, elements = split_elements(template)
    assert join_elements(head, elements) == template
    assert read_header_bytes(set_element(template, "Rows", b"US", struct.pack("<H", SIZE))) is not None


def read_header_bytes(data: bytes) -> dict | str:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        return read_header(f.name)


@pytest.mark.parametrize(
    ("rows", "cols", "vr"),
    [(65535, 65535, "US"), (10**9, 10**9, "UL"), (SIZE, 10**9, "UL"), (1, 1, "US")],
    ids=["us-max", "ul-1e9", "cols-1e9", "too-small"],
)
def test_huge_image_claims_are_refused_without_allocating(templates, tmp_path, rows, cols, vr):
    """A header claiming far more pixels than the file holds is refused before any buffer of that size exists."""
    _, template = templates
    data = mutate(template, [("us", "Rows", rows, vr), ("us", "Columns", cols, vr)])
    path = tmp_path / "huge.dcm"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        reason = read_header(path)
        with pytest.raises(ValueError, match="pixel|Rows|buffer|decode"):
            read_slice(path)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(reason, str) and ("pixel buffer" in reason or "Rows" in reason), reason
    assert elapsed < HEADER_SECONDS
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a {len(data)}-byte file"


def test_many_bad_files_do_not_lose_good_ones(templates, tmp_path):
    """A fixed sample of every mutation kind at once, in one folder: the good slices all survive all stages."""
    good, template = templates
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in good.items():
        (folder / name).write_bytes(data)
    cases = [
        [("truncate", 0.1)],
        [("truncate", 0.9)],
        [("drop", "PixelData")],
        [("drop", "ImagePositionPatient")],
        [("text", "PixelSpacing", b"0\\0", "DS")],
        [("text", "ImagePositionPatient", b"NaN\\NaN\\NaN", "DS")],
        [("text", "ImageOrientationPatient", b"1\\0\\0\\1\\0\\0", "DS")],
        [("text", "ImagePositionPatient", b"1\\2\\3", "FD")],
        [("us", "Rows", 65535, "US")],
        [("flip", [(0.5, 0xFF), (0.6, 0x10)])],
    ]
    for i, ops in enumerate(cases):
        (folder / f"zz_bad_{i:02d}.dcm").write_bytes(mutate(template, ops))
    (folder / "zz_not_dicom.txt").write_text("hello")
    (folder / "zz_empty.dcm").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = build_index([folder], out=tmp_path / "index.parquet", workers=1, progress=False)
        assert set(index["sop_uid"]) >= GOOD_SOPS
        run_convert(index, tmp_path / "cache", workers=2, progress=False)
        assert set(pd.read_parquet(tmp_path / "cache" / "cache_index.parquet")["sop_uid"]) >= GOOD_SOPS
        inputs = collect_studies(folder, tmp_path / "ps", workers=2)
    used = {f.name for s in inputs.studies.values() for series in s.used for f in series.files}
    assert set(good) <= used
    shutil.rmtree(tmp_path / "ps", ignore_errors=True)
