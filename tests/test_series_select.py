"""Series ranking (rsna19.inference.series_select) on real DICOM headers, and the thin-series slab reformat."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from hospital import SOFT, THICK_MM, THIN_MM, head_plan, write_hospital_study, write_series
from pydicom.uid import JPEGLosslessSV1

from rsna19.inference.inputs import collect_studies
from rsna19.inference.reformat import needs_reformat, reformat_slabs, slab_index
from rsna19.inference.series_select import SelectionPolicy, SeriesFacts, kernel_class, rank_series, same_slices
from rsna19.study.predictor import apply_selection

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")


@pytest.fixture(scope="module")
def plan():
    return head_plan()


@pytest.fixture(scope="module")
def hospital(plan, tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    return root, write_hospital_study(root, plan)


def _select(root, tmp_path, policy=None):
    inputs = collect_studies(root, tmp_path / "work")
    (study,) = inputs.studies.values()
    ranking = apply_selection(study, policy or SelectionPolicy())
    return study, ranking


def test_hospital_study_picks_the_soft_tissue_5mm_series(hospital, tmp_path):
    root, uid = hospital
    study, ranking = _select(root, tmp_path)
    assert [s.series_uid for s in study.used] == [uid["soft"]]
    reasons = {s.series_uid: s.reason for s in study.skipped}
    assert set(reasons) == {uid["bone"], uid["thin"], uid["scout"], uid["cta"], uid["copy"]}
    assert reasons[uid["copy"]].startswith(f"duplicate of 'Head 5.0 H30s' ({uid['soft']}): same 8 positions")
    assert "stored as Explicit VR Little Endian, not JPEG Lossless" in reasons[uid["copy"]]
    assert reasons[uid["bone"]].startswith("bone kernel")
    assert "H70h" in reasons[uid["bone"]]
    assert reasons[uid["thin"]].startswith("thicker series preferred")
    assert "localizer" in reasons[uid["scout"]]
    assert "contrast" in reasons[uid["cta"]] and "Iohexol" in reasons[uid["cta"]]
    # The ranking lists every readable axial candidate, best first, with its score and criteria.
    assert ranking[0]["series_uid"] == uid["soft"] and ranking[0]["rank"] == 1 and ranking[0]["used"]
    assert {r["series_uid"] for r in ranking} == {uid["soft"], uid["bone"], uid["thin"], uid["cta"], uid["copy"]}
    used = study.to_dict()["series_used"][0]
    crit = used["selection"]["criteria"]
    assert crit["kernel"]["points"] > 0 and crit["spacing"]["points"] == 0
    assert used["selection"]["header"]["kernel_class"] == "soft"
    assert used["selection"]["header"]["spacing_mm"] == pytest.approx(THICK_MM)
    assert used["selection"]["header"]["transfer_syntax"] == JPEGLosslessSV1


def test_all_series_predicts_every_usable_one_but_not_bone_or_contrast(hospital, tmp_path):
    root, uid = hospital
    study, _ = _select(root, tmp_path, SelectionPolicy(all_series=True))
    assert {s.series_uid for s in study.used} == {uid["soft"], uid["thin"]}  # the copy's slices are the soft ones
    assert next(s for s in study.skipped if s.series_uid == uid["copy"]).reason.startswith("duplicate of")
    study, _ = _select(root, tmp_path, SelectionPolicy(all_series=True, include_contrast=True))
    assert {s.series_uid for s in study.used} == {uid["soft"], uid["thin"], uid["cta"]}


def test_only_thin_series_is_used(plan, tmp_path):
    write_series(
        tmp_path / "in" / "thin",
        plan,
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        step=THIN_MM,
        attrs={**SOFT, "SeriesDescription": "Head 0.6"},
    )
    study, ranking = _select(tmp_path / "in", tmp_path)
    assert [s.series_uid for s in study.used] == ["1.2.3.1"] and ranking[0]["score"] < 0


@pytest.mark.parametrize(
    ("attrs", "pixel", "reason"),
    [
        ({"BodyPartExamined": "CHEST"}, None, "CHEST, not a head"),
        ({"ImageType": ["DERIVED", "SECONDARY", "MIP"]}, None, "projection image (MIP)"),
        ({"SeriesDescription": "Perfusion 5mm"}, None, "contrast/angio series"),
        ({}, 8.0, "field of view 512 mm is wider than a head"),
    ],
)
def test_hard_rules_skip_a_series_even_when_it_is_the_only_one(plan, tmp_path, attrs, pixel, reason):
    p = plan
    if pixel:
        p = dataclasses.replace(plan, geometry=dataclasses.replace(plan.geometry, pixel_spacing=(pixel, pixel)))
    write_series(
        tmp_path / "in",
        p,
        study_uid="1.2.4",
        series_uid="1.2.4.1",
        step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head", **attrs},
    )
    study, _ = _select(tmp_path / "in", tmp_path)
    assert not study.used and reason in study.skipped[0].reason
    assert reason in study.problem


def test_a_wide_field_of_view_head_is_predicted_unless_a_narrower_one_exists(plan, tmp_path):
    """Hospitals reconstruct heads at 360–410 mm too (trauma protocols): such a series is predicted when it is the
    study's only one, and loses to a head-sized reconstruction of the same head when there is one."""
    wide = dataclasses.replace(plan, geometry=dataclasses.replace(plan.geometry, pixel_spacing=(6.25, 6.25)))
    write_series(
        tmp_path / "in" / "wide",
        wide,
        study_uid="1.2.7",
        series_uid="1.2.7.1",
        step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head trauma"},
    )
    study, ranking = _select(tmp_path / "in", tmp_path)
    assert [s.series_uid for s in study.used] == ["1.2.7.1"]
    assert study.used[0].selection["criteria"]["fov"] == {"points": -2, "why": "field of view 400 mm"}
    write_series(
        tmp_path / "in" / "narrow",
        plan,
        study_uid="1.2.7",
        series_uid="1.2.7.2",
        step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head"},
    )
    study, _ = _select(tmp_path / "in", tmp_path / "both")
    assert [s.series_uid for s in study.used] == ["1.2.7.2"]
    (skipped,) = study.skipped
    assert skipped.series_uid == "1.2.7.1" and skipped.reason.startswith("wider field of view 400 mm")


def test_dynamic_series_with_repeated_positions_is_skipped(plan, tmp_path):
    """A perfusion-like run: the same 8 positions acquired at 3 time points (TemporalPositionIdentifier)."""
    for t in range(3):
        write_series(
            tmp_path / "in" / f"t{t}",
            plan,
            study_uid="1.2.5",
            series_uid="1.2.5.1",
            step=THICK_MM,
            attrs={**SOFT, "SeriesDescription": "Head dyn", "TemporalPositionIdentifier": t + 1},
        )
        for f in (tmp_path / "in" / f"t{t}").iterdir():  # distinct SOP UIDs per time point
            ds = pydicom.dcmread(f)
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{t}"
            ds.save_as(f)
    study, _ = _select(tmp_path / "in", tmp_path)
    assert not study.used and "dynamic series (3 temporal positions" in study.skipped[0].reason


def test_original_preferred_over_derived_at_equal_thickness(plan, tmp_path):
    common = {"study_uid": "1.2.6", "step": THICK_MM}
    write_series(
        tmp_path / "in" / "a",
        plan,
        series_uid="1.2.6.1",
        **common,
        attrs={**SOFT, "ImageType": ["DERIVED", "SECONDARY", "AXIAL"], "SeriesDescription": "MPR ax"},
    )
    write_series(
        tmp_path / "in" / "b", plan, series_uid="1.2.6.2", **common, attrs={**SOFT, "SeriesDescription": "Head"}
    )
    study, _ = _select(tmp_path / "in", tmp_path)
    assert [s.series_uid for s in study.used] == ["1.2.6.2"]
    assert study.skipped[0].reason.startswith("derived image (DERIVED/SECONDARY/AXIAL)")


def _facts(uid: str, **kw) -> SeriesFacts:
    base = dict(
        description="Head",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        kernel="H30s",
        n_files=8,
        n_positions=8,
        spacing_mm=5.0,
        thickness_mm=5.0,
        z_extent_mm=40.0,
        fov_mm=250.0,
        pixel_spacing_mm=0.49,
        transfer_syntax="1.2.840.10008.1.2.1",
        position_key=tuple(5.0 * k for k in range(8)),
    )
    return SeriesFacts(series_uid=uid, **{**base, **kw})


def test_duplicates_are_predicted_once_and_a_lossless_copy_is_preferred():
    lossy = _facts("1.1", transfer_syntax="1.2.840.10008.1.2.4.50")  # JPEG baseline, the lower UID
    plain = _facts("1.2")
    shifted = _facts("1.3", position_key=tuple(5.0 * k + 2.5 for k in range(8)))  # other positions: not a copy
    for policy in (SelectionPolicy(), SelectionPolicy(all_series=True)):
        got = {c.facts.series_uid: c for c in rank_series([lossy, plain, shifted], policy)}
        assert got["1.2"].used and got["1.2"].rank == 1
        assert not got["1.1"].used and got["1.1"].reason.startswith("duplicate of 'Head' (1.2): same 8 positions")
        assert "stored as JPEG Baseline (Process 1), not Explicit VR Little Endian" in got["1.1"].reason
        assert got["1.3"].used == policy.all_series
    assert same_slices(lossy, plain) and not same_slices(plain, shifted)
    assert not same_slices(plain, _facts("1.4", kernel="H70h")) and not same_slices(plain, _facts("1.5", n_files=9))


@pytest.mark.parametrize(
    ("kernel", "description", "window", "want"),
    [
        ("H30s", "", None, "soft"),
        ("Hr38\\3", "", None, "soft"),
        ("H70h", "", None, "bone"),
        ("Hr64\\3", "", None, "bone"),
        ("B31f", "", None, "soft"),
        ("B60f", "", None, "bone"),
        ("J70h", "", None, "bone"),
        ("FC26", "", None, "soft"),
        ("FC30", "", None, "bone"),
        ("STANDARD", "", None, "soft"),
        ("BONEPLUS", "", None, "bone"),
        ("LUNG", "", None, "bone"),
        ("UB", "", None, "soft"),
        ("YC", "", None, "bone"),
        ("", "Head bone 2mm", None, "bone"),
        ("", "Brain 5mm", None, "soft"),
        ("", "", (600.0, 2800.0), "bone"),
        ("", "", (40.0, 80.0), "soft"),
        ("", "", None, "unknown"),
        ("XYZ", "", None, "unknown"),
    ],
)
def test_kernel_table(kernel, description, window, want):
    assert kernel_class(kernel, description, window)[0] == want


def test_slabs_average_thin_slices_in_millimetres():
    positions = 10.0 + THIN_MM * np.arange(64)  # 40 mm of 0.625 mm slices
    slab_of, width = slab_index(positions, 5.0)
    assert width == pytest.approx(5.0) and np.array_equal(slab_of, np.repeat(np.arange(8), 8))
    assert needs_reformat(THIN_MM, 5.0) and not needs_reformat(4.0, 5.0)
    volume = np.arange(64, dtype=np.int16)[:, None, None].repeat(2, 1).repeat(2, 2)
    meta = {
        "positions": positions.tolist(),
        "sop_uids": [f"s{i}" for i in range(64)],
        "spacing": [THIN_MM, 1, 1],
        "slice_shifts_px": [[0.0, 0.0]] * 64,
        "labels": {"any": [None] * 64},
    }
    slabs = reformat_slabs(volume, meta, 5.0)
    assert slabs.volume.shape == (8, 2, 2)
    np.testing.assert_array_equal(slabs.volume[:, 0, 0], np.rint(np.arange(8) * 8 + 3.5).astype(np.int16))
    assert slabs.meta["positions"] == pytest.approx(10.0 + 5.0 * np.arange(8) + 3.5 * THIN_MM)
    assert slabs.meta["sop_uids"][0] in {"s3", "s4"} and slabs.meta["spacing"][0] == pytest.approx(5.0)
    probs = np.arange(8.0)[:, None]
    assert np.array_equal(slabs.expand(probs)[:, 0], np.repeat(np.arange(8.0), 8))
    # A gap in the series (missing slices) leaves no empty slab.
    gappy = np.concatenate([positions[:16], positions[32:]])
    slab_of, _ = slab_index(gappy, 5.0)
    assert set(slab_of.tolist()) == set(range(int(slab_of.max()) + 1))
