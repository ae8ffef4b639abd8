"""Every stage at RSNA 2019 size: wall time, peak RSS, disk and how the cost grows with the data (the exponent).

Makes inputs at a fraction (``--size``: 0.01, 0.1, 1.0) of the stage-2 data (752,803 training and 121,232 test
slices, about 35 slices a series, 1.27 series a patient, labels in contiguous runs per series):

* ``index``: DICOM files with the RSNA headers (:func:`rsna19.io.dicom_write.write_ct_dicom`) and 8² pixel data,
  flat ``stage_2_train/`` and ``stage_2_test/``, and ``stage_2_train.csv``; timed: ``build_index`` (``--workers``);
* ``folds``: the index table of the same slices (the columns ``make_folds`` reads); timed: ``write_folds``;
* ``stack``: ``runs/<model>/fold_k/{oof,test}.parquet`` of 9 models × 5 folds and ``folds.csv``; timed: the stack
  as the split jobs do it: ``--part features``, the convex fits, ``--part finish`` (convex + blend), each its own
  process; ``stack-lgbm`` / ``stack-mlp``: one level-2 fit job (fold 0) of LightGBM / the MLP with
  configs/stack/rsna2019.yaml (the whole stacker is 5 such jobs);
* ``seq``: the sequence model's inputs, ``embeddings_oof.npy`` (N × 512 float32, resnet34's width) and its
  parquet; timed: :func:`rsna19.data.embeddings.read_embeddings` (memory-mapped) + ``SequenceDataset`` + every
  series collated in batches of 32, as an epoch of the sequence model reads them;
* ``submit``: the stack's test predictions; timed: ``write_submission`` (validated Kaggle csv).

Each measured step runs in a fresh process (the inputs are made by another one), so its peak RSS
(``ru_maxrss`` of the process and of its children) is its own. ``--size`` may list several fractions; the exponent
between two sizes is ``log(t2 / t1) / log(n2 / n1)`` (1: linear). Inputs are kept under ``--dir`` and reused.

Usage::

    python benchmarks/scale.py --size 0.01 0.1 --stage index folds stack seq submit
    python benchmarks/scale.py --size 1.0 --stage stack          # the full-size stack (convex + blend)
    python benchmarks/scale.py --size 0.01 0.1 --stage stack-lgbm stack-mlp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import write_json  # noqa: E402

TRAIN_SLICES, TEST_SLICES = 752_803, 121_232
SLICES_PER_SERIES, SERIES_PER_PATIENT = 35, 1.27
MODELS, FOLDS, EMBED_DIM = 9, 5, 512
CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
SUBTYPE_RATE = (0.02, 0.12, 0.09, 0.12, 0.15)  # per series; RSNA's slice rates are about a third of these
STAGES = ("index", "folds", "stack", "stack-lgbm", "stack-mlp", "seq", "submit")
SPACING = (0.49, 0.49)
STACK_CFG = ROOT / "configs" / "stack" / "rsna2019.yaml"


# ------------------------------------------------------------------------------------------------ the slices
def slices(frac: float, seed: int = 0) -> pd.DataFrame:
    """One row a slice at ``frac`` of RSNA size: keys, split, labels (contiguous runs per series)."""
    rng = np.random.default_rng(seed)
    parts = []
    for split, total in (("train", TRAIN_SLICES), ("test", TEST_SLICES)):
        n_target = max(SLICES_PER_SERIES * 2, int(round(total * frac)))
        lengths = rng.integers(28, 43, size=n_target // SLICES_PER_SERIES + 2)
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_target) + 1]
        n_series = len(lengths)
        series = np.repeat(np.arange(n_series), lengths)
        n = len(series)
        patient_of_series = (np.arange(n_series) / SERIES_PER_PATIENT).astype(np.int64)
        tag = "t" if split == "test" else "r"
        frame = pd.DataFrame(
            {
                "sop_uid": [f"ID_{tag}{i:09x}" for i in range(n)],
                "series_uid": [f"ID_{tag}s{s:08x}" for s in series],
                "study_uid": [f"ID_{tag}t{s:08x}" for s in series],
                "patient_id": [f"ID_{tag}p{p:08x}" for p in patient_of_series[series]],
                "slice_idx": np.concatenate([np.arange(k) for k in lengths]),
                "split": split,
            }
        )
        labels = np.zeros((n, 6), dtype=np.float32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for c, rate in enumerate(SUBTYPE_RATE):
            hit = np.flatnonzero(rng.random(n_series) < rate)
            run = rng.integers(2, 12, size=len(hit))
            first = starts[hit] + (rng.random(len(hit)) * (lengths[hit] - run)).astype(np.int64)
            for a, r in zip(first, run):
                labels[a : a + r, c] = 1
        labels[:, 5] = labels[:, :5].max(axis=1)
        frame[list(CLASSES)] = labels
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def folds_of(train: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    patients = train["patient_id"].unique()
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"patient_id": patients, "fold": rng.permutation(np.arange(len(patients)) % FOLDS)})


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ inputs
#: Placeholders of a template file, as long as the values that replace them (``slices``' identifiers, a 5-character
#: slice position, a 4-character instance number), so every copy keeps the template's element lengths.
PLACEHOLDERS = {"sop": "ID_XSOPXXXXXX", "series": "ID_XSERXXXXXX", "study": "ID_XSTUXXXXXX", "patient": "ID_XPATXXXXXX"}
Z_PLACEHOLDER, INSTANCE_PLACEHOLDER = 777.5, 7777


def template_bytes(path: Path) -> bytes:
    """One RSNA-style CT file (:func:`rsna19.io.dicom_write.write_ct_dicom`, 8² pixels) with placeholder values."""
    from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom

    warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)  # Kaggle-style "ID_…" UIDs
    write_ct_dicom(
        path,
        np.zeros((8, 8)),
        SliceGeometry(ipp=(-125.0, -125.0, Z_PLACEHOLDER), iop=(1, 0, 0, 0, 1, 0), pixel_spacing=SPACING),
        sop_uid=PLACEHOLDERS["sop"],
        series_uid=PLACEHOLDERS["series"],
        study_uid=PLACEHOLDERS["study"],
        patient_id=PLACEHOLDERS["patient"],
        instance_number=INSTANCE_PLACEHOLDER,
        variant=StorageVariant(),
        extra={"WindowCenter": [36.0, 36.0], "WindowWidth": [80.0, 80.0]},
    )
    data = path.read_bytes()
    path.unlink()
    for text in [*PLACEHOLDERS.values(), str(Z_PLACEHOLDER), str(INSTANCE_PLACEHOLDER)]:
        if data.count(text.encode()) < 1:
            raise RuntimeError(f"placeholder {text} not found in the template")
    return data


def make_index_inputs(root: Path, frac: float) -> None:
    """Every slice as a DICOM file: a pydicom-written template whose identifiers, position and instance number are
    replaced byte for byte (pydicom writing each file is ~100x slower, and the index reads the same headers)."""
    df = slices(frac)
    template = template_bytes(root / "template.dcm")
    z_ph, in_ph = str(Z_PLACEHOLDER).encode(), str(INSTANCE_PLACEHOLDER).encode()
    ph = {k: v.encode() for k, v in PLACEHOLDERS.items()}
    for split, folder in (("train", "stage_2_train"), ("test", "stage_2_test")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        part = df[df["split"] == split]
        cols = zip(part["sop_uid"], part["series_uid"], part["study_uid"], part["patient_id"], part["slice_idx"])
        for sop, series, study, patient, k in cols:
            data = template.replace(ph["sop"], sop.encode()).replace(ph["series"], series.encode())
            data = data.replace(ph["study"], study.encode()).replace(ph["patient"], patient.encode())
            data = data.replace(z_ph, f"{5.0 * k:5.1f}".encode()).replace(in_ph, f"{k + 1:4d}".encode())
            (root / folder / f"{sop}.dcm").write_bytes(data)
    train = df[df["split"] == "train"]
    long = train.melt(id_vars=["sop_uid"], value_vars=list(CLASSES), var_name="cls", value_name="Label")
    pd.DataFrame({"ID": long["sop_uid"] + "_" + long["cls"], "Label": long["Label"].astype(int)}).to_csv(
        root / "stage_2_train.csv", index=False
    )


def make_folds_inputs(root: Path, frac: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    slices(frac).to_parquet(root / "index.parquet", index=False)


def make_stack_inputs(root: Path, frac: float) -> None:
    """9 models × 5 folds of OOF and test predictions: noisy logits of the labels, per-model calibration."""
    df = slices(frac)
    train, test = df[df["split"] == "train"].copy(), df[df["split"] == "test"].copy()
    folds = folds_of(train)
    folds.to_csv(root / "folds.csv", index=False)
    train["fold"] = train["patient_id"].map(dict(zip(folds["patient_id"], folds["fold"]))).astype(int)
    keys = ["sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx"]
    probs = [f"p_{c}" for c in CLASSES]
    rng = np.random.default_rng(1)
    y_tr, y_te = train[list(CLASSES)].to_numpy(), test[list(CLASSES)].to_numpy()
    for m in range(MODELS):
        signal, temp = 2.0 + 0.1 * m, 0.8 + 0.05 * m
        z_tr = (signal * (2 * y_tr - 1) - 2.0 + rng.normal(0, 1.2, y_tr.shape)) / temp
        oof = train[[*keys, "fold"]].assign(model=f"m{m}")
        oof[probs] = (1 / (1 + np.exp(-z_tr))).astype(np.float32)
        oof[list(CLASSES)] = y_tr
        for k in range(FOLDS):
            out = root / "runs" / f"m{m}" / f"fold_{k}"
            out.mkdir(parents=True, exist_ok=True)
            oof[oof["fold"] == k].to_parquet(out / "oof.parquet", index=False)
            z_te = (signal * (2 * y_te - 1) - 2.0 + rng.normal(0, 1.2, y_te.shape)) / temp
            t = test[keys].assign(fold=k, model=f"m{m}")
            t[probs] = (1 / (1 + np.exp(-z_te))).astype(np.float32)
            t.to_parquet(out / "test.parquet", index=False)


def make_seq_inputs(root: Path, frac: float) -> None:
    """``embeddings_oof.{npy,parquet,json}`` of the training slices: (N, 512) float32, written in chunks."""
    df = slices(frac)
    train = df[df["split"] == "train"].reset_index(drop=True)
    root.mkdir(parents=True, exist_ok=True)
    frame = train[["sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx"]].assign(fold=0, split="oof")
    frame[list(CLASSES)] = train[list(CLASSES)].to_numpy()
    frame[[f"logit_{c}" for c in CLASSES]] = 0.0
    frame.to_parquet(root / "embeddings_oof.parquet", index=False)
    x = np.lib.format.open_memmap(
        root / "embeddings_oof.npy", mode="w+", dtype=np.float32, shape=(len(frame), EMBED_DIM)
    )
    rng = np.random.default_rng(2)
    for i in range(0, len(frame), 65536):
        x[i : i + 65536] = rng.standard_normal((min(65536, len(frame) - i), EMBED_DIM), dtype=np.float32)
    x.flush()
    del x
    (root / "embeddings_oof.json").write_text(json.dumps({"logits": True, "dim": EMBED_DIM}))


def make_submit_inputs(root: Path, frac: float) -> None:
    df = slices(frac)
    test = df[df["split"] == "test"]
    root.mkdir(parents=True, exist_ok=True)
    wide = test[["sop_uid"]].copy()
    wide[[f"p_{c}" for c in CLASSES]] = np.random.default_rng(3).random((len(test), 6))
    wide.to_parquet(root / "wide.parquet", index=False)


MAKERS = {
    "index": make_index_inputs,
    "folds": make_folds_inputs,
    "stack": make_stack_inputs,
    "seq": make_seq_inputs,
    "submit": make_submit_inputs,
}


def input_kind(stage: str) -> str:
    return "stack" if stage.startswith("stack") else stage


# ------------------------------------------------------------------------------------------------ measured steps
def _stack_cfg(root: Path, *overrides: str) -> Any:
    from rsna19.core.config import load_config
    from rsna19.stacking.config import StackConfig

    paths = [f"runs={root / 'runs'}", f"folds_csv={root / 'folds.csv'}", f"out={root / 'out'}", "models=[]"]
    return load_config(StackConfig, STACK_CFG, [*paths, *overrides])


def step(stage: str, part: str, root: Path, workers: int) -> dict[str, Any]:
    """Run one measured step in this process; returns what it did (rows, extra numbers)."""
    if stage == "index":
        from rsna19.io.index import build_index

        out = root / "index.parquet"
        out.unlink(missing_ok=True)
        index = build_index(
            [str(root / "stage_2_train"), str(root / "stage_2_test")],
            str(root / "stage_2_train.csv"),
            str(out),
            workers,
            progress=False,
            overwrite=True,
        )
        return {"rows": len(index)}
    if stage == "folds":
        from rsna19.data.folds import write_folds

        folds = write_folds(root / "index.parquet", root / "folds_out.csv", force=True)
        return {"rows": len(folds)}
    if stage == "stack":
        from rsna19.stacking import parts
        from rsna19.stacking.parts import finish_stack

        cfg = _stack_cfg(root, "lgbm.enabled=false", "mlp.enabled=false")
        if part == "features":
            parts.run_features(cfg)
            return {"rows": int(json.loads(parts.level2_done_file(cfg).read_text())["rows"][0])}
        if part == "convex":
            for k in range(FOLDS):
                parts.run_fit(cfg, "convex", k)
            return {"rows": FOLDS}
        res = finish_stack(cfg, force=True)
        s = res.scores.set_index("name")
        return {"rows": len(res.level2.oof), "blend_vs_best_base": float(s.loc["blend", "vs_best_base"])}
    if stage in ("stack-lgbm", "stack-mlp"):
        from rsna19.stacking import parts

        name = stage.split("-")[1]
        other = "mlp" if name == "lgbm" else "lgbm"
        cfg = _stack_cfg(root, f"{other}.enabled=false")
        if not parts.level2_done_file(cfg).is_file():
            parts.run_features(cfg)
        t0 = time.perf_counter()
        parts.run_fit(cfg, name, 0)
        return {"rows": FOLDS, "fit_s": time.perf_counter() - t0}
    if stage == "seq":
        import torch

        from rsna19.data.embeddings import SequenceDataset, collate_sequences, read_embeddings

        frame, x, _ = read_embeddings(root, "oof")
        ds = SequenceDataset(frame, x, with_logits=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, collate_fn=collate_sequences)
        seen = 0
        for batch in loader:
            seen += int(batch["lengths"].sum())
        return {"rows": seen, "embeddings_bytes": int(x.nbytes), **rss_split_gb()}
    if stage == "submit":
        from rsna19.inference.submission import write_submission

        wide = pd.read_parquet(root / "wide.parquet")
        write_submission(wide, root / "submission.csv", expected_sops=wide["sop_uid"])
        return {"rows": len(wide) * 6}
    raise ValueError(stage)


PARTS = {"stack": ("features", "convex", "finish")}


def warm_imports() -> None:
    """Import what the steps use before the clock starts (torch, LightGBM, pandas' parquet engine)."""
    import lightgbm  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401

    import rsna19.data.embeddings  # noqa: F401
    import rsna19.data.folds  # noqa: F401
    import rsna19.inference.submission  # noqa: F401
    import rsna19.io.index  # noqa: F401
    import rsna19.stacking.parts  # noqa: F401
    import rsna19.stacking.run  # noqa: F401


def rss_split_gb() -> dict[str, float]:
    """This process's resident memory now, as anonymous (its own copies) and file-backed (mapped files, which the
    kernel can drop) GB, from ``/proc/self/status`` (empty where there is none)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[f"{key.lower()}_gb"] = int(value.split()[0]) / 1024**2
    except OSError:
        pass
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (on a busy machine, the honest cost)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_gb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024**2


def child(args: argparse.Namespace) -> None:
    root = Path(args.root)
    if args.make:
        t0 = time.perf_counter()
        MAKERS[input_kind(args.stage[0])](root, args.size[0])
        result = {"make_s": time.perf_counter() - t0}
    else:
        warm_imports()  # the wall time is the step's, not Python's imports
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = step(args.stage[0], args.part, root, args.workers)
        result.update({"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "peak_rss_gb": peak_rss_gb()})
    Path(args.result).write_text(json.dumps(result))


def run_child(argv: list[str], timeout: float | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    try:
        subprocess.run([sys.executable, __file__, *argv, "--child", "--result", str(out)], check=True, timeout=timeout)
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def measure(stage: str, frac: float, base: Path, workers: int, timeout: float | None) -> list[dict[str, Any]]:
    kind = input_kind(stage)
    root = base / f"{kind}-{frac:g}"
    marker = root / ".made"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        made = run_child(["--size", str(frac), "--stage", stage, "--root", str(root), "--make"], None)
        marker.write_text(json.dumps(made))
    rows = []
    for part in PARTS.get(stage, ("all",)):
        argv = ["--size", str(frac), "--stage", stage, "--root", str(root), "--part", part, "--workers", str(workers)]
        r = run_child(argv, timeout)
        rows.append({"stage": stage, "part": part, "size": frac, "disk_gb": disk_bytes(root) / 1e9, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def exponent(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(stage, part) → growth exponent of the wall time between the two largest measured sizes."""
    out = {}
    frame = pd.DataFrame(rows)
    for (stage, part), g in frame.groupby(["stage", "part"]):
        g = g.sort_values("size")
        if len(g) >= 2:
            a, b = g.iloc[-2], g.iloc[-1]
            out[(stage, part)] = math.log(b["seconds"] / a["seconds"]) / math.log(b["size"] / a["size"])
    return out


def table(rows: list[dict[str, Any]]) -> str:
    exps = exponent(rows)
    lines = [
        "| stage | part | size | rows | wall s | CPU s | peak RSS GB | disk GB | exponent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = exps.get((r["stage"], r["part"]))
        lines.append(
            f"| {r['stage']} | {r['part']} | {r['size']:g} | {r['rows']} | {r['seconds']:.1f} | "
            f"{r.get('cpu_s', math.nan):.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r['disk_gb']:.2f} | {'' if e is None else f'{e:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--stage", nargs="+", default=["index", "folds", "stack", "seq", "submit"], choices=STAGES)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "rsna19_scale"))
    parser.add_argument("--workers", type=int, default=2, help="index workers")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one measured step may take")
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON to OUT")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for stage in args.stage:
        for frac in sorted(args.size):
            rows += measure(stage, frac, Path(args.dir), args.workers, args.timeout)
    print(table(rows))
    write_json(args, "scale", "every stage at RSNA size", "≤ 16 GB peak, linear", rows)


if __name__ == "__main__":
    main()
