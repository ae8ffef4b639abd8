"""Every kind of DICOM object rsna19 writes, checked by Debian's dciodvfy (dicom3tools) and DCMTK's dsrdump.

The objects are written by the same functions predict-study and the node use (rsna19/inference/dicom_out.py and
seg_out.py), from small synthetic head series written with pydicom (single-frame CT and Enhanced CT), without a
bundle, so this runs in seconds:

* SR of a positive study (``any`` and a subtype present), of a negative study whose subtypes are over their own
  operating points (withheld, with the comment), and of a not-assessable study (Indeterminate + reasons);
* SC of the report picture;
* SEG of a seg_aux-style map (one segment per subtype) and of a Grad-CAM map (one ``any`` segment), over
  single-frame sources and over the frames of an Enhanced CT file.

Each must give 0 errors under dciodvfy and no "Unrecognized" term warning (no private coding scheme); dsrdump must
read every SR. Without the tools the tests are skipped; ``make test-dicom`` installs them (tests/dicom/
ensure_tools.sh) and sets ``RSNA19_REQUIRE_DICOM_TOOLS=1``, under which a missing tool fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pydicom
import pytest
from dicom_objects import write_objects

from rsna19.inference.dicom_out import FINDING_CODES

REQUIRE = os.environ.get("RSNA19_REQUIRE_DICOM_TOOLS") == "1"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{name} not installed (make test-dicom installs dicom3tools and dcmtk)")
        pytest.skip(f"{name} not installed (Debian packages dicom3tools / dcmtk; make test-dicom installs them)")
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every kind of object, written once: name → path."""
    return write_objects(tmp_path_factory.mktemp("conformance"))


OBJECTS = ("sr_positive", "sr_negative", "sr_not_assessable", "sr_enhanced", "sc", "seg_subtypes",
           "seg_gradcam_enhanced")  # fmt: skip


@pytest.mark.parametrize("name", OBJECTS)
def test_dciodvfy_finds_no_error_and_no_unrecognized_term(written, name):
    res = subprocess.run([_tool("dciodvfy"), str(written[name])], capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    unrecognized = [line for line in lines if "Unrecognized" in line]
    assert not errors, f"{name}: {errors}"
    assert not unrecognized, f"{name}: {unrecognized}"


@pytest.mark.parametrize("name", [o for o in OBJECTS if o.startswith("sr")])
def test_dsrdump_reads_every_sr_and_every_finding_is_snomed(written, name):
    res = subprocess.run([_tool("dsrdump"), "-Ec", str(written[name])], capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "error" not in text.lower(), text[-2000:]
    for value, _meaning in FINDING_CODES.values():
        assert f"({value},SCT," in text, value
    assert "99RSNA19" not in text


def test_negative_study_marks_no_subtype_present(written):
    """The bleed-free study's subtypes are over their own operating points, yet none is Present; each says why."""
    sr = pydicom.dcmread(written["sr_negative"])
    found = {}
    for group in sr.ContentSequence:
        if group.ValueType != "CONTAINER":
            continue
        for g in group.get("ContentSequence") or []:
            items = g.get("ContentSequence") or []
            finding = [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
            if not finding:
                continue
            code = finding[0].ConceptCodeSequence[0].CodeValue
            evaluations = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == code]
            comments = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
            found[code] = (evaluations[0].ConceptCodeSequence[0].CodeMeaning, comments)
    assert {v for v, _ in found.values()} == {"Absent"} and len(found) == 6
    withheld = written["negative_result"]["subtypes_withheld"]
    for cls in withheld:
        assert any("not reported" in c for c in found[FINDING_CODES[cls][0]][1])
