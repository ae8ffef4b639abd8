"""Kaggle submission: write, validate (first bad row named), score, and `rsna19 score`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna19.cli import main
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.core.metrics import per_class_log_loss, weighted_log_loss
from rsna19.inference.submission import score_submission, validate_submission, write_submission
from rsna19.io.rsna_csv import long_to_wide, read_labels, wide_to_long

SOPS = [f"ID_{i:09x}" for i in (10, 11, 12, 13)]


def _wide(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"sop_uid": SOPS, **{c: rng.uniform(0.01, 0.99, len(SOPS)) for c in PROB_COLUMNS}})


def _labels() -> pd.DataFrame:
    y = np.zeros((len(SOPS), len(CLASSES)), dtype=int)
    y[0, [4, 5]] = 1
    y[2, [1, 3, 5]] = 1
    return pd.DataFrame({"sop_uid": SOPS, **{c: y[:, i] for i, c in enumerate(CLASSES)}})


def test_write_roundtrip(tmp_path: Path) -> None:
    wide = _wide()
    path = write_submission(wide, tmp_path / "sub.csv", expected_sops=SOPS)
    text = path.read_text().splitlines()
    assert text[0] == "ID,Label" and len(text) == 1 + 6 * len(SOPS)
    assert text[1].startswith(f"{SOPS[0]}_epidural,") and text[6].startswith(f"{SOPS[0]}_any,")
    long = validate_submission(path, expected_sops=SOPS)
    back = long_to_wide(long, prefix="p_")
    np.testing.assert_allclose(back[list(PROB_COLUMNS)], wide[list(PROB_COLUMNS)], rtol=1e-7)
    # A wide DataFrame is accepted directly too.
    assert len(validate_submission(wide)) == 6 * len(SOPS)


def _long() -> pd.DataFrame:
    return wide_to_long(_wide(), prefix="p_")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.assign(Label=d["Label"].where(d.index != 7, np.nan)), "line 9 .*: empty label"),
        (lambda d: d.assign(Label=d["Label"].astype(object).where(d.index != 3, "abc")), "line 5 .*is not a number"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 4, np.inf)), "line 6 .*not finite"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 2, 1.5)), "line 4 .*outside \\[0, 1\\]"),
        (lambda d: d.assign(Label=d["Label"].where(d.index != 9, -0.1)), "line 11 .*outside \\[0, 1\\]"),
        (lambda d: d.assign(ID=d["ID"].where(d.index != 5, "ID_000000a_blood")), "line 7 .*malformed ID"),
        (lambda d: d.assign(ID=d["ID"].where(d.index != 1, "12cadc6af_epidural")), "line 3 .*malformed ID"),
        (lambda d: pd.concat([d, d.iloc[[8]]], ignore_index=True), "line 26 .*duplicate ID"),
        (lambda d: d.drop(index=[13]), "slice ID_00000000c lacks the classes intraparenchymal"),
    ],
)
def test_validate_names_first_bad_row(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "bad.csv"
    edit(_long()).to_csv(path, index=False)
    with pytest.raises(UserError, match=message):
        validate_submission(path)


def test_validate_reports_earliest_problem() -> None:
    d = _long()
    d.loc[10, "Label"] = 2.0
    d.loc[4, "ID"] = "nonsense"
    with pytest.raises(UserError, match="row 4 \\(nonsense\\): malformed ID"):
        validate_submission(d)


def test_validate_expected_sops(tmp_path: Path) -> None:
    long = _long()
    with pytest.raises(UserError, match="1 expected slices are missing, first: ID_000000099"):
        validate_submission(long, expected_sops=[*SOPS, "ID_000000099"])
    with pytest.raises(UserError, match="row 18 .*slice ID_00000000d is not expected"):
        validate_submission(long, expected_sops=SOPS[:3])
    with pytest.raises(UserError, match="columns ID,Label"):
        validate_submission(long.rename(columns={"Label": "Prob"}))
    (tmp_path / "cols.csv").write_text("Id,Prob\nID_000000001_any,0.5\n")
    with pytest.raises(UserError, match="expected the columns ID,Label"):
        validate_submission(tmp_path / "cols.csv")


def test_score_matches_metric_and_tolerates_duplicate_labels(tmp_path: Path) -> None:
    wide, labels = _wide(1), _labels()
    sub = write_submission(wide, tmp_path / "sub.csv")
    lab_long = wide_to_long(labels)
    lab_long = pd.concat([lab_long, lab_long.iloc[[0, 5]]], ignore_index=True)  # duplicate rows
    lab_long["Label"] = lab_long["Label"].astype(int)
    lab_path = tmp_path / "labels.csv"
    lab_long.to_csv(lab_path, index=False)
    assert len(read_labels(lab_path)) == len(SOPS)

    scores = score_submission(sub, lab_path)
    y_true = labels[list(CLASSES)].to_numpy(float)
    y_pred = wide[list(PROB_COLUMNS)].to_numpy(float)
    assert scores["wll"] == pytest.approx(weighted_log_loss(y_true, y_pred), rel=1e-6)
    assert scores["loss_any"] == pytest.approx(per_class_log_loss(y_true, y_pred)["any"], rel=1e-6)
    assert scores["n_slices"] == len(SOPS) and scores["n_ignored"] == 0
    assert np.isnan(scores["auc_epidural"])  # one label value only
    # A perfect submission scores ~0; extra unlabelled slices are ignored.
    perfect = labels.rename(columns=dict(zip(CLASSES, PROB_COLUMNS))).astype({c: float for c in PROB_COLUMNS})
    extra = pd.DataFrame({"sop_uid": ["ID_0000000ff"], **{c: [0.5] for c in PROB_COLUMNS}})
    scores = score_submission(wide_to_long(pd.concat([perfect, extra]), prefix="p_"), lab_long)
    assert scores["wll"] < 1e-12 and scores["n_ignored"] == 1
    assert scores["auc_any"] == 1.0
    # A labelled slice missing from the submission is an error.
    with pytest.raises(UserError, match="lacks 1 labelled slices"):
        score_submission(wide_to_long(wide.iloc[:3], prefix="p_"), lab_path)


def test_score_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sub = write_submission(_wide(), tmp_path / "sub.csv")
    lab = tmp_path / "labels.csv"
    wide_to_long(_labels()).astype({"Label": int}).to_csv(lab, index=False)
    assert main(["score", str(sub), str(lab)]) == 0
    out = capsys.readouterr().out
    assert "weighted log loss" in out and "(4 slices)" in out
    assert all(c in out for c in CLASSES)

    bad = tmp_path / "bad.csv"
    text = sub.read_text().splitlines()
    text[3] = text[3].split(",")[0] + ",nan"
    bad.write_text("\n".join(text) + "\n")
    assert main(["score", str(bad), str(lab)]) == 1
    err = capsys.readouterr().err
    assert "line 4" in err and "not finite" in err and "Traceback" not in err
    assert main(["score", str(tmp_path / "missing.csv"), str(lab)]) == 1
    assert "no such file" in capsys.readouterr().err
