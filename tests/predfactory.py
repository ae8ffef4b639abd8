"""TEST FIXTURE: realistic fake base-model predictions for the second-level tests (not package code).

Patients have one or two studies of one series each (12–28 slices). A bleed of a subtype spans a contiguous
run of slices, so labels are correlated along the series; ``any`` is their union. Each fake "model" outputs
``sigmoid((signal · (2y − 1) + bias + shared + ar + iid) / temperature)``: ``shared`` is noise common to all
models (hard slices), ``ar`` a smooth AR(1) noise along the slices, ``iid`` independent per-slice noise —
the part neighbour features and model averaging can remove — and a per-model temperature miscalibrates it.

OOF predictions exist for every training slice once (by the fold of its patient); test predictions come from
every fold's model, each with a little fold-specific noise. Files follow docs/contracts.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
PROB_COLUMNS = tuple(f"p_{c}" for c in CLASSES)
#: Chance that a series has a bleed of each subtype.
SUBTYPE_RATE = (0.08, 0.2, 0.15, 0.2, 0.2)


@dataclass(frozen=True)
class FakeModel:
    """Quality knobs of one fake base model."""

    name: str
    signal: float = 2.5
    bias: float = -0.5
    iid: float = 1.5
    ar: float = 0.6
    temperature: float = 1.0


DEFAULT_MODELS = (
    FakeModel("m_resnet", signal=2.6, iid=0.7, ar=0.9, temperature=1.3),
    FakeModel("m_2p5d", signal=2.4, iid=0.5, ar=1.0, temperature=0.8),
    FakeModel("m_seq", signal=2.2, iid=0.8, ar=0.7, bias=-0.8, temperature=1.0),
)


def _uid(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        uid = "ID_" + "".join(rng.choice(list("0123456789abcdef"), 9))
        if uid not in used:
            used.add(uid)
            return uid


def make_slices(n_patients: int, rng: np.random.Generator, used: set[str]) -> pd.DataFrame:
    """One row a slice: key columns and the six labels, labels contiguous along each series."""
    rows = []
    for _ in range(n_patients):
        patient = _uid(rng, used)
        for _ in range(rng.choice([1, 1, 2])):
            study, series = _uid(rng, used), _uid(rng, used)
            n = int(rng.integers(12, 29))
            labels = np.zeros((n, 6))
            for c, rate in enumerate(SUBTYPE_RATE):
                if rng.random() < rate:
                    length = int(rng.integers(2, min(9, n)))
                    start = int(rng.integers(0, n - length + 1))
                    labels[start : start + length, c] = 1
            labels[:, 5] = labels[:, :5].max(axis=1)
            for z in range(n):
                rows.append((_uid(rng, used), series, study, patient, z, *labels[z]))
    return pd.DataFrame(rows, columns=["sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx", *CLASSES])


def _ar_noise(series: np.ndarray, rng: np.random.Generator, sd: float, rho: float = 0.7) -> np.ndarray:
    """(N, 6) AR(1) noise along consecutive rows, restarted at each series."""
    e = rng.normal(0, sd * np.sqrt(1 - rho**2), (len(series), 6))
    out = np.empty_like(e)
    for i in range(len(series)):
        fresh = i == 0 or series[i] != series[i - 1]
        out[i] = rng.normal(0, sd, 6) if fresh else rho * out[i - 1] + e[i]
    return out


def predict(slices: pd.DataFrame, model: FakeModel, shared: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 6) fake probabilities of ``model`` for ``slices`` (sorted by series, slice)."""
    y = slices[list(CLASSES)].to_numpy()
    noise = _ar_noise(slices["series_uid"].to_numpy(), rng, model.ar) + rng.normal(0, model.iid, y.shape)
    # A slice that "looks like blood" to this model raises all its classes together.
    noise += rng.normal(0, 0.5 * model.iid, (len(y), 1))
    logit = model.signal * (2 * y - 1) + model.bias - 1.5 + shared + noise
    # Like a real network, `any` follows the strongest subtype evidence, so it is rarely below a subtype.
    logit[:, 5] = np.maximum(logit[:, 5], logit[:, :5].max(axis=1) + rng.normal(0, 0.3, len(y)))
    return 1 / (1 + np.exp(-logit / model.temperature))


@dataclass
class FakeWork:
    """Paths of a fake finished run directory."""

    root: Path
    runs: Path
    folds_csv: Path
    test_labels: Path
    sample_submission: Path
    models: list[str] = field(default_factory=list)
    train: pd.DataFrame | None = None
    test: pd.DataFrame | None = None


def make_work_dir(
    root: str | Path,
    n_patients: int = 40,
    n_test_patients: int = 10,
    n_folds: int = 5,
    models: tuple[FakeModel, ...] = DEFAULT_MODELS,
    seed: int = 0,
) -> FakeWork:
    """Write ``root/runs/<model>/fold_<k>/{oof,test}.parquet``, ``root/folds.csv``, ``root/test_labels.csv``
    and ``root/sample_submission.csv``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    train = make_slices(n_patients, rng, used)
    test = make_slices(n_test_patients, rng, used)
    patients = train["patient_id"].unique()
    fold_of = dict(zip(rng.permutation(patients), np.arange(len(patients)) % n_folds))
    train["fold"] = train["patient_id"].map(fold_of).astype(int)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"patient_id": list(fold_of), "fold": list(fold_of.values())}).to_csv(root / "folds.csv", index=False)

    # Hard regions of a scan fool every model alike: shared noise, smooth along the slices.
    shared_train = _ar_noise(train["series_uid"].to_numpy(), rng, 1.6, rho=0.85)
    shared_test = _ar_noise(test["series_uid"].to_numpy(), rng, 1.6, rho=0.85)
    keys = ["sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx"]
    for m in models:
        p_oof = predict(train, m, shared_train, rng)
        p_test = predict(test, m, shared_test, rng)
        oof = train[keys + ["fold"]].assign(model=m.name)
        oof[list(PROB_COLUMNS)] = p_oof
        oof[list(CLASSES)] = train[list(CLASSES)].to_numpy()
        for k in range(n_folds):
            out = root / "runs" / m.name / f"fold_{k}"
            out.mkdir(parents=True, exist_ok=True)
            oof[oof["fold"] == k].to_parquet(out / "oof.parquet", index=False)
            # Each fold's model sees the test set with a little noise of its own.
            logit = np.log(p_test) - np.log1p(-p_test) + rng.normal(0, 0.3, p_test.shape)
            t = test[keys].assign(fold=k, model=m.name)
            t[list(PROB_COLUMNS)] = 1 / (1 + np.exp(-logit))
            t.to_parquet(out / "test.parquet", index=False)

    long = test.melt(id_vars=["sop_uid"], value_vars=list(CLASSES), var_name="cls", value_name="Label")
    long["ID"] = long["sop_uid"] + "_" + long["cls"]
    long[["ID", "Label"]].to_csv(root / "test_labels.csv", index=False)
    long.assign(Label=0.5)[["ID", "Label"]].to_csv(root / "sample_submission.csv", index=False)
    return FakeWork(
        root,
        root / "runs",
        root / "folds.csv",
        root / "test_labels.csv",
        root / "sample_submission.csv",
        [m.name for m in models],
        train,
        test,
    )


if __name__ == "__main__":  # pragma: no cover - handy for building a notebook input by hand
    import sys

    print(make_work_dir(sys.argv[1] if len(sys.argv) > 1 else "work_fake").root)
