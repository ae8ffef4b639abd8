"""Prometheus text metrics of the node, read from ``serve.db`` (so they survive a restart), and its drift watch:
the stored results of the last answered studies against the bundle's ``drift_reference``
(:mod:`rsna19.monitor.drift`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from rsna19.monitor.drift import WINDOW, metrics_lines, node_drift_state
from rsna19.serve.db import STATUSES, ServeDB

#: Keys of the drift state that ``/health`` shows.
DRIFT_SUMMARY_KEYS: tuple[str, ...] = (
    "n_studies",
    "score",
    "worst",
    "warning",
    "threshold",
    "flag_rate",
    "reference_flag_rate",
    "message",
)


def latencies(db: ServeDB) -> list[float]:
    """Seconds from a study's last instance to its answer, for every answered study."""
    rows = db.query("SELECT answered_s - received_s AS s FROM studies WHERE answered_s IS NOT NULL")
    return [float(r["s"]) for r in rows if r["s"] is not None]


def stored_results(db: ServeDB, window: int = WINDOW) -> list[dict[str, Any]]:
    """The stored results (:func:`rsna19.serve.worker.study_summary`) of the last ``window`` answered studies
    (``done`` or ``sent``), oldest first."""
    rows = db.query(
        "SELECT result FROM studies WHERE status IN ('done', 'sent') AND result IS NOT NULL "
        "ORDER BY done_s DESC LIMIT ?",
        (int(window),),
    )
    return [json.loads(r["result"]) for r in reversed(rows)]


def node_drift(db: ServeDB, reference: Mapping[str, Any] | None) -> dict[str, Any]:
    """The node's drift state: :func:`rsna19.monitor.drift.node_drift_state` of its stored results.

    Args:
        db: the node's ``serve.db``.
        reference: the bundle's ``drift_reference`` (None: a bundle without one; the state says so).
    """
    return node_drift_state(reference, stored_results(db))


def drift_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """The drift state as ``/health`` shows it (:data:`DRIFT_SUMMARY_KEYS` and the PSI per fact)."""
    return {**{k: state.get(k) for k in DRIFT_SUMMARY_KEYS}, "psi": dict(state.get("psi", {}))}


def render_metrics(db: ServeDB, *, workers: int, drift: Mapping[str, Any] | None = None) -> str:
    """The ``/metrics`` page (text exposition format 0.0.4).

    Args:
        db: the node's ``serve.db``.
        workers: prediction workers with their bundle loaded.
        drift: the drift state (:func:`node_drift`); None leaves the drift lines out.
    """
    counts = db.counts()
    lat = latencies(db)
    lines = [
        "# HELP rsna19_studies_received_total Studies whose first instance was received.",
        "# TYPE rsna19_studies_received_total counter",
        f"rsna19_studies_received_total {sum(counts.values())}",
        "# HELP rsna19_instances_received_total Instances stored and acknowledged.",
        "# TYPE rsna19_instances_received_total counter",
        f"rsna19_instances_received_total {db.counter('instances_received')}",
        "# HELP rsna19_instances_refused_total C-STORE requests refused with a failure status.",
        "# TYPE rsna19_instances_refused_total counter",
        f"rsna19_instances_refused_total {db.counter('instances_refused')}",
        "# HELP rsna19_contexts_rejected_total Presentation contexts rejected at association (not CT, syntax).",
        "# TYPE rsna19_contexts_rejected_total counter",
        f"rsna19_contexts_rejected_total {db.counter('contexts_rejected')}",
        "# HELP rsna19_associations_refused_total Associations refused: calling AE title or address not allowed.",
        "# TYPE rsna19_associations_refused_total counter",
        f"rsna19_associations_refused_total {db.counter('associations_refused')}",
        "# HELP rsna19_tls_refused_total DICOM TLS handshakes that failed (plain connections, untrusted certificates).",
        "# TYPE rsna19_tls_refused_total counter",
        f"rsna19_tls_refused_total {db.counter('tls_refused')}",
        "# HELP rsna19_queue_length Studies queued for prediction.",
        "# TYPE rsna19_queue_length gauge",
        f"rsna19_queue_length {counts['queued']}",
        "# HELP rsna19_workers Prediction workers.",
        "# TYPE rsna19_workers gauge",
        f"rsna19_workers {workers}",
        "# HELP rsna19_studies_total Studies by status.",
        "# TYPE rsna19_studies_total gauge",
        *(f'rsna19_studies_total{{status="{s}"}} {counts[s]}' for s in STATUSES),
        "# HELP rsna19_latency_seconds Last instance received to results delivered (written when no destination).",
        "# TYPE rsna19_latency_seconds summary",
    ]
    for q in (0.5, 0.95):
        value = float(np.quantile(lat, q)) if lat else float("nan")
        lines.append(f'rsna19_latency_seconds{{quantile="{q}"}} {value:.6g}')
    lines += [f"rsna19_latency_seconds_sum {sum(lat):.6g}", f"rsna19_latency_seconds_count {len(lat)}"]
    if drift is not None:
        lines += metrics_lines(drift)
    return "\n".join(lines) + "\n"
