"""Load test of ``rsna19 serve`` behind a real PACS: Orthanc pushes synthetic head-CT studies, the node answers.

Everything runs on this machine, on loopback ports: an Orthanc (Debian package ``orthanc``; ``make test-pacs``
installs it) with the node declared as its modality ``rsna19``, and ``rsna19 serve --device cpu`` with Orthanc as
its destination. One synthetic study (``--slices`` 5 mm slices of ``--size``² pixels, with hemorrhages) is rendered
once and copied under new UIDs, so every study costs the same; all of them are uploaded to Orthanc before the clock
starts, then sent to the node with ``POST /modalities/rsna19/store`` (a C-STORE association per send, as a PACS
routing rule does). A warm-up study is answered first (bundle loading is not timed).

* **steady**: one study every ``--interval`` s (default 60) for ``--minutes`` (default 10) minutes.
* **burst**: ``--studies`` (default 30) studies pushed by ``--senders`` (default 3) concurrent senders.

Latency of a study = the time its SR is first seen in Orthanc (its change feed polled every 0.25 s) minus
the node's ``received_s`` (its last instance received): the quiet period (``--quiet-seconds``, the node's default
10 s) is part of it. Checked at the end of each phase: every study has exactly one SR and one SC in Orthanc (nothing
lost, answered once), every study is ``sent`` in the node, and the node's queue is empty.

Goal: steady p95 < 60 s on two cores; burst: nothing lost, no study answered twice, the queue drains.

Usage: python benchmarks/serve_load.py [--bundle B | --work demo_out] [--minutes 10] [--interval 60]
       [--studies 30] [--senders 3] [--size 512] [--slices 40] [--workers 1] [--threads 2] [--quiet-seconds 10]
       [--phases steady,burst] [--keep DIR] [--quick] [--json OUT]
Short smoke run: python benchmarks/serve_load.py --bundle B --minutes 2 --studies 6
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc and node harness of `make test-pacs`
from _bench import add_common_arguments, apply_quick, write_json  # noqa: E402
from pacs.node import Node, write_study  # noqa: E402
from pacs.orthanc import Orthanc, find_orthanc  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.1226.99"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def upload_clone(pacs: Orthanc, template: list[Path], study_uid: str) -> str:
    """Upload a copy of the template series to Orthanc under new study, series and SOP instance UIDs (built in
    memory: no files written); returns Orthanc's study ID."""
    from io import BytesIO

    import pydicom

    for k, src in enumerate(sorted(template)):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = f"{study_uid}.1"
        ds.SOPInstanceUID = f"{study_uid}.1.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"LOAD{study_uid.rsplit('.', 1)[-1]}"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        pacs.post("/instances", buf.getvalue())
    sid = pacs.study_id(study_uid)
    if sid is None:
        raise RuntimeError(f"Orthanc does not list study {study_uid} after the upload")
    return sid


class Watcher:
    """Follows Orthanc's change feed (``GET /changes``) and records when each study's first SR series appears."""

    def __init__(self, pacs: Orthanc, interval: float = 0.25) -> None:
        self.pacs = pacs
        self.interval = interval
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.since = int(pacs.get("/changes?last")["Last"])
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                feed = self.pacs.get(f"/changes?since={self.since}&limit=500")
                for change in feed["Changes"]:
                    if change["ChangeType"] != "NewSeries":
                        continue
                    series = self.pacs.get(f"/series/{change['ID']}")
                    if series["MainDicomTags"].get("Modality") != "SR":
                        continue
                    study = self.pacs.get(f"/studies/{series['ParentStudy']}")
                    with self.lock:
                        self.seen.setdefault(str(study["MainDicomTags"]["StudyInstanceUID"]), time.time())
                self.since = int(feed["Last"])
                if not feed["Done"]:
                    continue
            except OSError:
                pass  # Orthanc busy: next round
            self.stop_event.wait(self.interval)

    def wait(self, uids: list[str], timeout: float) -> list[str]:
        """Wait until every study's SR was seen; returns the ones still missing after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                missing = [u for u in uids if u not in self.seen]
            if not missing:
                return []
            time.sleep(0.5)
        return missing

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def check_answers(pacs: Orthanc, node: Node, uids: list[str]) -> dict[str, Any]:
    """Count SRs and SCs per study in Orthanc and the studies not ``sent`` in the node."""
    rows = {s["study_uid"]: s for s in node.studies()}
    lost, twice, not_sent = [], [], []
    for uid in uids:
        by_mod = pacs.instances_by_modality(uid)
        srs = [t for t in by_mod.get("SR", []) if t.get("SOPClassUID") == SR_CLASS]
        scs = [t for tags in by_mod.values() for t in tags if t.get("SOPClassUID") == SC_CLASS]
        if not srs or not scs:
            lost.append(uid)
        if len(srs) > 1 or len(scs) > 1:
            twice.append(uid)
        if rows.get(uid, {}).get("status") != "sent":
            not_sent.append(uid)
    return {"lost": lost, "twice": twice, "not_sent": not_sent, "rows": rows}


def latencies(watcher: Watcher, rows: dict[str, dict], uids: list[str]) -> list[float]:
    """SR seen in Orthanc − last instance received by the node, per answered study."""
    out = []
    for uid in uids:
        received = (rows.get(uid) or {}).get("received_s")
        if uid in watcher.seen and received is not None:
            out.append(watcher.seen[uid] - float(received))
    return out


def push(pacs: Orthanc, sids: list[str]) -> None:
    """Send studies to the node one C-STORE association each, in order."""
    for sid in sids:
        pacs.store("rsna19", [sid])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle folder (default: WORK/bundle, else a tiny run made on the spot)")
    parser.add_argument("--work", default="demo_out", help="a finished `rsna19 demo` / `rsna19 run` folder")
    parser.add_argument("--minutes", type=float, default=10.0, help="steady phase length")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between studies in the steady phase")
    parser.add_argument("--studies", type=int, default=30, help="studies of the burst phase")
    parser.add_argument("--senders", type=int, default=3, help="concurrent senders of the burst phase")
    parser.add_argument("--size", type=int, default=512, help="pixels per side of each slice")
    parser.add_argument("--slices", type=int, default=40, help="5 mm slices per study")
    parser.add_argument("--workers", type=int, default=1, help="the node's --workers (worker processes)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each worker of the node")
    parser.add_argument("--quiet-seconds", type=float, default=10.0, help="the node's --quiet-seconds")
    parser.add_argument("--phases", default="steady,burst", help="comma-separated: steady, burst")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the answers of a phase")
    parser.add_argument("--keep", help="keep the spool, Orthanc storage and logs in this folder")
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_quick(args, minutes=0.5, interval=10.0, studies=3, size=128, slices=8, quiet_seconds=2.0)
    phases = [p for p in args.phases.split(",") if p]
    if set(phases) - {"steady", "burst"}:
        parser.error(f"unknown phase in --phases {args.phases}")
    if find_orthanc() is None:
        sys.exit("serve_load: Orthanc is not installed (apt-get install -y orthanc, or `make test-pacs` once)")

    scratch_ctx = tempfile.TemporaryDirectory(prefix="rsna19-serve-load-")
    scratch = Path(args.keep) if args.keep else Path(scratch_ctx.name)
    scratch.mkdir(parents=True, exist_ok=True)
    from predict_study_speed import find_bundle

    bundle = find_bundle(args, scratch)
    n_steady = max(1, int(args.minutes * 60 / args.interval)) if "steady" in phases else 0
    n_burst = args.studies if "burst" in phases else 0
    t0 = time.perf_counter()
    template = write_study(scratch / "template", f"{UID_ROOT}.0", seed=5, size=args.size, slices=args.slices)
    uids = [f"{UID_ROOT}.{i + 1}" for i in range(1 + n_steady + n_burst)]  # [warm-up, steady..., burst...]

    pacs = Orthanc(scratch / "orthanc").start()
    node = Node(
        scratch / "spool",
        bundle,
        destinations=[f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"],
        quiet_seconds=args.quiet_seconds,
        extra=["--workers", str(args.workers)],
        threads=args.threads,
    )
    rows_out: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    watcher = None
    try:
        node.start(timeout=300)
        pacs.add_modality("rsna19", node.ae_title, "127.0.0.1", node.dicom_port)
        sids = [upload_clone(pacs, template, uid) for uid in uids]
        print(f"{len(uids)} studies of {args.slices} × {args.size}² in Orthanc after {time.perf_counter() - t0:.1f} s")
        watcher = Watcher(pacs)
        # Warm-up: the workers load the bundle and run once.
        push(pacs, sids[:1])
        if watcher.wait(uids[:1], args.timeout):
            raise SystemExit(f"serve_load: the warm-up study was not answered; node log:\n{node.log_tail()}")

        if n_steady:
            steady_uids, steady_sids = uids[1 : 1 + n_steady], sids[1 : 1 + n_steady]
            start = time.monotonic()
            for i, sid in enumerate(steady_sids):
                time.sleep(max(0.0, start + i * args.interval - time.monotonic()))
                push(pacs, [sid])
                print(f"steady: sent {i + 1}/{n_steady}", flush=True)
            missing = watcher.wait(steady_uids, args.timeout)
            time.sleep(1.0)  # let the node record `sent` after the SR arrived
            check = check_answers(pacs, node, steady_uids)
            lat = latencies(watcher, check["rows"], steady_uids)
            report["steady"] = {
                "n": n_steady,
                "p50": percentile(lat, 0.5),
                "p95": percentile(lat, 0.95),
                "max": max(lat, default=float("nan")),
                "missing": missing,
                **{k: check[k] for k in ("lost", "twice", "not_sent")},
            }

        if n_burst:
            burst_uids, burst_sids = uids[1 + n_steady :], sids[1 + n_steady :]
            shares = [burst_sids[k :: args.senders] for k in range(args.senders)]
            threads = [threading.Thread(target=push, args=(pacs, share)) for share in shares]
            t_start = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_pushed = time.time()
            missing = watcher.wait(burst_uids, args.timeout)
            time.sleep(1.0)
            check = check_answers(pacs, node, burst_uids)
            lat = latencies(watcher, check["rows"], burst_uids)
            t_end = max((watcher.seen[u] for u in burst_uids if u in watcher.seen), default=time.time())
            queue = node.health().get("queue")
            report["burst"] = {
                "n": n_burst,
                "senders": args.senders,
                "push_s": t_pushed - t_start,
                "per_min": len([u for u in burst_uids if u in watcher.seen]) / max(t_end - t_start, 1e-9) * 60,
                "p50": percentile(lat, 0.5),
                "p95": percentile(lat, 0.95),
                "max": max(lat, default=float("nan")),
                "queue_after": queue,
                "missing": missing,
                **{k: check[k] for k in ("lost", "twice", "not_sent")},
            }
    finally:
        if watcher is not None:
            watcher.close()
        node.stop()
        pacs.stop()
        if args.keep:
            print(f"kept {scratch} (node log {node.log_path.name}, orthanc/orthanc.log)")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; python "
        f"{platform.python_version()}; node: {args.workers} worker process(es), {args.threads} thread(s) each, "
        f"cpu, quiet {args.quiet_seconds:g} s; studies {args.slices} × {args.size}²; bundle {bundle}"
    )
    print("| phase | studies | rate | p50 s | p95 s | max s | lost | answered twice | not sent | queue after |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    met: bool | None = True
    if "steady" in report:
        s = report["steady"]
        print(
            f"| steady | {s['n']} | 1 per {args.interval:g} s | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']:.1f} "
            f"| {len(s['lost'])} | {len(s['twice'])} | {len(s['not_sent'])} | – |"
        )
        rows_out += [
            {"case": f"steady p50 (1 study / {args.interval:g} s)", "value": s["p50"], "unit": "s"},
            {"case": f"steady p95 (1 study / {args.interval:g} s)", "value": s["p95"], "unit": "s"},
        ]
        met = met and s["p95"] < 60.0 and not (s["lost"] or s["twice"] or s["not_sent"])
    if "burst" in report:
        b = report["burst"]
        print(
            f"| burst | {b['n']} | {b['senders']} senders, {b['per_min']:.2f} studies/min | {b['p50']:.1f} | "
            f"{b['p95']:.1f} | {b['max']:.1f} | {len(b['lost'])} | {len(b['twice'])} | {len(b['not_sent'])} | "
            f"{b['queue_after']} |"
        )
        rows_out += [
            {"case": f"burst {b['n']} studies, {b['senders']} senders", "value": b["per_min"], "unit": "studies/min"},
            {"case": "burst p50", "value": b["p50"], "unit": "s"},
            {"case": "burst p95", "value": b["p95"], "unit": "s"},
            {"case": "burst lost or answered twice", "value": len(b["lost"]) + len(b["twice"]), "unit": "studies"},
        ]
        met = met and not (b["lost"] or b["twice"] or b["not_sent"]) and b["queue_after"] == 0
    short = n_steady < 10 or (n_burst and n_burst < 30)
    write_json(
        args,
        "serve_load",
        f"rsna19 serve behind Orthanc: steady 1 study / {args.interval:g} s × {n_steady}, burst {n_burst} studies "
        f"× {args.senders} senders; {args.slices} × {args.size}² slices; {args.workers} worker process(es), "
        f"{args.threads} thread(s), cpu",
        "steady p95 < 60 s (last instance received → SR in the PACS) on 2 cores; burst: none lost or answered "
        "twice, the queue drains",
        rows_out,
        None if (args.quick or short) else bool(met),
        {"bundle": str(bundle), "quiet_seconds": args.quiet_seconds, "minutes": args.minutes, "studies": n_burst},
    )
    failures = [
        f"{phase}: {key} {report[phase][key]}"
        for phase in report
        for key in ("lost", "twice", "not_sent", "missing")
        if report[phase][key]
    ]
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
