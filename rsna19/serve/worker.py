"""The workers: each holds the bundle, takes queued studies from ``serve.db`` and predicts them.

The queue is the ``studies`` table (status ``queued``, oldest first), so it survives a kill; a study is claimed
(``running``) in one transaction by a worker thread, predicted (:func:`predict_one`: series selection, conversion,
every model, the stacker, the calibrated study result, the report picture, the DICOM SR and Secondary Capture), and
its outcome is stored (``done`` / ``failed``). The outputs are written to a temp folder then renamed to
``SPOOL/results/<study>/``.

``worker_isolation: process`` (the default): the thread drives a :class:`rsna19.serve.procs.WorkerProcess` that
holds the bundle and runs :func:`predict_one`; a run that crashes the process or passes ``study_timeout_s`` fails
that study only, and a new process takes over. ``thread``: the thread holds the bundle and runs :func:`predict_one`
itself (no time limit). The study code is reached through two functions only, :func:`load_predictor` and
:func:`predict_one`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rsna19.core.constants import CLASSES
from rsna19.serve.config import ServeConfig
from rsna19.serve.db import ServeDB
from rsna19.serve.procs import LoadFn, PredictFn, WorkerProcess, WorkerProcessError
from rsna19.serve.spool import Spool
from rsna19.study.batch import predict_studies
from rsna19.study.bundle import Bundle, load_bundle
from rsna19.study.predictor import StudyOptions, StudyPredictor

log = logging.getLogger("rsna19.serve.worker")


class WorkQueue:
    """Wakes the workers when a study is queued (the DB holds the queue; this only avoids polling delays)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tick = 0

    def notify(self) -> None:
        with self._cond:
            self._tick += 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            tick = self._tick
            self._cond.wait_for(lambda: self._tick != tick, timeout=timeout)


#: Fields of a ``studies.json`` study entry carried into the study record as they are when present: ``not_assessable``
#: (the reason the models cannot judge the study: a string, or an object with ``reason``), ``drift`` (an object with
#: ``score`` and ``warning``) and ``finding_note`` (why subtype findings are or are not reported).
HOOK_FIELDS: tuple[str, ...] = ("not_assessable", "drift", "finding_note")


def study_summary(entry: dict[str, Any], out: Path) -> dict[str, Any]:
    """The result of one ``studies.json`` study entry as stored in ``serve.db`` (and served by the API).

    Returns:
        ``{"p_any", "flag", "probabilities": {class: p}, "flags": {class: bool}, "positive_classes",
        "calibrated", "report", "sr", "sc", "sr_uid", "sc_uid", "series_used", "dicom_error"}``; paths are relative
        to the spool. Without a study model in the bundle the probabilities are the uncalibrated slice maxima and
        the flags are null.
    """
    sr = entry.get("study_result")
    if entry.get("status") == "not_assessable":  # the gate (rsna19/inference/assess.py): no probability, no flag
        probs: dict[str, float | None] = dict.fromkeys(CLASSES)
        flags = None
    elif sr is not None:
        probs = {c: float(sr["classes"][c]["probability"]) for c in CLASSES}
        flags: dict[str, bool] | None = {c: bool(sr["classes"][c]["positive"]) for c in CLASSES}
    else:
        probs = {c: float(entry["prediction"]["max_probability"][c]) for c in CLASSES}
        flags = None
    dicom = entry.get("dicom") or {}
    rel = f"{out.parent.name}/{out.name}"  # results/<study>
    return {
        "p_any": probs["any"],
        "flag": None if flags is None else flags["any"],
        "probabilities": probs,
        "flags": flags,
        "positive_classes": [c for c in CLASSES if flags and flags[c]],
        "calibrated": sr is not None,
        "report": f"{rel}/{entry['report']}" if entry.get("report") else None,
        "sr": f"{rel}/dicom/{dicom['sr']}" if dicom.get("sr") else None,
        "sc": f"{rel}/dicom/{dicom['sc']}" if dicom.get("sc") else None,
        "sr_uid": dicom.get("sr_sop_instance_uid"),
        "sc_uid": dicom.get("sc_sop_instance_uid"),
        "dicom_error": dicom.get("error"),
        "series_used": [s.get("series_uid") for s in entry.get("series_used", [])],
        "predict_seconds": entry.get("seconds"),
        "assessable": entry.get("status") != "not_assessable",
        "not_assessable": entry.get("not_assessable"),
        "seg": f"{rel}/dicom/{dicom['seg']}" if dicom.get("seg") else None,
        "seg_uid": dicom.get("seg_sop_instance_uid"),
        "drift_facts": entry.get("input_facts"),
        # Hooks for what predict-study may add to a study entry; carried as they are, shown by the worklist.
        **{k: entry[k] for k in HOOK_FIELDS if entry.get(k) is not None},
    }


def load_predictor(cfg: ServeConfig, bundle: Bundle | None = None) -> StudyPredictor:
    """What a worker keeps in memory between studies: a :class:`~rsna19.study.predictor.StudyPredictor`
    over the bundle on ``cfg.device`` (``bundle``: one already loaded), torch limited to ``torch_threads`` or the CPU
    count divided by the workers."""
    import torch

    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.workers))
    if bundle is None:
        bundle = load_bundle(cfg.bundle, device=cfg.device)
    return StudyPredictor(bundle, StudyOptions(cam=cfg.cam, source_headers=True, seg=cfg.seg))


def predict_one(predictor: StudyPredictor, spool: Spool, row: dict[str, Any]) -> dict[str, Any]:
    """Predict one spooled study with the worker's :func:`load_predictor`; returns :func:`study_summary`.

    Raises:
        RuntimeError: the study could not be predicted (no usable series, every series failed ...), with the
            reason predict-study gave.
    """
    uid, folder = row["study_uid"], row["folder"]
    final = spool.results(folder)
    tmp = final.with_name(f".{folder}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = predict_studies(
        spool.incoming(folder),
        predictor,
        tmp,
        dicom_out=tmp / "dicom",
        say=lambda line: log.info("predict", extra={"study_uid": uid, "line": line}),
    ).summary
    entry = next((s for s in summary["studies"] if str(s.get("study_uid")) == uid), None)
    if entry is None:
        skipped = summary.get("files_skipped") or []
        why = "; ".join(sorted({str(s.get("reason")) for s in skipped})[:3]) if skipped else "no readable series"
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"no CT study {uid} among the spooled files ({why})")
    if entry.get("status") not in ("ok", "not_assessable"):  # not assessable is an answer (SR, SC, report)
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(str(entry.get("error") or "prediction failed"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return study_summary(entry, final)


class Worker(threading.Thread):
    """One worker: a thread that claims studies one at a time and runs each in its process (``process``
    isolation) or itself (``thread``).

    Args:
        predict: ``predict(predictor, spool, row) -> summary`` (default :func:`predict_one`); a module-level
            function (it is sent to the worker process).
        load: ``load(cfg) -> predictor`` (default :func:`load_predictor`).
    """

    def __init__(
        self,
        index: int,
        cfg: ServeConfig,
        spool: Spool,
        db: ServeDB,
        queue: WorkQueue,
        stop: threading.Event,
        on_done: Any = None,
        predict: PredictFn | None = None,
        load: LoadFn | None = None,
    ) -> None:
        super().__init__(name=f"rsna19-worker-{index}", daemon=True)
        self.index = index
        self.cfg = cfg
        self.spool = spool
        self.db = db
        self.queue = queue
        self.stop_event = stop
        self.on_done = on_done
        self.predict = predict or predict_one
        self.load_fn = load or load_predictor
        self.bundle: Bundle | None = (
            None  # thread isolation: a bundle loaded before the worker started (embedding, tests)
        )
        self.predictor: Any = None  # thread isolation: the StudyPredictor this thread runs
        self.process_: WorkerProcess | None = None  # process isolation: the process that runs the studies
        self.loaded = False
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.current: str | None = None

    @property
    def isolated(self) -> bool:
        """Whether studies run in a worker process (``worker_isolation: process``)."""
        return self.cfg.worker_isolation == "process"

    def load(self) -> None:
        """Load the bundle (thread isolation) or start the worker process, which loads it (process isolation).

        Raises:
            Exception: the bundle did not load (the message says why).
        """
        # Imported here, in the worker's thread, so that the node listens before torch is imported.
        t0 = time.perf_counter()
        if self.isolated:
            self.process_ = self.process_ or WorkerProcess(self.index, self.cfg, self.load_fn, self.predict)
            info = self.process_.start()
            extra = {"pid": info.get("pid"), "starts": self.process_.starts}
        else:
            if self.predictor is None:
                self.predictor = (
                    self.load_fn(self.cfg) if self.bundle is None else load_predictor(self.cfg, self.bundle)
                )
            extra = {}
        self.loaded = True
        log.info(
            "bundle_loaded",
            extra={"worker": self.index, "seconds": round(time.perf_counter() - t0, 3), **extra},
        )

    def run(self) -> None:
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log; the SCP keeps receiving
            self.load_error = " ".join(str(exc).split())
            log.error("bundle_load_failed", extra={"worker": self.index, "error": self.load_error})
            return
        finally:
            self.ready.set()
        try:
            while not self.stop_event.is_set():
                if self.isolated and not self.loaded:
                    if not self._restart():
                        return
                    continue
                row = self.db.claim()
                if row is None:
                    self.queue.wait(timeout=1.0)
                    continue
                self.current = row["study_uid"]
                self.process(row)
                self.current = None
        finally:
            if self.process_ is not None:
                self.process_.stop()

    def _restart(self) -> bool:
        """A new worker process after one died or was killed; False (and ``load_error``) when it cannot load."""
        try:
            self.load()
            return True
        except Exception as exc:  # noqa: BLE001
            self.load_error = " ".join(str(exc).split())
            log.error("bundle_load_failed", extra={"worker": self.index, "error": self.load_error})
            return False

    def run_study(self, row: dict[str, Any]) -> dict[str, Any]:
        """Predict a claimed study where this worker runs studies; returns its summary.

        Raises:
            WorkerProcessError: the worker process crashed or passed ``study_timeout_s`` (it is replaced before the
                next study).
            Exception: the study failed.
        """
        if not self.isolated:
            return self.predict(self.predictor, self.spool, row)
        assert self.process_ is not None
        try:
            return self.process_.run(row, self.cfg.study_timeout_s)
        except WorkerProcessError:
            self.loaded = False
            for tmp in self.spool.results(row["folder"]).parent.glob(f".{row['folder']}.*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)  # what the lost run had written
            raise

    def process(self, row: dict[str, Any]) -> str:
        """Predict a claimed study and store the outcome; returns the new status."""
        uid = row["study_uid"]
        log.info("study_started", extra={"study_uid": uid, "worker": self.index, "n_instances": row["n_instances"]})
        result, error = None, None
        try:
            result = self.run_study(row)
            if self.cfg.destinations and not self.cfg.silent and not result.get("sr"):
                error = f"no DICOM SR to send: {result.get('dicom_error') or 'not written'}"
        except Exception as exc:  # noqa: BLE001 - one failed study is recorded; the worker goes on
            error = " ".join(str(exc).split()) or type(exc).__name__
            log.debug("study failed", exc_info=True)
        destinations = [] if self.cfg.silent else self.cfg.destinations
        status = self.db.finish(uid, started_s=row["started_s"], result=result, error=error, destinations=destinations)
        extra: dict[str, Any] = {"study_uid": uid, "status": status, "worker": self.index}
        if result and result.get("p_any") is not None:
            extra.update(p_any=round(result["p_any"], 4), flag=result["flag"])
        elif result:
            extra.update(not_assessable=result.get("not_assessable"))
        if error:
            extra["error"] = error
        log.log(logging.ERROR if status == "failed" else logging.INFO, "study_finished", extra=extra)
        if self.on_done is not None:
            self.on_done(uid, status)
        return status

    def close(self) -> None:
        """Kill the worker process (a study still running there is lost; the caller re-queues it)."""
        if self.process_ is not None:
            self.process_.kill()
