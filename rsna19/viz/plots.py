"""Pictures of a run's ``log.csv`` and of the stack's ``scores.csv``, for people who would rather look than read.

:func:`plot_training_curves` draws the learning curves of one training run (written as ``curves.png`` in the run
directory by the trainer) and :func:`plot_score_table` the stack's score table (``scores.png`` next to
``scores.csv``). Both use the Agg renderer on a :class:`matplotlib.figure.Figure` (no pyplot, so no global figure
state), write atomically and leave no date or software version in the PNG: same inputs, same bytes.

Plots are a by-product: the stages call them through :func:`plot_safely`, so a plotting error only logs a warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from rsna19.core.atomic import atomic_path
from rsna19.core.constants import CLASSES, SHORT_NAMES
from rsna19.core.metrics import expected_calibration_error, reliability_bins

log = logging.getLogger(__name__)

DPI: int = 100


#: Line colours of the six classes (colour-blind friendly tab10 picks, ``any`` black; the study report's too).
CLASS_COLOURS: dict[str, str] = {
    "epidural": "tab:blue",
    "intraparenchymal": "tab:orange",
    "intraventricular": "tab:green",
    "subarachnoid": "tab:purple",
    "subdural": "tab:red",
    "any": "black",
}

#: Bar colours of the score table's row kinds (``scores.csv`` column ``kind``).
KIND_COLOURS: dict[str, str] = {
    "base": "tab:blue",
    "mean": "tab:gray",
    "stacker": "tab:orange",
    "blend": "tab:green",
}

#: Columns :func:`plot_training_curves` needs in ``log.csv``.
CURVE_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "val_wll", *(f"val_loss_{c}" for c in CLASSES))


def save_png(fig: Figure, out_png: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``out_png`` atomically as a deterministic PNG."""
    with atomic_path(out_png) as tmp:
        # No "Software" entry (matplotlib version) and PNG has no date by default: same inputs, same bytes.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return Path(out_png)


def best_epoch(log_frame: pd.DataFrame) -> int | None:
    """The epoch of the lowest validation weighted log loss (the first on ties, like the trainer), or None.

    Args:
        log_frame: the rows of ``log.csv`` (columns ``epoch`` and ``val_wll``).
    """
    wll = pd.to_numeric(log_frame["val_wll"], errors="coerce")
    if not wll.notna().any():
        return None
    return int(log_frame["epoch"].iloc[int(np.nanargmin(wll.to_numpy(dtype=np.float64)))])


def plot_training_curves(log_csv: str | os.PathLike[str], out_png: str | os.PathLike[str], title: str) -> Path:
    """Draw the learning curves of a run from its ``log.csv``.

    Three panels sharing the epoch axis: training loss and validation weighted log loss (the best epoch marked
    with a star, a dotted line and its value), the six per-class validation losses, and the learning rate at
    the end of each epoch (log scale when it spans more than a factor 10; left out when ``lr`` is missing).

    Args:
        log_csv: the run's ``log.csv`` (see ``LOG_COLUMNS`` in :mod:`rsna19.training.trainer`).
        out_png: the picture to write (atomically).
        title: shown above the panels, e.g. ``"clf2dc fold 0"``.

    Returns:
        ``out_png``.

    Raises:
        ValueError: ``log.csv`` has no rows or lacks a column of :data:`CURVE_COLUMNS`.
    """
    df = pd.read_csv(log_csv)
    missing = [c for c in CURVE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{log_csv} lacks the column(s) {', '.join(missing)}")
    if df.empty:
        raise ValueError(f"{log_csv} has no epochs yet")
    df = df.sort_values("epoch", kind="stable")
    epochs = df["epoch"].to_numpy()
    marker = "o" if len(df) <= 40 else None
    has_lr = "lr" in df.columns and pd.to_numeric(df["lr"], errors="coerce").notna().any()

    # A fixed layout (no constrained layout: it draws the figure twice, which doubled the time of a plot).
    fig_h = 8.0 if has_lr else 6.6
    fig = Figure(figsize=(8.0, fig_h), dpi=DPI)
    ratios = [3.0, 3.0, 1.2] if has_lr else [3.0, 3.0]
    axes = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    fig.subplots_adjust(left=0.1, right=0.86, top=1 - 0.75 / fig_h, bottom=0.6 / fig_h, hspace=0.28)
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.12 / fig_h, va="top")

    _draw_losses(axes, df, marker)
    _draw_class_losses(axes[1], df, marker)
    if has_lr:
        _draw_lr(axes[2], df, marker)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(df) == 1:
        axes[-1].set_xlim(epochs[0] - 1, epochs[0] + 1)
    for a in axes:
        a.tick_params(labelsize=8)
    return save_png(fig, out_png)


def _draw_losses(axes: np.ndarray, df: pd.DataFrame, marker: str | None) -> None:
    """Top panel of :func:`plot_training_curves`: training loss and val wll, the best epoch marked on every panel."""
    ax = axes[0]
    epochs = df["epoch"].to_numpy()
    ax.plot(epochs, df["train_loss"], color="tab:blue", marker=marker, ms=3, lw=1.5, label="train loss")
    ax.plot(epochs, df["val_wll"], color="tab:red", marker=marker, ms=3, lw=1.8, label="val weighted log loss")
    best = best_epoch(df)
    if best is not None:
        best_wll = float(df.loc[df["epoch"] == best, "val_wll"].iloc[0])
        for a in axes:
            a.axvline(best, color="0.6", lw=0.9, ls=":", zorder=0)
        ax.plot(
            [best],
            [best_wll],
            marker="*",
            ms=15,
            color="gold",
            mec="black",
            mew=0.8,
            ls="none",
            zorder=5,
            label=f"best: epoch {best}, val wll {best_wll:.4f}",
        )
    ax.set_ylabel("loss")
    ax.set_title("training loss and validation weighted log loss", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    ax.grid(alpha=0.3)


def _draw_class_losses(ax: Any, df: pd.DataFrame, marker: str | None) -> None:
    """Middle panel of :func:`plot_training_curves`: the six per-class validation losses."""
    for name in CLASSES:
        ax.plot(
            df["epoch"].to_numpy(),
            df[f"val_loss_{name}"],
            color=CLASS_COLOURS[name],
            marker=marker,
            ms=2.5,
            lw=2.2 if name == "any" else 1.3,
            label=SHORT_NAMES[name],
        )
    ax.set_ylabel("val log loss")
    ax.set_title("validation log loss per class", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)


def _draw_lr(ax: Any, df: pd.DataFrame, marker: str | None) -> None:
    """Bottom panel of :func:`plot_training_curves`: the learning rate, log scale when it spans more than 10x."""
    lr = pd.to_numeric(df["lr"], errors="coerce").to_numpy(dtype=np.float64)
    ax.plot(df["epoch"].to_numpy(), lr, color="tab:green", marker=marker, ms=2.5, lw=1.3)
    positive = lr[np.isfinite(lr) & (lr > 0)]
    if len(positive) and positive.max() > 10 * positive.min():
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    ax.set_ylabel("lr")
    ax.set_title("learning rate (end of epoch)", fontsize=9, loc="left")
    ax.grid(alpha=0.3)


def _loss_axis_start(values: np.ndarray) -> float:
    """Left end of the loss axis: 0, or a round number below the smallest loss when the differences are small.

    Losses of a stack lie close together (0.060 against 0.075): from 0 the bars would look the same length.
    """
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    if lo <= 0 or span <= 0 or lo < 1.5 * span:
        return 0.0
    step = 10.0 ** math.floor(math.log10(span)) / 2
    return max(0.0, math.floor((lo - 0.6 * span) / step) * step)


def plot_score_table(scores: pd.DataFrame, out_png: str | os.PathLike[str], title: str) -> Path:
    """Draw the stack's score table as horizontal bars: OOF and test weighted log loss of every row.

    Rows are sorted by OOF loss (best on top); bars are coloured by ``kind`` (base, mean, stacker, blend), the
    OOF bar solid and the test bar lighter and hatched, each with its value. A dashed line marks the best base
    model's OOF loss: what the second level has to beat. A test loss that is NaN (no test labels) draws no bar
    but "n/a"; when no row has one, the OOF bars take the whole row. When the losses lie close together the axis
    starts at a round number below the smallest (said in the axis label), so the differences stay visible.

    Args:
        scores: the score table (``scores.csv``: ``name``, ``kind``, ``wll_oof``, ``wll_test``).
        out_png: the picture to write (atomically).
        title: shown above the chart, e.g. ``"stack demo"``.

    Returns:
        ``out_png``.

    Raises:
        ValueError: ``scores`` has no rows with an OOF loss or lacks a needed column.
    """
    df = _score_rows(scores)
    has_test = bool(df["wll_test"].notna().any())
    n = len(df)
    names = [str(v) for v in df["name"]]
    kinds = [str(v) for v in df["kind"]]

    # A fixed layout in inches (no constrained layout: it draws twice); the left margin fits the longest name.
    row_h = 0.6 if has_test else 0.36
    left_in, right_in, top_in, bottom_in = 0.3 + 0.068 * max(len(v) for v in names), 1.75, 0.5, 0.55
    fig_w, fig_h = max(8.0, left_in + 5.0 + right_in), top_in + bottom_in + 0.2 + row_h * n
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes(
        (left_in / fig_w, bottom_in / fig_h, 1 - (left_in + right_in) / fig_w, 1 - (top_in + bottom_in) / fig_h)
    )
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.1 / fig_h, va="top")
    y = np.arange(n, dtype=np.float64)
    height = 0.4 if has_test else 0.7
    colours = [KIND_COLOURS.get(k, "tab:brown") for k in kinds]
    oof_y = y - height / 2 if has_test else y
    test_y = y + height / 2
    test = df["wll_test"].to_numpy(dtype=np.float64)
    ax.barh(oof_y, df["wll_oof"], height=height, color=colours, edgecolor="black", lw=0.5)
    if has_test:
        ok = np.isfinite(test)
        ax.barh(
            test_y[ok],
            test[ok],
            height=height,
            color=np.asarray(colours)[ok].tolist(),
            alpha=0.45,
            hatch="///",
            edgecolor="black",
            lw=0.5,
        )

    left = _label_scores(ax, df, oof_y, test_y if has_test else None)
    ax.set_yticks(y, names, fontsize=8.5)
    ax.set_ylim(n - 0.5, -0.5)  # best on top
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    xlabel = "weighted log loss (lower is better)"
    if left > 0:
        xlabel += f"; axis starts at {left:g}, not 0"
    ax.set_xlabel(xlabel, fontsize=9)
    _score_legend(ax, df, has_test)
    return save_png(fig, out_png)


def _score_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The rows of the score table with an OOF loss, best first, losses numeric (NaN where missing)."""
    missing = [c for c in ("name", "kind", "wll_oof", "wll_test") if c not in scores.columns]
    if missing:
        raise ValueError(f"the score table lacks the column(s) {', '.join(missing)}")
    df = scores.copy()
    df["wll_oof"] = pd.to_numeric(df["wll_oof"], errors="coerce")
    df["wll_test"] = pd.to_numeric(df["wll_test"], errors="coerce")
    df = df[df["wll_oof"].notna()].sort_values("wll_oof", kind="stable").reset_index(drop=True)
    if df.empty:
        raise ValueError("the score table has no row with an OOF loss")
    return df


def _label_scores(ax: Any, df: pd.DataFrame, oof_y: np.ndarray, test_y: np.ndarray | None) -> float:
    """Set the loss axis's range and write each bar's value ("n/a" for NaN); the test bars' when ``test_y`` is given.

    Returns:
        The left end of the loss axis.
    """
    values = df[["wll_oof", "wll_test"]].to_numpy(dtype=np.float64)
    finite = values[np.isfinite(values)]
    left = _loss_axis_start(finite)
    right = float(finite.max())
    pad = (right - left) * 0.16  # room for the value labels
    ax.set_xlim(left, right + pad)
    label_box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.6}
    labels = [(yy, v, "black") for yy, v in zip(oof_y, df["wll_oof"])]
    if test_y is not None:
        labels += [(yy, v, "0.3") for yy, v in zip(test_y, df["wll_test"].to_numpy(dtype=np.float64))]
    for yy, v, colour in labels:
        x, text = (left, "n/a") if math.isnan(v) else (v, f"{v:.4f}")
        ax.text(x + pad * 0.04, yy, text, va="center", ha="left", fontsize=7.5, color=colour, bbox=label_box, zorder=4)
    return left


def _score_legend(ax: Any, df: pd.DataFrame, has_test: bool) -> None:
    """The best base model's OOF line and the legend: kinds (known ones first), OOF/test, that line."""
    kinds = [str(v) for v in df["kind"]]
    base = df.loc[df["kind"] == "base", "wll_oof"]
    ref = float(base.min()) if len(base) else math.nan
    if len(base):
        ax.axvline(ref, color="black", ls="--", lw=1.0, zorder=3)
    order = [k for k in KIND_COLOURS if k in kinds] + [k for k in dict.fromkeys(kinds) if k not in KIND_COLOURS]
    handles: list[Any] = [
        Patch(facecolor=KIND_COLOURS.get(k, "tab:brown"), edgecolor="black", lw=0.5, label=k) for k in order
    ]
    handles.append(Patch(facecolor="white", edgecolor="black", lw=0.5, label="OOF"))
    if has_test:
        handles.append(Patch(facecolor="white", edgecolor="black", lw=0.5, hatch="///", label="test"))
    else:
        handles.append(Patch(facecolor="none", edgecolor="none", label="(no test labels)"))
    if len(base):
        handles.append(Line2D([], [], color="black", ls="--", lw=1.0, label=f"best base OOF\n{ref:.4f}"))
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_safely(plot: Callable[..., Path], *args: Any, **kwargs: Any) -> Path | None:
    """Call ``plot(*args, **kwargs)``; on any error log a warning and return None instead of raising.

    The stages draw their pictures through this: a plot is never worth failing a training run or a stack for.

    Returns:
        what ``plot`` returned (the picture's path), or None when it failed.
    """
    try:
        return plot(*args, **kwargs)
    except Exception as exc:  # any plotting failure is only a warning
        log.warning("could not draw %s: %s: %s", getattr(plot, "__name__", "a plot"), type(exc).__name__, exc)
        return None


def write_training_curves(run_dir: str | os.PathLike[str], title: str) -> Path | None:
    """Draw ``run_dir/log.csv`` as ``run_dir/curves.png``; a failure only logs a warning (see :func:`plot_safely`).

    Args:
        run_dir: a training run directory (``RUNS/<config name>/fold_<k>``).
        title: shown above the panels.

    Returns:
        the picture's path, or None when it could not be drawn.
    """
    run_dir = Path(run_dir)
    return plot_safely(plot_training_curves, run_dir / "log.csv", run_dir / "curves.png", title)


#: One curve set of :func:`plot_roc` / :func:`plot_reliability`: panel title → class → (labels, probabilities).
CurveSet = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def _panels(curves: CurveSet, title: str) -> tuple[Figure, list[Any]]:
    """A figure with one square panel per entry of ``curves``."""
    n = max(len(curves), 1)
    width = 0.3 + 3.6 * n
    fig = Figure(figsize=(width, 4.2), dpi=DPI)
    fig.suptitle(title, fontsize=10)
    return fig, [fig.add_axes(((0.6 + 3.6 * i) / width, 0.13, 3.0 / width, 0.72)) for i in range(n)]


def _draw_roc(ax: Any, panel: str, classes: dict[str, tuple[np.ndarray, np.ndarray]], ops: dict[str, Any]) -> None:
    """One ROC panel: a line per class with its AUC, the operating points ``ops`` (class → (sens, spec)) as dots."""
    from sklearn.metrics import roc_auc_score, roc_curve

    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    for c in CLASSES:
        if c not in classes:
            continue
        y, p = (np.asarray(v, dtype=np.float64) for v in classes[c])
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y, p)
        auc = roc_auc_score(y, p)
        colour = CLASS_COLOURS[c]
        ax.plot(fpr, tpr, color=colour, lw=2.0 if c == "any" else 1.2, label=f"{SHORT_NAMES[c]} {auc:.3f}")
        op = ops.get(c)
        if op is not None and all(math.isfinite(v) for v in op):
            ax.plot([1 - op[1]], [op[0]], "o", color=colour, ms=5, mec="white", mew=0.8)
    _unit_square(ax, panel, "1 − specificity", "sensitivity")
    ax.legend(title="AUC (dot: operating point)", title_fontsize=7, fontsize=7, loc="lower right")


def _unit_square(ax: Any, panel: str, xlabel: str, ylabel: str) -> None:
    """Title, [0, 1] axes of equal scale, small labels and a grid: the frame of a ROC or reliability panel."""
    ax.set_title(panel, fontsize=9)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _draw_reliability(ax: Any, panel: str, classes: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int) -> None:
    """One reliability panel: a line per class through its non-empty bins (dot area: count), ECE in the legend."""
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    for c in CLASSES:
        if c not in classes:
            continue
        y, p = (np.asarray(v, dtype=np.float64) for v in classes[c])
        if len(y) == 0:
            continue
        bins = reliability_bins(y, p, n_bins)
        bins = bins[bins["n"] > 0]
        ece = expected_calibration_error(y, p, n_bins)
        colour = CLASS_COLOURS[c]
        ax.plot(bins["mean_prob"], bins["frac_pos"], color=colour, lw=2.0 if c == "any" else 1.0, alpha=0.9)
        sizes = 6 + 40 * np.sqrt(bins["n"].to_numpy() / max(int(bins["n"].max()), 1))
        ax.scatter(bins["mean_prob"], bins["frac_pos"], s=sizes, color=colour, label=f"{SHORT_NAMES[c]} {ece:.3f}")
    _unit_square(ax, panel, "mean predicted probability", "fraction positive")
    ax.legend(title="ECE (dot area: count)", title_fontsize=7, fontsize=7, loc="upper left")


def plot_roc(
    curves: CurveSet,
    out_png: str | os.PathLike[str],
    title: str,
    operating_points: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> Path:
    """ROC curves, one panel per level (e.g. study and slice), one line per class with its AUC.

    Args:
        curves: panel title → class → ((N,) 0/1 labels, (N,) probabilities); a class with one label value is
            left out of its panel.
        out_png: output file (written atomically, deterministic bytes).
        title: figure title.
        operating_points: panel title → class → (sensitivity, specificity), drawn as dots.
    """
    fig, axes = _panels(curves, title)
    for ax, (panel, classes) in zip(axes, curves.items()):
        _draw_roc(ax, panel, classes, (operating_points or {}).get(panel, {}))
    return save_png(fig, out_png)


def plot_reliability(curves: CurveSet, out_png: str | os.PathLike[str], title: str, n_bins: int = 10) -> Path:
    """Reliability diagrams: mean predicted probability against the fraction of positives per equal-width bin.

    One panel per level, one line per class (dots sized by the bin's count); the diagonal is perfect calibration.

    Args:
        curves: panel title → class → ((N,) 0/1 labels, (N,) probabilities).
        out_png: output file.
        title: figure title.
        n_bins: equal-width bins over [0, 1] (those of :func:`rsna19.core.metrics.reliability_bins`).
    """
    fig, axes = _panels(curves, title)
    for ax, (panel, classes) in zip(axes, curves.items()):
        _draw_reliability(ax, panel, classes, n_bins)
    return save_png(fig, out_png)


def plot_roc_reliability(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    operating_points: dict[str, tuple[float, float]],
    out_png: str | os.PathLike[str],
    title: str,
    n_bins: int = 10,
) -> Path:
    """ROC curves (with operating points) and the reliability diagram of one set of study results, side by side.

    Args:
        curves: class → ((N,) 0/1 labels, (N,) probabilities).
        operating_points: class → (sensitivity, specificity), drawn on the ROC curves.
        out_png: output file (atomic, deterministic bytes).
        title: figure title.
        n_bins: reliability bins.
    """
    fig, (ax_roc, ax_rel) = _panels({"roc": curves, "reliability": curves}, title)
    _draw_roc(ax_roc, "ROC (dot: the bundle's operating point)", curves, operating_points)
    _draw_reliability(ax_rel, "reliability", curves, n_bins)
    return save_png(fig, out_png)
