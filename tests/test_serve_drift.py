"""The node's drift watch: studies stored in a real ``serve.db`` are compared with a bundle's ``drift_reference``
(:mod:`rsna19.monitor.drift`); ``/metrics`` carries the PSI lines and the warning, the worklist the banner, both
served by the node's HTTP server. Studies like the reference raise no warning; studies from another scanner do."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from rsna19.monitor.drift import MIN_STUDIES, PSI_WARNING, build_reference
from rsna19.serve.db import ServeDB
from rsna19.serve.http import ServeHTTP
from rsna19.serve.metrics import drift_summary, node_drift, stored_results
from rsna19.serve.spool import Spool


def _facts(rng: np.random.Generator, n: int, *, shifted: bool = False) -> list[dict]:
    """Input facts of ``n`` series: the training scanner, or (``shifted``) another vendor, kernel and calibration."""
    return [
        {
            "manufacturer": "ACME MEDICAL" if shifted else "GE MEDICAL SYSTEMS",
            "kernel": "FC68" if shifted else "STANDARD",
            "slice_thickness_mm": 2.5 if shifted else 5.0,
            "pixel_spacing_mm": float(rng.normal(0.45, 0.02)),
            "hu_brain_median": float(rng.normal(70.0 if shifted else 30.0, 2.0)),
            "hu_bone_fraction": float(rng.normal(0.08, 0.01)),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def reference() -> dict:
    rng = np.random.default_rng(0)
    p_any = rng.uniform(0.0, 1.0, 200)
    return build_reference(_facts(rng, 200), list(p_any), list(p_any > 0.8), source="test")


def _db_with(path, facts: list[dict], p_any: list[float]) -> ServeDB:
    """A ``serve.db`` whose studies were answered with these input facts (the worker's stored result shape)."""
    db = ServeDB(path)
    kw = dict(series_uid="s", sop_class_uid="c", transfer_syntax="t", path="p", size=1, calling_ae="A")
    for i, (f, p) in enumerate(zip(facts, p_any)):
        uid = f"1.2.826.0.1.3680043.10.1226.70.{i + 1}"
        db.add_instance(uid, uid, f"{uid}.1", **kw)
        assert db.rerun(uid) == "queued"
        row = db.claim()
        result = {"p_any": p, "flag": p > 0.8, "probabilities": {"any": p}, "drift_facts": f}
        assert db.finish(uid, started_s=row["started_s"], result=result, error=None, destinations=[]) == "done"
    return db


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _served(db: ServeDB, tmp_path, reference: dict | None) -> tuple[str, str]:
    """``/metrics`` and the worklist page of a node HTTP server over ``db``."""
    srv = ServeHTTP("127.0.0.1", 0, db, Spool(tmp_path), None, lambda: {"status": "ok"}, drift_reference=reference)
    port = srv.start()
    try:
        return _get(port, "/metrics"), _get(port, "/")
    finally:
        srv.stop()


def _value(metrics: str, name: str) -> float:
    return float(next(line for line in metrics.splitlines() if line.startswith(name + " ")).split()[-1])


def test_studies_from_another_scanner_raise_the_warning_in_metrics_and_worklist(reference, tmp_path):
    rng = np.random.default_rng(1)
    n = MIN_STUDIES + 5
    db = _db_with(tmp_path / "serve.db", _facts(rng, n, shifted=True), [0.9] * n)
    assert [r["drift_facts"]["manufacturer"] for r in stored_results(db)] == ["ACME MEDICAL"] * n
    metrics, page = _served(db, tmp_path, reference)
    assert _value(metrics, "rsna19_drift_warning") == 1 and _value(metrics, "rsna19_drift_score") > PSI_WARNING
    for fact in ("manufacturer", "kernel", "slice_thickness_mm", "hu_brain_median"):
        line = next(x for x in metrics.splitlines() if x.startswith(f'rsna19_drift_psi{{fact="{fact}"}}'))
        assert float(line.split()[-1]) > PSI_WARNING, line
    assert _value(metrics, "rsna19_flag_rate") == 1.0
    assert _value(metrics, "rsna19_reference_flag_rate") == pytest.approx(reference["flag_rate"])
    assert 'id="drift-banner"' in page and "input drift" in page and "flag rate 100%" in page
    health = drift_summary(node_drift(db, reference))  # what /health shows
    assert health["warning"] is True and health["n_studies"] == n and health["psi"]["kernel"] > PSI_WARNING
    json.dumps(health)  # JSON as it is


def test_studies_like_the_reference_raise_no_warning(reference, tmp_path):
    rng = np.random.default_rng(2)
    n = 40
    p_any = [float(p) for p in rng.uniform(0.0, 1.0, n)]
    db = _db_with(tmp_path / "serve.db", _facts(rng, n), p_any)
    metrics, page = _served(db, tmp_path, reference)
    assert _value(metrics, "rsna19_drift_warning") == 0 and _value(metrics, "rsna19_drift_score") <= PSI_WARNING
    assert 'rsna19_drift_psi{fact="manufacturer"}' in metrics
    assert 'id="drift-banner"' not in page and "input drift" not in page
    assert drift_summary(node_drift(db, reference))["warning"] is False


def test_a_bundle_without_a_reference_reads_nan_and_too_few_studies_no_warning(reference, tmp_path):
    rng = np.random.default_rng(3)
    db = _db_with(tmp_path / "serve.db", _facts(rng, 3, shifted=True), [0.9] * 3)
    metrics, page = _served(db, tmp_path, None)
    assert "rsna19_drift_score NaN" in metrics and _value(metrics, "rsna19_drift_warning") == 0
    assert node_drift(db, None)["message"].startswith("no drift reference")
    few = node_drift(db, reference)  # three odd studies: too few to judge
    assert few["score"] > PSI_WARNING and not few["warning"] and "at least" in few["message"]
