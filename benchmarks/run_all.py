"""Run every benchmark script several times and rewrite the generated tables of ``docs/benchmarks.md``.

Each script in ``benchmarks/`` accepts ``--quick`` (small sizes) and ``--json OUT`` (its rows, see ``_bench.py``).
This runner calls each one ``--repeats`` times in a fresh process, takes the median of every row over the runs and
writes, into ``docs/benchmarks.md``:

* between ``<!-- bench:header:start -->`` and ``<!-- bench:header:end -->``: the machine (CPU model, cores, RAM,
  GPU if any), the versions (Python, torch, numpy, pandas, pydicom, LightGBM), the date, the load average and the
  command;
* between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``: one table per benchmark with its goal and
  whether the runs met it.

Only the text between markers is replaced; the hand-written sections stay. Markers missing from the document are
appended in a "Generated tables" section at the end.

Usage::

    python benchmarks/run_all.py                 # full sizes, 3 runs each (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick         # seconds per script: proves every script runs
    python benchmarks/run_all.py --device cuda   # GPU parts (train step, predict-study) on the GPU
    python benchmarks/run_all.py --only index,convert --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Bench:
    """One benchmark script and how to call it.

    Attributes:
        name: marker name in the document.
        script: file in ``benchmarks/``.
        args: extra arguments of every run.
        device_arg: the script takes ``--device`` (passed through from ``run_all.py --device``).
        full_args: extra arguments of full (not ``--quick``) runs only.
        max_repeats: at most this many runs, whatever ``--repeats`` says (the demo takes minutes).
    """

    name: str
    script: str
    args: tuple[str, ...] = ()
    device_arg: bool = False
    full_args: tuple[str, ...] = ()
    max_repeats: int | None = None


BENCHES: tuple[Bench, ...] = (
    Bench("index", "index_speed.py"),
    Bench("convert", "convert_speed.py"),
    Bench("loader", "loader_speed.py"),
    Bench("cold_cache", "cold_cache_loader.py"),
    Bench("train", "train_throughput.py", device_arg=True, full_args=("--workers", "2")),
    Bench("stack", "stack_speed.py", full_args=("--stackers", "lgbm,mlp,convex", "--threads", "1")),
    Bench("predict_study", "predict_study_speed.py", device_arg=True),
    Bench("demo", "demo_speed.py", max_repeats=1),
    Bench("serve_load", "serve_load.py", max_repeats=1),
)


@dataclass
class Outcome:
    """What the runs of one benchmark gave."""

    bench: Bench
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    problem: str | None = None


def _versions() -> dict[str, str]:
    out = {"Python": platform.python_version()}
    for dist in ("torch", "numpy", "pandas", "pydicom", "lightgbm", "timm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a broken CUDA setup is reported as "none", the CPU tables still run
        pass
    return "none"


def machine_header(command: str) -> str:
    """The markdown block describing where and when the tables were measured."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    return "\n".join(
        [
            f"**Generated** {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by `{command}`",
            "",
            f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, {_ram_gib()} RAM, GPU: {_gpu()}; "
            f"{platform.system()} {platform.release()}",
            f"- versions: {versions}",
            f"- load average at the end: {load} (other jobs on the machine slow every number down)",
        ]
    )


def _script_supports_json(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    return "--json" in text or "add_common_arguments" in text


def run_bench(bench: Bench, repeats: int, quick: bool, device: str | None, tmp: Path, timeout: float) -> Outcome:
    """Run one script ``repeats`` times and collect its JSON rows."""
    out = Outcome(bench)
    path = HERE / bench.script
    if not path.is_file():
        out.problem = f"`benchmarks/{bench.script}` does not exist yet"
        return out
    if not _script_supports_json(path):
        out.problem = f"`benchmarks/{bench.script}` has no `--json` option yet"
        return out
    for i in range(min(repeats, bench.max_repeats or repeats)):
        target = tmp / f"{bench.name}-{i}.json"
        cmd = [sys.executable, str(path), "--json", str(target), *bench.args]
        cmd += ["--quick"] if quick else list(bench.full_args)
        if device and bench.device_arg:
            cmd += ["--device", device]
        print(f"[{bench.name} {i + 1}/{repeats}] {shlex.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            out.problem = f"run {i + 1} took more than {timeout:.0f} s"
            return out
        out.seconds.append(time.perf_counter() - t0)
        if proc.returncode != 0 or not target.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            out.problem = f"run {i + 1} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
            return out
        out.runs.append(json.loads(target.read_text(encoding="utf-8")))
    return out


def _fmt(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render_table(outcome: Outcome, quick: bool = False) -> str:
    """The markdown block of one benchmark: title, goal, a table of medians, and whether the goal was met."""
    bench = outcome.bench
    if outcome.problem and not outcome.runs:
        return f"_{bench.name}: not measured: {outcome.problem}._"
    first = outcome.runs[0]
    cases: dict[tuple[str, str], list[float]] = {}
    for run in outcome.runs:
        for row in run["rows"]:
            cases.setdefault((row["case"], row["unit"]), []).append(float(row["value"]))
    n = len(outcome.runs)
    lines = [f"**{first['title']}** (median of {n} run{'s' if n > 1 else ''})", ""]
    lines += ["| case | median | unit | min | max |", "|---|---:|---|---:|---:|"]
    for (case, unit), values in cases.items():
        lines.append(
            f"| {case} | {_fmt(statistics.median(values))} | {unit} | {_fmt(min(values))} | {_fmt(max(values))} |"
        )
    verdicts = [r.get("met") for r in outcome.runs]
    judged = [v for v in verdicts if v is not None]
    if quick:
        verdict = "not judged on `--quick` sizes"
    elif not judged:
        verdict = "not judged on this run (sizes too small or no goal threshold for this script)"
    else:
        hits = sum(bool(v) for v in judged)
        verdict = f"**{'met' if hits * 2 > len(judged) else 'not met'}** in {hits} of {len(judged)} runs"
    lines += ["", f"Goal: {first['goal']}. {verdict}."]
    if outcome.problem:
        lines.append(f"Warning: {outcome.problem}.")
    if first.get("params"):
        lines.append(f"Parameters: `{json.dumps(first['params'], sort_keys=True)}`.")
    return "\n".join(lines)


def replace_block(doc: str, name: str, body: str) -> str:
    """Put ``body`` between the markers of ``name`` in ``doc`` (appended at the end if the markers are missing)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(doc):
        return pattern.sub(lambda _m: block, doc, count=1)
    if "## Generated tables" not in doc:
        doc = doc.rstrip() + "\n\n## Generated tables\n\nWritten by `make bench` (`benchmarks/run_all.py`); "
        doc += "re-runs replace only the text between the `bench:` markers.\n"
    return doc.rstrip() + f"\n\n{block}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each: proves the scripts run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per script (default 3, 1 with --quick)")
    parser.add_argument(
        "--only", default="", help="comma-separated benchmark names: " + ",".join(b.name for b in BENCHES)
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="device of the model benchmarks")
    parser.add_argument("--doc", default=str(DOC), help="markdown file to update (default docs/benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave the document alone")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per script run before giving up")
    args = parser.parse_args(argv)

    repeats = args.repeats or (1 if args.quick else 3)
    wanted = {s for s in args.only.split(",") if s}
    unknown = wanted - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    benches = [b for b in BENCHES if not wanted or b.name in wanted]
    command = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="rsna19-bench-") as tmp:
        for bench in benches:
            outcome = run_bench(bench, repeats, args.quick, args.device, Path(tmp), args.timeout)
            if outcome.problem:
                print(f"[{bench.name}] {outcome.problem}", file=sys.stderr)
            outcomes.append(outcome)

    header = machine_header(command.strip())
    tables = {o.bench.name: render_table(o, args.quick) for o in outcomes}
    print("\n" + header + "\n")
    for name, table in tables.items():
        print(f"--- {name}\n{table}\n")
    if not args.no_write:
        doc_path = Path(args.doc)
        doc = doc_path.read_text(encoding="utf-8") if doc_path.is_file() else "# Benchmarks\n"
        doc = replace_block(doc, "header", header)
        for name, table in tables.items():
            doc = replace_block(doc, name, table)
        tmp_doc = doc_path.with_name(f".{doc_path.name}.tmp-{os.getpid()}")
        tmp_doc.write_text(doc, encoding="utf-8")
        os.replace(tmp_doc, doc_path)
        print(f"updated {doc_path}")
    failed = [o.bench.name for o in outcomes if o.problem and not o.runs]
    return 1 if failed and len(failed) == len(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
