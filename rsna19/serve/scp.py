"""The DICOM Storage SCP: CT instances in, on disk and in the DB before they are acknowledged.

Only CT Image Storage and Enhanced CT Image Storage are offered (in the transfer syntaxes predict-study reads) plus
Verification; any other SOP class gets no presentation context at association (logged with its result code). A
C-STORE is refused with a DICOM status, logged and counted (``instances_refused``):

* 0x0122 SOP class not supported (not CT);
* 0xA900 data set does not match the SOP class (no Study/SOP Instance UID, a Modality other than CT);
* 0xA700 out of resources (instance larger than ``max_instance_mb``, less than ``min_free_disk_mb`` free on the
  spool's disk, more than ``max_studies_per_minute`` new studies in the last minute, or writing failed).

An association from a calling AE title (or an address) that ``allowed_aets`` does not list is rejected before any
C-STORE (A-ASSOCIATE-RJ, "calling AE title not recognized"), logged and counted (``associations_refused``). With
``tls_cert`` the port speaks DICOM TLS only: a plain connection or a caller without a trusted certificate fails the
handshake (logged and counted, ``tls_refused``).

A success (0x0000) is returned only after the file is fsynced under its final name and its row is committed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
import threading
import time
from typing import Any

from rsna19.serve.config import ServeConfig
from rsna19.serve.db import ServeDB
from rsna19.serve.spool import Spool, safe_name
from rsna19.serve.tls import dicom_server_context

log = logging.getLogger("rsna19.serve.scp")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_CLASSES: tuple[str, ...] = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
#: Transfer syntaxes accepted for storage: every one predict-study decodes losslessly (docs/dicom.md).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900


class StorageSCP:
    """The SCP's handlers and its server (``start`` returns once it listens; the port is :attr:`port`)."""

    def __init__(self, cfg: ServeConfig, spool: Spool, db: ServeDB, on_stored: Any = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.db = db
        self.on_stored = on_stored
        self.server: Any = None
        self.policy = cfg.sender_policy
        # One new study at a time passes the rate check (two associations must not both take the last slot).
        self._new_study_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ server
    def start(self) -> int:
        """Listen on ``cfg.host:cfg.port`` (0: a free port) in background threads; returns the port."""
        from pynetdicom import AE, evt

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one line per PDU otherwise
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for big instances
        ae.network_timeout = max(self.cfg.network_timeout_s, 1.0)
        ae.maximum_associations = 32
        for sop_class in CT_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ACCEPTED, self.handle_accepted),
        ]
        ctx = dicom_server_context(self.cfg)
        self.server = ae.start_server((self.cfg.host, int(self.cfg.port)), block=False, evt_handlers=handlers)
        if ctx is not None:
            self.server.get_request = self._tls_accept(self.server, ctx)
        return int(self.server.server_address[1])

    def _tls_accept(self, server: Any, ctx: ssl.SSLContext) -> Any:
        """``server.get_request`` with the TLS handshake under the network timeout; a failed handshake (a plain
        connection, no or an untrusted client certificate) is logged and counted, and the connection dropped."""
        timeout = max(self.cfg.network_timeout_s, 1.0)

        def get_request() -> tuple[Any, Any]:
            sock, address = server.socket.accept()
            sock.settimeout(timeout)  # a caller that never completes the handshake cannot hold the accept loop
            try:
                tls = ctx.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as exc:
                sock.close()
                self.db.bump("tls_refused")
                log.warning("tls_refused", extra={"address": address[0], "reason": " ".join(str(exc).split())})
                raise OSError(f"TLS handshake failed: {exc}") from None
            tls.settimeout(None)
            return tls, address

        return get_request

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations (open ones are aborted)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ------------------------------------------------------------------------------------------------ handlers
    def handle_requested(self, event: Any) -> None:
        """Refuse an association from a calling AE title (or address) that ``allowed_aets`` does not list.

        The A-ASSOCIATE-RJ is rejected-permanent, service-user, "calling AE title not recognized" (0x01, 0x01, 0x03),
        as for pynetdicom's own ``require_calling_aet``; it is logged and counted (``associations_refused``).
        """
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        address = str(event.assoc.requestor.address)
        reason = self.policy.check(calling, address)
        if reason is None:
            return
        self.db.bump("associations_refused")
        log.warning("association_refused", extra={"calling_ae": calling, "address": address, "reason": reason})
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        time.sleep(0.05)  # let the requestor read the A-ASSOCIATE-RJ before the connection is closed

    def handle_echo(self, event: Any) -> int:
        log.info("echo", extra={"calling_ae": _calling(event)})
        return SUCCESS

    def handle_accepted(self, event: Any) -> None:
        """Log every presentation context the association refused (abstract syntax / transfer syntax)."""
        for cx in event.assoc.rejected_contexts:
            self.db.bump("contexts_rejected")
            log.warning(
                "context_rejected",
                extra={
                    "calling_ae": _calling(event),
                    "sop_class_uid": str(cx.abstract_syntax),
                    "result": int(cx.result or 0),
                    "reason": {
                        0x03: "abstract syntax (SOP class) not supported",
                        0x04: "no transfer syntax supported",
                    }.get(int(cx.result or 0), "rejected"),
                },
            )

    def handle_store(self, event: Any) -> int:
        """Spool one instance and record it, then acknowledge; any other outcome is a logged refusal."""
        t0 = time.perf_counter()
        sop_class = str(event.context.abstract_syntax)
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        if sop_class not in CT_CLASSES:
            return self._refuse(event, SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not CT", sop_uid=sop_uid)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a data set that cannot be encoded is refused, the node goes on
            return self._refuse(event, DATASET_MISMATCH, f"cannot read the data set: {exc}", sop_uid=sop_uid)
        limit = self.cfg.max_instance_mb * 1024 * 1024
        if self.cfg.max_instance_mb > 0 and len(data) > limit:
            return self._refuse(
                event, OUT_OF_RESOURCES, f"{len(data)} bytes > max_instance_mb {self.cfg.max_instance_mb:g}", sop_uid
            )
        free_mb = shutil.disk_usage(self.spool.root).free / 2**20
        if free_mb < self.cfg.min_free_disk_mb:
            return self._refuse(
                event, OUT_OF_RESOURCES, f"{free_mb:.0f} MB free < min_free_disk_mb {self.cfg.min_free_disk_mb:g}"
            )
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            modality = str(ds.get("Modality", "") or "")
            patient = patient_fields(ds)
        except Exception as exc:  # noqa: BLE001
            return self._refuse(event, DATASET_MISMATCH, f"cannot decode the data set: {exc}", sop_uid=sop_uid)
        if not study_uid or not sop_uid:
            return self._refuse(event, DATASET_MISMATCH, "no StudyInstanceUID or SOPInstanceUID", sop_uid=sop_uid)
        if modality and modality != "CT":
            return self._refuse(event, DATASET_MISMATCH, f"Modality {modality!r} is not CT", study_uid, sop_uid)
        limited = self.cfg.max_studies_per_minute > 0 and not self.db.known_study(study_uid)
        with self._new_study_lock if limited else contextlib.nullcontext():
            if limited:
                recent = self.db.studies_started_since(time.time() - 60.0)
                if recent >= self.cfg.max_studies_per_minute:
                    return self._refuse(
                        event,
                        OUT_OF_RESOURCES,
                        f"{recent} new studies in the last minute (max_studies_per_minute "
                        f"{self.cfg.max_studies_per_minute})",
                        study_uid,
                        sop_uid,
                    )
            try:
                folder = safe_name(study_uid)
                path = self.spool.write_instance(folder, sop_uid, data)
                new = self.db.add_instance(
                    study_uid,
                    folder,
                    sop_uid,
                    series_uid=series_uid,
                    sop_class_uid=sop_class,
                    transfer_syntax=_syntax(event.context.transfer_syntax),
                    path=str(path.relative_to(self.spool.root)),
                    size=len(data),
                    calling_ae=_calling(event),
                    patient=patient,
                )
            except Exception as exc:  # noqa: BLE001 - a disk or DB error refuses this instance, not the node
                log.exception("store_failed", extra={"study_uid": study_uid, "sop_uid": sop_uid})
                return self._refuse(event, OUT_OF_RESOURCES, f"cannot spool: {exc}", study_uid, sop_uid)
        if new:
            log.info("study_received", extra={"study_uid": study_uid, "calling_ae": _calling(event)})
        log.debug(
            "stored",
            extra={"study_uid": study_uid, "sop_uid": sop_uid, "bytes": len(data), "ms": _ms(t0)},
        )
        if self.on_stored is not None:
            self.on_stored(study_uid)
        return SUCCESS

    def _refuse(self, event: Any, status: int, reason: str, study_uid: str = "", sop_uid: str = "") -> int:
        self.db.bump("instances_refused")
        log.warning(
            "store_refused",
            extra={
                "status": f"0x{status:04X}",
                "reason": reason,
                "study_uid": study_uid or None,
                "sop_uid": sop_uid or None,
                "calling_ae": _calling(event),
            },
        )
        return status


def patient_fields(ds: Any) -> dict[str, str]:
    """PatientName, PatientID and AccessionNumber of an instance (empty strings when absent): stored in serve.db and
    shown only to token holders, never logged or used in a file name."""
    return {
        "patient_name": str(ds.get("PatientName", "") or "").replace("^", " ").strip(),
        "patient_id": str(ds.get("PatientID", "") or "").strip(),
        "accession": str(ds.get("AccessionNumber", "") or "").strip(),
    }


def _calling(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return ""


def _syntax(ts: Any) -> str:
    """The accepted transfer syntax of a context (a UID; a list of one in some pynetdicom versions)."""
    return str(ts if isinstance(ts, str) else ts[0])


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)
