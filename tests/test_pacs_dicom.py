"""Orthanc stores the SR, SC and SEG rsna19 writes in the source study (``make test-pacs``; marker ``pacs``).

The source CT series is uploaded to a throw-away Orthanc (tests/pacs/orthanc.py: its own storage and loopback
ports); the SR, SC and SEG of that study (tests/dicom_objects.py: the writers predict-study and the node use) are
C-STOREd with the node's sender (rsna19.serve.sender.send_files) as the declared modality RSNA19. Orthanc must
hold all three in the source study, the SEG referencing the source CT instances. Without Orthanc the test is
skipped; under ``RSNA19_REQUIRE_PACS=1`` it fails instead.
"""

from __future__ import annotations

import os

import pytest
from dicom_objects import write_objects
from pacs.orthanc import Modality, Orthanc, find_orthanc, free_port

pytestmark = pytest.mark.pacs

STUDY_UID = "1.2.826.0.1.3680043.10.1226.78"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def test_orthanc_stores_sr_sc_and_seg_in_the_source_study(tmp_path):
    if find_orthanc() is None:
        if os.environ.get("RSNA19_REQUIRE_PACS") == "1":
            pytest.fail("Orthanc is not installed (apt-get install -y orthanc)")
        pytest.skip("Orthanc is not installed; `make test-pacs` installs it")
    from rsna19.serve.config import Destination
    from rsna19.serve.sender import send_files

    objects = write_objects(tmp_path / "objects", STUDY_UID)
    node = Modality("RSNA19", "127.0.0.1", free_port())
    with Orthanc(tmp_path / "orthanc", modalities={"rsna19": node}) as pacs:
        for path in objects["src"]:
            pacs.upload(path)
        files = [objects["sr_positive"], objects["sc"], objects["seg_subtypes"]]
        send_files(files, Destination.parse(f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"), "RSNA19", 30.0)
        assert pacs.studies() and len(pacs.studies()) == 1  # one study: the answers joined the source study
        by_modality = pacs.instances_by_modality(STUDY_UID)
        assert len(by_modality["CT"]) == len(objects["src"])
        classes = [t["SOPClassUID"] for tags in by_modality.values() for t in tags]
        assert classes.count(SR_CLASS) == classes.count(SC_CLASS) == classes.count(SEG_CLASS) == 1
        (seg,) = by_modality["SEG"]
        ct = {t["SOPInstanceUID"] for t in by_modality["CT"]}
        refs = {
            r["ReferencedSOPInstanceUID"]
            for s in seg["ReferencedSeriesSequence"]
            for r in s["ReferencedInstanceSequence"]
        }
        assert refs and refs <= ct
