"""Pictures of a run's log.csv and of the stack's score table: valid PNGs, best epoch, NaN test scores, guard."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rsna19.core.constants import CLASSES
from rsna19.stacking.report import SCORE_COLUMNS, score_frame, score_row
from rsna19.training.trainer import LOG_COLUMNS
from rsna19.viz import plots
from rsna19.viz.plots import best_epoch, plot_safely, plot_score_table, plot_training_curves, write_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path: Path, n_epochs: int = 8, best: int = 5, seed: int = 0) -> Path:
    """A ``log.csv`` in the trainer's schema whose validation loss is lowest at epoch ``best``."""
    rng = np.random.default_rng(seed)
    epochs = np.arange(n_epochs)
    val = 0.08 + 0.01 * np.abs(epochs - best) + rng.uniform(0, 0.002, n_epochs)
    val[best] = 0.07
    rows: dict[str, object] = {
        "epoch": epochs,
        "train_loss": 0.3 * np.exp(-epochs / 3) + 0.05,
        "val_wll": val,
    }
    for i, c in enumerate(CLASSES):
        rows[f"val_loss_{c}"] = val * (0.5 + 0.2 * i)
    rows["lr"] = 3e-4 * 0.5 * (1 + np.cos(np.pi * epochs / n_epochs))
    rows["time_s"] = rng.uniform(50, 70, n_epochs)
    pd.DataFrame(rows, columns=list(LOG_COLUMNS)).to_csv(path, index=False)
    return path


def real_scores(test_labels: bool = True, seed: int = 0) -> pd.DataFrame:
    """A score table built the way the stack builds it (``score_row`` on random labels and predictions)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((200, 6)) < 0.2).astype(np.float64)
    y_test = (rng.random((80, 6)) < 0.2).astype(np.float64)
    rows = []
    spec = [("clf2dc", "base", 0.35), ("clf3d", "base", 0.4), ("seq", "base", 0.3), ("mean", "mean", 0.28)]
    spec += [("convex", "stacker", 0.25), ("lgbm", "stacker", 0.22), ("mlp", "stacker", 0.24), ("blend", "blend", 0.2)]
    for name, kind, noise in spec:
        p = np.clip(y * 0.6 + 0.2 + rng.normal(0, noise, y.shape), 0.01, 0.99)
        pt = np.clip(y_test * 0.6 + 0.2 + rng.normal(0, noise, y_test.shape), 0.01, 0.99)
        rows.append(score_row(name, kind, y, p, y_test if test_labels else None, pt if test_labels else None))
    return score_frame(rows)


def assert_png(path: Path, min_size: tuple[int, int] = (400, 250), max_size: tuple[int, int] = (2000, 3000)) -> None:
    """``path`` is a complete PNG of a sane size and no temporary of it is left."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        im.verify()  # a truncated or corrupt file raises
    assert min_size[0] <= w <= max_size[0] and min_size[1] <= h <= max_size[1], (w, h)
    with Image.open(path) as im:  # not a blank canvas: the plot drew something
        extrema = im.convert("L").getextrema()
    assert extrema[0] < 100 and extrema[1] > 200
    assert not [p.name for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture(autouse=True)
def no_pyplot_figures_leak():
    """The plots never go through pyplot: no figure is left open in its global state."""
    before = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    yield
    after = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    assert after == before


# ---------------------------------------------------------------------------------------------- training curves


def test_training_curves_png(tmp_path):
    log_csv = write_log(tmp_path / "log.csv", n_epochs=8, best=5)
    out = plot_training_curves(log_csv, tmp_path / "curves.png", "clf2dc fold 0")
    assert out == tmp_path / "curves.png"
    assert_png(out)
    assert best_epoch(pd.read_csv(log_csv)) == 5


def test_training_curves_are_deterministic(tmp_path):
    log_csv = write_log(tmp_path / "log.csv")
    a = plot_training_curves(log_csv, tmp_path / "a.png", "t").read_bytes()
    b = plot_training_curves(log_csv, tmp_path / "b.png", "t").read_bytes()
    assert a == b


def test_training_curves_single_epoch_and_without_lr(tmp_path):
    log_csv = write_log(tmp_path / "log.csv", n_epochs=1, best=0)
    assert_png(plot_training_curves(log_csv, tmp_path / "one.png", "one epoch"))
    df = pd.read_csv(log_csv).drop(columns=["lr"])
    df.to_csv(tmp_path / "nolr.csv", index=False)
    assert_png(plot_training_curves(tmp_path / "nolr.csv", tmp_path / "nolr.png", "no lr"))


def test_best_epoch():
    df = pd.DataFrame({"epoch": [3, 4, 5, 6], "val_wll": [0.2, 0.1, 0.1, 0.3]})
    assert best_epoch(df) == 4  # the first of equal losses, like the trainer (strictly lower to improve)
    assert best_epoch(df.assign(val_wll=[math.nan, 0.5, math.nan, 0.4])) == 6
    assert best_epoch(df.assign(val_wll=math.nan)) is None


def test_training_curves_reject_an_empty_or_foreign_log(tmp_path):
    pd.DataFrame(columns=list(LOG_COLUMNS)).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ValueError, match="no epochs"):
        plot_training_curves(tmp_path / "empty.csv", tmp_path / "e.png", "t")
    pd.DataFrame({"epoch": [0], "loss": [1.0]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match="val_wll"):
        plot_training_curves(tmp_path / "other.csv", tmp_path / "o.png", "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.csv", "other.csv"]


# ---------------------------------------------------------------------------------------------- score table


def test_score_table_png(tmp_path):
    scores = real_scores()
    scores.to_csv(tmp_path / "scores.csv", index=False)
    read = pd.read_csv(tmp_path / "scores.csv")
    assert list(read.columns) == SCORE_COLUMNS
    out = plot_score_table(read, tmp_path / "scores.png", "stack demo")
    assert out == tmp_path / "scores.png"
    assert_png(out)
    assert plot_score_table(read, tmp_path / "again.png", "stack demo").read_bytes() == out.read_bytes()


def test_score_table_without_test_labels(tmp_path):
    scores = real_scores(test_labels=False)
    scores.to_csv(tmp_path / "scores.csv", index=False)  # NaN is written as an empty cell
    read = pd.read_csv(tmp_path / "scores.csv")
    assert read["wll_test"].isna().all()
    assert_png(plot_score_table(read, tmp_path / "scores.png", "no test labels"))


def test_score_table_with_some_test_scores_missing_and_no_base_row(tmp_path):
    scores = real_scores()
    scores.loc[[1, 5], "wll_test"] = math.nan
    assert_png(plot_score_table(scores, tmp_path / "partial.png", "partial"))
    only_stackers = scores[scores["kind"] != "base"]
    assert_png(plot_score_table(only_stackers, tmp_path / "stackers.png", "no base"))


def test_score_table_rejects_unusable_tables(tmp_path):
    with pytest.raises(ValueError, match="wll_test"):
        plot_score_table(pd.DataFrame({"name": ["a"], "kind": ["base"], "wll_oof": [0.1]}), tmp_path / "x.png", "t")
    empty = pd.DataFrame(columns=SCORE_COLUMNS)
    with pytest.raises(ValueError, match="no row"):
        plot_score_table(empty, tmp_path / "y.png", "t")
    assert list(tmp_path.iterdir()) == []


def test_loss_axis_starts_at_a_round_number_when_losses_are_close():
    assert plots._loss_axis_start(np.array([0.0602, 0.0745])) == pytest.approx(0.05)
    assert plots._loss_axis_start(np.array([0.1, 0.9])) == 0.0  # far apart: from 0
    assert plots._loss_axis_start(np.array([0.07, 0.07])) == 0.0


# ---------------------------------------------------------------------------------------------- the guard


def test_plot_safely_turns_a_failure_into_a_warning(tmp_path, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    with caplog.at_level(logging.WARNING, logger="rsna19.viz.plots"):
        assert plot_safely(broken, tmp_path / "x.png") is None
    assert "could not draw broken" in caplog.text and "renderer exploded" in caplog.text
    assert plot_safely(lambda p: p, tmp_path / "ok.png") == tmp_path / "ok.png"


def test_trainer_hook_never_raises(tmp_path, caplog, monkeypatch):
    """``write_training_curves`` (what ``Trainer.fit`` calls) on a good, a missing, a broken log and a failing plot."""
    run = tmp_path / "fold_0"
    run.mkdir()
    with caplog.at_level(logging.WARNING, logger="rsna19.viz.plots"):
        assert write_training_curves(run, "no log yet") is None  # no log.csv
        (run / "log.csv").write_text("epoch,train_loss\n0,not a number,\x00\n", encoding="utf-8")
        assert write_training_curves(run, "garbage") is None
        write_log(run / "log.csv")
        assert write_training_curves(run, "good") == run / "curves.png"
        assert_png(run / "curves.png")

        def explode(*args, **kwargs):
            raise MemoryError("no room for the canvas")

        monkeypatch.setattr(plots, "plot_training_curves", explode)
        (run / "curves.png").unlink()
        assert write_training_curves(run, "failing") is None
    assert not (run / "curves.png").exists()
    assert caplog.text.count("could not draw") == 3
    assert sorted(p.name for p in run.iterdir()) == ["log.csv"]


def test_stack_writes_scores_png(tmp_path):
    """``run_stack`` writes ``scores.png`` next to ``scores.csv`` inside its atomically renamed folder."""
    from predfactory import make_work_dir

    from rsna19.core.config import load_config
    from rsna19.stacking.config import StackConfig
    from rsna19.stacking.run import run_stack

    work = make_work_dir(tmp_path / "work", n_patients=16, n_test_patients=4, n_folds=4)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "stack" / "tiny.yaml"
    overrides = [f"runs={work.runs}", f"folds_csv={work.folds_csv}", f"out={tmp_path / 'stack'}"]
    overrides += [f"models=[{','.join(work.models)}]", f"test_labels={work.test_labels}"]
    result = run_stack(load_config(StackConfig, tiny, overrides))
    assert (result.out_dir / "scores.csv").is_file()
    assert_png(result.out_dir / "scores.png")
