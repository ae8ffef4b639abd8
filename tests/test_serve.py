"""``rsna19 serve``: a pynetdicom SCU sends synthetic CT studies on loopback, a pynetdicom Storage SCP started here
is the destination. Spool before acknowledgement, the quiet period, the prediction, the SR + SC at the destination
with the input study's UID, C-ECHO, refusals with their status, the HTTP API, page, health and metrics, the token,
retries then dead letter, re-run, and a ``python -m rsna19 serve`` process killed with SIGKILL, restarted, and
stopped with SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from hospital import SOFT, enhanced_copy, head_plan, transcode_jpeg_lossless, write_series
from pydicom.uid import JPEGLosslessSV1
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, MRImageStorage, Verification

from rsna19.core.errors import UserError
from rsna19.serve.app import ServeApp
from rsna19.serve.config import Destination, ServeConfig, load_config
from rsna19.serve.db import ServeDB
from rsna19.serve.http import ServeHTTP, authorized, sorted_studies
from rsna19.serve.scp import StorageSCP
from rsna19.serve.spool import Spool
from rsna19.study.bundle import export_bundle, load_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
STUDY_BASE = "1.2.826.0.1.3680043.10.1226.77"


# ------------------------------------------------------------------------------------------------ helpers
def wait_for(pred, timeout: float = 60.0, every: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def write_study(folder: Path, study_uid: str) -> list[Path]:
    """An 8-slice 64-pixel synthetic head with a bleed, as CT Image Storage files."""
    return write_series(folder, head_plan(), study_uid=study_uid, series_uid=f"{study_uid}.1", step=5.0, attrs={**SOFT})


class DestinationSCP:
    """A pynetdicom Storage SCP on a free loopback port that records what it receives."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]
        self.node = f"DEST@127.0.0.1:{self.port}"

    def _store(self, event) -> int:
        ds = event.dataset
        self.received.append(
            {"sop_class": str(ds.SOPClassUID), "sop_uid": str(ds.SOPInstanceUID), "study_uid": str(ds.StudyInstanceUID)}
        )
        return 0x0000

    def of(self, study_uid: str, sop_class: str) -> list[dict]:
        return [r for r in self.received if r["study_uid"] == study_uid and r["sop_class"] == sop_class]

    def stop(self) -> None:
        self.server.shutdown()


def send(
    port: int, files: list[Path], after_each=None, contexts=None, calling: str = "MODALITY", tls=None
) -> list[int] | None:
    """C-STORE ``files`` to the node in one association; returns the statuses (None: association not established).

    ``tls``: an ``ssl.SSLContext`` (DICOM TLS)."""
    ae = AE(ae_title=calling)
    for cx in contexts or [build_context(CTImageStorage)]:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RSNA19", tls_args=None if tls is None else (tls, "localhost"))
    if not assoc.is_established:
        return None
    statuses = []
    try:
        for f in files:
            status = assoc.send_c_store(f)
            statuses.append(int(status.Status))
            if after_each is not None:
                after_each(f, int(status.Status))
    finally:
        assoc.release()
    return statuses


def http(port: int, path: str, method: str = "GET", token: str | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def api_study(port: int, uid: str) -> dict | None:
    _, body, _ = http(port, "/api/studies")
    return next((s for s in json.loads(body) if s["study_uid"] == uid), None)


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    return export_bundle(tiny_run, tmp_path_factory.mktemp("serve_bundle") / "bundle").path


@pytest.fixture(scope="module")
def loaded(bundle):
    return load_bundle(bundle, device="cpu")


@pytest.fixture(scope="module")
def dest():
    d = DestinationSCP()
    yield d
    d.stop()


def _cfg(bundle: Path, spool: Path, **kw) -> ServeConfig:
    base = dict(
        bundle=str(bundle),
        spool=str(spool),
        port=0,
        http_port=0,
        quiet_seconds=0.5,
        device="cpu",
        cam=False,
        min_free_disk_mb=0,
        send_retries=3,
        retry_backoff_s=0.1,
        network_timeout_s=5,
        shutdown_grace_s=30,
        worker_isolation="thread",  # the module's preloaded bundle; worker processes: test_worker_processes_*
    )
    return ServeConfig(**{**base, **kw})


def _wait_ready(app: ServeApp, timeout: float) -> bool:
    """Wait until every worker of ``app`` has loaded its bundle (or failed to)."""
    end = time.time() + timeout
    return all(w.ready.wait(max(0.0, end - time.time())) for w in app.workers)


@pytest.fixture(scope="module")
def node(bundle, loaded, dest, tmp_path_factory):
    """An in-process node (the module's bundle preloaded) sending to :func:`dest`."""
    app = ServeApp(_cfg(bundle, tmp_path_factory.mktemp("spool"), destinations=[dest.node]), bundle=loaded)
    app.start()
    assert _wait_ready(app, 60)
    yield app
    app.shutdown(grace_s=10)


@pytest.fixture(scope="module")
def answered(node, dest, tmp_path_factory):
    """One study sent to the node; records what was on disk and in the DB when each C-STORE response came."""
    uid = f"{STUDY_BASE}.1"
    files = write_study(tmp_path_factory.mktemp("study1"), uid)
    ports = json.loads(node.spool.ports_path.read_text())
    seen = []

    def check(f: Path, status: int) -> None:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        path = node.spool.root / "incoming" / uid / f"{sop}.dcm"
        in_db = any(r["sop_uid"] == sop for r in node.db.instances(uid))
        seen.append((status, path.is_file(), in_db))

    t0 = time.time()
    statuses = send(ports["dicom"], files, after_each=check)
    study = wait_for(lambda: (s := api_study(ports["http"], uid)) and s["status"] == "sent" and s, timeout=90)
    return {"uid": uid, "files": files, "statuses": statuses, "seen": seen, "study": study, "ports": ports, "t0": t0}


# ------------------------------------------------------------------------------------------------ tests
def test_instances_are_on_disk_and_in_the_db_before_the_ack(answered):
    assert answered["statuses"] == [0] * len(answered["files"])
    assert answered["seen"] == [(0, True, True)] * len(answered["files"])


def test_study_is_predicted_and_sr_sc_reach_the_destination(answered, dest):
    uid = answered["uid"]
    (sr,) = dest.of(uid, SR_CLASS)  # one SR, in the input study
    (sc,) = dest.of(uid, SC_CLASS)
    s = answered["study"]
    assert s["sr_uid"] == sr["sop_uid"] and s["sc_uid"] == sc["sop_uid"]
    assert s["n_instances"] == len(answered["files"]) and s["error"] is None and s["runs"] == 1
    assert 0.0 <= s["p_any"] <= 1.0 and isinstance(s["flag"], bool)
    assert set(s["probabilities"]) == set(s["flags"]) and "any" in s["probabilities"]
    # Quiet period respected: queued no earlier than quiet_seconds after the last instance.
    assert s["queued_s"] - s["received_s"] >= 0.5 - 0.05
    assert s["received_s"] <= s["started_s"] <= s["done_s"] <= s["answered_s"]
    assert s["latency_s"] == pytest.approx(s["answered_s"] - s["received_s"], abs=1e-3)


def test_api_objects_report_page_health_and_metrics(answered, node, loaded):
    port, uid = answered["ports"]["http"], answered["uid"]
    s = answered["study"]
    for key in ("study_uid", "status", "p_any", "flag", "probabilities", "flags", "n_instances", "received_s"):
        assert key in s
    for key in ("answered_s", "latency_s", "error", "report_url"):
        assert key in s
    code, png, ctype = http(port, s["report_url"])
    assert code == 200 and ctype == "image/png" and png.startswith(b"\x89PNG")
    code, body, _ = http(port, "/health")
    health = json.loads(body)
    assert code == 200 and health["status"] == "ok" and health["workers"] == 1
    assert health["bundle"] == node.bundle_sha and len(health["bundle"]) == 64 and health["queue"] == 0
    # The drift watch: the bundle's reference read at start; one answered study is too few for a warning.
    assert node.drift_reference is not None and node.drift_reference == loaded.drift_reference
    drift = health["drift"]
    assert drift["n_studies"] >= 1 and drift["warning"] is False and "at least" in drift["message"]
    assert set(drift["psi"]) >= {"manufacturer", "kernel", "hu_brain_median", "p_any"}
    code, body, ctype = http(port, "/metrics")
    text = body.decode()
    assert code == 200 and ctype.startswith("text/plain")
    for name in (
        "rsna19_studies_received_total",
        "rsna19_instances_received_total",
        "rsna19_queue_length",
        'rsna19_studies_total{status="sent"}',
        'rsna19_latency_seconds{quantile="0.5"}',
        'rsna19_latency_seconds{quantile="0.95"}',
        "rsna19_instances_refused_total",
        "rsna19_drift_score",
        'rsna19_drift_psi{fact="manufacturer"}',
        "rsna19_drift_warning 0",
        "rsna19_reference_flag_rate",
    ):
        assert name in text
    received = next(line for line in text.splitlines() if line.startswith("rsna19_instances_received_total"))
    assert int(received.split()[-1]) >= len(answered["files"])
    code, body, ctype = http(port, "/")
    page = body.decode()
    assert code == 200 and ctype.startswith("text/html") and '<table id="worklist">' in page
    assert "setInterval(refresh, 2000)" in page and "#c62828" in page and 'id="drift-banner"' not in page
    initial = json.loads(page.split("const INITIAL = ", 1)[1].split(";\n", 1)[0])  # the rows the script renders
    (row,) = [r for r in initial if r["study_uid"] == uid]
    assert row["flag"] == s["flag"] and row["p_any"] == s["p_any"]
    assert "patient_name" not in row  # no token: no patient fields


def test_echo(node):
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    port = json.loads(node.spool.ports_path.read_text())["dicom"]
    assoc = ae.associate("127.0.0.1", port, ae_title="RSNA19")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_non_ct_is_refused_with_its_status(node, tmp_path):
    port = json.loads(node.spool.ports_path.read_text())["dicom"]
    before = node.db.counter("instances_refused")
    rejected_before = node.db.counter("contexts_rejected")
    # An MR SOP class gets no presentation context (abstract syntax not supported, result 0x03).
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="RSNA19")
    assert assoc.is_established
    rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assert rejected == {MRImageStorage: 0x03}
    assoc.release()
    assert node.db.counter("contexts_rejected") == rejected_before + 1  # logged and counted
    # A CT Image Storage object whose Modality is MR: 0xA900 (data set does not match the SOP class).
    uid = f"{STUDY_BASE}.9"
    f = write_study(tmp_path, uid)[0]
    ds = pydicom.dcmread(f)
    ds.Modality = "MR"
    ds.save_as(f)
    assert send(port, [f]) == [0xA900]
    assert node.db.counter("instances_refused") == before + 1
    assert node.db.study(uid) is None and not (node.spool.root / "incoming" / uid).exists()


@pytest.fixture
def scp_only(bundle, tmp_path):
    """A Storage SCP on its own spool and DB (no workers): ``make(**cfg)`` starts one, stopped at the end."""
    started = []

    def make(**kw):
        spool = Spool(tmp_path / f"spool{len(started)}")
        db = ServeDB(spool.db_path)
        scp = StorageSCP(_cfg(bundle, spool.root, **kw), spool, db)
        started.append(scp)
        return scp.start(), spool, db

    yield make
    for scp in started:
        scp.stop()


def test_limits_refuse_with_out_of_resources(scp_only, tmp_path):
    study_a = write_study(tmp_path / "a", f"{STUDY_BASE}.5")
    study_b = write_study(tmp_path / "b", f"{STUDY_BASE}.6")
    port, _, db = scp_only(max_instance_mb=0.001)  # instance size
    assert send(port, study_a[:1]) == [0xA700]
    assert db.counter("instances_refused") == 1 and db.studies() == []
    port, _, db = scp_only(min_free_disk_mb=1e12)  # free disk
    assert send(port, study_a[:1]) == [0xA700] and db.studies() == []
    port, _, db = scp_only(max_studies_per_minute=1)  # new studies a minute; a known study goes on
    assert send(port, study_a[:2] + study_b[:1] + study_a[2:3]) == [0, 0, 0xA700, 0]
    assert [s["study_uid"] for s in db.studies()] == [f"{STUDY_BASE}.5"] and db.counter("instances_refused") == 1


def test_compressed_instance_is_stored_as_received(scp_only, tmp_path):
    f = write_study(tmp_path / "in", f"{STUDY_BASE}.7")[0]
    transcode_jpeg_lossless(f)
    port, spool, db = scp_only()
    assert send(port, [f], contexts=[build_context(CTImageStorage, JPEGLosslessSV1)]) == [0]
    (row,) = db.instances(f"{STUDY_BASE}.7")
    assert row["transfer_syntax"] == JPEGLosslessSV1
    stored = pydicom.dcmread(spool.root / row["path"])
    assert stored.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert stored.PixelData == pydicom.dcmread(f).PixelData  # the encoded pixels, byte for byte


def test_enhanced_ct_study_is_predicted_and_answered(node, dest, tmp_path):
    """One multi-frame Enhanced CT file: stored, predicted frame by frame, SR + SC at the destination."""
    uid = f"{STUDY_BASE}.10"
    path = tmp_path / "enhanced.dcm"
    singles = write_study(tmp_path / "single", uid)
    ids = {"sop_uid": f"{uid}.2.1", "series_uid": f"{uid}.2", "study_uid": uid, "patient_id": "P"}
    enhanced_copy(singles, path, **ids, reverse=False)
    ports = json.loads(node.spool.ports_path.read_text())
    assert send(ports["dicom"], [path], contexts=[build_context(EnhancedCTImageStorage)]) == [0]
    s = wait_for(lambda: (s := api_study(ports["http"], uid)) and s["status"] in ("sent", "failed") and s, timeout=90)
    assert s["status"] == "sent", s["error"]
    assert s["n_instances"] == 1 and len(dest.of(uid, SR_CLASS)) == 1 and len(dest.of(uid, SC_CLASS)) == 1


def test_rerun_queues_the_study_again(answered, node, dest):
    port, uid = answered["ports"]["http"], answered["uid"]
    assert http(port, f"/api/studies/{uid}/rerun", method="POST")[0] == 202
    assert http(port, "/api/studies/1.2.3.404/rerun", method="POST")[0] == 404
    s = wait_for(lambda: (s := api_study(port, uid)) and s["status"] == "sent" and s["runs"] == 2 and s, timeout=90)
    # Deterministic SR/SC UIDs: the PACS keeps one copy of each.
    assert len({r["sop_uid"] for r in dest.of(uid, SR_CLASS)}) == 1 and len(dest.of(uid, SR_CLASS)) == 2
    assert s["sr_uid"] == answered["study"]["sr_uid"]


def test_silent_mode_predicts_and_records_but_sends_nothing(bundle, loaded, dest, tmp_path):
    app = ServeApp(_cfg(bundle, tmp_path / "spool", destinations=[dest.node], silent=True), bundle=loaded)
    ports = app.start()
    try:
        uid = f"{STUDY_BASE}.22"
        assert send(ports["dicom"], write_study(tmp_path / "in", uid)) == [0] * 8
        s = wait_for(lambda: (s := api_study(ports["http"], uid)) and s["status"] in ("done", "failed") and s, 90)
        assert s["status"] == "done" and s["sr_uid"] and 0.0 <= s["p_any"] <= 1.0  # predicted, SR written
        assert (app.spool.root / "results" / uid / "studies.json").is_file()
        time.sleep(1.0)  # a sender would have delivered by now
        assert not dest.of(uid, SR_CLASS) and not dest.of(uid, SC_CLASS) and app.sender is None
        assert app.db.deliveries(uid) == [] and app.health()["silent"] is True
    finally:
        app.shutdown(grace_s=10)


def test_retries_then_dead_letter_when_the_destination_is_down(bundle, loaded, tmp_path):
    down = f"DOWN@127.0.0.1:{free_port()}"
    app = ServeApp(_cfg(bundle, tmp_path / "spool", destinations=[down], send_retries=2), bundle=loaded)
    ports = app.start()
    try:
        uid = f"{STUDY_BASE}.2"
        assert send(ports["dicom"], write_study(tmp_path / "in", uid)) == [0] * 8
        s = wait_for(lambda: (s := api_study(ports["http"], uid)) and s["status"] == "failed" and s, timeout=90)
        assert s["error"].startswith(f"delivery to {down} failed") and s["answered_s"] is None
        (d,) = app.db.deliveries(uid)
        assert d["attempts"] == 2 and d["status"] == "failed"
        dead = app.spool.root / "dead_letter" / uid
        reason = json.loads((dead / "reason.json").read_text())
        assert reason["destination"] == down and reason["attempts"] == 2
        names = sorted(p.name.split("_")[0] for p in dead.glob("*.dcm"))
        assert names in (["SC", "SR"], ["SC", "SEG", "SR"])  # the SEG of a positive study goes with them
    finally:
        app.shutdown(grace_s=10)


def test_api_sort_order_on_a_real_db(tmp_path):
    db = ServeDB(tmp_path / "serve.db")
    studies = [(0.2, 1.0), (None, 2.0), (0.9, 3.0), (None, 4.0), (0.5, 5.0)]  # (p_any, last instance time)
    for i, (_, t) in enumerate(studies):
        uid = f"1.2.3.{i}"
        kw = dict(series_uid="s", sop_class_uid="c", transfer_syntax="t", path="p", size=1, calling_ae="A", now=t)
        db.add_instance(uid, uid, f"{uid}.1", **kw)
    for i, (p, _) in enumerate(studies):
        if p is not None:
            uid = f"1.2.3.{i}"
            assert db.rerun(uid) == "queued"
            row = db.claim()
            assert row["study_uid"] == uid
            db.finish(
                uid, started_s=row["started_s"], result={"p_any": p, "flag": p > 0.5}, error=None, destinations=[]
            )
    order = [s["study_uid"] for s in sorted_studies(db.studies())]
    assert order == ["1.2.3.2", "1.2.3.4", "1.2.3.0", "1.2.3.3", "1.2.3.1"]
    flags = {s["study_uid"]: s["flag"] for s in sorted_studies(db.studies())}
    assert flags["1.2.3.2"] is True and flags["1.2.3.0"] is False and flags["1.2.3.1"] is None
    done = db.study("1.2.3.2")
    assert done["status"] == "done" and done["answered_s"] is not None  # no destination: answered when written


def test_token_is_required_off_loopback(tmp_path):
    assert authorized(None, None, None) and authorized("", None, None)
    assert authorized("s3cret", "Bearer s3cret", None) and authorized("s3cret", None, "s3cret")
    assert not authorized("s3cret", None, None) and not authorized("s3cret", "Bearer nope", None)
    assert not authorized("s3cret", "Basic s3cret", None)
    with pytest.raises(UserError, match="--token"):
        ServeConfig(bundle="b", spool="s", http_host="0.0.0.0").check()
    ServeConfig(bundle="b", spool="s", http_host="0.0.0.0", token="t").check()
    ServeConfig(bundle="b", spool="s", http_host="127.0.0.1").check()
    # A server with a token refuses requests without it.
    db = ServeDB(tmp_path / "serve.db")
    srv = ServeHTTP("127.0.0.1", 0, db, Spool(tmp_path), "s3cret", lambda: {"status": "ok"})
    port = srv.start()
    try:
        assert http(port, "/health")[0] == 401
        assert http(port, "/api/studies?token=wrong")[0] == 401
        assert http(port, "/health", token="s3cret")[0] == 200
        assert http(port, "/api/studies?token=s3cret")[0] == 200
    finally:
        srv.stop()


def test_config_file_and_flags(tmp_path):
    (tmp_path / "serve.yaml").write_text("quiet_seconds: 3\ndestinations: [A@h:1]\nae-title: NODE\nworkers: 2\n")
    cfg = load_config(str(tmp_path / "serve.yaml"), {"bundle": "b", "spool": "s", "workers": 1, "port": None})
    assert (cfg.quiet_seconds, cfg.ae_title, cfg.workers, cfg.port) == (3.0, "NODE", 1, 11112)
    assert cfg.destination_nodes == [Destination("A", "h", 1)]
    (tmp_path / "alias.yaml").write_text("destination: B@h:2\n")
    assert load_config(str(tmp_path / "alias.yaml"), {"bundle": "b", "spool": "s"}).destinations == ["B@h:2"]
    (tmp_path / "bad.yaml").write_text("quiet_secs: 3\n")
    with pytest.raises(UserError, match="unknown key"):
        load_config(str(tmp_path / "bad.yaml"), {"bundle": "b", "spool": "s"})
    with pytest.raises(UserError, match="AET@HOST:PORT"):
        load_config(None, {"bundle": "b", "spool": "s", "destinations": ["nohost"]})


# ------------------------------------------------------------------------------------------------ the process
def _start(bundle: Path, spool: Path, dest: str, log: Path) -> subprocess.Popen:
    (spool / "ports.json").unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "rsna19",
        "serve",
        "--bundle",
        str(bundle),
        "--spool",
        str(spool),
        "--port",
        "0",
        "--http-port",
        "0",
        "--quiet-seconds",
        "3",
        "--device",
        "cpu",
        "--no-cam",
        "--destination",
        dest,
        "--min-free-disk-mb",
        "0",
        "--retry-backoff-s",
        "0.2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "a") as err:  # a file, not a pipe: a full pipe would block the server
        return subprocess.Popen(cmd, env=env, stderr=err, stdout=subprocess.DEVNULL)


def _ports(proc: subprocess.Popen, spool: Path, log: Path) -> dict:
    def ready():
        assert proc.poll() is None, f"serve exited with {proc.returncode}: {log.read_text()[-3000:]}"
        p = spool / "ports.json"
        return json.loads(p.read_text()) if p.is_file() else None

    ports = wait_for(ready, timeout=90)
    assert ports["pid"] == proc.pid
    return ports


def test_sigkill_restart_every_acknowledged_instance_and_one_answer_then_sigterm(bundle, dest, tmp_path):
    spool = tmp_path / "spool"
    uid = f"{STUDY_BASE}.3"
    files = write_study(tmp_path / "in", uid)
    log = tmp_path / "serve.log"
    proc = _start(bundle, spool, dest.node, log)
    try:
        ports = _ports(proc, spool, log)
        acked = []
        send(ports["dicom"], files[:5], after_each=lambda f, st: st == 0 and acked.append(f))
        proc.send_signal(signal.SIGKILL)  # at once: inside the quiet period, nothing predicted yet
        proc.wait(10)
        assert len(acked) == 5
        with sqlite3.connect(spool / "serve.db") as c:
            rows = c.execute("SELECT sop_uid, path FROM instances WHERE study_uid=?", (uid,)).fetchall()
        sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in acked}
        assert {r[0] for r in rows} == sops
        for _, rel in rows:
            assert pydicom.dcmread(spool / rel).StudyInstanceUID == uid  # whole, readable files

        # Restart: the study (quiet for long already) is queued, predicted and answered once.
        proc = _start(bundle, spool, dest.node, log)
        ports = _ports(proc, spool, log)
        s = wait_for(lambda: (s := api_study(ports["http"], uid)) and s["status"] == "sent" and s, timeout=120)
        assert s["n_instances"] == 5 and s["runs"] == 1
        assert len(dest.of(uid, SR_CLASS)) == 1 and len(dest.of(uid, SC_CLASS)) == 1  # exactly once
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = log.read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert "listening" in events and "stopped" in events
    assert not (spool / "ports.json").exists()


def test_graceful_shutdown_requeues_unfinished_work(bundle, loaded, tmp_path):
    """A study still running when the grace period ends is queued again in the DB (and predicted after restart)."""
    app = ServeApp(_cfg(bundle, tmp_path / "spool", quiet_seconds=0.0), bundle=loaded)
    ports = app.start()
    gate = threading.Event()
    worker = app.workers[0]
    real = worker.process

    def slow(row):  # hold the study in "running" until the shutdown is over
        gate.wait(30)
        return real(row)

    worker.process = slow
    uid = f"{STUDY_BASE}.4"
    send(ports["dicom"], write_study(tmp_path / "in", uid))
    wait_for(lambda: app.db.study(uid)["status"] == "running", timeout=30)
    app.shutdown(grace_s=0.2)
    assert app.db.study(uid)["status"] == "queued"
    gate.set()  # the late run ends after the re-queue: its result is dropped, the study stays queued
    worker.join(60)
    assert not worker.is_alive() and app.db.study(uid)["status"] == "queued" and app.db.study(uid)["p_any"] is None


def test_restart_requeues_a_study_a_kill_left_running(bundle, loaded, dest, tmp_path):
    """The spool and DB as a SIGKILL during a prediction leaves them: the restarted node predicts and answers once."""
    uid = f"{STUDY_BASE}.11"
    spool = Spool(tmp_path / "spool")
    db = ServeDB(spool.db_path)
    for f in write_study(tmp_path / "in", uid):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        path = spool.write_instance(uid, str(ds.SOPInstanceUID), f.read_bytes())
        kw = dict(series_uid=str(ds.SeriesInstanceUID), sop_class_uid=CTImageStorage, transfer_syntax="", size=0)
        db.add_instance(uid, uid, str(ds.SOPInstanceUID), path=str(path.relative_to(spool.root)), calling_ae="M", **kw)
    db.queue_quiet(0.0)
    assert db.claim()["study_uid"] == uid  # running when the process died
    db.close()
    (spool.root / "incoming" / uid / ".half.dcm.1.2.tmp").write_bytes(b"never acknowledged")
    app = ServeApp(_cfg(bundle, spool.root, destinations=[dest.node]), bundle=loaded)
    ports = app.start()
    try:
        s = wait_for(lambda: (s := api_study(ports["http"], uid)) and s["status"] == "sent" and s, timeout=90)
        assert s["runs"] == 2 and len(dest.of(uid, SR_CLASS)) == 1
        assert not list((spool.root / "incoming" / uid).glob(".*.tmp"))  # unacknowledged leftovers removed
    finally:
        app.shutdown(grace_s=10)


# ------------------------------------------------------------------------------------------------ who may send
@pytest.fixture
def bare_scp(tmp_path):
    """A Storage SCP on its own spool and DB, no bundle needed: ``make(**cfg)`` → (port, spool, db, scp)."""
    started = []

    def make(**kw):
        spool = Spool(tmp_path / f"bare{len(started)}")
        db = ServeDB(spool.db_path)
        scp = StorageSCP(_cfg(Path("no-bundle"), spool.root, **kw), spool, db)
        started.append(scp)
        return scp.start(), spool, db, scp

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from pacs.certs import make_pki, openssl_available

    if openssl_available():
        pytest.skip(openssl_available())
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_tls(pki, pair=None):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def test_allowed_aets_refuse_unknown_titles_and_wrong_addresses(bare_scp, tmp_path):
    files = write_study(tmp_path / "in", f"{STUDY_BASE}.20")[:1]
    port, _, db, scp = bare_scp(allowed_aets=["MODALITY@127.0.0.1", "PACS@10.9.8.0/24", "CT2"])
    assert send(port, files, calling="MODALITY") == [0]  # listed, from its address
    assert send(port, files, calling="CT2") == [0]  # listed without an address: from anywhere
    assert send(port, files, calling="INTRUDER") is None  # unknown title: association rejected
    assert send(port, files, calling="PACS") is None  # known title, wrong address
    assert db.counter("associations_refused") == 2 and db.counter("instances_received") == 2
    assert scp.policy.check("PACS", "10.9.8.77") is None and scp.policy.check("PACS", "::ffff:10.9.8.1") is None
    assert "not allowed from 10.9.7.1" in scp.policy.check("PACS", "10.9.7.1")
    with pytest.raises(UserError, match="TITLE@ADDRESS"):
        ServeConfig(bundle="b", spool="s", allowed_aets=["TOO LONG A TITLE FOR DICOM"]).check()
    with pytest.raises(UserError, match="cannot resolve"):
        ServeConfig(bundle="b", spool="s", allowed_aets=["CT@no-such-host.invalid"]).check()


def test_dicom_tls_receive_and_send(bare_scp, pki, tmp_path):
    """The SCP speaks TLS only: a caller with a certificate of the CA stores; a plain connection, a caller without
    a certificate and one with an untrusted certificate are refused and counted. The sender reaches it over TLS."""
    from rsna19.serve.sender import SendError, send_files
    from rsna19.serve.tls import dicom_client_context

    files = write_study(tmp_path / "in", f"{STUDY_BASE}.21")[:2]
    tls = dict(tls_cert=str(pki["node"].cert), tls_key=str(pki["node"].key), tls_ca=str(pki.ca))
    port, _, db, _ = bare_scp(**tls, network_timeout_s=2)
    assert send(port, files[:1], tls=_client_tls(pki, pki["modality"])) == [0]
    assert send(port, files[:1]) is None  # plain DICOM to the TLS port
    assert send(port, files[:1], tls=_client_tls(pki)) is None  # TLS without a client certificate
    assert send(port, files[:1], tls=_client_tls(pki, pki.rogue)) is None  # a certificate of another CA
    assert db.counter("tls_refused") == 3 and db.counter("instances_received") == 1
    # The sender: TLS with the node's own certificate, the destination's checked against the CA and host name.
    cfg = ServeConfig(
        bundle="b", spool="s", **{**tls, "tls_cert": str(pki["pacs"].cert), "tls_key": str(pki["pacs"].key)}
    )
    send_files(files[1:], Destination("RSNA19", "localhost", port), "PACS", 5, dicom_client_context(cfg))
    assert db.counter("instances_received") == 2
    with pytest.raises(SendError, match="TLS"):
        send_files(files[1:], Destination("RSNA19", "127.0.0.1", port), "PACS", 5, None)  # plain: refused
    with pytest.raises(UserError, match="both"):
        ServeConfig(bundle="b", spool="s", tls_cert=str(pki["node"].cert)).check()


def test_https_named_tokens_reviews_and_patient_fields(pki, tmp_path, caplog):
    """HTTPS with the node's certificate; each named token is logged with what it views, re-runs and reviews; patient
    fields only behind a token; the viewer link; the flagged-only filter."""

    db = ServeDB(tmp_path / "serve.db")
    kw = dict(series_uid="s", sop_class_uid="c", transfer_syntax="t", path="p", size=1, calling_ae="A")
    from rsna19.serve.scp import patient_fields

    header = pydicom.Dataset()
    header.PatientName, header.PatientID, header.AccessionNumber = "Doe^Jane", "PID-7", "ACC-42"
    patient = patient_fields(header)  # what the SCP stores of each instance
    for i, p in enumerate((0.9, 0.1)):
        uid = f"1.2.3.{i}"
        db.add_instance(uid, uid, f"{uid}.1", patient=patient, **kw)
        db.rerun(uid)
        row = db.claim()
        db.finish(uid, started_s=row["started_s"], result={"p_any": p, "flag": p > 0.5}, error=None, destinations=[])
    cfg = ServeConfig(
        bundle="b",
        spool=str(tmp_path),
        http_tls_cert=str(pki["node"].cert),
        http_tls_key=str(pki["node"].key),
        tokens={"alice": "alice-secret-1", "ris": "ris-secret-22"},
        viewer_url="http://pacs:8042/app/explorer.html#study?uuid={orthanc_id}&acc={accession}",
    )
    srv = ServeHTTP("127.0.0.1", 0, db, Spool(tmp_path), cfg.named_tokens, lambda: {"status": "ok"}, cfg=cfg)
    port = srv.start()
    ctx = _client_tls(pki)

    def get(path, token=None, method="GET"):
        req = urllib.request.Request(f"https://localhost:{port}{path}", method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect)
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers

    try:
        caplog.set_level("INFO", logger="rsna19.serve.http")
        assert get("/health")[0] == 401
        code, body, _ = get("/api/studies", token="alice-secret-1")
        studies = json.loads(body)
        assert code == 200 and [s["study_uid"] for s in studies] == ["1.2.3.0", "1.2.3.1"]
        assert studies[0]["patient_name"] == "Doe Jane" and studies[0]["accession"] == "ACC-42"
        assert studies[0]["age_s"] >= 0
        flagged = json.loads(get("/api/studies?flagged=1", token="alice-secret-1")[1])
        assert [s["study_uid"] for s in flagged] == ["1.2.3.0"]
        assert get("/api/studies/1.2.3.0/acknowledge", token="alice-secret-1", method="POST")[0] == 200
        assert get("/api/studies/1.2.3.1/dismiss", token="ris-secret-22", method="POST")[0] == 200
        assert get("/api/studies/1.2.3.404/dismiss", token="ris-secret-22", method="POST")[0] == 404
        one = json.loads(get("/api/studies/1.2.3.0", token="ris-secret-22")[1])
        assert one["review"] == "acknowledged" and one["review_by"] == "alice" and one["review_s"] > 0
        code, _, headers = get(one["viewer_url"], token="ris-secret-22")
        sha = hashlib.sha1(b"PID-7|1.2.3.0").hexdigest()
        assert code == 302 and headers["Location"].startswith(
            f"http://pacs:8042/app/explorer.html#study?uuid={sha[:8]}-"
        )
        assert headers["Location"].endswith("&acc=ACC-42")
        assert get("/api/studies/1.2.3.0/rerun", token="ris-secret-22", method="POST")[0] == 202
        with pytest.raises(OSError):  # plain HTTP to the HTTPS port: no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        srv.stop()
    events = [(r.getMessage(), getattr(r, "user", None), getattr(r, "study_uid", None)) for r in caplog.records]
    assert ("review", "alice", "1.2.3.0") in events and ("review", "ris", "1.2.3.1") in events
    assert ("study_viewed", "ris", "1.2.3.0") in events and ("rerun", "ris", "1.2.3.0") in events
    text = " ".join(str(r.__dict__) for r in caplog.records)
    assert "Doe" not in text and "PID-7" not in text and "ACC-42" not in text and "secret" not in text
    # Without tokens (loopback only) the same API hides the patient fields.
    srv = ServeHTTP("127.0.0.1", 0, db, Spool(tmp_path), None, lambda: {"status": "ok"})
    port = srv.start()
    try:
        s = json.loads(http(port, "/api/studies")[1])[0]
        assert "patient_name" not in s and "accession" not in s
    finally:
        srv.stop()
    with pytest.raises(UserError, match="share one secret"):
        ServeConfig(bundle="b", spool="s", tokens={"a": "same-secret", "b": "same-secret"}).check()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_token_flags_and_yaml_tokens(tmp_path):
    (tmp_path / "serve.yaml").write_text(
        "tokens: {alice: alice-secret-1}\nallowed_aets: [CT1@10.0.0.7]\nsilent: true\n"
    )
    cfg = load_config(str(tmp_path / "serve.yaml"), {"bundle": "b", "spool": "s"})
    assert cfg.named_tokens == {"alice": "alice-secret-1"} and cfg.allowed_aets == ["CT1@10.0.0.7"] and cfg.silent
    assert cfg.to_dict()["tokens"] == {"alice": "***"}
    cfg = load_config(None, {"bundle": "b", "spool": "s", "tokens": ["bob=bob-secret-1"], "token": "shared-secret"})
    assert cfg.named_tokens == {"bob": "bob-secret-1", "token": "shared-secret"}
    with pytest.raises(UserError, match="NAME=SECRET"):
        load_config(None, {"bundle": "b", "spool": "s", "tokens": ["nosecret"]})


# ------------------------------------------------------------------------------------------------ worker processes
@pytest.mark.slow
def test_worker_processes_survive_a_hang_and_a_crash(bundle, dest, tmp_path):
    """A bundle rigged (tests/rigged.py) to hang on one study and to SIGKILL its process on another: both are failed
    with the reason, the worker process is replaced, and every other study is still answered once."""
    from rigged import CRASH, HANG, rigged_predict

    cfg = _cfg(bundle, tmp_path / "spool", destinations=[dest.node], worker_isolation="process", study_timeout_s=30)
    cfg.torch_threads = 1
    app = ServeApp(cfg, predict=rigged_predict)
    ports = app.start()
    try:
        assert app.wait_ready(180) and app.health()["status"] == "ok"
        first_pid = app.workers[0].process_.pid
        uids = [f"{STUDY_BASE}.30", f"{STUDY_BASE}.31{HANG}", f"{STUDY_BASE}.32{CRASH}", f"{STUDY_BASE}.33"]
        for i, uid in enumerate(uids):
            assert send(ports["dicom"], write_study(tmp_path / f"in{i}", uid)) == [0] * 8
            time.sleep(0.6)  # queued in this order
        final = ("sent", "failed")
        done = wait_for(
            lambda: (
                (s := {u: api_study(ports["http"], u) for u in uids})
                and all(v["status"] in final for v in s.values())
                and s
            ),
            timeout=300,
        )
        hang, crash = done[uids[1]], done[uids[2]]
        assert hang["status"] == "failed" and "timed out after 30 s" in hang["error"], hang
        assert crash["status"] == "failed" and "died while predicting (killed by SIGKILL)" in crash["error"], crash
        for uid in (uids[0], uids[3]):
            assert done[uid]["status"] == "sent" and done[uid]["runs"] == 1
            assert len(dest.of(uid, SR_CLASS)) == 1 and len(dest.of(uid, SC_CLASS)) == 1
        assert not dest.of(uids[1], SR_CLASS) and not dest.of(uids[2], SR_CLASS)
        worker = app.workers[0]
        assert worker.process_.starts == 3 and worker.process_.pid != first_pid  # replaced after each loss
        assert not list((app.spool.root / "results").glob(".*.tmp"))  # the lost runs' temp folders removed
    finally:
        app.shutdown(grace_s=10)
    assert app.workers[0].process_.proc is None  # the worker process is gone after the shutdown
