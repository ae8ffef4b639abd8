"""`rsna19 demo` end to end, as a new user runs it (marker `slow`: ~7 minutes on two cores, ~3 more for the HU-offset
check; `make test-slow`).

The model-quality goals the demo was tuned for are asserted on its default seed, so a change that loses them shows
up here: the best base model's slice AUC(any) out of fold ≥ 0.93, and the blend never above the best base model's
loss on the OOF rows (docs/benchmarks.md, "Model quality").
"""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from rsna19.pipeline.config import load_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rsna19", "demo", "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_prints_the_score_table_and_the_stage_times(demo):
    _, stdout = demo
    for text in ("weighted log loss", "blend / best base model:", "submission.csv", "time per stage", "demo finished"):
        assert text in stdout


def test_demo_meets_the_model_quality_goals_on_its_default_seed(demo):
    out, _ = demo
    scores = pd.read_csv(out / "stack" / "demo" / "scores.csv").set_index("name")
    base = scores[scores["kind"] == "base"]
    assert set(base.index) == set(load_pipeline("demo").model_names)
    assert base["auc_any"].max() >= 0.93
    assert scores.loc["blend", "wll_oof"] <= base["wll_oof"].min()
    assert scores[["wll_oof", "wll_test"]].notna().all().all()
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission.columns) == ["ID", "Label"] and submission["Label"].between(0, 1).all()


def test_a_second_run_does_nothing_again(demo):
    out, _ = demo
    proc = subprocess.run(
        [sys.executable, "-m", "rsna19", "demo", "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already done" in proc.stdout


@pytest.mark.xfail(
    strict=True,
    reason="issue 23 is open: the brain reference is opt-in (off in configs/demo: it cost clf2d most of its skill at "
    "the demo budget; docs/benchmarks.md, 'Scanner shift'), so the demo bundle still reads absolute HU",
)
def test_an_hu_offset_of_10_inside_the_head_moves_the_demo_bundle_little(demo, tmp_path):
    """Issue 23: HU ±10 inside the head moves study AUC(any) by ≤ 0.02 and the mean p_any of bleed-free slices by
    ≤ 0.05 (holds once the demo's image models read HU referenced to the series' brain tissue)."""
    from rsna19.synth.shift import write_shift_preset
    from rsna19.synth.shift_eval import evaluate_preset

    out, _ = demo
    bundle = tmp_path / "bundle"
    run = [sys.executable, "-m", "rsna19"]
    proc = subprocess.run([*run, "bundle", str(out), "--out", str(bundle)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for name in ("none", "hu_plus10", "hu_minus10"):
        studies = tmp_path / name
        write_shift_preset(studies, name, n_studies=12)
        pred = tmp_path / f"pred_{name}"
        cmd = [*run, "predict-study", str(studies / "stage_2_test"), "--bundle", str(bundle), "--out", str(pred)]
        proc = subprocess.run([*cmd, "--device", "cpu", "--tta", "none", "--no-cam"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = evaluate_preset(studies, pred)
    for name in ("hu_plus10", "hu_minus10"):
        assert abs(rows[name]["study_auc_max"] - rows["none"]["study_auc_max"]) <= 0.02, rows
        assert abs(rows[name]["p_neg"] - rows["none"]["p_neg"]) <= 0.05, rows
