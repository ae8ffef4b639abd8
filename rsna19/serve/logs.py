"""The node's logs: one JSON object a line on stderr (``ts``, ``level``, ``event``, ``logger`` and the fields).

Patient names, IDs and accession numbers are never passed to a log call (only study UIDs, AE titles, token names).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any

log = logging.getLogger("rsna19.serve")

#: Standard attributes of a LogRecord (everything else passed in ``extra`` goes into the JSON line).
_RECORD_KEYS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``event`` (the message), ``logger``, then the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        for k, v in record.__dict__.items():
            if k not in _RECORD_KEYS and not k.startswith("_"):
                obj[k] = v
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as one JSON line (replaces the root logger's handlers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings (pydicom's VR notes) as JSON lines too
    threading.excepthook = _log_thread_exception
    for noisy in ("pynetdicom", "highdicom"):  # a line per PDU / per copied module otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    log.error(
        "thread_crashed",
        extra={"thread": getattr(args.thread, "name", None), "error": f"{args.exc_type.__name__}: {args.exc_value}"},
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )
