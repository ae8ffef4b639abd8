"""The CQ500 dataset's conventions (Chilamkurthy et al., 2018): study names, ``reads.csv`` and the reference.

CQ500 is distributed one folder a study, named like ``CQ500CT123 CQ500CT123`` (with an ``Unknown Study`` folder
and one folder a series below it: ``CT 5mm``, ``CT PLAIN THIN``, ``CT BONE``, ...), and a ``reads.csv`` with one
row a study: ``name`` (``CQ500-CT-123``), ``Category`` and, for each of three readers R1–R3, 0/1 columns
``R1:ICH, R1:IPH, R1:IVH, R1:SDH, R1:EDH, R1:SAH, R1:BleedLocation-Left, ..., R1:Fracture, ...``.

**Study key.** Folder and ``name`` spell the same study differently; both become ``CQ500-CT-<n>`` (:func:`study_key`):
the first path component that reads ``CQ500``, an optional separator, ``CT``, an optional separator and a number
(case and the separators ``-``, ``_`` and space are free; leading zeros dropped). ``CQ500CT123 CQ500CT123``,
``CQ500-CT-123`` and ``cq500_ct_0123`` are all ``CQ500-CT-123``.

**Reference.** Per finding, the majority of the three readers (at least two of three say 1: positive; at least two
say 0: negative; otherwise, when reads are missing, no reference for that finding). The findings map to the six
classes: ICH → any, IPH → intraparenchymal, IVH → intraventricular, SAH → subarachnoid, SDH → subdural,
EDH → epidural.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from rsna19.core.errors import UserError

READERS: tuple[str, ...] = ("R1", "R2", "R3")
#: CQ500 finding → the class it is compared with.
FINDINGS: dict[str, str] = {
    "ICH": "any",
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SDH": "subdural",
    "EDH": "epidural",
    "SAH": "subarachnoid",
}
#: The other per-reader columns of the published ``reads.csv`` (not used for the hemorrhage reference).
OTHER_FINDINGS: tuple[str, ...] = (
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
_NAME = re.compile(r"^\s*CQ500[-_ ]?CT[-_ ]?0*(\d+)(?:\s|$)", re.IGNORECASE)


def study_key(name: str | os.PathLike[str]) -> str | None:
    """``CQ500-CT-<n>`` of a ``reads.csv`` name, a study folder name or a path holding one; None if none reads so.

    >>> study_key("CQ500CT123 CQ500CT123/Unknown Study/CT 5mm")
    'CQ500-CT-123'
    """
    for part in PurePosixPath(Path(name).as_posix()).parts:
        m = _NAME.match(part)
        if m:
            return f"CQ500-CT-{int(m.group(1))}"
    return None


def read_reads(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Read a CQ500 ``reads.csv``.

    Returns:
        ``(votes, reference, problems)``: ``votes`` one row a study (index: study key), columns
        ``<reader>:<finding>`` for the six hemorrhage findings (float: 1, 0 or NaN for a missing read);
        ``reference`` the majority per class (index: study key, ``CLASSES`` columns, NaN without a majority);
        ``problems`` one message a row that was dropped (a name that is not a CQ500 name, a repeated name).

    Raises:
        UserError: a missing file, no ``name`` column, or no ``R<k>:<finding>`` column of a hemorrhage finding.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reads file {path} does not exist")
    raw = pd.read_csv(path, dtype={"name": str})
    if "name" not in raw.columns:
        raise UserError(f"{path}: no 'name' column; expected the CQ500 reads.csv (name, Category, R1:ICH, ...)")
    cols = [f"{r}:{f}" for r in READERS for f in FINDINGS]
    missing = [c for c in cols if c not in raw.columns]
    if missing:
        raise UserError(f"{path}: missing reader column(s) {', '.join(missing)} (expected R1..R3 × ICH, IPH, ...)")
    problems: list[str] = []
    keys = raw["name"].map(lambda n: study_key(str(n)) if isinstance(n, str) else None)
    for i in np.flatnonzero(keys.isna().to_numpy()):
        problems.append(f"{path.name} row {i + 2}: name {raw['name'].iloc[i]!r} is not a CQ500 study name: dropped")
    dup = keys.duplicated(keep="first") & keys.notna()
    for i in np.flatnonzero(dup.to_numpy()):
        problems.append(f"{path.name} row {i + 2}: {keys.iloc[i]} appears again: the first row is used")
    keep = keys.notna() & ~dup
    votes = raw.loc[keep, cols].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    bad = votes.notna() & ~votes.isin([0.0, 1.0])
    if bad.to_numpy().any():
        votes = votes.mask(bad)  # a read that is not 0/1 counts as missing
        problems.append(f"{path.name}: {int(bad.to_numpy().sum())} read(s) not 0/1: treated as missing")
    votes.index = pd.Index(keys[keep].to_numpy(), name="study_key")
    return votes, majority(votes), problems


def majority(votes: pd.DataFrame) -> pd.DataFrame:
    """The readers' majority per finding, mapped to the classes.

    Args:
        votes: one row a study; ``<reader>:<finding>`` columns with 1, 0 or NaN (missing).

    Returns:
        One row a study, one column a class (``FINDINGS`` values): 1.0 where at least two readers say 1, 0.0 where
        at least two say 0, NaN otherwise (only possible with a missing read).
    """
    out = pd.DataFrame(index=votes.index)
    for finding, cls in FINDINGS.items():
        v = votes[[f"{r}:{finding}" for r in READERS]].to_numpy(dtype=np.float64)
        pos = np.nansum(v == 1.0, axis=1)
        neg = np.nansum(v == 0.0, axis=1)
        out[cls] = np.where(pos >= 2, 1.0, np.where(neg >= 2, 0.0, np.nan))
    return out


def positive_reads(votes: pd.DataFrame) -> pd.DataFrame:
    """How many readers said 1, per study and class (``reads_<class>`` in ``studies.csv``)."""
    return pd.DataFrame(
        {
            cls: (votes[[f"{r}:{finding}" for r in READERS]] == 1.0).sum(axis=1).astype(int)
            for finding, cls in FINDINGS.items()
        },
        index=votes.index,
    )


def missing_reads(votes: pd.DataFrame) -> pd.Series:
    """Missing hemorrhage reads per study (0 for a complete row)."""
    return votes.isna().sum(axis=1).astype(int)
