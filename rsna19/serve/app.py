"""Wiring of the node: spool + DB + SCP + quiet-period monitor + workers + sender + HTTP, and its shutdown.

Start order: the spool and ``serve.db`` (studies left ``running`` by a kill go back to ``queued``), the workers
(each starts its worker process, which loads the bundle; or loads it in its thread with ``worker_isolation:
thread``), the sender (not in ``silent`` mode), the SCP and the HTTP server; ``ports.json`` is written once both
listen. Shutdown (SIGTERM/SIGINT): stop accepting associations, let running studies finish for up to
``shutdown_grace_s``, re-queue the rest in the DB, end the worker processes, stop the sender and the HTTP server,
remove ``ports.json``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import yaml

from rsna19.serve.config import ServeConfig, is_loopback
from rsna19.serve.db import ServeDB
from rsna19.serve.http import ServeHTTP
from rsna19.serve.metrics import drift_summary, node_drift
from rsna19.serve.procs import LoadFn, PredictFn
from rsna19.serve.scp import StorageSCP
from rsna19.serve.sender import Sender
from rsna19.serve.spool import Spool
from rsna19.serve.worker import Worker, WorkQueue
from rsna19.study.bundle import Bundle, load_study_model

log = logging.getLogger("rsna19.serve")


class ServeApp:
    """The running node. ``start()`` returns once it listens; ``shutdown()`` stops it gracefully."""

    def __init__(
        self,
        cfg: ServeConfig,
        bundle: Bundle | None = None,
        predict: PredictFn | None = None,
        load: LoadFn | None = None,
    ) -> None:
        """``bundle``: a loaded :class:`rsna19.study.bundle.Bundle` for the first worker (thread isolation only:
        embedding, tests); None: every worker loads ``cfg.bundle``. ``predict`` / ``load``: what a worker runs on a
        study and loads once (module-level functions; default :func:`rsna19.serve.worker.predict_one` and
        :func:`rsna19.serve.worker.load_predictor`)."""
        cfg.check()
        if bundle is not None and cfg.worker_isolation == "process":
            raise ValueError("a preloaded bundle needs worker_isolation='thread' (a worker process loads its own)")
        self.preloaded = bundle
        self.predict = predict
        self.load = load
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.db: ServeDB | None = None
        self.stop_event = threading.Event()  # workers, sender and monitor stop
        self.queue = WorkQueue()
        self.workers: list[Worker] = []
        self.sender: Sender | None = None
        self.scp: StorageSCP | None = None
        self.http: ServeHTTP | None = None
        self.monitor: threading.Thread | None = None
        self.bundle_sha = ""
        self.drift_reference: dict[str, Any] | None = None
        self.started_s = time.time()

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> dict[str, int]:
        """Start every part; returns ``{"dicom": port, "http": port, "pid": pid}`` (also in ``ports.json``)."""
        cfg = self.cfg
        self.spool.ports_path.unlink(missing_ok=True)
        _, manifest, self.bundle_sha = load_study_model(cfg.bundle)  # a bad bundle fails here, before listening
        self.drift_reference = manifest.get("drift_reference")  # read once, without torch
        removed = self.spool.clean_temp()
        with open(self.spool.root / "serve_config.yaml", "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=True)
        self.db = ServeDB(self.spool.db_path)
        requeued = self.db.requeue_running()
        log.info(
            "starting",
            extra={"spool": str(self.spool.root), "requeued": requeued, "temp_removed": removed, "pid": os.getpid()},
        )
        for i in range(cfg.workers):
            w = Worker(i, cfg, self.spool, self.db, self.queue, self.stop_event, predict=self.predict, load=self.load)
            if i == 0 and self.preloaded is not None:
                w.bundle = self.preloaded
            self.workers.append(w)
            w.start()
        if cfg.destinations and not cfg.silent:
            self.sender = Sender(cfg, self.spool, self.db, self.stop_event)
            self.sender.start()
            for w in self.workers:
                w.on_done = lambda _uid, _status: self.sender.wake.set()  # type: ignore[union-attr]
        self.monitor = threading.Thread(target=self._monitor, name="rsna19-quiet", daemon=True)
        self.monitor.start()
        self.scp = StorageSCP(cfg, self.spool, self.db)
        dicom_port = self.scp.start()
        self.http = ServeHTTP(
            cfg.http_host,
            cfg.http_port,
            self.db,
            self.spool,
            cfg.named_tokens,
            self.health,
            cfg=cfg,
            drift_reference=self.drift_reference,
        )
        self.http.on_rerun = lambda _uid: self.queue.notify()
        http_port = self.http.start()
        ports = {"dicom": dicom_port, "http": http_port, "pid": os.getpid()}
        self.spool.write_json(ports, self.spool.ports_path)
        log.info(
            "listening",
            extra={
                **ports,
                "ae_title": cfg.ae_title,
                "destinations": cfg.destinations,
                "allowed_aets": cfg.allowed_aets or "any",
                "dicom_tls": cfg.dicom_tls,
                "http_tls": bool(cfg.http_tls_cert),
                "tokens": sorted(cfg.named_tokens),
                "worker_isolation": cfg.worker_isolation,
                "silent": cfg.silent,
            },
        )
        if not cfg.allowed_aets and not is_loopback(cfg.host):
            log.warning("any_caller_may_store", extra={"host": cfg.host, "fix": "give --allowed-aet TITLE[@ADDRESS]"})
        return ports

    def _monitor(self) -> None:
        """Queue the studies that have been quiet long enough (every 0.2 s)."""
        assert self.db is not None
        while not self.stop_event.is_set():
            try:
                uids = self.db.queue_quiet(self.cfg.quiet_seconds)
                for uid in uids:
                    log.info("study_queued", extra={"study_uid": uid})
                if uids:
                    self.queue.notify()
            except Exception:  # noqa: BLE001 - the monitor must keep running; the next tick retries
                log.exception("monitor_error")
            self.stop_event.wait(0.2)

    # ------------------------------------------------------------------------------------------------ state
    def health(self) -> dict[str, Any]:
        """``/health``: ``status`` ok (every worker has its bundle), loading, or error (a bundle failed to load);
        ``drift``: the drift watch's summary (:func:`rsna19.serve.metrics.drift_summary`)."""
        assert self.db is not None
        loaded = sum(1 for w in self.workers if w.loaded and w.is_alive())
        errors = [w.load_error for w in self.workers if w.load_error]
        status = "error" if errors and not loaded else ("ok" if loaded == len(self.workers) else "loading")
        out: dict[str, Any] = {
            "status": status,
            "queue": self.db.counts()["queued"],
            "workers": loaded,
            "bundle": self.bundle_sha,
            "running": [w.current for w in self.workers if w.current],
            "uptime_s": round(time.time() - self.started_s, 1),
            "worker_isolation": self.cfg.worker_isolation,
            "silent": self.cfg.silent,
            "dicom_tls": self.cfg.dicom_tls,
            "allowed_aets": list(self.cfg.allowed_aets),
            "associations_refused": self.db.counter("associations_refused"),
            "tls_refused": self.db.counter("tls_refused"),
            "drift": drift_summary(node_drift(self.db, self.drift_reference)),
        }
        if errors:
            out["error"] = errors[0]
        return out

    # ------------------------------------------------------------------------------------------------ stop
    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, let running studies finish (``grace_s``), re-queue the rest, stop everything."""
        grace = self.cfg.shutdown_grace_s if grace_s is None else grace_s
        log.info("stopping", extra={"grace_s": grace})
        if self.scp is not None:
            self.scp.stop()
        self.stop_event.set()  # workers take no new study; the one in hand finishes
        self.queue.notify()
        end = time.time() + grace
        for w in self.workers:
            if w.current is not None:  # idle or still loading its bundle: nothing to finish
                w.join(max(0.0, end - time.time()))
        if self.sender is not None:
            self.sender.wake.set()
            self.sender.join(max(1.0, end - time.time()))
        if self.monitor is not None:
            self.monitor.join(1.0)
        unfinished = self.db.requeue_running() if self.db is not None else []
        for w in self.workers:  # a worker process still predicting: its study is queued again, the run is dropped
            if w.current is not None:
                w.close()
        for w in self.workers:
            w.join(2.0)  # idle ones stop their process within a second
            w.close()  # whatever is left of a worker process goes now
        if self.http is not None:
            self.http.stop()
        self.spool.ports_path.unlink(missing_ok=True)
        log.info("stopped", extra={"requeued": unfinished})
        # A worker still inside a prediction keeps its DB handle; the process exits right after, so only close
        # the DB when every worker is gone.
        if self.db is not None and not any(w.is_alive() for w in self.workers):
            self.db.close()


def serve_forever(cfg: ServeConfig) -> int:
    """Run the node until SIGTERM or SIGINT; returns 0 after a graceful shutdown."""
    app = ServeApp(cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.start()
    while not stop.wait(0.5):
        pass
    app.shutdown()
    return 0
