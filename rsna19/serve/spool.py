"""The spool folder: where every acknowledged instance, every result and every undeliverable answer lives.

Layout (docs/contracts.md, "Serve spool")::

    SPOOL/serve.db                          the state (rsna19.serve.db)
    SPOOL/ports.json                        {"dicom": port, "http": port, "pid": pid}, once both listen
    SPOOL/serve_config.yaml                 the resolved configuration (token masked)
    SPOOL/incoming/<study>/<sop>.dcm        each received instance, as received (with a file meta header)
    SPOOL/results/<study>/                  predict-study's outputs: studies.json, report_<study>.png, dicom/
    SPOOL/dead_letter/<study>/              SR + SC that could not be delivered, and reason.json

``<study>`` and ``<sop>`` are the UIDs with any character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (a UID is
digits and dots; RSNA-style ``ID_<hex>`` names pass unchanged).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from rsna19.core.atomic import write_text

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(uid: str) -> str:
    """A UID as a file or folder name (never empty, never ``.``/``..``, at most 128 characters)."""
    name = _UNSAFE.sub("_", str(uid).strip())[:128]
    return name if name.strip(".") else "_" + name


class Spool:
    """Paths of one spool folder, and its durable writes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("incoming", "results", "dead_letter"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def db_path(self) -> Path:
        return self.root / "serve.db"

    @property
    def ports_path(self) -> Path:
        return self.root / "ports.json"

    def incoming(self, study_folder: str) -> Path:
        return self.root / "incoming" / study_folder

    def results(self, study_folder: str) -> Path:
        return self.root / "results" / study_folder

    def dead_letter(self, study_folder: str) -> Path:
        return self.root / "dead_letter" / study_folder

    def write_instance(self, study_folder: str, sop_uid: str, data: bytes) -> Path:
        """Write one received instance durably: temp name, fsync, rename, fsync of the folder.

        Returns:
            The final path (``incoming/<study>/<sop>.dcm``); once this returns, the file survives a kill or a
            power cut.
        """
        folder = self.incoming(study_folder)
        new = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{safe_name(sop_uid)}.dcm"
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"  # two associations, one SOP
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
        if new:
            _fsync_dir(folder.parent)
        return path

    def write_json(self, obj: Any, path: Path) -> None:
        """Atomic JSON write (temp name + rename, :func:`rsna19.core.atomic.write_text`)."""
        write_text(json.dumps(obj, indent=1) + "\n", path)

    def clean_temp(self) -> int:
        """Delete the temp files a kill left in ``incoming/`` (never acknowledged); returns how many."""
        n = 0
        for tmp in (self.root / "incoming").glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the file's own fsync already happened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
