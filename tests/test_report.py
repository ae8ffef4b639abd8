"""Tests for rsna19.viz.report: the study report PNG and the studies.json summary."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.viz.report import render_study_report, summarise_study, top_slices


def _expected_shape(top_k: int, n_slices: int, calibrated: bool = False) -> tuple[int, int]:
    """(height, width) in pixels of the report, written out from its layout rather than computed by rsna19.

    At 100 dpi: one 200 px panel per slice shown, never fewer than 5 panels, plus 45 px of margins; 765 px high
    (title 30, slice titles 50, the window rows 400, gap 35, plot 200, x label 50) and 25 more for the line of
    the calibrated study result.
    """
    return 765 + (25 if calibrated else 0), 45 + 200 * max(min(top_k, n_slices), 5)


def _study(z: int = 12, size: int = 48, seed: int = 0):
    """A disc 'head' with a bright blob on slices 5..7 and probabilities peaking at slice 6."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = np.where(np.hypot(yy - size / 2, xx - size / 2) < size * 0.4, 35, -1024)
    vol = (head[None] + rng.normal(0, 4, (z, size, size))).astype(np.int16)
    vol[5:8, 10:16, 12:22] = 70
    t = np.arange(z)
    probs = np.full((z, 6), 0.02)
    probs[:, 4] = 0.9 * np.exp(-(((t - 6) / 1.5) ** 2))
    probs[:, 3] = 0.55 * np.exp(-(((t - 3) / 1.0) ** 2))
    probs[:, 5] = np.maximum(probs[:, 3], probs[:, 4]) + 0.05
    sops = [f"ID_{i:09x}" for i in range(z)]
    positions = list(np.arange(z) * 5.0 - 20.0)
    return vol, probs, sops, positions


def test_png_written_with_expected_size_and_content(tmp_path):
    vol, probs, sops, pos = _study()
    out = tmp_path / "sub" / "report_ID_st.png"
    shown = render_study_report(vol, probs, sops, pos, out, "ID_st", top_k=4)
    assert shown == [6, 5, 7, 3]  # by p_any (3: the SAH peak), ties by z
    img = mpimg.imread(out)
    assert img.shape[:2] == _expected_shape(4, len(vol)) == (765, 1045)
    assert img[..., :3].std() > 0.1  # not a blank canvas
    assert not list(out.parent.glob(".*tmp*"))  # atomic write left no temporary behind


def test_png_bytes_are_deterministic(tmp_path):
    vol, probs, sops, pos = _study()
    cam = np.zeros((16, 16))
    cam[3:6, 4:8] = 1.0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    render_study_report(vol, probs, sops, pos, a, "ID_st", cam=cam)
    render_study_report(vol, probs, sops, pos, b, "ID_st", cam=cam)
    assert a.read_bytes() == b.read_bytes()
    assert b"Software" not in a.read_bytes() and b"matplotlib" not in a.read_bytes()
    c = tmp_path / "c.png"
    render_study_report(vol, probs, sops, pos, c, "ID_st")  # the heat map changes the picture
    assert c.read_bytes() != a.read_bytes()


def test_single_slice_and_size_floor(tmp_path):
    vol, probs, sops, pos = _study(z=1)
    out = tmp_path / "one.png"
    assert render_study_report(vol, probs, sops, pos, out, "ID_one", top_k=6) == [0]
    # Never narrower than MIN_COLUMNS panels: the plot stays readable.
    assert mpimg.imread(out).shape[:2] == _expected_shape(6, 1)
    # Past the floor, one more slice is one more panel.
    wide = tmp_path / "wide.png"
    vol, probs, sops, pos = _study(z=12)
    render_study_report(vol, probs, sops, pos, wide, "ID_wide", top_k=7)
    assert mpimg.imread(wide).shape[:2] == _expected_shape(7, 12) == (765, 1445)


def test_bad_inputs_raise(tmp_path):
    vol, probs, sops, pos = _study()
    with pytest.raises(ValueError, match="probs must be"):
        render_study_report(vol, probs[:, :5], sops, pos, tmp_path / "x.png", "s")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        render_study_report(vol, probs * 2, sops, pos, tmp_path / "x.png", "s")
    with pytest.raises(ValueError, match="sop_uids"):
        render_study_report(vol, probs, sops[:-1], pos, tmp_path / "x.png", "s")
    with pytest.raises(ValueError, match="cam must be"):
        render_study_report(vol, probs, sops, pos, tmp_path / "x.png", "s", cam=np.zeros(3))
    assert not (tmp_path / "x.png").exists()


def test_top_slices_order():
    np.testing.assert_array_equal(top_slices(np.array([0.1, 0.9, 0.5, 0.9]), 3), [1, 3, 2])
    assert top_slices(np.array([0.3]), 5).tolist() == [0]


def test_summarise_study_values():
    _, probs, sops, pos = _study()
    df = pd.DataFrame(probs, columns=list(PROB_COLUMNS))
    df.insert(0, "sop_uid", sops)
    df.insert(1, "position", pos)
    df["series_uid"] = "ID_se"
    # Rows shuffled: z must follow position, not row order.
    shuffled = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    summary = summarise_study(shuffled, top_k=3)
    assert summary["n_slices"] == 12
    assert summary["max_probability"]["subdural"] == pytest.approx(0.9, abs=1e-6)
    assert summary["max_probability"]["subarachnoid"] == pytest.approx(0.55, abs=1e-6)
    assert summary["max_probability"]["epidural"] == pytest.approx(0.02)
    assert summary["positive"] == {c: c in ("subarachnoid", "subdural", "any") for c in CLASSES}
    assert summary["positive_classes"] == ["subarachnoid", "subdural", "any"]
    assert [t["z"] for t in summary["top_slices"]] == [6, 5, 7]
    top = summary["top_slices"][0]
    assert top == {
        "sop_uid": "ID_000000006",
        "z": 6,
        "position": 10.0,
        "p_any": pytest.approx(0.95),
        "series_uid": "ID_se",
    }
    json.dumps(summary)  # plain JSON types only

    explicit = summarise_study(df.assign(z=np.arange(12)[::-1]), top_k=1, threshold=0.96)
    assert explicit["top_slices"][0]["z"] == 5 and explicit["positive_classes"] == []


def test_summarise_study_rejects_bad_frames():
    with pytest.raises(ValueError, match="no slices"):
        summarise_study(pd.DataFrame(columns=["sop_uid", *PROB_COLUMNS]))
    with pytest.raises(ValueError, match="missing columns"):
        summarise_study(pd.DataFrame({"sop_uid": ["a"], "p_any": [0.5]}))
    bad = pd.DataFrame([[np.nan] * 6], columns=list(PROB_COLUMNS)).assign(sop_uid="a")
    with pytest.raises(ValueError, match="finite"):
        summarise_study(bad)


def test_calibrated_result_line(tmp_path):
    """With a study result the picture gets a second title line (the calibrated flag); the montage is unchanged."""
    from rsna19.core.calibration import apply_study_model, fit_study_model
    from rsna19.viz.report import result_line

    vol, probs, sops, pos = _study()
    frame = pd.DataFrame(probs, columns=list(PROB_COLUMNS)).assign(study_uid="s", sop_uid=sops)
    labels = np.zeros((len(sops), 6))
    labels[4:9, [4, 5]] = 1
    oof = pd.concat(
        [
            frame.assign(
                study_uid=f"s{i}", sop_uid=[f"{i}_{s}" for s in sops], **dict(zip(CLASSES, labels.T * (i % 2)))
            )
            for i in range(6)
        ]
    )
    oof.loc[oof["study_uid"].isin(["s0", "s2", "s4"]), list(PROB_COLUMNS)] *= 0.2  # negatives score lower
    result = apply_study_model(fit_study_model(oof), frame)
    line = result_line(result)
    assert line.startswith("calibrated p(any)") and result["flag"].upper() in line
    plain, calibrated = tmp_path / "plain.png", tmp_path / "calibrated.png"
    render_study_report(vol, probs, sops, pos, plain, "ID_st", top_k=4)
    render_study_report(vol, probs, sops, pos, calibrated, "ID_st", top_k=4, study_result=result)
    a, b = mpimg.imread(plain), mpimg.imread(calibrated)
    assert b.shape[:2] == _expected_shape(4, len(vol), calibrated=True)
    extra = b.shape[0] - a.shape[0]
    assert extra > 0 and a.shape[1] == b.shape[1]
    np.testing.assert_array_equal(a[-300:], b[-300:])  # the curves below are drawn the same
