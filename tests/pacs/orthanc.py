"""A throw-away Orthanc PACS on loopback ports, and the few REST calls the tests need.

``Orthanc`` writes a JSON configuration into its folder (storage and index there, HTTP and DICOM on free loopback
ports, no authentication, remote access off, every caller allowed to store), starts ``Orthanc CONFIG`` as a
subprocess, waits until ``GET /system`` answers and stops it (SIGTERM, then SIGKILL) on exit. The storage survives
:meth:`Orthanc.restart`, like a PACS rebooted between two deliveries.

Usage::

    with Orthanc(tmp_path / "orthanc") as pacs:
        pacs.add_modality("rsna19", "RSNA19", "127.0.0.1", node_port)
        iid = pacs.upload(path)
        pacs.store("rsna19", [pacs.study_id(study_uid)])
        tags = pacs.tags(pacs.study_instances(study_id)[0])
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The program the Debian package installs (``/usr/sbin``, which a non-login PATH may lack).
ORTHANC_NAMES = ("Orthanc", "/usr/sbin/Orthanc")


def find_orthanc() -> str | None:
    """Path of the Orthanc executable, or None when it is not installed."""
    for name in ORTHANC_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a tiny race with other programs remains)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(proc: subprocess.Popen, timeout: float | None) -> int | None:
    """SIGTERM ``proc`` and wait ``timeout`` s, then SIGKILL (``timeout`` None: SIGKILL at once). Returns its exit
    code."""
    if proc.poll() is None:
        if timeout is None:
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
    return proc.returncode


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed (the message holds the status and the answer)."""


@dataclass(frozen=True)
class Modality:
    """A DICOM node Orthanc knows (its ``DicomModalities`` entry)."""

    aet: str
    host: str
    port: int
    tls: bool = False  # Orthanc calls it over DICOM TLS (``UseDicomTls``)
    local_aet: str | None = None  # the calling AE title Orthanc uses towards it (``LocalAet``), else Orthanc's own

    def entry(self) -> list[Any] | dict[str, Any]:
        """The ``DicomModalities`` value (the short list form when no option is set)."""
        if not self.tls and self.local_aet is None:
            return [self.aet, self.host, self.port]
        out: dict[str, Any] = {"AET": self.aet, "Host": self.host, "Port": self.port, "UseDicomTls": self.tls}
        if self.local_aet:
            out["LocalAet"] = self.local_aet
        return out


class Orthanc:
    """One Orthanc process with its own storage under ``root``.

    Args:
        root: folder of the configuration, storage, index and log (created).
        aet: Orthanc's own AE title.
        modalities: name → :class:`Modality` written into ``DicomModalities`` (more with :meth:`add_modality`).
        lua: optional Lua script text (``LuaScripts``), e.g. a routing rule.
        tls: ``(certificate, private key, trusted certificates)`` PEM files: the DICOM port speaks TLS only and
            requires a trusted client certificate (``DicomTls*``); modalities with ``tls`` are called over TLS.
        executable: the Orthanc program (default: :func:`find_orthanc`).
    """

    def __init__(
        self,
        root: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, Modality] | None = None,
        lua: str | None = None,
        executable: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.root = Path(root)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.lua = lua
        self.tls = tls
        self.executable = executable or find_orthanc()
        if self.executable is None:
            raise OrthancError("Orthanc is not installed (Debian: apt-get install -y orthanc)")
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process ---------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout + stderr (appended across restarts)."""
        return self.root / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        cfg: dict[str, Any] = {
            "Name": "rsna19-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,  # the REST API answers loopback callers only, so no login is needed
            "AuthenticationEnabled": False,
            # Orthanc 1.10 has no DICOM bind address: its DICOM port listens on every interface, so only the
            # declared modalities (calling AE title + their host, 127.0.0.1) may store or echo; the called AE
            # title is not checked.
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {name: m.entry() for name, m in self.modalities.items()},
            "DicomScuTimeout": 30,
            "StableAge": 2,
            "Plugins": [],
        }
        if self.lua:
            cfg["LuaScripts"] = [str(self.root / "rules.lua")]  # written by start()
        if self.tls:
            cert, key, trusted = self.tls
            cfg.update(
                DicomTlsEnabled=True,
                DicomTlsCertificate=str(cert),
                DicomTlsPrivateKey=str(key),
                DicomTlsTrustedCertificates=str(trusted),
                DicomTlsRemoteCertificateRequired=True,
            )
        return cfg

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "orthanc.json"
        if self.lua:
            (self.root / "rules.lua").write_text(self.lua, encoding="utf-8")
        cfg_path.write_text(json.dumps(self.config(), indent=1), encoding="utf-8")
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child; closed in stop()
        self._log = log
        self.proc = subprocess.Popen([self.executable, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=1.0)
                return self
            except (OSError, OrthancError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc (SIGTERM, SIGKILL after ``timeout`` s); its storage stays."""
        self._end(timeout)

    def kill(self) -> None:
        """SIGKILL Orthanc at once (a crash: its DICOM port is gone within milliseconds); its storage stays."""
        self._end(None)

    def _end(self, timeout: float | None) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()

    def restart(self, down_s: float = 0.0) -> Orthanc:
        """Stop, stay down ``down_s`` seconds, start again on the same ports with the same storage."""
        self.stop()
        time.sleep(down_s)
        return self.start()

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of Orthanc's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> Any:
        """One REST call; returns the decoded JSON answer (or the raw bytes when it is not JSON)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json" if body[:1] in (b"{", b"[") else "application/dicom")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise OrthancError(f"{method} {path}: HTTP {e.code}: {detail}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any, timeout: float = 120.0) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, timeout=timeout)

    def add_modality(
        self, name: str, aet: str, host: str, port: int, tls: bool = False, local_aet: str | None = None
    ) -> None:
        """Declare a DICOM node (kept for restarts; sent to the running Orthanc with ``PUT /modalities/NAME``);
        ``tls``: called over DICOM TLS; ``local_aet``: the calling AE title Orthanc uses towards it."""
        m = Modality(aet, host, port, tls, local_aet)
        self.modalities[name] = m
        if self.proc is not None and self.proc.poll() is None:
            entry = m.entry()
            body = json.dumps(entry if isinstance(entry, dict) else {"AET": aet, "Host": host, "Port": port}).encode()
            self.request("PUT", f"/modalities/{name}", body)

    def upload(self, path: Path) -> str:
        """``POST /instances`` one DICOM file; returns its Orthanc instance ID."""
        answer = self.post("/instances", Path(path).read_bytes())
        return str(answer["ID"])

    def upload_folder(self, folder: Path) -> list[str]:
        """Upload every file under ``folder`` (sorted); returns the instance IDs."""
        return [self.upload(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()]

    def store(self, modality: str, resources: list[str], timeout: float = 300.0) -> Any:
        """``POST /modalities/{modality}/store``: C-STORE the resources (Orthanc IDs of studies, series or
        instances) to the node, synchronously (returns when the association ends)."""
        payload = {"Resources": list(resources), "Synchronous": True}
        return self.post(f"/modalities/{modality}/store", payload, timeout=timeout)

    def echo(self, modality: str) -> bool:
        """C-ECHO the node; True when it answered."""
        try:
            self.post(f"/modalities/{modality}/echo", {})
            return True
        except OrthancError:
            return False

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's ID of the study with this StudyInstanceUID, or None when Orthanc does not hold it."""
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return str(found[0]) if found else None

    def studies(self) -> list[str]:
        """Orthanc IDs of every study it holds."""
        return [str(s) for s in self.get("/studies")]

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study (``GET /studies/{id}/series``: MainDicomTags, Instances, ...)."""
        return list(self.get(f"/studies/{study_id}/series"))

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """The instances of a study (``GET /studies/{id}/instances``)."""
        return list(self.get(f"/studies/{study_id}/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/tags?simplify``: keyword → value, sequences as lists of dicts."""
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def instances_by_modality(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        """Modality (``CT``, ``SR``, ``OT``...) → the simplified tags of each instance of the study."""
        sid = self.study_id(study_uid)
        out: dict[str, list[dict[str, Any]]] = {}
        if sid is None:
            return out
        for inst in self.study_instances(sid):
            tags = self.tags(inst["ID"])
            out.setdefault(str(tags.get("Modality", "")), []).append(tags)
        return out


def wait_for(predicate: Any, timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy; return it, or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)
