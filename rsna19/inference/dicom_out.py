"""DICOM results of ``predict-study --dicom-out DIR``: a TID 1500 Structured Report and a Secondary Capture.

For each predicted study two new instances in the **source study** (same StudyInstanceUID, patient and study
modules copied from the source images, each in a new series):

* ``SR_<SOPInstanceUID>.dcm``: a Comprehensive 3D SR holding a TID 1500 *Imaging Measurement Report* (procedure
  reported: LOINC 24725-4 "Head CT"). One measurement group per class (``any`` first, then the subtypes), with:

  - finding type: SNOMED CT (:data:`FINDING_CODES`): 1386000 *Intracranial hemorrhage* for ``any``, 68752002
    *Extradural hemorrhage*, 274100004 *Cerebral hemorrhage* (RSNA's intraparenchymal), 274110009
    *Intraventricular hemorrhage*, 21454007 *Subarachnoid intracranial hemorrhage*, 35486000 *Subdural
    intracranial hemorrhage*;
  - measurements (unit UCUM ``1``): DCM 122157 *Probability* (the calibrated study probability), DCM 111071
    *CAD Operating Point* (its threshold), DCM 111088 *Case Sensitivity* (the target sensitivity the threshold
    was chosen for on the OOF studies) and SCT 246262008 *Score* (the uncalibrated study score: the max slice
    probability); every code is DCM, SCT, LN or UCUM: no private coding scheme;
  - a qualitative evaluation: the finding, SCT 52101004 *Present* or SCT 272519000 *Absent* (the flag at the
    operating point; a subtype is *Present* only within a positive ``any``, and a subtype over its own operating
    point on an ``any``-negative study carries a DCM 121106 *Comment* saying why it is not reported); a study that
    is not assessable (:mod:`rsna19.inference.assess`) gets SCT 82334004 *Indeterminate* for every finding, no
    numbers, and the reasons as a *Comment*;
  - source images: the slices that drove the result (the class's highest slice probabilities), referenced by
    SOP class and instance UID; a frame of a multi-frame (Enhanced CT) image is referenced as the file's own
    SOPInstanceUID plus its ReferencedFrameNumber (never the ``<uid>.f<frame>`` slice UID used inside rsna19);
  - algorithm identification (TID 4019): name ``rsna19``, the package version, and the parameters
    ``bundle_sha256=…``, ``bundle_version=…``, ``study_model=platt/<score>``, ``subtypes=within_positive_any``.

  The SR's Current Requested Procedure Evidence lists every instance (file) of the predicted series.
* ``SC_<SOPInstanceUID>.dcm``: the report picture as an RGB Secondary Capture image.

New UIDs are derived from the bundle checksum and the source study UID, so the same study and bundle give the same
UIDs on a re-run. File names hold only the new SOP Instance UIDs, never patient data. Both files are written to a
temporary name and renamed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import atomic_path
from rsna19.core.calibration import SUBTYPE_RULE
from rsna19.core.constants import CLASSES
from rsna19.io.multiframe import frame_sop_uid, is_multiframe

if TYPE_CHECKING:
    from rsna19.inference.result import StudyResult

#: SNOMED CT *Score* (attribute): the NUM item of the uncalibrated study score (no private coding scheme is used).
SCORE_CODE = ("246262008", "Score")
#: Series numbers of the new series (high, to stay clear of a scanner's numbering).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
#: Slices referenced per class in the SR.
TOP_SLICES_PER_CLASS = 3
MANUFACTURER = "rsna19"

#: Patient and study attributes the new instances copy from the source (Type 2: empty when the source lacks them).
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: SNOMED CT concept of each class's finding (concept ID, fully specified name without the semantic tag). The RSNA
#: "intraparenchymal" class is SNOMED CT's cerebral (intracerebral) hemorrhage; "epidural" its extradural one.
FINDING_CODES: dict[str, tuple[str, str]] = {
    "any": ("1386000", "Intracranial hemorrhage (disorder)"),
    "epidural": ("68752002", "Extradural hemorrhage"),
    "intraparenchymal": ("274100004", "Cerebral hemorrhage"),
    "intraventricular": ("274110009", "Intraventricular hemorrhage"),
    "subarachnoid": ("21454007", "Subarachnoid intracranial hemorrhage"),
    "subdural": ("35486000", "Subdural intracranial hemorrhage"),
}


@dataclass
class DicomOutputs:
    """What :func:`write_study_dicom` wrote (paths relative to the output folder in ``to_dict``)."""

    sr_path: Path
    sc_path: Path
    sr_uid: str
    sc_uid: str
    referenced: int
    note: str | None = None

    def to_dict(self, root: Path) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sr": self.sr_path.relative_to(root).as_posix(),
            "sc": self.sc_path.relative_to(root).as_posix(),
            "sr_sop_instance_uid": self.sr_uid,
            "sc_sop_instance_uid": self.sc_uid,
            "evidence_instances": self.referenced,
        }
        if self.note:
            out["note"] = self.note
        return out


def finding_code(cls: str) -> Any:
    """The coded finding of a class: a SNOMED CT concept (:data:`FINDING_CODES`) for ``any`` and every subtype."""
    from highdicom.sr import CodedConcept

    if cls == "any":  # as it always was: pydicom's SCT concept
        from pydicom.sr.codedict import codes

        return codes.SCT.IntracranialHemorrhage
    value, meaning = FINDING_CODES[cls]
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def read_source_header(path: str | os.PathLike[str]) -> Any | None:
    """The header (no pixels) of one source file, or None when it cannot be read or has no SOP UIDs.

    SOPClassUID is filled in from the file meta where the dataset lacks it (RSNA-style files carry it only there)
    and missing Type 2 patient and study attributes are added empty.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - an unreadable file was already skipped by the prediction
        return None
    if "SOPClassUID" not in ds and "MediaStorageSOPClassUID" in getattr(ds, "file_meta", {}):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in ds:
            setattr(ds, keyword, "")  # Type 2: present, may be empty (anonymised data often lacks them)
    return ds if "SOPInstanceUID" in ds and "SOPClassUID" in ds else None


@dataclass(frozen=True)
class SourceSlices:
    """The source instances of the predicted slices.

    Attributes:
        headers: SOPInstanceUID → header of every readable source file (one per file: the SR's evidence).
        where: slice UID (``slices.csv``'s ``sop_uid``) → (SOPInstanceUID of its file, 1-based frame number; 0 for
            a single-frame file).
    """

    headers: dict[str, Any]
    where: dict[str, tuple[str, int]]


def read_source_slices(sources: Sequence[str | os.PathLike[str] | Mapping[str, Any]]) -> SourceSlices:
    """Read the header of every source file once and map each slice UID to its file's instance and frame.

    Args:
        sources: slice references (``path``, ``frame``, ``sop_uid``: :meth:`SeriesInput.slice_refs
            <rsna19.inference.inputs.SeriesInput.slice_refs>`) or bare paths; a bare path of a multi-frame file
            stands for all its frames (slice UIDs ``<SOPInstanceUID>.f<frame>``, :mod:`rsna19.io.multiframe`).
    """
    headers_of: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    where: dict[str, tuple[str, int]] = {}
    for src in sources:
        ref = dict(src) if isinstance(src, Mapping) else {"path": os.fspath(src)}
        path = str(ref["path"])
        if path not in headers_of:
            headers_of[path] = read_source_header(path)
        ds = headers_of[path]
        if ds is None:
            continue
        sop = str(ds.SOPInstanceUID)
        headers.setdefault(sop, ds)
        frame = int(ref.get("frame") or 0)
        if "sop_uid" in ref:
            where[str(ref["sop_uid"])] = (sop, frame)
        elif is_multiframe(ds):
            for f in range(1, int(ds.get("NumberOfFrames", 1) or 1) + 1):
                where[frame_sop_uid(sop, f)] = (sop, f)
        else:
            where[sop] = (sop, 0)
    return SourceSlices(headers, where)


def source_images(slice_uids: Sequence[str], sources: SourceSlices) -> list[Any]:
    """highdicom source-image references of some slices: one per file, with the frames of a multi-frame file."""
    import highdicom as hd

    frames: dict[str, list[int]] = {}
    for u in slice_uids:
        if u in sources.where:
            sop, frame = sources.where[u]
            frames.setdefault(sop, [])
            if frame:
                frames[sop].append(frame)
    return [
        hd.sr.SourceImageForMeasurementGroup(
            str(sources.headers[sop].SOPClassUID), sop, referenced_frame_numbers=sorted(f) or None
        )
        for sop, f in frames.items()
    ]


def _uid(bundle_sha: str, study_uid: str, what: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[bundle_sha, study_uid, what])


def top_slice_uids(slices: pd.DataFrame, cls: str, k: int = TOP_SLICES_PER_CLASS) -> list[str]:
    """SOP UIDs of the ``k`` slices with the highest probability of ``cls`` (ties: file order)."""
    col = f"p_{cls}"
    order = np.argsort(-slices[col].to_numpy(dtype=np.float64), kind="stable")[:k]
    return [str(slices["sop_uid"].iloc[i]) for i in order]


def _finding_group(
    cls: str,
    r: dict[str, Any] | None,
    sources: SourceSlices,
    slices: pd.DataFrame,
    algo: Any,
    tracking_uid: str,
    comment: str | None,
) -> Any:
    """One TID 1501 measurement group: a class's finding, its numbers (``r``; None: not assessable) and evidence."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    unit = codes.UCUM.NoUnits
    finding = finding_code(cls)
    measurements = None
    if r is not None:
        score_code = hd.sr.CodedConcept(value=SCORE_CODE[0], scheme_designator="SCT", meaning=SCORE_CODE[1])
        measurements = [
            hd.sr.Measurement(name=codes.DCM.Probability, value=float(r["probability"]), unit=unit),
            hd.sr.Measurement(name=codes.DCM.CADOperatingPoint, value=float(r["threshold"]), unit=unit),
            hd.sr.Measurement(name=codes.DCM.CaseSensitivity, value=float(r["target_sensitivity"]), unit=unit),
            hd.sr.Measurement(name=score_code, value=float(r["score"]), unit=unit),
        ]
        value = codes.SCT.Present if r["positive"] else codes.SCT.Absent
    else:
        value = codes.SCT.Indeterminate
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"rsna19 {cls}"),
        finding_type=finding,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=value)],
        source_images=source_images(top_slice_uids(slices, cls), sources) if r is not None else None,
    )
    if comment:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=comment[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    return group


def finding_comments(study_result: dict[str, Any] | None, assessment: dict[str, Any] | None) -> dict[str, str]:
    """Class → the SR's comment on its finding: why a study is not assessable, or why a subtype is not reported."""
    if assessment is not None and not assessment.get("assessable", True):
        why = "; ".join(str(r["message"]) for r in assessment.get("reasons", []))
        return dict.fromkeys(("any", *CLASSES[:-1]), f"not assessable: {why}")
    if study_result is None:
        return {}
    return {
        c: f"over its own operating point, not reported: {SUBTYPE_RULE} ('any' is negative)"
        for c in study_result.get("subtypes_withheld") or []
    }


def build_sr(
    sources: SourceSlices,
    slices: pd.DataFrame,
    study_result: dict[str, Any] | None,
    identity: dict[str, Any],
    sop_uid: str,
    series_uid: str,
    assessment: dict[str, Any] | None = None,
) -> Any:
    """The Comprehensive 3D SR (TID 1500) of one study.

    Args:
        sources: the source files of the predicted series (the evidence) and where each slice lies in them.
        slices: the study's slices (``sop_uid``, ``p_<class>``).
        study_result: the calibrated study result (:func:`rsna19.core.calibration.apply_study_model`); None for a study
            that is not assessable.
        identity: ``rsna19_version``, ``bundle_sha256``, ``bundle_version`` (and ``study_score``).
        sop_uid, series_uid: of the new SR.
        assessment: the not-assessable gate's verdict (:mod:`rsna19.inference.assess`); when the study is not
            assessable every finding is SCT *Indeterminate*, without numbers, with the reasons as a comment.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    not_assessable = assessment is not None and not assessment.get("assessable", True)
    if study_result is None and not not_assessable:
        raise ValueError("build_sr: a study result or a not-assessable verdict is needed")
    params = [
        f"bundle_sha256={identity['bundle_sha256']}",
        f"bundle_version={identity['bundle_version']}",
    ]
    if study_result is not None:
        params += [f"study_model={study_result['method']}/{study_result['score']}", "subtypes=within_positive_any"]
    algo = hd.sr.AlgorithmIdentification(name="rsna19", version=str(identity["rsna19_version"]), parameters=params)
    headers = sources.headers
    study_uid = str(next(iter(headers.values())).StudyInstanceUID)
    comments = finding_comments(study_result, assessment)
    groups = []
    for cls in ("any", *CLASSES[:-1]):
        r = None if not_assessable or study_result is None else study_result["classes"][cls]
        uid = _uid(identity["bundle_sha256"], study_uid, f"tracking/{cls}")
        groups.append(_finding_group(cls, r, sources, slices, algo, uid, comments.get(cls)))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(identity["bundle_sha256"], "", "device"),
            name="rsna19",
            manufacturer_name=MANUFACTURER,
            model_name=f"bundle {identity['bundle_sha256'][:16]}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.HeadCT,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    evidence = sorted(headers.values(), key=lambda ds: (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # a machine's result, not verified by a reader
        is_verified=False,
    )
    sr.SeriesDescription = "rsna19 hemorrhage result (not verified)"
    return sr


def build_sc(ref: Any, png: str | os.PathLike[str], sop_uid: str, series_uid: str) -> Any:
    """An RGB Secondary Capture of the report picture, in the study of ``ref`` (patient and study copied)."""
    import highdicom as hd
    from matplotlib.image import imread
    from pydicom.uid import ExplicitVRLittleEndian

    img = imread(png)  # float RGBA in [0, 1]
    rgb = np.ascontiguousarray(np.rint(np.asarray(img)[..., :3] * 255).astype(np.uint8))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = "rsna19 hemorrhage report (not verified)"
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C of General Series: the report picture has no side; dciodvfy asks for it
    return sc


def write_study_dicom(
    out: str | os.PathLike[str],
    files: Sequence[str | os.PathLike[str] | Mapping[str, Any]] | SourceSlices,
    slices: pd.DataFrame,
    study_result: dict[str, Any] | None,
    identity: dict[str, Any],
    report_png: str | os.PathLike[str],
    assessment: dict[str, Any] | None = None,
) -> DicomOutputs:
    """Write the SR and the SC of one study into ``out``.

    Args:
        out: output folder (created).
        files: every slice of the predicted series, as slice references (``path``, ``frame``, ``sop_uid``) or file
            paths (:func:`read_source_slices`), or their headers already read: the SR's evidence and the source of
            the patient/study modules.
        slices: the study's predicted slices (``sop_uid``, ``p_<class>``).
        study_result: the calibrated result (``studies.json``'s ``study_result``); None when not assessable.
        identity: ``rsna19_version``, ``bundle_sha256``, ``bundle_version``.
        report_png: the study's report picture.
        assessment: ``studies.json``'s ``assessment`` (:mod:`rsna19.inference.assess`); a study that is not
            assessable gets an SR of *Indeterminate* findings with the reasons.

    Raises:
        ValueError: no readable source header among ``files``.
    """
    sources = files if isinstance(files, SourceSlices) else read_source_slices(files)
    headers = sources.headers
    predicted = [u for u in slices["sop_uid"].astype(str) if u in sources.where]
    if not predicted:
        raise ValueError("no readable source header of the predicted slices")
    ref = headers[sources.where[predicted[0]][0]]
    study_uid = str(ref.StudyInstanceUID)
    sha = str(identity["bundle_sha256"])
    sr_uid, sc_uid = _uid(sha, study_uid, "sr"), _uid(sha, study_uid, "sc")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Source UIDs that break the UI rules (RSNA's "ID_<hex>") are copied as they are: the SR and SC must
        # name the source study exactly; pydicom warns about each on write.
        warnings.simplefilter("ignore", UserWarning)
        sr = build_sr(sources, slices, study_result, identity, sr_uid, _uid(sha, study_uid, "sr-series"), assessment)
        sc = build_sc(ref, report_png, sc_uid, _uid(sha, study_uid, "sc-series"))
        sr_path, sc_path = out / f"SR_{sr_uid}.dcm", out / f"SC_{sc_uid}.dcm"
        for ds, path in ((sr, sr_path), (sc, sc_path)):
            with atomic_path(path) as tmp:
                ds.save_as(tmp, enforce_file_format=True)
    note = None
    if not all(_valid_uid(u) for ds in headers.values() for u in (ds.StudyInstanceUID, ds.SOPInstanceUID)):
        note = "source UIDs are not valid DICOM UIDs (e.g. RSNA's ID_<hex>); copied unchanged into the SR and SC"
    return DicomOutputs(sr_path, sc_path, sr_uid, sc_uid, len(headers), note)


def write_result_dicom(
    out: str | os.PathLike[str], result: StudyResult, identity: dict[str, Any], report_png: str | os.PathLike[str]
) -> DicomOutputs:
    """:func:`write_study_dicom` of a predicted study: its slices, calibrated result and source headers (read by
    the predictor while the input existed, else now from the slice references); of a not-assessable study: the
    refused series' slices and the gate's verdict (every finding *Indeterminate*).

    Raises:
        ValueError: the study has no calibrated result, or no readable source header.
    """
    sources = result.sources if result.sources is not None else result.slice_refs()
    if not result.assessable and result.refused is not None:  # every finding Indeterminate, with the reasons
        slices = pd.DataFrame({"sop_uid": [str(u) for u in result.refused[1]["sop_uids"]]})
        return write_study_dicom(out, sources, slices, None, identity, report_png, assessment=result.assessment)
    if result.study_result is None:
        raise ValueError("the study has no calibrated result (a bundle without a study model)")
    return write_study_dicom(out, sources, result.slices(), result.study_result, identity, report_png)


def _valid_uid(uid: Any) -> bool:
    from pydicom.uid import UID

    return UID(str(uid)).is_valid
