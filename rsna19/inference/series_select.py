"""Rank the candidate series of one study and pick the one(s) ``rsna19 predict-study`` predicts, with reasons.

A hospital study holds many series of the same head: soft-tissue and bone kernels, thick and thin
reconstructions, derived reformats and projections, scouts, contrast phases, perfusion runs, sometimes another
body part. The models were trained on one kind (RSNA: thick, soft-tissue, original axials without contrast), so
predicting everything and taking the maximum adds false positives and run time. This module judges each
axial CT series that :mod:`rsna19.inference.inputs` found readable, from its headers alone:

* **hard rules** (the series is never predicted by default; the reason is reported): projection images (MIP / MinIP /
  VR in ImageType or the description), a body part or description naming another region (chest, abdomen, ...), a field
  of view that is no head's (> 500 mm: wider than any head reconstruction; < 100 mm: a targeted reconstruction),
  contrast (ContrastBolusAgent present, CTA / angio / venogram / perfusion / "C+" in SeriesDescription) and dynamic
  series (several temporal positions, or positions repeated) unless :attr:`SelectionPolicy.include_contrast`; a bone
  (sharp) kernel while a soft-tissue or unknown-kernel series is usable;
* **score** (the best usable series is predicted; the others are skipped with the criterion that lost):
  kernel (soft tissue +4, unknown 0, bone −4), image type (ORIGINAL +2, PRIMARY +1, DERIVED / SECONDARY /
  MPR / REFORMATTED −1 each, at most −2), slice spacing (−3 per factor of two away from the training spacing,
  capped at −12), head coverage along z (≥ 100 mm +1, < 50 mm −2) and a wide field of view (> 350 mm −2: a
  trauma protocol that takes in the face, or a body scan; a head series of that width is still predicted when
  nothing narrower is there, since hospitals do reconstruct heads at 360–410 mm). Ties go to more slices, then to a
  lossless encoding over a lossy one (JPEG baseline / extended, JPEG 2000, near-lossless JPEG-LS), then the UID;
* **duplicates**: a series with the same slices as a better-ranked one (:func:`same_slices`: the same positions,
  kernel, slice thickness, pixel spacing, field of view, image type and contrast: a re-export, e.g. a PACS copy
  in another transfer syntax under a new series UID) is skipped as a duplicate of it, also with ``all_series``:
  the same images are predicted once.

Kernels (:func:`kernel_class`) come from a table of common vendor tokens: Siemens ``H30s``/``Hr40``/``B31f``
(≤ 49 soft, ≥ 60 sharp), Canon/Toshiba ``FC21``/``FC26`` (< 30 soft, ≥ 30 sharp), GE ``STANDARD``/``SOFT`` vs
``BONE``/``BONEPLUS``/``LUNG``/``EDGE``/``DETAIL``, Philips ``UA``/``UB``/``A``/``B``/``C`` vs ``D``/``E``/``L``/
``Y*``; without a kernel, the description ("BONE", "BRAIN") and the first display window (width ≥ 1000 HU: a bone
window) are hints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Training slice spacing assumed for bundles that do not record it (RSNA head CT is mostly 5 mm).
DEFAULT_TRAINING_SPACING_MM = 5.0

#: ImageType values of projections and renderings: never what a slice model was trained on.
PROJECTION_TOKENS: frozenset[str] = frozenset({"MIP", "MINIP", "MAXIP", "PROJECTION IMAGE"})
#: ImageType values of reconstructions made from another series (acceptable, less preferred than originals).
DERIVED_TOKENS: frozenset[str] = frozenset({"DERIVED", "SECONDARY", "MPR", "REFORMATTED", "CURVED"})

#: Body parts / description words of another region than the head.
NOT_HEAD_WORDS: frozenset[str] = frozenset(
    {"CHEST", "THORAX", "LUNG", "LUNGS", "ABDOMEN", "ABD", "PELVIS", "HEART", "CARDIAC", "CORONARY", "LIVER",
     "KIDNEY", "RENAL", "EXTREMITY", "KNEE", "HIP", "SHOULDER", "ANKLE", "WRIST", "LSPINE", "TSPINE"}
)  # fmt: skip
#: Body parts / description words that confirm a head study.
HEAD_WORDS: frozenset[str] = frozenset({"HEAD", "BRAIN", "SKULL", "CRANIUM", "CEREBRUM", "NEURO", "HEADNECK"})

#: SeriesDescription patterns of contrast phases and dynamic acquisitions.
_CONTRAST_RE = re.compile(
    r"(?<![A-Z])(CTA|CTV|CTP|ANGIO\w*|VENO\w*|PERFUSION|PERF|C\+|ARTERIAL|WITH CONTRAST|W CONTRAST|POST ?CONTRAST)"
    r"(?![A-Z])"
)
_PROJECTION_RE = re.compile(r"(?<![A-Z])(MIP|MINIP|MAXIP|VRT|3D)(?![A-Z])")
_SIEMENS_RE = re.compile(r"^[A-Z]{1,2}(\d{2})[A-Z]?$")
_FC_RE = re.compile(r"^FC(\d{2})$")
_SOFT_WORDS = frozenset({"STANDARD", "STND", "STD", "SOFT", "SMOOTH", "BRAIN", "HEAD", "UA", "UB", "UC", "A", "B", "C"})
_SHARP_WORDS = frozenset({"BONE", "BONEPLUS", "LUNG", "EDGE", "DETAIL", "SHARP", "D", "E", "L"})
#: Transfer syntaxes whose compression loses information (JPEG baseline / extended, JPEG 2000 and HTJ2K with
#: their lossy modes allowed, JPEG-LS near-lossless): a series stored this way ranks after a lossless copy of it.
LOSSY_SYNTAXES: frozenset[str] = frozenset(
    {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
     "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"}
)  # fmt: skip
#: Values of ContrastBolusAgent that mean "no contrast".
_NO_AGENT = frozenset({"", "NONE", "NO", "N/A", "NA", "-"})


@dataclass(frozen=True)
class SelectionPolicy:
    """How a study's series are chosen.

    Attributes:
        training_spacing_mm: the slice spacing the bundle was trained on.
        all_series: predict every usable series, not only the best.
        include_contrast: let contrast, CTA and dynamic (perfusion) series be predicted.
        max_fov_mm, min_fov_mm: the in-plane field of view a head series can have (hard rule).
        wide_fov_mm: a wider field of view loses 2 points (a narrower reconstruction of the head is preferred).
    """

    training_spacing_mm: float = DEFAULT_TRAINING_SPACING_MM
    all_series: bool = False
    include_contrast: bool = False
    max_fov_mm: float = 500.0
    min_fov_mm: float = 100.0
    wide_fov_mm: float = 350.0


@dataclass
class SeriesFacts:
    """What the ranking knows of one readable axial CT series (from its headers).

    Attributes:
        series_uid, description: identifiers.
        image_type: ImageType values (upper case) of the first file.
        kernel: ConvolutionKernel ("" if absent).
        body_part, study_description, protocol: BodyPartExamined, StudyDescription, ProtocolName.
        contrast_agent: ContrastBolusAgent ("" if absent).
        window: (centre, width) of the first display window, or None.
        n_files: files of the series.
        n_positions: distinct slice positions (0.01 mm).
        n_temporal: distinct TemporalPositionIdentifier values, or NumberOfTemporalPositions when larger.
        spacing_mm: median gap between distinct positions (SliceThickness for a single slice).
        thickness_mm: SliceThickness (median), or None.
        z_extent_mm: covered length along the normal (first to last position + one spacing).
        fov_mm: in-plane field of view (rows × row spacing, the smaller of both directions).
        pixel_spacing_mm: in-plane pixel spacing (row direction).
        transfer_syntax: the transfer syntax UID(s) of the files ("/"-joined when they differ; "" unknown).
        position_key: the distinct slice positions (0.01 mm), for :func:`same_slices`.
    """

    series_uid: str
    description: str = ""
    image_type: tuple[str, ...] = ()
    kernel: str = ""
    body_part: str = ""
    study_description: str = ""
    protocol: str = ""
    contrast_agent: str = ""
    window: tuple[float, float] | None = None
    n_files: int = 0
    n_positions: int = 0
    n_temporal: int = 1
    spacing_mm: float | None = None
    thickness_mm: float | None = None
    z_extent_mm: float | None = None
    fov_mm: float | None = None
    pixel_spacing_mm: float | None = None
    transfer_syntax: str = ""
    position_key: tuple[float, ...] = ()

    @property
    def lossy(self) -> bool:
        """True when a file of the series is stored with a lossy transfer syntax."""
        return any(u in LOSSY_SYNTAXES for u in self.transfer_syntax.split("/"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready header facts for ``studies.json``."""

        def r(v: float | None) -> float | None:
            return None if v is None else round(float(v), 3)

        return {
            "image_type": "/".join(self.image_type),
            "kernel": self.kernel,
            "kernel_class": kernel_class(self.kernel, self.description, self.window)[0],
            "body_part": self.body_part,
            "contrast_agent": self.contrast_agent,
            "n_positions": self.n_positions,
            "n_temporal": self.n_temporal,
            "spacing_mm": r(self.spacing_mm),
            "thickness_mm": r(self.thickness_mm),
            "z_extent_mm": r(self.z_extent_mm),
            "fov_mm": r(self.fov_mm),
            "pixel_spacing_mm": r(self.pixel_spacing_mm),
            "transfer_syntax": self.transfer_syntax,
        }


@dataclass
class SeriesChoice:
    """The verdict on one series.

    Attributes:
        facts: the series' header facts.
        score: total points (None when a hard rule excluded it before scoring).
        criteria: criterion → {"points", "why"}.
        rank: 1 = best among the scored series; None for a hard exclusion.
        used: predicted.
        reason: why not predicted (None when used).
        note: a remark on a used series (e.g. "only bone-kernel series available").
    """

    facts: SeriesFacts
    score: float | None = None
    criteria: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank: int | None = None
    used: bool = False
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready verdict (``studies.json``, ``series_ranking``)."""
        return {
            "series_uid": self.facts.series_uid,
            "description": self.facts.description,
            "rank": self.rank,
            "score": None if self.score is None else round(self.score, 3),
            "criteria": self.criteria,
            "used": self.used,
            "reason": self.reason,
            "note": self.note,
            "header": self.facts.to_dict(),
        }


# ----------------------------------------------------------------------------------------------- header facts
def header_hints(ds: Any) -> dict[str, Any]:
    """The selection-relevant header values of one file (``ds``: a pydicom dataset read without pixels).

    Returns:
        ``{"kernel", "body_part", "study_description", "protocol", "contrast_agent", "temporal_id", "n_temporal"}``
        (strings stripped; ``temporal_id`` str or "", ``n_temporal`` int, 0 when absent). Never raises.
    """

    def text(tag: str) -> str:
        try:
            value = ds.get(tag, "")
            if value is None:
                return ""
            if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
                return "\\".join(str(v).strip() for v in value)
            return str(value).strip()
        except Exception:  # noqa: BLE001 - a malformed optional element is an absent one
            return ""

    n_temporal = text("NumberOfTemporalPositions")
    return {
        "kernel": text("ConvolutionKernel"),
        "body_part": text("BodyPartExamined").upper(),
        "study_description": text("StudyDescription"),
        "protocol": text("ProtocolName"),
        "contrast_agent": text("ContrastBolusAgent"),
        "temporal_id": text("TemporalPositionIdentifier"),
        "n_temporal": int(n_temporal) if n_temporal.isdigit() else 0,
    }


def series_facts(
    series_uid: str,
    description: str,
    image_type: Sequence[str],
    hints: Sequence[dict[str, Any]],
    positions: Sequence[float],
    thicknesses: Sequence[float],
    pixel_spacing: tuple[float, float] | None,
    shape: tuple[int, int] | None,
    window: tuple[float, float] | None,
    transfer_syntaxes: Sequence[str] = (),
) -> SeriesFacts:
    """Condense the per-file values of one series into :class:`SeriesFacts`.

    Args:
        series_uid, description, image_type: of the series (first file).
        hints: :func:`header_hints` of every file.
        positions: (N,) slice positions along the normal (mm), duplicates included.
        thicknesses: SliceThickness of the files (NaN / ≤ 0 ignored).
        pixel_spacing: (row, col) spacing in mm; shape: (rows, cols).
        window: first (centre, width) display window of the first file.
        transfer_syntaxes: the transfer syntax UID of each file (duplicates fine).
    """
    first = hints[0] if hints else {}
    distinct = sorted({round(float(p), 2) for p in positions})
    good_t = sorted(float(t) for t in thicknesses if t is not None and math.isfinite(float(t)) and float(t) > 0)
    thickness = good_t[len(good_t) // 2] if good_t else None
    if len(distinct) > 1:
        gaps = sorted(b - a for a, b in zip(distinct, distinct[1:]))
        spacing: float | None = gaps[len(gaps) // 2]
    else:
        spacing = thickness
    extent = None if not distinct else distinct[-1] - distinct[0] + (spacing or 0.0)
    temporal_ids = {h.get("temporal_id", "") for h in hints} - {""}
    n_temporal = max([len(temporal_ids), 1, *(int(h.get("n_temporal", 0) or 0) for h in hints)])
    fov = ps = None
    if pixel_spacing is not None and shape is not None:
        ps = float(pixel_spacing[0])
        fov = min(shape[0] * float(pixel_spacing[0]), shape[1] * float(pixel_spacing[1]))
    return SeriesFacts(
        series_uid=series_uid,
        description=description,
        image_type=tuple(image_type),
        kernel=str(first.get("kernel", "")),
        body_part=str(first.get("body_part", "")),
        study_description=str(first.get("study_description", "")),
        protocol=str(first.get("protocol", "")),
        contrast_agent=str(first.get("contrast_agent", "")),
        window=window,
        n_files=len(positions),
        n_positions=len(distinct),
        n_temporal=n_temporal,
        spacing_mm=spacing,
        thickness_mm=thickness,
        z_extent_mm=extent,
        fov_mm=fov,
        pixel_spacing_mm=ps,
        transfer_syntax="/".join(sorted({str(u) for u in transfer_syntaxes if u})),
        position_key=tuple(distinct),
    )


# ------------------------------------------------------------------------------------------------- judgements
def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Z0-9+]+", text.upper()))


def kernel_class(kernel: str, description: str = "", window: tuple[float, float] | None = None) -> tuple[str, str]:
    """Soft-tissue or bone (sharp) reconstruction kernel, from the kernel name and, without one, from hints.

    Args:
        kernel: ConvolutionKernel (multi-valued ones joined by ``\\``, e.g. Siemens ``Hr40\\3``).
        description: SeriesDescription.
        window: first (centre, width) display window.

    Returns:
        ``("soft" | "bone" | "unknown", why)``.
    """
    for token in re.split(r"[^A-Za-z0-9+]+", kernel.upper()):
        if not token or token.isdigit():
            continue
        if token in _SHARP_WORDS or (token.startswith("Y") and len(token) == 2):  # Philips Y-sharp: YA..YF
            return "bone", f"sharp/bone kernel {kernel}"
        if token in _SOFT_WORDS:
            return "soft", f"soft-tissue kernel {kernel}"
        m = _FC_RE.match(token)  # Canon/Toshiba: FC1x–FC2x soft (FC21/FC26 brain), FC30+ bone and lung
        if m:
            return (
                ("bone", f"sharp/bone kernel {kernel}") if int(m.group(1)) >= 30 else ("soft", f"soft kernel {kernel}")
            )
        m = _SIEMENS_RE.match(token)  # Siemens: H/Hr/B/Br/J/Qr + sharpness; ≤ 49 soft, ≥ 60 sharp
        if m:
            n = int(m.group(1))
            if n >= 60:
                return "bone", f"sharp/bone kernel {kernel}"
            if n <= 49:
                return "soft", f"soft-tissue kernel {kernel}"
            return "unknown", f"medium-sharp kernel {kernel}"
    words = _words(description)
    if words & {"BONE", "BONES", "KNOCHEN", "SHARP", "OSSEOUS"}:
        return "bone", f"description {description!r} names a bone reconstruction"
    if window is not None and window[1] >= 1000:
        return "bone", f"bone display window (centre {window[0]:g}, width {window[1]:g})"
    if words & {"BRAIN", "SOFT", "STANDARD", "STD", "HIRN", "CEREBRUM"}:
        return "soft", f"description {description!r} names a soft-tissue reconstruction"
    if window is not None and window[1] <= 400:
        return "soft", f"brain display window (centre {window[0]:g}, width {window[1]:g})"
    return "unknown", f"kernel {kernel!r} not in the table" if kernel else "no kernel in the header"


def hard_reason(f: SeriesFacts, policy: SelectionPolicy) -> str | None:
    """Why ``f`` must not be predicted whatever the other series are, or None."""
    projection = sorted(set(f.image_type) & PROJECTION_TOKENS) or _PROJECTION_RE.findall(f.description.upper())
    if projection:
        return f"projection image ({'/'.join(projection)}), not a slice series"
    for label, text in (("body part", f.body_part), ("series description", f.description),
                        ("study description", f.study_description)):  # fmt: skip
        words = _words(text)
        other = sorted(words & NOT_HEAD_WORDS)
        if other and not words & HEAD_WORDS:
            return f"{label} {text!r}: {'/'.join(other)}, not a head"
    if f.fov_mm is not None and f.fov_mm > policy.max_fov_mm:
        return f"field of view {f.fov_mm:.0f} mm is wider than a head (> {policy.max_fov_mm:g} mm: a body scan?)"
    if f.fov_mm is not None and f.fov_mm < policy.min_fov_mm:
        return f"field of view {f.fov_mm:.0f} mm is too small for a head (< {policy.min_fov_mm:g} mm: targeted?)"
    if not policy.include_contrast:
        if f.contrast_agent.upper() not in _NO_AGENT:
            return f"contrast (ContrastBolusAgent {f.contrast_agent!r}); --include-contrast predicts it"
        m = _CONTRAST_RE.search(f.description.upper())
        if m:
            return (
                f"contrast/angio series (description {f.description!r}: {m.group(1)}); --include-contrast predicts it"
            )
        if f.n_temporal > 1:
            return f"dynamic series ({f.n_temporal} temporal positions: perfusion?); --include-contrast predicts it"
        if f.n_positions and f.n_files >= 1.5 * f.n_positions:
            return (
                f"dynamic series ({f.n_files} images at {f.n_positions} positions: perfusion?); "
                "--include-contrast predicts it"
            )
    return None


def score_series(f: SeriesFacts, policy: SelectionPolicy) -> dict[str, dict[str, Any]]:
    """The scored criteria of one series: criterion → ``{"points", "why"}`` (see the module docstring)."""
    kclass, kwhy = kernel_class(f.kernel, f.description, f.window)
    crit: dict[str, dict[str, Any]] = {"kernel": {"points": {"soft": 4, "unknown": 0, "bone": -4}[kclass], "why": kwhy}}

    types = set(f.image_type)
    pts = (2 if "ORIGINAL" in types else 0) + (1 if "PRIMARY" in types else 0)
    derived = sorted(types & DERIVED_TOKENS)
    pts -= min(len(derived), 2)
    crit["image_type"] = {"points": pts, "why": "/".join(f.image_type) or "no ImageType"}

    t = policy.training_spacing_mm
    if f.spacing_mm:
        off = abs(math.log2(f.spacing_mm / t))
        crit["spacing"] = {
            "points": -round(min(3.0 * off, 12.0), 3),
            "why": f"{f.spacing_mm:g} mm slices vs {t:g} mm in training",
        }
    else:
        crit["spacing"] = {"points": -3, "why": "slice spacing unknown"}

    z = f.z_extent_mm or 0.0
    crit["coverage"] = {
        "points": 1 if z >= 100.0 else (-2 if z < 50.0 else 0),
        "why": f"{z:.0f} mm along z",
    }
    wide = f.fov_mm is not None and f.fov_mm > policy.wide_fov_mm
    crit["fov"] = {
        "points": -2 if wide else 0,
        "why": f"field of view {f.fov_mm:.0f} mm" if f.fov_mm is not None else "field of view unknown",
    }
    return crit


def _name(c: SeriesChoice) -> str:
    """How a reason names a series: its description and UID."""
    d = c.facts.description
    return f"{d!r} ({c.facts.series_uid})" if d else c.facts.series_uid


def _lost_on(c: SeriesChoice, best: SeriesChoice, policy: SelectionPolicy) -> str:
    """The skip reason of a scored series that is not the best: the criterion on which it lost most."""
    b = best.facts
    name = _name(best)
    deficits = {k: best.criteria[k]["points"] - c.criteria[k]["points"] for k in c.criteria}
    k = max(deficits, key=lambda key: deficits[key])
    if deficits[k] <= 0:
        return f"lower rank ({c.score:g} vs {best.score:g} points, or fewer slices): {name} preferred"
    if k == "kernel":
        return f"{c.criteria['kernel']['why']}: {best.criteria['kernel']['why']} in {name} preferred"
    if k == "spacing":
        t = policy.training_spacing_mm
        mine, theirs = c.facts.spacing_mm or 0.0, b.spacing_mm or 0.0
        word = "thinner" if theirs < mine else "thicker"
        return f"{word} series preferred: {name} ({theirs:g} mm) is nearer the training {t:g} mm than {mine:g} mm"
    if k == "image_type":
        theirs_type = best.criteria["image_type"]["why"]
        return f"derived image ({c.criteria['image_type']['why']}): {name} ({theirs_type}) preferred"
    if k == "fov":
        return f"wider {c.criteria['fov']['why']}: {name} ({best.criteria['fov']['why']}) preferred"
    return f"less head coverage ({c.criteria['coverage']['why']}): {name} covers {best.criteria['coverage']['why']}"


def same_slices(a: SeriesFacts, b: SeriesFacts) -> bool:
    """True when ``a`` and ``b`` hold the same slices: the same positions (0.01 mm), kernel, slice thickness,
    pixel spacing, field of view, image type and contrast agent. The transfer syntax and the description may
    differ: a PACS or workstation copy of a series is often re-encoded and renamed under a new series UID."""

    def close(x: float | None, y: float | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and abs(x - y) <= 1e-3 * max(abs(x), 1))

    return (
        bool(a.position_key)
        and a.position_key == b.position_key
        and a.kernel.upper() == b.kernel.upper()
        and a.image_type == b.image_type
        and a.contrast_agent.upper() == b.contrast_agent.upper()
        and a.n_files == b.n_files
        and close(a.thickness_mm, b.thickness_mm)
        and close(a.pixel_spacing_mm, b.pixel_spacing_mm)
        and close(a.fov_mm, b.fov_mm)
    )


def _duplicate_reason(c: SeriesChoice, of: SeriesChoice) -> str:
    f = c.facts
    what = f"same {f.n_positions} positions, kernel {f.kernel or 'none'}, {f.thickness_mm or 0:g} mm thickness"
    if f.transfer_syntax != of.facts.transfer_syntax:
        what += f"; stored as {_syntax_name(f.transfer_syntax)}, not {_syntax_name(of.facts.transfer_syntax)}"
    return f"duplicate of {_name(of)}: {what}; the same slices are predicted once"


def _syntax_name(uids: str) -> str:
    """Transfer syntax UIDs ("/"-joined) by name where pydicom knows them."""
    from pydicom.uid import UID

    return "/".join(UID(u).name if UID(u).is_transfer_syntax else u for u in uids.split("/")) or "unknown syntax"


def rank_series(facts: Sequence[SeriesFacts], policy: SelectionPolicy = SelectionPolicy()) -> list[SeriesChoice]:
    """Judge every candidate series of one study: which to predict, in which rank, and why each other is not.

    Args:
        facts: the readable axial CT series of the study.
        policy: training spacing, ``all_series``, ``include_contrast``.

    Returns:
        One :class:`SeriesChoice` per series, best first (hard exclusions last); at least one is ``used`` when any
        series passes the hard rules.
    """
    choices = [SeriesChoice(f) for f in facts]
    scored = []
    for c in choices:
        c.reason = hard_reason(c.facts, policy)
        if c.reason is None:
            c.criteria = score_series(c.facts, policy)
            c.score = float(sum(v["points"] for v in c.criteria.values()))
            scored.append(c)
    # A bone kernel ranks after every other usable series whatever its other points: sharp kernels put noise
    # edges where a soft-tissue model looks for thin bright blood.
    scored.sort(
        key=lambda c: (
            c.criteria["kernel"]["points"] < 0,
            -(c.score or 0.0),
            -c.facts.n_positions,
            c.facts.lossy,
            c.facts.series_uid,
        )
    )
    for i, c in enumerate(scored):
        c.rank = i + 1
    if not scored:
        return choices
    best = scored[0]
    soft_exists = any(c.criteria["kernel"]["points"] >= 0 for c in scored)
    for i, c in enumerate(scored):
        is_bone = c.criteria["kernel"]["points"] < 0
        original = next((d for d in scored[:i] if same_slices(c.facts, d.facts)), None)
        if c is best:
            c.used = True
            if is_bone:
                c.note = "only bone-kernel series available: expect more false positives"
        elif original is not None:
            c.reason = _duplicate_reason(c, original)
        elif is_bone and soft_exists:
            c.reason = f"bone kernel ({c.criteria['kernel']['why']}): {_name(best)} preferred"
        elif policy.all_series:
            c.used = True
        else:
            c.reason = _lost_on(c, best, policy)
    rest = [c for c in choices if c.rank is None]
    return [*scored, *rest]
