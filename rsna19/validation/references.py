"""The reference a validation compares with: a site's study labels (``--format studies``) or CQ500's reads
(``--format cq500``), as one table keyed by study.

* ``studies``: a csv with ``study_uid`` (the StudyInstanceUID) and any of the six class columns, 0/1; a blank cell
  means no label for that class (the study is left out of that class only). A class without a column is not
  evaluated.
* ``cq500``: the CQ500 ``reads.csv`` (:mod:`rsna19.io.cq500`): the majority of the three readers per finding,
  mapped to the six classes, keyed ``CQ500-CT-<n>``; every class is evaluated. Fleiss' κ of the three readers per
  finding is computed over the rows with all three reads of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.core.metrics import fleiss_kappa
from rsna19.io.cq500 import FINDINGS, READERS, positive_reads, read_reads

FORMATS: tuple[str, ...] = ("studies", "cq500")


@dataclass
class Reference:
    """The reference of every labelled study.

    Attributes:
        labels: one row a study (index: study key), ``CLASSES`` columns, 1.0 / 0.0 / NaN (no reference).
        classes: the classes the labels file covers (the others are all NaN and not evaluated).
        missing: study key → what is missing for it (``R2:SAH``, ``subdural`` ...), for studies with a gap.
        problems: messages about rows that were dropped or values that were not 0/1.
        reads: ``reads_<class>`` (readers saying 1) per study, cq500 only.
        kappa: Fleiss' κ per class with its number of studies, cq500 only.
    """

    labels: pd.DataFrame
    classes: list[str]
    missing: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reads: pd.DataFrame | None = None
    kappa: dict[str, dict[str, Any]] | None = None


def read_reference(path: str | os.PathLike[str], fmt: str) -> Reference:
    """Read the labels file of ``fmt`` (:data:`FORMATS`).

    Raises:
        UserError: a missing or malformed file, or an unknown format.
    """
    if fmt == "studies":
        return read_study_labels(path)
    if fmt == "cq500":
        return read_cq500_reference(path)
    raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")


def read_study_labels(path: str | os.PathLike[str]) -> Reference:
    """A site's study labels: ``study_uid`` plus any of the class columns (0/1, blank: no label)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels file {path} does not exist")
    raw = pd.read_csv(path, dtype={"study_uid": str})
    classes = [c for c in CLASSES if c in raw.columns]
    if "study_uid" not in raw.columns or not classes:
        raise UserError(f"{path}: expected a study_uid column and at least one of {', '.join(CLASSES)}")
    problems: list[str] = []
    uid = raw["study_uid"].astype("string").str.strip()
    blank = uid.isna() | (uid == "")
    for i in np.flatnonzero(blank.to_numpy()):
        problems.append(f"{path.name} row {i + 2}: no study_uid: dropped")
    dup = uid.duplicated(keep="first") & ~blank
    for i in np.flatnonzero(dup.to_numpy()):
        problems.append(f"{path.name} row {i + 2}: study {uid.iloc[i]} appears again: the first row is used")
    keep = (~blank & ~dup).to_numpy()
    values = raw.loc[keep, classes].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    bad = values.notna() & ~values.isin([0.0, 1.0])
    text_bad = raw.loc[keep, classes].notna() & values.isna()  # a value that is not a number at all
    n_bad = int((bad | text_bad).to_numpy().sum())
    if n_bad:
        problems.append(f"{path.name}: {n_bad} label(s) not 0/1: treated as missing")
    values = values.mask(bad)
    labels = pd.DataFrame(np.nan, index=pd.Index(uid[keep].to_numpy(), name="study_key"), columns=list(CLASSES))
    labels[classes] = values.to_numpy()
    missing = {k: [c for c in classes if np.isnan(labels.at[k, c])] for k in labels.index}
    return Reference(labels, classes, {k: v for k, v in missing.items() if v}, problems)


def read_cq500_reference(path: str | os.PathLike[str]) -> Reference:
    """CQ500's ``reads.csv``: the readers' majority per class, the readers' votes and Fleiss' κ."""
    votes, labels, problems = read_reads(path)
    missing = {
        k: [col for col in votes.columns if np.isnan(votes.at[k, col])]
        for k in votes.index
        if votes.loc[k].isna().any()
    }
    kappa = {}
    for finding, cls in FINDINGS.items():
        r = votes[[f"{reader}:{finding}" for reader in READERS]].dropna().to_numpy()
        kappa[cls] = {"finding": finding, "n": int(len(r)), "kappa": fleiss_kappa(r)}
    return Reference(labels[list(CLASSES)], list(CLASSES), missing, problems, positive_reads(votes), kappa)
