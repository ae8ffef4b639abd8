"""Fault tolerance: SIGKILL at random points and re-run; disk full; outputs that cannot be written.

* kill -9: each stage runs as a real ``rsna19`` subprocess that is killed at seeded random points (after a seeded
  amount of progress plus a seeded delay), re-run until it finishes, and its outputs are compared with those of an
  uninterrupted run: byte-identical for ``convert`` and ``stack``, an equal parquet for ``predict``. Training's
  kill/resume is tested in tests/test_train.py (``test_resume_after_sigkill_matches_uninterrupted``).
* disk full: ``OSError(ENOSPC)`` raised by the write itself (the OS boundary) inside :func:`atomic_path`, and a
  real failing write in a subprocess whose file size limit (``RLIMIT_FSIZE``) is too small for the outputs.
* unwritable output: an output path below a regular file (works as root too), and a mode 0o555 folder (skipped as
  root, who may write there anyway).
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from predfactory import make_work_dir

from rsna19.cli import main
from rsna19.conversion.run import run_convert
from rsna19.core.atomic import OutputError, atomic_path, ensure_writable_dir, write_csv
from rsna19.core.errors import UserError
from rsna19.io.index import build_index
from rsna19.synth import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
STACK_TINY = ROOT / "configs" / "stack" / "tiny.yaml"
TRAIN_TINY = ROOT / "configs" / "tiny" / "clf2dc_5c.yaml"
#: The longest a single stage subprocess may take here (a hang is a failure, not a stuck CI job).
STAGE_TIMEOUT_S = 180.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rsna19.cli", *args]


def _env() -> dict[str, str]:
    # One thread per library: the machine is shared and the results must not depend on the thread count.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


class _Forked:
    """A forked child running ``rsna19.cli.main(argv)``, with the ``Popen`` methods :func:`run_killed` uses.

    Forking skips the interpreter start and imports (seconds on a busy machine) of a fresh subprocess; used for the
    stages that import no torch (a process that used OpenMP threads must not fork).
    """

    def __init__(self, argv: list[str], preexec: Callable[[], None] | None = None) -> None:
        self.stderr = None
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns into pytest
            code = 70
            try:
                if preexec is not None:
                    preexec()
                code = main(argv)
            finally:
                sys.stderr.flush()
                os._exit(code)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_killed(cmd: list[str], ready: Callable[[], bool], delay_s: float, fork: bool = False) -> int | None:
    """Start ``cmd`` (an ``rsna19`` command line; with ``fork`` the arguments of ``main`` in a forked child), wait
    until ``ready()`` (polled) and then ``delay_s`` more, and SIGKILL it.

    Returns:
        None if it was killed, or its exit code if it ended first.
    """
    if fork:
        proc: subprocess.Popen | _Forked = _Forked(cmd)
    else:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    try:
        while proc.poll() is None and not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd} hung")
            time.sleep(0.002)
        end = time.monotonic() + delay_s
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def kill_at(
    cmd: list[str], delay_s: float, ready: Callable[[], bool] = lambda: True, fork: bool = False, tries: int = 5
) -> float:
    """:func:`run_killed` until the SIGKILL lands; each time the run ends first (it must end with 0), the delay
    halves. A test of resuming after a kill that was never sent tests nothing, so this fails then.

    Returns:
        The delay after ``ready()`` at which the run was killed.
    """
    for _ in range(tries):
        code = run_killed(cmd, ready, delay_s, fork)
        if code is None:
            return delay_s
        assert code == 0, f"{cmd} failed (exit {code}) before it could be killed"
        delay_s /= 2
    raise AssertionError(f"{cmd} was never killed: it finished first {tries} times (last delay {delay_s:.3f} s)")


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)


def tree_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every regular file below ``folder`` by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def leftovers(folder: Path) -> list[str]:
    """Temporaries (``.tmp-*``, ``.<name>.tmp-*``, ``.<name>.old-*``) anywhere below ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------------------------
# kill -9


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """The tiny synthetic dataset and its index (``index.parquet``)."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    generate_dataset(data, preset="tiny", seed=1, workers=1, progress=False)
    index = root / "index.parquet"
    build_index([data / "stage_2_train", data / "stage_2_test"], data / "stage_2_train.csv", index, progress=False)
    return index


def test_convert_killed_at_random_points_resumes_byte_identical(indexed, tmp_path):
    ref = tmp_path / "ref"
    run_convert(indexed, ref, workers=1, progress=False)
    n_series = sum(1 for p in ref.iterdir() if p.is_dir())
    assert n_series >= 6

    rng = random.Random(8)
    cache = tmp_path / "killed"
    argv = ["convert", str(indexed), "--out", str(cache), "--workers", "1", "--no-progress"]

    def series_dirs() -> int:
        return sum(1 for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else 0

    # Kill points: after more and more series are in flight (the last series never: it could finish first).
    for k in sorted(rng.sample(range(n_series - 1), 2)):
        kill_at(argv, rng.uniform(0.0, 0.03), ready=lambda k=k: series_dirs() > k, fork=True)
    done = run_to_end(_cli(*argv))  # the last run is a real CLI process
    assert done.returncode == 0, done.stderr
    assert leftovers(cache) == []
    assert tree_bytes(cache) == tree_bytes(ref)


def test_stack_killed_at_random_points_resumes_byte_identical(tmp_path):
    work = make_work_dir(tmp_path / "work", n_patients=16, n_test_patients=4, n_folds=4)
    args = [
        "stack",
        str(STACK_TINY),
        f"models=[{','.join(work.models)}]",
        "--runs",
        str(work.runs),
        "--folds",
        str(work.folds_csv),
    ]
    out = tmp_path / "stack"  # the same path for both runs: config.yaml records it
    t0 = time.monotonic()
    ref = run_to_end(_cli(*args, "--out", str(out)))
    assert ref.returncode == 0, ref.stderr
    duration = time.monotonic() - t0
    expected = tree_bytes(out, skip=("timings.json",))
    final = out / STACK_TINY.stem  # the stack's own folder, renamed into place when complete
    complete = tree_bytes(final, skip=("timings.json",))
    shutil.rmtree(out)

    rng = random.Random(19)
    # Time points spread over the whole run (imports, features, level-2 CV, writing); the output folder appears
    # by one rename, so whatever the point, a killed run leaves either nothing or a complete result.
    for frac in sorted(rng.uniform(0.1, 0.98) for _ in range(2)):
        kill_at(_cli(*args, "--out", str(out)), frac * duration)
        assert not final.exists() or tree_bytes(final, skip=("timings.json",)) == complete  # nothing or all of it
    done = run_to_end(_cli(*args, "--out", str(out)))
    assert done.returncode == 0, done.stderr
    assert leftovers(out) == []
    # timings.json holds wall times, the one output that may differ.
    assert tree_bytes(out, skip=("timings.json",)) == expected


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A clf2dc_5c run trained one short epoch on fold 0 of a small fake cache."""
    import torch
    from cachefactory import write_cache_and_folds

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults_pred")
    cache, folds = write_cache_and_folds(root, n_folds=2, n_patients=4, n_test_patients=2, size=32)
    args = ["train", str(TRAIN_TINY), "--fold", "0", "--cache", str(cache), "--folds", str(folds)]
    assert main([*args, "--runs", str(root / "runs"), "train.epochs=1", "data.samples_per_epoch=8"]) == 0
    return cache, root / "runs" / "clf2dc_5c"


def test_predict_killed_then_rerun_gives_equal_parquet(trained_run, tmp_path):
    _, run = trained_run
    args = ["predict", str(run), "--fold", "0", "--split", "oof", "--tta", "none", "hflip", "--device", "cpu"]
    ref = tmp_path / "ref.parquet"
    assert main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "killed" / "oof.parquet"
    rng = random.Random(3)
    for delay in sorted(rng.uniform(0.2, 6.0) for _ in range(2)):
        kill_at(_cli(*args, "--out", str(out)), delay)
        assert not out.exists() or pd.read_parquet(out).equals(pd.read_parquet(ref))  # never a partial file
    done = run_to_end(_cli(*args, "--out", str(out)))
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(ref), check_exact=True)


# ----------------------------------------------------------------------------------------------------------------
# Disk full


def test_enospc_in_a_write_is_a_clear_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "table.csv"
    target.parent.mkdir()
    target.write_text("old complete output\n")
    full = pytest.raises(OutputError, match=rf"cannot write {target}: no space left on the device")
    with full as info, atomic_path(target) as tmp:
        tmp.write_text("half a tab")
        # What write(2) returns on a full disk, raised where the write happens.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert isinstance(info.value, UserError) and info.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]  # no temporary left
    assert target.read_text() == "old complete output\n"  # the previous output is untouched


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_other_write_failures_name_the_target(tmp_path, code):
    target = tmp_path / "x.parquet"
    with pytest.raises(OutputError, match=f"cannot write {target}: "), atomic_path(target):
        raise OSError(code, os.strerror(code))
    assert list(tmp_path.iterdir()) == []


def test_unrelated_oserror_passes_through(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x.csv"):
        raise FileNotFoundError(errno.ENOENT, "an input is missing")


def _small_file_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        # Writes past the limit then fail with EFBIG (the signal that would kill the process is ignored), the
        # same path through the code as a disk that fills up.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run_with_file_limit(argv: list[str], limit: int) -> tuple[int, str]:
    """Run ``rsna19 ARGV`` in a forked child whose files may not grow past ``limit`` bytes; (exit code, stderr)."""
    read_end, write_end = os.pipe()

    def preexec() -> None:
        sys.stderr = open(write_end, "w", closefd=False)  # noqa: SIM115 - the child's stderr goes to the pipe
        _small_file_limit(limit)()

    child = _Forked(argv, preexec)
    os.close(write_end)
    with os.fdopen(read_end, "r") as err:
        text = err.read()
    return child.wait(), text


def test_convert_with_no_room_for_outputs_fails_clearly_without_partial_series(indexed, tmp_path):
    cache = tmp_path / "cache"
    # 4 KiB: the cache folder is created, but a 64² volume.npy of a few slices does not fit.
    code, stderr = _run_with_file_limit(["convert", str(indexed), "--out", str(cache), "--no-progress"], 4096)
    assert code == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert "cannot write" in last and str(cache) in last and "file too large" in last, last
    assert "Traceback" not in stderr
    assert [p.name for p in cache.iterdir()] == []  # no series folder, no temporary


def test_index_with_no_room_for_outputs_fails_clearly(indexed, tmp_path):
    data = indexed.parent / "data"
    out = tmp_path / "idx" / "index.parquet"
    argv = ["index", str(data / "stage_2_train"), "--out", str(out), "--workers", "1", "--no-progress"]
    code, stderr = _run_with_file_limit(argv, 1024)
    assert code == 1, stderr
    assert f"cannot write {out}" in stderr and "Traceback" not in stderr
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Unwritable output folders


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: any output path below it cannot be created, whoever runs the test (root included)."""
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


def test_ensure_writable_dir(tmp_path, blocker):
    assert ensure_writable_dir(tmp_path / "new" / "deep").is_dir()
    with pytest.raises(OutputError, match="it exists and is not a folder"):
        ensure_writable_dir(blocker)
    with pytest.raises(OutputError, match=f"{blocker / 'sub'}"):
        ensure_writable_dir(blocker / "sub")
    with pytest.raises(OutputError, match="a path component is a file"):
        write_csv(pd.DataFrame({"a": [1]}), blocker / "sub" / "x.csv")


def test_stages_refuse_an_output_below_a_file_before_working(indexed, blocker, tmp_path):
    data = indexed.parent / "data"
    with pytest.raises(OutputError, match="cannot create output folder|a path component is a file"):
        build_index([data / "stage_2_test"], out=blocker / "idx" / "index.parquet", progress=False)
    with pytest.raises(OutputError):
        run_convert(indexed, blocker / "cache", progress=False)
    # Through the CLI: exit code 1 and one line, no traceback.
    assert main(["convert", str(indexed), "--out", str(blocker / "cache"), "--no-progress"]) == 1
    work = make_work_dir(tmp_path / "work", n_patients=8, n_test_patients=2, n_folds=2)
    args = ["stack", str(STACK_TINY), f"models=[{','.join(work.models)}]", "--runs", str(work.runs)]
    t0 = time.monotonic()
    assert main([*args, "--folds", str(work.folds_csv), "--out", str(blocker / "stack")]) == 1
    assert time.monotonic() - t0 < 10, "the stack stage should fail before fitting anything"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into mode 0o555 folders; covered by the file-parent test")
def test_read_only_folder_is_a_clear_error(indexed, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied|cannot write in output folder"):
            run_convert(indexed, ro, progress=False)
        with pytest.raises(OutputError):
            write_csv(pd.DataFrame({"a": [1]}), ro / "x.csv")
    finally:
        ro.chmod(0o755)
