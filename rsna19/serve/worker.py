"""The workers: each loads the bundle once, then takes queued studies from ``serve.db`` and predicts them.

The queue is the ``studies`` table (status ``queued``, oldest first), so it survives a kill; a study is claimed
(``running``) in one transaction, predicted by the worker's
:class:`~rsna19.inference.study_predictor.StudyPredictor` through :func:`rsna19.inference.study.predict_studies` on
its spool folder (series selection, conversion, every model, the stacker, the calibrated study result, the report
picture, the DICOM SR and Secondary Capture), and its outcome is stored (``done`` / ``failed``). The outputs are
written to a temp folder then renamed to ``SPOOL/results/<study>/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rsna19.constants import CLASSES
from rsna19.serve.config import ServeConfig
from rsna19.serve.db import ServeDB
from rsna19.serve.spool import Spool

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
    }


def predict_one(predictor: Any, spool: Spool, row: dict[str, Any]) -> dict[str, Any]:
    """Predict one spooled study with a :class:`rsna19.inference.study_predictor.StudyPredictor`; returns
    :func:`study_summary`.

    Raises:
        RuntimeError: the study could not be predicted (no usable series, every series failed ...), with the
            reason predict-study gave.
    """
    from rsna19.inference.study import predict_studies

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
    """One worker thread: its own bundle, one study at a time."""

    def __init__(
        self,
        index: int,
        cfg: ServeConfig,
        spool: Spool,
        db: ServeDB,
        queue: WorkQueue,
        stop: threading.Event,
        on_done: Any = None,
    ) -> None:
        super().__init__(name=f"rsna19-worker-{index}", daemon=True)
        self.index = index
        self.cfg = cfg
        self.spool = spool
        self.db = db
        self.queue = queue
        self.stop_event = stop
        self.on_done = on_done
        self.bundle: Any = None
        self.predictor: Any = None  # rsna19.inference.study_predictor.StudyPredictor, made once the bundle is loaded
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.current: str | None = None

    def load(self) -> None:
        """Load the bundle (once; the worker keeps it in memory)."""
        import torch

        from rsna19.bundle import load_bundle

        # Share the CPUs between the workers (the SCP and HTTP threads need little); imported here, in the worker's
        # thread, so that the node listens before torch is imported.
        torch.set_num_threads(self.cfg.torch_threads or max(1, (os.cpu_count() or 1) // self.cfg.workers))
        t0 = time.perf_counter()
        self.bundle = load_bundle(self.cfg.bundle, device=self.cfg.device)
        log.info(
            "bundle_loaded",
            extra={"worker": self.index, "seconds": round(time.perf_counter() - t0, 3), "bundle": self.bundle.sha256},
        )

    def run(self) -> None:
        try:
            if self.bundle is None:
                self.load()
            from rsna19.inference.study_predictor import StudyOptions, StudyPredictor  # imports torch: not before

            self.predictor = StudyPredictor(
                self.bundle, StudyOptions(cam=self.cfg.cam, source_headers=True, seg=self.cfg.seg)
            )
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log; the SCP keeps receiving
            self.load_error = str(exc)
            log.error("bundle_load_failed", extra={"worker": self.index, "error": str(exc)})
            return
        finally:
            self.ready.set()
        while not self.stop_event.is_set():
            row = self.db.claim()
            if row is None:
                self.queue.wait(timeout=1.0)
                continue
            self.current = row["study_uid"]
            self.process(row)
            self.current = None

    def process(self, row: dict[str, Any]) -> str:
        """Predict a claimed study and store the outcome; returns the new status."""
        uid = row["study_uid"]
        log.info("study_started", extra={"study_uid": uid, "worker": self.index, "n_instances": row["n_instances"]})
        result, error = None, None
        try:
            result = predict_one(self.predictor, self.spool, row)
            if self.cfg.destinations and not result.get("sr"):
                error = f"no DICOM SR to send: {result.get('dicom_error') or 'not written'}"
        except Exception as exc:  # noqa: BLE001 - one failed study is recorded; the worker goes on
            error = " ".join(str(exc).split()) or type(exc).__name__
            log.debug("study failed", exc_info=True)
        status = self.db.finish(
            uid, started_s=row["started_s"], result=result, error=error, destinations=self.cfg.destinations
        )
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
