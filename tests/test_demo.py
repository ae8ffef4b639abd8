"""`rsna19 demo` end to end, as a new user runs it (marker `slow`, `make test-slow`: two demos of ~6.5 minutes each on
two float32 cores, seeds 0 and 1, and ~2 minutes a seed for the HU-offset check).

The model-quality goals of the demo are asserted on its default seed, so a change that loses them shows up here:
the best base model's slice AUC(any) out of fold, and the blend never above the best base model's loss on the OOF
rows (docs/benchmarks.md, "Demo"). The scanner-shift goal of issue 23 is asserted on both seeds: an HU offset of
±10 inside the head moves the demo bundle's study AUC(any) by ≤ 0.02 and the mean p_any of its bleed-free slices by
≤ 0.05 (docs/benchmarks.md, "Scanner shift").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rsna19.pipeline.config import load_pipeline
from rsna19.synth.shift import write_shift_preset
from rsna19.synth.shift_eval import evaluate_preset

pytestmark = pytest.mark.slow

RSNA19 = [sys.executable, "-m", "rsna19"]

#: The demo's quality goal on seed 0 (measured 0.913 for its best base model; docs/benchmarks.md, "Demo").
MIN_BEST_BASE_AUC = 0.90


def _run_demo(out: Path, seed: int) -> str:
    proc = subprocess.run(
        [*RSNA19, "demo", "--out", str(out), "--seed", str(seed)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, _run_demo(out, seed=0)


@pytest.fixture(scope="module")
def demo_seed1(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_seed1") / "out"
    return out, _run_demo(out, seed=1)


def test_demo_prints_the_score_table_and_the_stage_times(demo):
    _, stdout = demo
    for text in ("weighted log loss", "blend / best base model:", "submission.csv", "time per stage", "demo finished"):
        assert text in stdout


def test_demo_meets_the_model_quality_goals_on_its_default_seed(demo):
    out, _ = demo
    scores = pd.read_csv(out / "stack" / "demo" / "scores.csv").set_index("name")
    base = scores[scores["kind"] == "base"]
    assert set(base.index) == set(load_pipeline("demo").model_names)
    assert base["auc_any"].max() >= MIN_BEST_BASE_AUC
    assert scores.loc["blend", "wll_oof"] <= base["wll_oof"].min()
    assert scores[["wll_oof", "wll_test"]].notna().all().all()
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission.columns) == ["ID", "Label"] and submission["Label"].between(0, 1).all()


def test_a_second_run_does_nothing_again(demo):
    out, _ = demo
    proc = subprocess.run([*RSNA19, "demo", "--out", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already done" in proc.stdout


@pytest.mark.parametrize("which", ["demo", "demo_seed1"])
def test_an_hu_offset_of_10_inside_the_head_moves_the_demo_bundle_little(which, request, tmp_path):
    """Issue 23: HU ±10 inside the head moves study AUC(any) by ≤ 0.02 and the mean p_any of bleed-free slices by
    ≤ 0.05: the demo's image models read HU referenced to the series' brain tissue (``data.hu_reference: brain``)."""
    out, _ = request.getfixturevalue(which)
    bundle = tmp_path / "bundle"
    proc = subprocess.run([*RSNA19, "bundle", str(out), "--out", str(bundle)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for name in ("none", "hu_plus10", "hu_minus10"):
        studies = tmp_path / name
        write_shift_preset(studies, name, n_studies=24)  # 24: one swapped pair moves AUC by < 0.01
        pred = tmp_path / f"pred_{name}"
        cmd = [*RSNA19, "predict-study", str(studies / "stage_2_test"), "--bundle", str(bundle), "--out", str(pred)]
        proc = subprocess.run([*cmd, "--device", "cpu", "--tta", "none", "--no-cam"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = evaluate_preset(studies, pred)
    # The claim needs a model that separates studies: a bundle at chance would pass the ±0.02 bound trivially.
    assert rows["none"]["study_auc_max"] >= 0.8, rows
    for name in ("hu_plus10", "hu_minus10"):
        assert abs(rows[name]["study_auc_max"] - rows["none"]["study_auc_max"]) <= 0.02, rows
        assert abs(rows[name]["p_neg"] - rows["none"]["p_neg"]) <= 0.05, rows
