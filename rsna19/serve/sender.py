"""The answers: a predicted study's SR and Secondary Capture go to every destination with C-STORE.

A failed attempt (no association, a refused context, a C-STORE status that is not success or warning) is retried
after ``retry_backoff_s`` × 2^(attempt-1) (at most ``retry_backoff_max_s``), up to ``send_retries`` attempts per
destination; then the files are copied to ``SPOOL/dead_letter/<study>/`` with ``reason.json`` and the study is
``failed`` with the reason. A destination that has the results is not sent them again; a study becomes ``sent``
once every destination has them. The SR/SC SOP Instance UIDs are deterministic (bundle + study), so a re-send after
a kill between the C-STORE and the DB update leaves one copy in the PACS. With ``tls_cert`` every destination is
reached over DICOM TLS (:mod:`rsna19.serve.tls`).
"""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from rsna19.serve.config import Destination, ServeConfig
from rsna19.serve.db import ServeDB
from rsna19.serve.spool import Spool
from rsna19.serve.tls import dicom_client_context

log = logging.getLogger("rsna19.serve.sender")

#: C-STORE statuses that mean "stored": success and the 0xB000-range warnings (coercion, elements discarded).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(RuntimeError):
    """A delivery attempt failed (the message says why)."""


def send_files(
    files: list[Path], dest: Destination, calling_ae: str, timeout_s: float, tls: ssl.SSLContext | None = None
) -> None:
    """C-STORE ``files`` to ``dest`` in one association (over DICOM TLS with ``tls``, the destination's certificate
    checked against the host name it is reached by).

    Raises:
        SendError: no association, no accepted context for a file, or a failure status.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in sorted({str(h.SOPClassUID) for _, h in headers}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = None if tls is None else (tls, dest.host)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        how = "TLS " if tls is not None else ""
        raise SendError(f"no {how}association with {dest} (refused, aborted, unreachable or a failed TLS handshake)")
    try:
        for path, _ in headers:
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:  # no accepted presentation context, association gone
                raise SendError(f"{path.name}: {exc}") from None
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{path.name}: no C-STORE response from {dest} (timeout or abort)")
            if int(code) not in STORED:
                raise SendError(f"{path.name}: C-STORE status 0x{int(code):04X} from {dest}")
    finally:
        if assoc.is_established:
            assoc.release()


class Sender(threading.Thread):
    """Delivers ``done`` studies whose next attempt is due (wakes every 0.2 s or when notified)."""

    def __init__(self, cfg: ServeConfig, spool: Spool, db: ServeDB, stop: threading.Event) -> None:
        super().__init__(name="rsna19-sender", daemon=True)
        self.cfg = cfg
        self.spool = spool
        self.db = db
        self.stop_event = stop
        self.wake = threading.Event()
        self.by_name = {str(d): d for d in cfg.destination_nodes}
        self.tls = dicom_client_context(cfg)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                for row in self.db.due_for_sending():
                    if self.stop_event.is_set():
                        break
                    self.deliver(row)
            except Exception:  # noqa: BLE001 - the sender must outlive a bad row; the row is retried
                log.exception("sender_error")
            self.wake.wait(0.2)
            self.wake.clear()

    def deliver(self, row: dict[str, Any]) -> str:
        """One attempt per pending destination of one study; returns the study's status afterwards."""
        uid = row["study_uid"]
        result = json.loads(row["result"] or "{}")
        files = [self.spool.root / result[k] for k in ("sr", "sc", "seg") if result.get(k)]
        status = row["status"]
        for d in self.db.deliveries(uid):
            if d["status"] != "pending":
                continue
            dest = self.by_name.get(d["destination"]) or Destination.parse(d["destination"])
            t0 = time.perf_counter()
            try:
                missing = [p.name for p in files if not p.is_file()]
                if not files or missing:
                    raise SendError(f"result files missing: {', '.join(missing) or 'no SR/SC'}")
                send_files(files, dest, self.cfg.ae_title, self.cfg.network_timeout_s, self.tls)
            except Exception as exc:  # noqa: BLE001 - any failure is one failed attempt
                error = str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
                attempt = int(d["attempts"]) + 1
                give_up = attempt >= self.cfg.send_retries
                wait = min(self.cfg.retry_backoff_s * 2 ** (attempt - 1), self.cfg.retry_backoff_max_s)
                if give_up:  # the files are safe in the dead-letter folder before the study reads as failed
                    self.dead_letter(row, files, d["destination"], error, attempt)
                self.db.delivery_failed(uid, d["destination"], error, None if give_up else time.time() + wait)
                log.warning(
                    "send_failed",
                    extra={
                        "study_uid": uid,
                        "destination": d["destination"],
                        "attempt": attempt,
                        "error": error,
                        "retry_in_s": None if give_up else round(wait, 3),
                    },
                )
                if give_up:
                    return "failed"
                continue
            status = self.db.delivered(uid, d["destination"])
            log.info(
                "sent",
                extra={
                    "study_uid": uid,
                    "destination": d["destination"],
                    "ms": round(1000 * (time.perf_counter() - t0)),
                },
            )
        return status

    def dead_letter(self, row: dict[str, Any], files: list[Path], destination: str, error: str, attempts: int) -> Path:
        """Copy the undeliverable files to ``SPOOL/dead_letter/<study>/`` with ``reason.json``."""
        folder = self.spool.dead_letter(row["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        for p in files:
            if p.is_file():
                shutil.copy2(p, folder / p.name)
        self.spool.write_json(
            {
                "study_uid": row["study_uid"],
                "destination": destination,
                "attempts": attempts,
                "error": error,
                "time": time.time(),
                "files": [p.name for p in files],
            },
            folder / "reason.json",
        )
        log.error("dead_letter", extra={"study_uid": row["study_uid"], "destination": destination, "error": error})
        return folder
