"""Write outputs under a temporary name and rename them, so a killed stage never leaves a file that looks done.

The same place turns the operating system's "cannot write here" failures (disk full, quota, read-only file system,
permission denied, a file where a folder should be) into an :class:`OutputError`: one line naming the output and
the reason, with the temporary removed, for every stage alike. :func:`ensure_writable_dir` checks an output
folder up front, so a long stage fails in its first second rather than after hours of work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from rsna19.core.errors import UserError

#: errno values that say "the output cannot be written here" and the words used for them.
_WRITE_FAILURES: dict[int, str] = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
}


class OutputError(UserError):
    """An output cannot be written: disk full, read-only, no permission, or a file in the way."""


def output_error(exc: OSError, target: str | os.PathLike[str]) -> OutputError | None:
    """The :class:`OutputError` for a failed write of ``target``, or None where ``exc`` is not such a failure.

    Args:
        exc: what the write raised.
        target: the output being written (named in the message instead of its temporary).
    """
    reason = _WRITE_FAILURES.get(exc.errno or 0)
    if reason is None:
        return None
    return OutputError(f"cannot write {os.fspath(target)}: {reason}")


def ensure_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (with its parents) if needed and check that files can be created in it.

    Called by stages before any work. ``os.access`` answers for the effective user (root passes mode bits but
    not a read-only mount).

    Raises:
        OutputError: the folder cannot be created (a file in the way, no permission, read-only) or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot use output folder {folder}: it exists and is not a folder") from None
    except OSError as exc:
        err = output_error(exc, folder)
        raise (
            OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") if err is None else err
        ) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in output folder {folder}: permission denied or read-only")
    return folder


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    Works for files and directories. On error the temporary is removed and ``target`` is untouched.

    Args:
        target: final path of the file or directory.

    Raises:
        OutputError: the folder of ``target`` cannot be created or written, or writing failed for lack of space,
            quota or permission (raised by the body or by the rename); other errors pass through unchanged.
    """
    target = Path(target)
    ensure_writable_dir(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{next(tempfile._get_candidate_names())}")
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            # A directory cannot be renamed onto a non-empty one: swap through a second name.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        err = output_error(exc, target)
        if err is None:
            raise
        raise err from exc
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the writer of a temporary may still be at work)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike[str]) -> int:
    """Remove the temporaries of ``target`` left by :func:`atomic_path` in processes that were killed.

    A SIGKILL skips the clean-up of ``atomic_path``; the ``.<name>.tmp-<pid>-*`` (and ``.<name>.old-<pid>``) left
    behind are removed here when their writer is gone. Temporaries of live processes (a concurrent writer) stay.

    Args:
        target: the output whose temporaries are looked for (in its folder).

    Returns:
        how many were removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return 0
    removed = 0
    for kind in ("tmp", "old"):
        for p in target.parent.glob(f".{target.name}.{kind}-*"):
            pid_text = p.name[len(f".{target.name}.{kind}-") :].split("-", 1)[0]
            pid = int(pid_text) if pid_text.isdigit() else -1
            if pid > 0 and pid_alive(pid):  # a live writer (this process included)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


def write_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` to ``path`` atomically (pyarrow engine, no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow")
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` to ``path`` atomically as csv without the index."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
