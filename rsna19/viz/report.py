"""Per-study outputs of ``rsna19 predict-study``: the report picture and the ``studies.json`` summary.

:func:`render_study_report` draws one PNG per study: the most suspicious slices (by ``p_any``) in the brain and
subdural windows with their probabilities, an optional Grad-CAM heat map on the top slice, and the six class
probabilities along the slices. :func:`summarise_study` condenses the per-slice predictions of a study into the
dict written to ``studies.json``.

The PNG is deterministic: same inputs, same bytes (no timestamp or software version in its metadata, a fixed
size, the Agg renderer and no global pyplot state), so reports can be compared and cached.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rsna19.core.calibration import consistent_flags
from rsna19.core.constants import CLASSES, PROB_COLUMNS, SHORT_NAMES, WINDOWS
from rsna19.viz.plots import CLASS_COLOURS, save_png

#: Report geometry in inches (the layout is placed by hand, so the size never depends on text extents).
PANEL_INCHES: float = 2.0  # one montage cell, image plus gap
_GAP = 0.08  # between images
_LEFT = 0.35  # room for the window names
_RIGHT = 0.1
_HEADER = 0.3  # the study title
_RESULT_LINE = 0.25  # the calibrated study result under the title, when there is one
_SLICE_TITLE = 0.5  # three lines of 7.5 pt above each slice
_PLOT_GAP = 0.35  # between the montage and the plot (rank numbers)
_PLOT = 2.0
_FOOTER = 0.5  # x label
_LEGEND = 0.75  # legend right of the plot
DPI: int = 100
#: The picture is never narrower than this many panels, so the probability plot stays readable.
MIN_COLUMNS: int = 5


def _windowed(hu: np.ndarray, name: str) -> np.ndarray:
    """HU → [0, 1] through the named window of :data:`rsna19.core.constants.WINDOWS`."""
    centre, width = WINDOWS[name]
    return np.clip((np.asarray(hu, dtype=np.float32) - (centre - width / 2)) / width, 0.0, 1.0)


def top_slices(p_any: np.ndarray, k: int, z: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` slices with the highest ``p_any``, most suspicious first (ties: lower z first).

    Args:
        p_any: (Z,) probabilities.
        k: how many (capped at Z).
        z: (Z,) slice numbers breaking ties; the array index when None.

    Returns:
        (min(k, Z),) int indices into ``p_any``.
    """
    p_any = np.asarray(p_any, dtype=np.float64)
    z = np.arange(p_any.shape[0]) if z is None else np.asarray(z)
    return np.lexsort((z, -p_any))[: max(0, min(k, p_any.shape[0]))]


def _figure_inches(cols: int, calibrated: bool = False) -> tuple[float, float]:
    header = _HEADER + (_RESULT_LINE if calibrated else 0.0)
    return _LEFT + cols * PANEL_INCHES + _RIGHT, header + _SLICE_TITLE + 2 * PANEL_INCHES + _PLOT_GAP + _PLOT + _FOOTER


def result_line(study_result: dict[str, Any]) -> str:
    """One line of the calibrated study result: the flag of ``any``, its probability and operating point, and the
    subtypes flagged at theirs (only within a positive ``any``; with ``any`` negative the line says that subtypes
    are not reported, never a subtype as flagged)."""
    a = study_result["classes"]["any"]
    flagged = [
        f"{SHORT_NAMES[c]} {study_result['classes'][c]['probability']:.2f}"
        for c in CLASSES[:-1]
        if study_result["classes"][c]["positive"]
    ]
    line = (
        f"calibrated p(any) {a['probability']:.2f} {'≥' if a['positive'] else '<'} {a['threshold']:.2f} "
        f"(operating point for sensitivity {a['target_sensitivity']:.2f}) → {study_result['flag'].upper()}"
    )
    if flagged:
        return line + f" · flagged: {', '.join(flagged)}"
    if not a["positive"] and study_result.get("subtypes_withheld"):
        return line + " · no subtype reported (subtypes only within a positive 'any')"
    return line


def _slice_title(rank: int, z: int, probs: np.ndarray, sop_uid: str, threshold: float) -> str:
    """'#1 · z 12 · any 0.93', the subtypes above the threshold (at most 3; else the two likeliest), the SOP UID."""
    sub = [(float(probs[i]), SHORT_NAMES[c]) for i, c in enumerate(CLASSES[:-1])]
    sub.sort(key=lambda t: -t[0])
    # At most three fit the panel width; they are the likeliest anyway.
    shown = [t for t in sub if t[0] >= threshold][:3] or sub[:2]
    classes = " ".join(f"{name} {p:.2f}" for p, name in shown)
    uid = sop_uid if len(sop_uid) <= 18 else sop_uid[:17] + "…"
    return f"#{rank} · z {z} · any {float(probs[-1]):.2f}\n{classes}\n{uid}"


def render_study_report(
    volume_hu: np.ndarray,
    probs: np.ndarray,
    sop_uids: Sequence[str],
    positions: Sequence[float],
    out_png: str | os.PathLike[str],
    study_uid: str,
    top_k: int = 6,
    cam: np.ndarray | None = None,
    threshold: float = 0.5,
    study_result: dict[str, Any] | None = None,
    seg_mask: np.ndarray | None = None,
) -> list[int]:
    """Draw the report of one study (one series) and write it atomically as PNG.

    Layout: row 1, the ``top_k`` slices with the highest ``p_any`` in the brain window (40/80), most
    suspicious first, each titled with its probabilities; row 2, the same slices in the subdural window
    (80/200); bottom, the six probabilities along the slice index z with the threshold and the shown slices
    marked. ``cam`` is drawn over the first (most suspicious) slice.

    Args:
        volume_hu: (Z, H, W) HU, slice order (z = 0 is the lowest position).
        probs: (Z, 6) probabilities in :data:`rsna19.core.constants.CLASSES` order.
        sop_uids: (Z,) SOPInstanceUID of each slice.
        positions: (Z,) slice positions along the normal (mm), ascending.
        out_png: output file.
        study_uid: shown in the title.
        top_k: slices in the montage.
        cam: optional (h, w) heat map in [0, 1] for the top slice; stretched over the slice when its size differs
            (a network input may be resized).
        threshold: decision threshold drawn on the plot and used to pick the classes in the titles.
        study_result: the calibrated study result (:func:`rsna19.core.calibration.apply_study_model`), drawn as a
            second title line: the flag at the operating point, the calibrated probabilities, flagged subtypes.
        seg_mask: optional (H, W) bool bleed map of the top slice, the one the DICOM SEG holds
            (:mod:`rsna19.inference.seg_out`), drawn over it in red (instead of ``cam`` when both are given).

    The eleven arguments must stay: each is a separate input of the one picture that both callers (the study
    predictor and the tests, without a :class:`~rsna19.inference.result.StudyResult`) set on their own.

    Returns:
        The z indices shown, most suspicious first.

    Raises:
        ValueError: inconsistent shapes, no slices, or probabilities outside [0, 1].
    """
    volume_hu = np.asarray(volume_hu)
    probs = np.asarray(probs, dtype=np.float64)
    _check_report_inputs(volume_hu, probs, sop_uids, positions, cam, seg_mask)
    shown = top_slices(probs[:, -1], top_k)
    cols = max(len(shown), MIN_COLUMNS)
    fig_w, fig_h = _figure_inches(cols, study_result is not None)
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    _draw_title(fig, probs, study_uid, threshold, study_result)
    header = _HEADER + (_RESULT_LINE if study_result is not None else 0.0)
    for row, window in enumerate(("brain", "subdural")):
        top = header + _SLICE_TITLE + row * PANEL_INCHES
        for col, z in enumerate(int(v) for v in shown):
            ax = _add_axes(fig, _LEFT + col * PANEL_INCHES, top, PANEL_INCHES - _GAP, PANEL_INCHES - _GAP)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(_windowed(volume_hu[z], window), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if col == 0:
                centre, w = WINDOWS[window]
                ax.set_ylabel(f"{window} {centre:g}/{w:g}", fontsize=8)
            if row == 0:
                ax.set_title(_slice_title(col + 1, z, probs[z], str(sop_uids[z]), threshold), fontsize=7.5, pad=3)
            if row == 0 and col == 0:
                _draw_overlay(ax, cam, seg_mask, volume_hu.shape[1:])
    plot_top = header + _SLICE_TITLE + 2 * PANEL_INCHES + _PLOT_GAP
    ax = _add_axes(fig, _LEFT + 0.15, plot_top, cols * PANEL_INCHES - _GAP - 0.15 - _LEGEND, _PLOT)
    _draw_probabilities(ax, probs, positions, shown, threshold)
    save_png(fig, out_png)
    return [int(z) for z in shown]


def _check_report_inputs(
    volume_hu: np.ndarray,
    probs: np.ndarray,
    sop_uids: Sequence[str],
    positions: Sequence[float],
    cam: np.ndarray | None,
    seg_mask: np.ndarray | None,
) -> None:
    """Raise ValueError on inputs of :func:`render_study_report` that do not fit together."""
    if volume_hu.ndim != 3 or volume_hu.shape[0] == 0:
        raise ValueError(f"volume_hu must be (Z, H, W) with Z >= 1, got {volume_hu.shape}")
    n = volume_hu.shape[0]
    if probs.shape != (n, len(CLASSES)):
        raise ValueError(f"probs must be ({n}, {len(CLASSES)}), got {probs.shape}")
    if len(sop_uids) != n or len(positions) != n:
        raise ValueError(f"sop_uids and positions need {n} entries, got {len(sop_uids)} and {len(positions)}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be finite and in [0, 1]")
    if cam is not None and (np.asarray(cam).ndim != 2):
        raise ValueError(f"cam must be a 2-D map, got shape {np.shape(cam)}")
    if seg_mask is not None and np.shape(seg_mask) != volume_hu.shape[1:]:
        raise ValueError(f"seg_mask must be {volume_hu.shape[1:]}, got {np.shape(seg_mask)}")


def _add_axes(fig: Figure, left: float, top: float, width: float, height: float) -> Any:
    """Axes placed in inches from the top-left corner of ``fig``."""
    fig_w, fig_h = fig.get_size_inches()
    return fig.add_axes((left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h))


def _draw_title(
    fig: Figure, probs: np.ndarray, study_uid: str, threshold: float, study_result: dict[str, Any] | None
) -> None:
    """The report's title line (with the uncalibrated verdict) or, given a study result, its title and result lines."""
    fig_h = fig.get_size_inches()[1]
    verdict = "POSITIVE" if probs[:, -1].max() >= threshold else "negative"
    flags = [
        SHORT_NAMES[c] for c, p in zip(CLASSES[:-1], probs.max(axis=0)) if p >= threshold and verdict == "POSITIVE"
    ]
    title = f"study {study_uid} · {len(probs)} slices · max p(any) {probs[:, -1].max():.2f}"
    if study_result is None:  # with a study result, the verdict is the calibrated one of the line below
        title += f" → {verdict}" + (f" ({', '.join(flags)})" if flags else "")
    fig.text(0.5, 1 - 0.06 / fig_h, title, ha="center", va="top", fontsize=11, fontweight="bold")
    if study_result is not None:
        positive = study_result["flag"] == "positive"
        fig.text(
            0.5,
            1 - (0.06 + _HEADER) / fig_h,
            result_line(study_result),
            ha="center",
            va="top",
            fontsize=10,
            color="tab:red" if positive else "tab:green",
            fontweight="bold",
        )


def _draw_overlay(ax: Any, cam: np.ndarray | None, seg_mask: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """The bleed map (red) or else the Grad-CAM map (stretched over the ``shape`` slice) on the top slice."""
    if seg_mask is not None:
        ax.imshow(
            np.ma.masked_equal(np.asarray(seg_mask, dtype=np.float32), 0.0),
            cmap="Reds",
            vmin=0,
            vmax=1,
            alpha=0.5,
            interpolation="nearest",
        )
        ax.text(0.02, 0.02, "bleed map (SEG)", transform=ax.transAxes, fontsize=7, color="yellow", va="bottom")
    elif cam is not None:
        height, width = shape
        heat = np.ma.masked_less(np.clip(np.asarray(cam, dtype=np.float32), 0, 1), 0.2)
        ax.imshow(
            heat,
            cmap="jet",
            vmin=0,
            vmax=1,
            alpha=0.45,
            interpolation="bilinear",
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        )
        ax.text(0.02, 0.02, "Grad-CAM (any)", transform=ax.transAxes, fontsize=7, color="yellow", va="bottom")


def _draw_probabilities(
    ax: Any, probs: np.ndarray, positions: Sequence[float], shown: np.ndarray, threshold: float
) -> None:
    """The six probabilities along z, the threshold, and the shown slices marked with their rank."""
    n = len(probs)
    zs = np.arange(n)
    for i, name in enumerate(CLASSES):
        ax.plot(
            zs,
            probs[:, i],
            color=CLASS_COLOURS[name],
            lw=2.0 if name == "any" else 1.2,
            marker="o" if n <= 40 else None,
            ms=2.5,
            label=SHORT_NAMES[name],
        )
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    for rank, z in enumerate(shown):
        ax.axvline(int(z), color="0.75", lw=0.8, zorder=0)
        ax.text(int(z), 1.03, str(rank + 1), ha="center", va="bottom", fontsize=7, color="0.35")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("probability", fontsize=8)
    ax.set_xlabel(
        f"slice index z (0 = lowest; position {float(positions[0]):.1f} → {float(positions[-1]):.1f} mm); "
        "numbers: slices shown above",
        fontsize=8,
    )
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def summarise_study(df_slices: pd.DataFrame, top_k: int = 5, threshold: float = 0.5) -> dict[str, Any]:
    """Condense the per-slice predictions of one study into the dict written to ``studies.json``.

    Args:
        df_slices: one row a slice with ``sop_uid``, the six ``p_<class>`` columns, and optionally ``z`` (or
            ``slice_idx``), ``position`` and ``series_uid``. Without ``z``, slices are numbered by ``position``
            (or row order).
        top_k: slices listed in ``top_slices``.
        threshold: decision threshold of the ``positive`` flags (a subtype is flagged only with ``any``:
            :func:`rsna19.core.calibration.consistent_flags`).

    Returns:
        ``{"n_slices", "threshold", "max_probability": {class: p}, "positive": {class: bool},
        "positive_classes": [class, ...], "top_slices": [{"sop_uid", "z", "position", "p_any"[, "series_uid"]}]}``
        with probabilities rounded to 6 decimals; ``top_slices`` is sorted by ``p_any`` descending.

    Raises:
        ValueError: no rows, a missing column, or probabilities that are not finite.
    """
    if len(df_slices) == 0:
        raise ValueError("summarise_study: no slices")
    missing = [c for c in ("sop_uid", *PROB_COLUMNS) if c not in df_slices.columns]
    if missing:
        raise ValueError(f"summarise_study: missing columns {missing}")
    probs = df_slices[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(probs)):
        raise ValueError("summarise_study: probabilities must be finite")

    df = df_slices.reset_index(drop=True)
    if "z" in df.columns:
        z = df["z"].to_numpy()
    elif "slice_idx" in df.columns:
        z = df["slice_idx"].to_numpy()
    elif "position" in df.columns:
        z = df["position"].rank(method="first").to_numpy() - 1
    else:
        z = np.arange(len(df))
    maxima = probs.max(axis=0)
    top = []
    for i in top_slices(probs[:, -1], top_k, z):
        entry: dict[str, Any] = {
            "sop_uid": str(df.at[i, "sop_uid"]),
            "z": int(z[i]),
            "position": float(df.at[i, "position"]) if "position" in df.columns else None,
            "p_any": round(float(probs[i, -1]), 6),
        }
        if "series_uid" in df.columns:
            entry["series_uid"] = str(df.at[i, "series_uid"])
        top.append(entry)
    flags, _withheld = consistent_flags({c: bool(p >= threshold) for c, p in zip(CLASSES, maxima)})
    return {
        "n_slices": len(df),
        "threshold": threshold,
        "max_probability": {c: round(float(p), 6) for c, p in zip(CLASSES, maxima)},
        "positive": flags,
        "positive_classes": [c for c in CLASSES if flags[c]],
        "top_slices": top,
    }


def render_not_assessable_report(
    volume_hu: np.ndarray,
    sop_uids: Sequence[str],
    positions: Sequence[float],
    out_png: str | os.PathLike[str],
    study_uid: str,
    reasons: Sequence[str],
    columns: int = MIN_COLUMNS,
) -> None:
    """The report of a study the models cannot judge (:mod:`rsna19.inference.assess`): NOT ASSESSABLE, the reasons,
    and up to ``columns`` slices spread over the series in the brain window. Written atomically; deterministic.

    Args:
        volume_hu: (Z, H, W) HU of the refused series.
        sop_uids: (Z,) SOPInstanceUID (or slice UID) of each slice.
        positions: (Z,) slice positions (mm).
        out_png: output file.
        study_uid: shown in the title.
        reasons: one line each.
    """
    volume_hu = np.asarray(volume_hu)
    n = int(volume_hu.shape[0])
    shown = np.unique(np.linspace(0, max(n - 1, 0), num=min(columns, max(n, 1))).round().astype(int)) if n else []
    lines = len(reasons)
    header = _HEADER + 0.22 * (lines + 1)
    fig_w = _LEFT + columns * PANEL_INCHES + _RIGHT
    fig_h = header + _SLICE_TITLE + PANEL_INCHES + 0.2
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    fig.text(
        0.5,
        1 - 0.06 / fig_h,
        f"study {study_uid} · {n} slices → NOT ASSESSABLE (no result: neither positive nor negative)",
        ha="center",
        va="top",
        fontsize=11,
        fontweight="bold",
        color="tab:orange",
    )
    for i, reason in enumerate(reasons):
        fig.text(0.5, 1 - (0.06 + _HEADER + 0.22 * i) / fig_h, reason, ha="center", va="top", fontsize=9)
    size = PANEL_INCHES - _GAP
    for col, z in enumerate(int(v) for v in shown):
        left, top = _LEFT + col * PANEL_INCHES, header + _SLICE_TITLE
        ax = fig.add_axes((left / fig_w, 1 - (top + size) / fig_h, size / fig_w, size / fig_h))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(_windowed(volume_hu[z], "brain"), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        uid = str(sop_uids[z])
        uid = uid if len(uid) <= 18 else uid[:17] + "…"
        ax.set_title(f"z {z} · {float(positions[z]):.1f} mm\n{uid}", fontsize=7.5, pad=3)
    save_png(fig, out_png)
