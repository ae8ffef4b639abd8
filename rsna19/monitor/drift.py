"""Input and output drift: the studies a node answers against the reference its bundle recorded from training.

Reference (``bundle.json``'s ``drift_reference``, :func:`build_reference`): for each fact of
:data:`rsna19.monitor.facts.FACTS`, from the training series, either the share of each category (``category``:
manufacturer, kernel; values seen in fewer than :data:`MIN_SHARE` of the series fold into ``other``) or bin edges
at the 10th, 50th and 90th percentiles and the share of the training series in each of the four bins
(``number``); and from the out-of-fold studies the same for the calibrated ``p_any`` and the flag rate of ``any``.

State (:func:`drift_state`): the recorded studies' facts are binned the same way and each fact gets its population
stability index, PSI = Σ (a − e) · ln(a / e) over its bins, with the shares smoothed by one study per bin
(:func:`psi`), so that one odd study in a small window does not read as drift. The drift score is the largest PSI;
the warning is raised when it passes :data:`PSI_WARNING` (0.25, the usual "significant shift") over at least
``min_studies`` studies. Missing facts (unknown) are a category of their own for categories and are left out of
numbers.

The node's hook (:func:`metrics_lines`, :func:`worklist_banner`): ``/metrics`` gets ``rsna19_drift_score``,
``rsna19_drift_psi{fact=...}``, ``rsna19_drift_warning``, ``rsna19_flag_rate`` and ``rsna19_reference_flag_rate``;
the worklist a one-line banner when the warning is on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rsna19.monitor.facts import FACTS

#: PSI above which a fact has drifted ("significant shift" in the usual reading: < 0.1 none, 0.1–0.25 moderate).
PSI_WARNING: float = 0.25
#: Fewest recorded studies for a warning (fewer: the state says "too few studies").
MIN_STUDIES: int = 10
#: Categories seen in fewer than this share of the reference fold into ``other``.
MIN_SHARE: float = 0.02
#: Percentiles of the number facts' bin edges.
EDGES_PERCENTILES: tuple[float, ...] = (10.0, 50.0, 90.0)
#: Output facts compared with the out-of-fold studies.
OUTPUTS: dict[str, str] = {"p_any": "number", "flag": "category"}
UNKNOWN = "unknown"
OTHER = "other"


def _category(v: Any) -> str:
    return UNKNOWN if v is None or (isinstance(v, float) and math.isnan(v)) or v == "" else str(v).strip().upper()


def _numbers(values: Iterable[Any]) -> np.ndarray:
    out = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray(out, dtype=np.float64)


def fact_reference(kind: str, values: Sequence[Any]) -> dict[str, Any] | None:
    """The reference of one fact from its training values; None without a usable value."""
    if kind == "category":
        cats = [_category(v) for v in values]
        if not cats:
            return None
        shares = {c: cats.count(c) / len(cats) for c in sorted(set(cats))}
        kept = {c: s for c, s in shares.items() if s >= MIN_SHARE}
        other = 1.0 - sum(kept.values())
        return {"kind": "category", "shares": {**kept, OTHER: round(other, 6)}, "n": len(cats)}
    x = _numbers(values)
    if not x.size:
        return None
    edges = [float(np.percentile(x, q)) for q in EDGES_PERCENTILES]
    counts = _bin_counts(x, edges)
    return {
        "kind": "number",
        "edges": [round(e, 6) for e in edges],
        "shares": (counts / x.size).tolist(),
        "n": int(x.size),
    }


def _bin_counts(x: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts in the bins (−∞, e1), [e1, e2), …, [ek, ∞); values equal to a repeated edge go to its upper bin."""
    return np.bincount(np.searchsorted(np.asarray(edges), x, side="right"), minlength=len(edges) + 1).astype(float)


def build_reference(
    facts: Sequence[Mapping[str, Any]], p_any: Sequence[float], flags: Sequence[bool], source: str
) -> dict[str, Any]:
    """The ``drift_reference`` of a bundle.

    Args:
        facts: one dict a training series (:func:`rsna19.monitor.facts.series_facts`).
        p_any: calibrated ``p_any`` of the out-of-fold studies.
        flags: their ``any`` flags at the operating point.
        source: where the values come from (for the record).
    """
    ref: dict[str, Any] = {"facts": {}, "outputs": {}, "n_series": len(facts), "source": source}
    for name, kind in FACTS.items():
        r = fact_reference(kind, [f.get(name) for f in facts])
        if r is not None:
            ref["facts"][name] = r
    r = fact_reference("number", list(p_any))
    if r is not None:
        ref["outputs"]["p_any"] = r
    if len(flags):
        ref["outputs"]["flag"] = fact_reference("category", ["positive" if f else "negative" for f in flags])
        ref["flag_rate"] = round(float(np.mean(np.asarray(flags, dtype=float))), 6)
    return ref


def psi(expected: Sequence[float], counts: Sequence[float], smoothing: float = 1.0) -> float:
    """Population stability index of observed ``counts`` against ``expected`` shares.

    Both sides are smoothed by ``smoothing`` studies per bin (the expected shares as if the same number of studies
    had been drawn), so that empty bins give a finite value and a single study moves the index little.
    """
    e = np.asarray(expected, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    n = float(c.sum())
    if n == 0:
        return 0.0
    a = (c + smoothing) / (n + smoothing * len(c))
    e = (e * n + smoothing) / (n + smoothing * len(e))
    return float(np.sum((a - e) * np.log(a / e)))


def fact_psi(reference: Mapping[str, Any], values: Sequence[Any]) -> tuple[float | None, int]:
    """PSI of one fact's recorded values against its reference, and how many values counted."""
    if reference["kind"] == "category":
        shares = reference["shares"]
        cats = [_category(v) for v in values]
        cats = [c if c in shares else OTHER for c in cats]
        if not cats:
            return None, 0
        names = list(shares)
        return psi([shares[k] for k in names], [cats.count(k) for k in names]), len(cats)
    x = _numbers(values)
    if not x.size:
        return None, 0
    return psi(reference["shares"], _bin_counts(x, reference["edges"])), int(x.size)


def drift_state(
    reference: Mapping[str, Any] | None,
    studies: Sequence[Mapping[str, Any]],
    threshold: float = PSI_WARNING,
    min_studies: int = MIN_STUDIES,
) -> dict[str, Any]:
    """The drift state of the recorded studies.

    Args:
        reference: the bundle's ``drift_reference`` (None: bundles written before it existed).
        studies: one dict a study: its input facts (:data:`FACTS` keys) and, when answered, ``p_any`` and ``flag``
            (bool; None for a study without a flag, e.g. not assessable).
        threshold: PSI of the warning.
        min_studies: fewest studies for a warning.

    Returns:
        ``{"n_studies", "psi": {fact: value or None}, "score", "worst", "flag_rate", "reference_flag_rate",
        "warning", "threshold", "message"}``.
    """
    n = len(studies)
    flags = [bool(s["flag"]) for s in studies if s.get("flag") is not None]
    flag_rate = float(np.mean(flags)) if flags else None
    state: dict[str, Any] = {
        "n_studies": n,
        "psi": {},
        "score": None,
        "worst": None,
        "flag_rate": None if flag_rate is None else round(flag_rate, 6),
        "reference_flag_rate": None if reference is None else reference.get("flag_rate"),
        "warning": False,
        "threshold": threshold,
        "min_studies": min_studies,
    }
    if reference is None:
        state["message"] = "no drift reference in the bundle (re-export it with this rsna19 version)"
        return state
    for name, ref in {**reference.get("facts", {}), **reference.get("outputs", {})}.items():
        if name == "flag":
            values = ["positive" if f else "negative" for f in flags]
        else:
            values = [s.get(name) for s in studies]
        value, _counted = fact_psi(ref, values)
        state["psi"][name] = None if value is None else round(value, 4)
    scored = {k: v for k, v in state["psi"].items() if v is not None}
    if scored:
        worst = max(scored, key=lambda k: scored[k])
        state["score"], state["worst"] = scored[worst], worst
    if n < min_studies:
        state["message"] = f"{n} studies recorded: a drift warning needs at least {min_studies}"
    elif state["score"] is not None and state["score"] > threshold:
        state["warning"] = True
        state["message"] = (
            f"input drift: {state['worst']} PSI {state['score']:.2f} > {threshold:g} over the last {n} studies "
            "(the studies differ from the training data; results may be less reliable)"
        )
    else:
        state["message"] = f"no drift: largest PSI {state['score'] or 0:.2f} ≤ {threshold:g} over {n} studies"
    return state


def metrics_lines(state: Mapping[str, Any]) -> list[str]:
    """Prometheus text lines of a drift state, for the node's ``/metrics``."""
    lines = [
        "# HELP rsna19_drift_score Largest population stability index of the recorded studies' facts.",
        "# TYPE rsna19_drift_score gauge",
        f"rsna19_drift_score {state['score'] if state.get('score') is not None else 'NaN'}",
        "# HELP rsna19_drift_psi Population stability index of one input or output fact.",
        "# TYPE rsna19_drift_psi gauge",
    ]
    for fact, value in sorted(state.get("psi", {}).items()):
        lines.append(f'rsna19_drift_psi{{fact="{fact}"}} {value if value is not None else "NaN"}')
    lines += [
        "# HELP rsna19_drift_warning 1 when the drift score passes the threshold over enough studies.",
        "# TYPE rsna19_drift_warning gauge",
        f"rsna19_drift_warning {int(bool(state.get('warning')))}",
        "# HELP rsna19_flag_rate Share of the recorded studies flagged positive for any.",
        "# TYPE rsna19_flag_rate gauge",
        f"rsna19_flag_rate {state['flag_rate'] if state.get('flag_rate') is not None else 'NaN'}",
        "# HELP rsna19_reference_flag_rate Share of the out-of-fold training studies flagged positive.",
        "# TYPE rsna19_reference_flag_rate gauge",
        "rsna19_reference_flag_rate "
        f"{state['reference_flag_rate'] if state.get('reference_flag_rate') is not None else 'NaN'}",
    ]
    return lines


def worklist_banner(state: Mapping[str, Any]) -> str | None:
    """The worklist's one-line banner: the drift warning with the flag rates, or None without a warning."""
    if not state.get("warning"):
        return None
    rates = ""
    if state.get("flag_rate") is not None and state.get("reference_flag_rate") is not None:
        rates = f" · flag rate {state['flag_rate']:.0%} (training {state['reference_flag_rate']:.0%})"
    return f"⚠ {state['message']}{rates}"


def study_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """One study's entry for :func:`drift_state` from the node's stored result (:func:`rsna19.serve.worker.
    study_summary`: ``drift_facts``, ``p_any``, ``flag``)."""
    return {**(result.get("drift_facts") or {}), "p_any": result.get("p_any"), "flag": result.get("flag")}


#: Studies of the node's window (the most recent answered ones).
WINDOW: int = 200


def node_drift_state(
    reference: Mapping[str, Any] | None, results: Sequence[Mapping[str, Any]], window: int = WINDOW
) -> dict[str, Any]:
    """The node's hook: the drift state of its last ``window`` answered studies.

    Args:
        reference: ``bundle.drift_reference``.
        results: the stored results of answered studies (``serve.db``'s ``result`` JSON:
            :func:`rsna19.serve.worker.study_summary`), oldest first.
        window: how many of the most recent ones count.

    Returns:
        :func:`drift_state` of them; ``/metrics`` shows :func:`metrics_lines` of it, the worklist
        :func:`worklist_banner`.
    """
    return drift_state(reference, [study_record(r) for r in list(results)[-window:] if r])
