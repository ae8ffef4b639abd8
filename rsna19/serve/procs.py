"""Worker processes: each holds the bundle in its own interpreter and predicts one study at a time, under a time limit.

A model run that hangs, or crashes the interpreter (a segfault in a native library, the OOM killer, ``os._exit``),
ends only the process that ran it: the worker thread of the node that drives it (:class:`rsna19.serve.worker.Worker`)
marks that study ``failed`` with the reason, starts a new process (which loads the bundle again) and goes on with the
queue. CPU-bound work of two workers no longer shares one GIL.

The child is started with the ``spawn`` method (a fresh interpreter: nothing of the node's threads, sockets or
locks is inherited) and asks the kernel for SIGKILL when the node dies (``PR_SET_PDEATHSIG`` on Linux), so a
SIGKILLed node leaves no orphan predicting on. Parent and child talk over one pipe:

* child → parent: ``("ready", info)`` once the bundle is loaded, or ``("load_error", message)``;
* parent → child: ``("study", row)``; child → parent: ``("ok", summary)`` or ``("error", message)``;
* parent → child: ``("stop",)``, or the pipe closes: the child exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from rsna19.serve.config import ServeConfig
from rsna19.serve.logs import setup_json_logging
from rsna19.serve.spool import Spool

log = logging.getLogger("rsna19.serve.procs")

#: ``predict(predictor, spool, row) -> summary``: what a worker runs on one claimed study (a module-level
#: function, so that it can be sent to a spawned process).
PredictFn = Callable[..., dict[str, Any]]
#: ``load(cfg) -> bundle``: what a worker process holds in memory between studies.
LoadFn = Callable[[ServeConfig], Any]


class WorkerProcessError(RuntimeError):
    """The worker process could not start, died, or ran past the time limit (the message says which)."""


def describe_exit(code: int | None) -> str:
    """``-9`` → ``"killed by SIGKILL"``, ``1`` → ``"exit code 1"``, None → ``"still running"``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _die_with_parent(parent_pid: int) -> None:
    """Ask for SIGKILL when the node dies (Linux), and exit at once if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the closed pipe still ends the child after its study
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


def child_main(conn: Connection, cfg: ServeConfig, load: LoadFn, predict: PredictFn, index: int, parent: int) -> None:
    """The worker process: load the bundle, then answer ``("study", row)`` messages until told to stop."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the node decides

    setup_json_logging()
    t0 = time.perf_counter()
    try:
        predictor = load(cfg)
    except Exception as exc:  # noqa: BLE001 - reported to the node, which reports it on /health
        conn.send(("load_error", " ".join(str(exc).split()) or type(exc).__name__))
        return
    conn.send(("ready", {"pid": os.getpid(), "seconds": round(time.perf_counter() - t0, 3)}))
    spool = Spool(cfg.spool)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the node is gone
            return
        if msg[0] != "study":
            return
        try:
            answer: tuple[str, Any] = ("ok", predict(predictor, spool, msg[1]))
        except Exception as exc:  # noqa: BLE001 - one failed study is an answer, the process goes on
            log.debug("study failed", exc_info=True)
            answer = ("error", " ".join(str(exc).split()) or type(exc).__name__)
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return


class WorkerProcess:
    """One worker process, driven by one thread of the node.

    Args:
        index: the worker's number (log fields, process name).
        cfg: the node's configuration (sent to the child; ``torch_threads``, ``device``, ``cam`` apply there).
        load: ``load(cfg) -> bundle``, run once in the child (a module-level function).
        predict: ``predict(predictor, spool, row) -> summary``, run in the child for each study.
    """

    def __init__(self, index: int, cfg: ServeConfig, load: LoadFn, predict: PredictFn) -> None:
        self.index = index
        self.cfg = cfg
        self.load = load
        self.predict = predict
        self._ctx = mp.get_context("spawn")
        self.proc: Any = None
        self.conn: Connection | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Start the child and wait until it has loaded the bundle; returns ``{"pid", "seconds"}``.

        Raises:
            WorkerProcessError: the bundle failed to load, the child died, or it took longer than ``timeout_s``.
        """
        self.kill()
        parent_conn, child_conn = self._ctx.Pipe()
        self.proc = self._ctx.Process(
            target=child_main,
            args=(child_conn, self.cfg, self.load, self.predict, self.index, os.getpid()),
            name=f"rsna19-worker-{self.index}",
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if parent_conn.poll(0.2):
                try:
                    kind, value = parent_conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "ready":
                    return dict(value)
                self.kill()
                raise WorkerProcessError(f"the worker process could not load the bundle: {value}")
            if not self.proc.is_alive():
                break
        code = self._end()
        if code is None:
            raise WorkerProcessError(f"the worker process did not load the bundle within {timeout_s:g} s")
        raise WorkerProcessError(f"the worker process exited while loading the bundle ({describe_exit(code)})")

    def run(self, row: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Predict one study in the child; returns its summary.

        Raises:
            WorkerProcessError: the child died (the reason names the signal or exit code) or ran past ``timeout_s``
                (then it is killed); either way the process is gone and :meth:`start` must be called again.
            RuntimeError: the study failed with an ordinary error (the child goes on).
        """
        if self.conn is None or self.proc is None or not self.proc.is_alive():
            raise WorkerProcessError("the worker process is not running")
        try:
            self.conn.send(("study", row))
        except (BrokenPipeError, OSError):
            code = self._end()
            raise WorkerProcessError(f"the worker process died before the study ({describe_exit(code)})") from None
        t0 = time.monotonic()
        while True:
            waited = time.monotonic() - t0
            if timeout_s > 0 and waited >= timeout_s:
                self._end(kill=True)
                raise WorkerProcessError(
                    f"prediction timed out after {timeout_s:g} s (study_timeout_s); its worker process was killed"
                )
            step = 0.5 if timeout_s <= 0 else max(0.01, min(0.5, timeout_s - waited))
            if self.conn.poll(step):
                try:
                    kind, value = self.conn.recv()
                except (EOFError, OSError):
                    code = self._end()
                    raise WorkerProcessError(
                        f"the worker process died while predicting ({describe_exit(code)})"
                    ) from None
                if kind == "ok":
                    return dict(value)
                raise RuntimeError(str(value))
            if not self.proc.is_alive():
                code = self._end()
                raise WorkerProcessError(f"the worker process died while predicting ({describe_exit(code)})")

    def _end(self, kill: bool = False) -> int | None:
        """Forget the child (killed first with ``kill``, else reaped); returns its exit code."""
        proc, conn, self.proc, self.conn = self.proc, self.conn, None, None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        if kill and proc.is_alive():
            proc.kill()
        proc.join(5.0)
        return proc.exitcode

    def kill(self) -> None:
        """SIGKILL the child now (a run in progress is lost)."""
        self._end(kill=True)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the child to exit after its current study; SIGKILL after ``timeout_s``."""
        if self.conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(("stop",))
        if self.proc is not None:
            self.proc.join(timeout_s)
        self._end(kill=True)
