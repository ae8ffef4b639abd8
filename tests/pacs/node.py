"""The ``rsna19 serve`` node as a subprocess (ports picked by the node, read from ``SPOOL/ports.json``), its HTTP API,
and synthetic head-CT studies to send it.

Usage::

    with Node(spool, bundle, destinations=[f"ORTHANC@127.0.0.1:{pacs.dicom_port}"]) as node:
        pacs.add_modality("rsna19", node.ae_title, "127.0.0.1", node.dicom_port)
        ...
        node.studies()        # GET /api/studies
        node.kill()           # SIGKILL, then node.start() again on the same spool
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pacs.orthanc import terminate

ROOT = Path(__file__).resolve().parents[2]


def serve_available() -> str | None:
    """None when this checkout has the ``rsna19 serve`` command, else the reason it cannot run."""
    if not (ROOT / "rsna19" / "commands" / "serve.py").is_file():
        return "this checkout has no `rsna19 serve` command (rsna19/commands/serve.py)"
    return None


class NodeError(RuntimeError):
    """The node did not start or exited (the message holds the end of its log)."""


class Node:
    """One ``rsna19 serve`` process on a spool folder.

    Args:
        spool: the spool folder (kept across :meth:`kill` / :meth:`start`, as after a crash).
        bundle: the bundle folder.
        destinations: ``AET@HOST:PORT`` of each PACS the results go to.
        ae_title: the node's AE title.
        quiet_seconds: a study is complete after this many seconds without a new instance.
        extra: more command-line arguments.
        threads: torch threads of each worker (``torch_threads`` in the node's ``--config`` YAML, written next to
            the spool) and OMP / MKL threads of the process.
        token: ``(name, secret)`` of a named token (``--user-token``): every HTTP call of this helper sends it.
        config: more keys of the ``--config`` YAML.
    """

    def __init__(
        self,
        spool: Path,
        bundle: Path,
        destinations: list[str] | None = None,
        ae_title: str = "RSNA19",
        quiet_seconds: float = 2.0,
        extra: list[str] | None = None,
        threads: int = 2,
        token: tuple[str, str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.spool = Path(spool)
        self.bundle = Path(bundle)
        self.destinations = list(destinations or [])
        self.ae_title = ae_title
        self.quiet_seconds = quiet_seconds
        self.extra = list(extra or [])
        self.threads = threads
        self.token = token
        self.config = dict(config or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.starts = 0

    @property
    def log_path(self) -> Path:
        """The node's stderr (JSON lines), appended across restarts."""
        return self.spool.parent / f"{self.spool.name}.log"

    @property
    def config_path(self) -> Path:
        """The node's ``--config`` YAML (settings without a flag: ``torch_threads``)."""
        return self.spool.parent / f"{self.spool.name}.yaml"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "rsna19", "serve", "--bundle", str(self.bundle), "--spool", str(self.spool)]
        cmd += ["--config", str(self.config_path)]
        cmd += ["--port", str(self.ports.get("dicom", 0)), "--http-port", str(self.ports.get("http", 0))]
        cmd += ["--ae-title", self.ae_title, "--quiet-seconds", f"{self.quiet_seconds:g}", "--device", "cpu"]
        for dest in self.destinations:
            cmd += ["--destination", dest]
        if self.token:
            cmd += ["--user-token", f"{self.token[0]}={self.token[1]}"]
        return cmd + self.extra

    def start(self, timeout: float = 120.0, ready: bool = True) -> Node:
        """Start the node and wait until ``ports.json`` names its ports and ``GET /health`` answers (with
        ``ready``: until its status is ``ok``, every worker's bundle loaded).

        After the first start the same ports are asked for again, so a PACS that knows the node keeps reaching it.
        """
        self.spool.mkdir(parents=True, exist_ok=True)
        ports_file = self.spool / "ports.json"
        ports_file.unlink(missing_ok=True)
        import yaml

        self.config_path.write_text(
            yaml.safe_dump({"torch_threads": int(self.threads), **self.config}), encoding="utf-8"
        )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it; closed by stop()/kill()
        self._log = log
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeError(f"rsna19 serve exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                ports = json.loads(ports_file.read_text())
                if ports.get("pid") == self.proc.pid:
                    self.ports = {"dicom": int(ports["dicom"]), "http": int(ports["http"])}
                    status = self.health().get("status")
                    if not ready or status == "ok":
                        return self
            except urllib.error.HTTPError as exc:  # 503: a bundle failed to load
                self.kill()
                raise NodeError(f"rsna19 serve is unhealthy ({exc}); log:\n{self.log_tail()}") from None
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        self.kill()
        raise NodeError(f"rsna19 serve did not come up within {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful shutdown); SIGKILL after ``timeout`` s. Returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code = terminate(proc, timeout)
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL, like a power cut: nothing is flushed or cleaned up by the node."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log_events(self) -> list[dict[str, Any]]:
        """The node's JSON log lines (other lines skipped)."""
        out = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    # -- HTTP ------------------------------------------------------------------------------------------------
    @property
    def dicom_port(self) -> int:
        return self.ports["dicom"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def page_url(self) -> str:
        """The worklist page's URL (with ``?token=`` when the node has a token)."""
        return self.url + "/" + (f"?token={self.token[1]}" if self.token else "")

    def request(self, path: str, method: str = "GET") -> urllib.request.Request:
        """A request to the node's HTTP port, with the token's ``Authorization`` header."""
        req = urllib.request.Request(self.url + path, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token[1]}")
        return req

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.request(path), timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.request(path, "POST"), timeout=timeout) as resp:
            return json.loads(resp.read())

    def health(self) -> dict[str, Any]:
        return dict(self.get_json("/health"))

    def studies(self) -> list[dict[str, Any]]:
        """``GET /api/studies`` (p_any descending)."""
        return list(self.get_json("/api/studies"))

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return next((s for s in self.studies() if s["study_uid"] == study_uid), None)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.request("/metrics"), timeout=10) as resp:
            return resp.read().decode()


# -- synthetic studies -------------------------------------------------------------------------------------------
def write_study(
    folder: Path, study_uid: str, seed: int, bleed: bool = True, size: int = 64, slices: int = 8, scout: bool = False
) -> list[Path]:
    """One 5 mm soft-tissue axial series of a synthetic head under ``folder`` (valid UIDs under ``study_uid``,
    patient and study modules), with the plan's hemorrhages or none. ``scout``: a single localizer image instead
    (a study predict-study cannot use: it fails with "no usable series"). Returns the file paths."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hospital import SOFT, THICK_MM, head_plan, write_localizer, write_series

    plan = head_plan(seed=seed, size=size)
    if scout:
        return [write_localizer(folder, plan, study_uid=study_uid, series_uid=f"{study_uid}.1")]
    g = dataclasses.replace(plan.geometry, n_slices=slices)
    plan = dataclasses.replace(plan, geometry=g, bleeds=plan.bleeds if bleed else ())
    if not bleed:
        plan = dataclasses.replace(plan, small_bleeds=())
    attrs = {**SOFT, "SeriesDescription": "Head 5.0 H30s"}
    return write_series(folder, plan, study_uid=study_uid, series_uid=f"{study_uid}.1", step=THICK_MM, attrs=attrs)
