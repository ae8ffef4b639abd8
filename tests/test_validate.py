"""``rsna19 validate`` end to end on the synthetic CQ500 stand-in (``rsna19 synth --preset cq500``) with the tiny
bundle: the readers' majority and the class mapping, every reported number against an independent computation
(scikit-learn, scipy) on ``studies.csv``, every kind of problem reported with a message and a count, a recalibrated
bundle that loads while the original stays byte for byte the same, and the ``studies`` format on a folder and a
zip."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from rsna19.cli import main
from rsna19.core.calibration import apply_platt, threshold_for_sensitivity, threshold_for_specificity
from rsna19.core.constants import CLASSES
from rsna19.core.metrics import bootstrap_indices, fleiss_kappa, resample_weights, weighted_auc
from rsna19.io.cq500 import FINDINGS, READERS, majority, read_reads, study_key
from rsna19.study.bundle import export_bundle, load_bundle, load_study_model
from rsna19.synth.cq500 import SERIES, generate_cq500, study_folder

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

N_BOOT = 200
N_STUDIES = 6


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    return export_bundle(tiny_run, tmp_path_factory.mktemp("validate_bundle") / "bundle").path


@pytest.fixture(scope="module")
def cq(tmp_path_factory):
    """A 6-study, 64-pixel CQ500 stand-in (read-only)."""
    root = tmp_path_factory.mktemp("cq500") / "cq"
    summary = generate_cq500(root, N_STUDIES, seed=0, image_size=64)
    return root, summary


@pytest.fixture(scope="module")
def validated(bundle, cq, tmp_path_factory):
    """One ``validate --format cq500 --recalibrate`` run on a copy of the stand-in with every kind of problem:
    an unreadable study (CQ500CT90: files that are not DICOM), a study without reads (CQ500-CT-5's row removed),
    reads of a study not in DATA (CQ500-CT-77) and a missing read (R2:SAH of CQ500-CT-1)."""
    root, _ = cq
    work = tmp_path_factory.mktemp("validated")
    data = work / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("*.csv", "*.json"))
    bad = data / "CQ500CT90 CQ500CT90" / "Unknown Study" / "CT 5mm"
    bad.mkdir(parents=True)
    for k in range(3):
        (bad / f"CT{k:06d}.dcm").write_bytes(b"not a dicom file" * 10)
    reads = pd.read_csv(root / "reads.csv")
    reads = reads[reads["name"] != "CQ500-CT-5"].reset_index(drop=True)
    reads.loc[reads["name"] == "CQ500-CT-1", "R2:SAH"] = np.nan
    extra = reads.iloc[[0, 0]].copy()
    extra["name"] = ["CQ500-CT-77", "CQ500-CT-90"]
    reads = pd.concat([reads, extra], ignore_index=True)
    reads.to_csv(work / "reads.csv", index=False)
    before = _digest(bundle)
    out = work / "out"
    args = ["validate", data, "--bundle", bundle, "--labels", work / "reads.csv", "--out", out, "--format", "cq500"]
    args += ["--bootstrap", N_BOOT, "--seed", 3, "--recalibrate", "--cv-folds", 2]
    assert main([str(a) for a in args]) == 0
    return {"out": out, "reads": work / "reads.csv", "bundle": bundle, "before": before, "data": data}


# ---------------------------------------------------------------------------------------------- CQ500 conventions
def test_study_key_reads_folder_and_csv_spellings():
    assert study_key("CQ500CT123 CQ500CT123") == "CQ500-CT-123"
    assert study_key("CQ500-CT-123") == "CQ500-CT-123"
    assert study_key("cq500_ct_0123") == "CQ500-CT-123"
    assert study_key("x/CQ500CT7 CQ500CT7/Unknown Study/CT 5mm/CT000000.dcm") == "CQ500-CT-7"
    assert study_key("CQ500CT12a") is None and study_key("study 12") is None


def test_majority_vote_and_class_mapping(tmp_path):
    cols = [f"{r}:{f}" for r in READERS for f in FINDINGS]
    votes = pd.DataFrame(0.0, index=["a", "b", "c"], columns=cols)
    votes.loc["a", ["R1:ICH", "R2:ICH", "R1:EDH", "R3:EDH"]] = 1.0  # 2 of 3: positive
    votes.loc["b", ["R3:IPH", "R2:SDH"]] = 1.0  # 1 of 3: negative
    votes.loc["c", ["R1:SAH"]] = 1.0
    votes.loc["c", ["R2:SAH"]] = np.nan  # 1 yes, 1 no, 1 missing: no majority
    m = majority(votes)
    assert m.loc["a", "any"] == 1 and m.loc["a", "epidural"] == 1 and m.loc["a", "subdural"] == 0
    assert m.loc["b"].sum() == 0
    assert np.isnan(m.loc["c", "subarachnoid"]) and m.loc["c", "any"] == 0
    assert FINDINGS == {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural",
                        "EDH": "epidural", "SAH": "subarachnoid"}  # fmt: skip
    # read_reads: names normalised, a bad name dropped with a message.
    df = votes.reset_index(drop=True)
    df.insert(0, "name", ["CQ500-CT-1", "CQ500CT2 CQ500CT2", "nonsense"])
    df.to_csv(tmp_path / "reads.csv", index=False)
    v, ref, problems = read_reads(tmp_path / "reads.csv")
    assert list(ref.index) == ["CQ500-CT-1", "CQ500-CT-2"] and len(problems) == 1 and "nonsense" in problems[0]


def test_synth_cq500_layout_and_readers(cq, tmp_path):
    root, summary = cq
    for i in range(N_STUDIES):
        series = root / study_folder(i) / "Unknown Study"
        assert sorted(p.name for p in series.iterdir()) == sorted(SERIES) == ["CT 5mm", "CT BONE", "CT PLAIN THIN"]
        n5 = len(list((series / "CT 5mm").glob("CT*.dcm")))
        assert len(list((series / "CT PLAIN THIN").glob("CT*.dcm"))) == 8 * n5
        assert len(list((series / "CT BONE").glob("CT*.dcm"))) == n5
    raw = pd.read_csv(root / "reads.csv")
    assert list(raw.columns[:8]) == ["name", "Category", "R1:ICH", "R1:IPH", "R1:IVH", "R1:SDH", "R1:EDH", "R1:SAH"]
    assert {"R3:Fracture", "R2:MidlineShift", "R1:BleedLocation-Left"} <= set(raw.columns)
    reads = np.stack([raw[[f"{r}:{f}" for f in FINDINGS]].to_numpy() for r in READERS])  # (3, N, 6)
    disagree = (reads != reads[0]).any(axis=(0, 2))
    assert 1 <= disagree.sum() < N_STUDIES and len(summary["reader_changes"]) == disagree.sum()
    truth = pd.read_csv(root / "truth.csv")
    assert (truth["any"] == truth[list(CLASSES[:5])].max(axis=1)).all() and truth["any"].sum() >= 1
    labels = pd.read_csv(root / "study_labels.csv", dtype={"study_uid": str})
    assert (labels[list(CLASSES)].to_numpy() == truth[list(CLASSES)].to_numpy()).all()
    # The CLI writes the same files; a second run with the same arguments skips the work.
    args = ["synth", str(tmp_path / "c"), "--preset", "cq500", "--studies", "2", "--image-size", "64", "--workers", "1"]
    assert main(args) == 0 and (tmp_path / "c" / "CQ500CT1 CQ500CT1").is_dir()
    assert main(args) == 0


# --------------------------------------------------------------------------------------------- stats building blocks
def test_weighted_auc_and_thresholds_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(40) < 0.4
    p = np.round(rng.random(40), 1)  # many ties
    idx = bootstrap_indices(40, 50, 1)
    aucs = weighted_auc(y, p, resample_weights(idx, 40))
    for b in range(50):
        yy, pp = y[idx[b]], p[idx[b]]
        want = roc_auc_score(yy, pp) if 0 < yy.sum() < len(yy) else np.nan
        assert np.isclose(aucs[b], want, equal_nan=True)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    for target in (0.9, 0.95, 0.5):
        thr, sens, spec = threshold_for_specificity(p, y, target)
        assert spec >= target and np.isclose(sens, tpr[1 - fpr >= target - 1e-12].max())
        thr, sens, spec = threshold_for_sensitivity(p, y, target)
        assert sens >= target and np.isclose(spec, (1 - fpr)[tpr >= target - 1e-12].max())


def _fleiss(r: np.ndarray) -> float:
    """Fleiss' κ written from its definition with explicit loops (independent of rsna19.core.metrics)."""
    n, m = r.shape
    p_i = []
    for row in r:
        agree = sum(1 for a in range(m) for b in range(m) if a != b and row[a] == row[b])
        p_i.append(agree / (m * (m - 1)))
    p1 = r.mean()
    pe = p1**2 + (1 - p1) ** 2
    return (np.mean(p_i) - pe) / (1 - pe)


def test_fleiss_kappa():
    r = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    assert np.isclose(fleiss_kappa(r), _fleiss(r))
    assert fleiss_kappa(np.ones((4, 3))) != fleiss_kappa(np.ones((4, 3)))  # NaN: every rating the same
    assert np.isclose(fleiss_kappa(np.array([[1, 1, 1], [0, 0, 0]])), 1.0)


# ------------------------------------------------------------------------------------------------- end to end
def test_studies_csv_holds_majority_and_predict_study_probabilities(validated):
    out = validated["out"]
    table = pd.read_csv(out / "studies.csv", dtype={"study_uids": str}).set_index("study_key")
    raw = pd.read_csv(validated["reads"]).set_index("name")
    ok = table[table["status"] == "ok"]
    assert len(ok) == N_STUDIES - 1
    for key in ok.index:
        for finding, cls in FINDINGS.items():
            v = raw.loc[key, [f"{r}:{finding}" for r in READERS]].to_numpy(dtype=float)
            pos, neg = np.nansum(v == 1), np.nansum(v == 0)
            want = 1.0 if pos >= 2 else 0.0 if neg >= 2 else np.nan
            assert np.isclose(ok.at[key, f"y_{cls}"], want, equal_nan=True), (key, cls)
            assert ok.at[key, f"reads_{cls}"] == pos
    # p = Platt(max over the predicted slices) with the bundle's study model: the predict-study path.
    model, _, _ = load_study_model(validated["bundle"])
    slices = pd.read_csv(out / "predict" / "slices.csv", dtype={"study_uid": str})
    for key in ok.index:
        mine = slices[slices["study_uid"] == ok.at[key, "study_uids"]]
        for c in CLASSES:
            score = mine[f"p_{c}"].max()
            e = model["classes"][c]
            assert np.isclose(ok.at[key, f"score_{c}"], score)
            assert np.isclose(ok.at[key, f"p_{c}"], apply_platt(np.array([score]), e["a"], e["b"])[0])
    studies = json.loads((out / "predict" / "studies.json").read_text())["studies"]
    for s in studies:  # the soft-tissue 5 mm series is the one predicted
        assert [d["description"] for d in s["series_used"]] == ["CT 5mm"]


def test_every_reported_number_matches_an_independent_computation(validated):
    out = validated["out"]
    table = pd.read_csv(out / "studies.csv").set_index("study_key")
    ok = table[table["status"] == "ok"]
    result = pd.read_csv(out / "validation.csv")
    model, _, _ = load_study_model(validated["bundle"])
    info = json.loads((out / "validation.json").read_text())
    assert info["bootstrap"]["resamples"] == N_BOOT and info["bootstrap"]["seed"] == 3
    idx = bootstrap_indices(len(ok), N_BOOT, 3)  # the documented resamples, over studies.csv's ok rows in order
    for c in CLASSES:
        y_all = ok[f"y_{c}"].to_numpy(dtype=float)
        known = ~np.isnan(y_all)
        y, p = y_all[known].astype(int), ok[f"p_{c}"].to_numpy(dtype=float)[known]
        rows = result[(result["model"] == "bundle") & (result["class"] == c)].set_index("point")
        assert list(rows.index) == [
            "operating_point", "sensitivity_0.90", "sensitivity_0.95", "specificity_0.90", "specificity_0.95"
        ]  # fmt: skip
        r = rows.loc["operating_point"]
        assert (r["n"], r["n_pos"], r["n_neg"]) == (len(y), y.sum(), len(y) - y.sum())
        assert np.isclose(r["brier"], brier_score_loss(y, p))
        # ECE over 10 equal-width bins, written out here.
        bins = np.clip(np.ceil(p * 10).astype(int) - 1, 0, 9)  # (lo, hi] bins, 0 in the first
        ece = sum(abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).sum() for b in np.unique(bins))
        assert np.isclose(r["ece"], ece / len(y))
        if 0 < y.sum() < len(y):
            assert np.isclose(r["auc"], roc_auc_score(y, p))
            # Bootstrap interval: the same resamples through sklearn.
            boots = []
            pos_in_known = np.cumsum(known) - 1
            for b in range(N_BOOT):
                pick = pos_in_known[idx[b][known[idx[b]]]]
                yy, pp = y[pick], p[pick]
                if 0 < yy.sum() < len(yy):
                    boots.append(roc_auc_score(yy, pp))
            assert r["auc_boot_valid"] == len(boots)
            assert np.allclose([r["auc_lo"], r["auc_hi"]], np.percentile(boots, [2.5, 97.5]))
        else:
            assert np.isnan(r["auc"])
        fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False) if 0 < y.sum() < len(y) else (None, None, None)
        for point, row in rows.iterrows():
            thr = model["classes"][c]["threshold"] if point == "operating_point" else row["threshold"]
            if point != "operating_point":
                if np.isnan(thr):
                    continue
                kind, target = point.split("_")
                if fpr is not None and kind == "sensitivity":
                    assert np.isclose(row["specificity"], (1 - fpr)[tpr >= float(target) - 1e-12].max())
                if fpr is not None and kind == "specificity":
                    assert np.isclose(row["sensitivity"], tpr[1 - fpr >= float(target) - 1e-12].max())
            else:
                assert np.isclose(row["threshold"], thr)
            tn, fp, fn, tp = confusion_matrix(y, (p >= thr).astype(int), labels=[0, 1]).ravel()
            assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (tp, fn, tn, fp)
            for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
                if n == 0:
                    assert np.isnan(row[name])
                    continue
                assert np.isclose(row[name], k / n)
                ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
                assert np.allclose([row[f"{name}_lo"], row[f"{name}_hi"]], [ci.low, ci.high])
    # Fleiss' kappa over the reads.csv rows with all three reads of a finding.
    raw = pd.read_csv(validated["reads"])
    for finding, cls in FINDINGS.items():
        r = raw[[f"{x}:{finding}" for x in READERS]].dropna().to_numpy()
        got = info["fleiss_kappa"][cls]
        assert got["n"] == len(r)
        want = _fleiss(r) if 0 < r.mean() < 1 else None
        assert (got["kappa"] is None and want is None) or np.isclose(got["kappa"], want)
    # The published-style table and the clinician summary carry the same numbers.
    any_row = result[(result["model"] == "bundle") & (result["class"] == "any")].iloc[0]
    assert f"{any_row['auc']:.3f}" in (out / "table.md").read_text() if not np.isnan(any_row["auc"]) else True
    assert "Checked on 5 CQ500-format studies" in (out / "summary.txt").read_text()
    assert "Inter-reader agreement (Fleiss' κ, three readers): ICH" in (out / "table.md").read_text()
    assert (out / "report.png").stat().st_size > 10_000


def test_problems_are_reported_with_message_and_count(validated, capsys):
    info = json.loads((validated["out"] / "validation.json").read_text())
    p = info["problems"]
    assert p["unreadable"]["studies"] == ["CQ500-CT-90"] and p["unreadable"]["count"] == 1
    assert "no readable DICOM study: 3 file(s) skipped" in p["unreadable"]["details"]["CQ500-CT-90"]
    assert p["not_in_labels"]["studies"] == ["CQ500-CT-5"] and p["not_in_labels"]["count"] == 1
    assert p["not_in_data"]["studies"] == ["CQ500-CT-77"] and p["not_in_data"]["count"] == 1
    assert p["missing_reads"]["studies"] == ["CQ500-CT-1"] and p["missing_reads"]["details"]["CQ500-CT-1"] == "R2:SAH"
    assert info["n_studies"] == {"ok": 5, "unreadable": 1, "not_assessable": 0, "not_in_labels": 1, "not_in_data": 1}
    table = pd.read_csv(validated["out"] / "studies.csv").set_index("study_key")
    assert table.loc["CQ500-CT-90", "status"] == "unreadable" and table.loc["CQ500-CT-77", "status"] == "not_in_data"
    summary = (validated["out"] / "summary.txt").read_text()
    assert "studies in DATA that could not be read or predicted (not evaluated): 1" in summary
    assert "studies in the labels that are not in DATA (not evaluated): 1" in summary


def test_recalibrated_bundle_loads_and_the_original_is_unchanged(validated):
    out, bundle = validated["out"], validated["bundle"]
    assert _digest(bundle) == validated["before"]  # the original, byte for byte
    new = out / "bundle_recalibrated"
    loaded = load_bundle(new, device="cpu")  # every checksum verified
    info = json.loads((out / "validation.json").read_text())
    assert info["recalibration"]["bundle_sha256"] == loaded.sha256
    manifest = json.loads((new / "bundle.json").read_text())
    assert manifest["recalibration"]["original_bundle_sha256"] == info["bundle_sha256"]
    old_model, _, _ = load_study_model(bundle)
    table = pd.read_csv(out / "studies.csv").set_index("study_key")
    ok = table[table["status"] == "ok"]
    from rsna19.core.calibration import fit_study_class

    for c in CLASSES:
        e = loaded.study_model["classes"][c]
        assert e["recalibrated"] and e["slice_threshold"] == old_model["classes"][c]["slice_threshold"]
        known = ok[f"y_{c}"].notna()
        want = fit_study_class(ok.loc[known, f"score_{c}"].to_numpy(), ok.loc[known, f"y_{c}"].to_numpy(), 0.95)
        assert np.isclose(e["a"], want["a"]) and np.isclose(e["threshold"], want["threshold"])
    # Other files copied byte for byte.
    for rel, digest in validated["before"].items():
        if rel not in ("bundle.json", "study_model.json"):
            assert hashlib.sha256((new / rel).read_bytes()).hexdigest() == digest
    # The cross-validated numbers reported for it, against sklearn on the out-of-fold columns.
    result = pd.read_csv(out / "validation.csv")
    cv = result[result["model"] == "recalibrated_cv"].set_index("class")
    assert set(cv.index) == set(CLASSES)
    for c in CLASSES:
        known = ok[f"y_{c}"].notna()
        y, p = ok.loc[known, f"y_{c}"].astype(int), ok.loc[known, f"p_cv_{c}"]
        flags = ok.loc[known, f"flag_cv_{c}"].astype(bool)
        assert np.isclose(cv.at[c, "brier"], brier_score_loss(y, p))
        if 0 < y.sum() < len(y):
            assert np.isclose(cv.at[c, "auc"], roc_auc_score(y, p))
        tn, fp, fn, tp = confusion_matrix(y, flags.astype(int), labels=[0, 1]).ravel()
        assert (cv.at[c, "tp"], cv.at[c, "fn"], cv.at[c, "tn"], cv.at[c, "fp"]) == (tp, fn, tn, fp)
    assert ok["cv_fold"].nunique() == 2
    # Re-running without --force refuses to replace the recalibrated bundle.
    args = ["validate", validated["data"], "--bundle", bundle, "--labels", validated["reads"], "--out", out]
    assert main([str(a) for a in [*args, "--format", "cq500", "--bootstrap", 100, "--recalibrate"]]) == 1


def test_studies_format_on_a_folder_and_a_zip(bundle, cq, tmp_path):
    root, _ = cq
    data = tmp_path / "site"
    for i in range(3):  # a site's export: the study folders, any layout
        shutil.copytree(root / study_folder(i) / "Unknown Study" / "CT 5mm", data / f"patient{i}" / "ct")
    labels = pd.read_csv(root / "study_labels.csv", dtype={"study_uid": str})
    labels = labels.iloc[:4][["study_uid", "any", "subdural"]]  # two classes; the 4th study is not in DATA
    labels.loc[1, "subdural"] = np.nan  # a blank label
    labels.to_csv(tmp_path / "labels.csv", index=False)
    zpath = tmp_path / "site.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(data.rglob("*")):
            zf.write(f, f.relative_to(data).as_posix())
    results = []
    for src, out in ((data, tmp_path / "out_dir"), (zpath, tmp_path / "out_zip")):
        args = ["validate", src, "--bundle", bundle, "--labels", tmp_path / "labels.csv", "--out", out]
        assert main([str(a) for a in [*args, "--bootstrap", 100, "--folds", "0"]]) == 0
        info = json.loads((out / "validation.json").read_text())
        assert info["classes"] == ["subdural", "any"] and info["n_studies"]["ok"] == 3
        assert info["problems"]["not_in_data"]["studies"] == [labels.loc[3, "study_uid"]]
        assert info["problems"]["missing_reads"]["studies"] == [labels.loc[1, "study_uid"]]
        assert "missing labels" in info["problems"]["missing_reads"]["message"]
        result = pd.read_csv(out / "validation.csv")
        assert set(result["class"]) == {"subdural", "any"}
        assert result.loc[result["class"] == "subdural", "n"].iloc[0] == 2
        results.append(result)
    pd.testing.assert_frame_equal(results[0], results[1])


def test_user_errors(bundle, cq, tmp_path, capsys):
    root, _ = cq
    (tmp_path / "bad.csv").write_text("study,any\n1,0\n")
    base = ["validate", str(root), "--bundle", str(bundle), "--out", str(tmp_path / "o")]
    assert main([*base, "--labels", str(tmp_path / "bad.csv")]) == 1
    assert "expected a study_uid column" in capsys.readouterr().err
    assert main([*base, "--labels", str(tmp_path / "bad.csv"), "--format", "cq500"]) == 1
    assert "no 'name' column" in capsys.readouterr().err
    assert main([*base, "--labels", str(root / "reads.csv"), "--format", "cq500", "--bootstrap", "10"]) == 1
    assert "at least 100" in capsys.readouterr().err


def test_study_table_statuses_from_a_predict_study_summary():
    """Every status from a hand-made ``studies.json`` summary: a CQ500 folder with two StudyInstanceUIDs of which
    one failed (its slices still evaluated, the failure kept as the reason), a folder whose files were all skipped,
    a study without reads and reads without a study."""
    from rsna19.validation.references import Reference
    from rsna19.validation.run import study_table

    summary = {
        "studies": [
            {"study_uid": "u1", "status": "ok", "folder": "CQ500CT1 CQ500CT1/Unknown Study"},
            {"study_uid": "u2", "status": "error", "error": "no usable axial CT series", "folder": "CQ500CT1 CQ500CT1"},
            {"study_uid": "u3", "status": "ok", "folder": "CQ500CT2 CQ500CT2/Unknown Study"},
        ],
        "files_skipped": [{"path": "CQ500CT3 CQ500CT3/Unknown Study/CT 5mm/CT000000.dcm", "reason": "not DICOM"}],
    }
    slices = pd.DataFrame({"study_uid": ["u1", "u1", "u3"], **{f"p_{c}": [0.2, 0.7, 0.1] for c in CLASSES}})
    model = {"score": "max", "classes": {c: {"a": 1.0, "b": 0.0, "threshold": 0.5} for c in CLASSES}}
    labels = pd.DataFrame(0.0, index=["CQ500-CT-1", "CQ500-CT-3", "CQ500-CT-4"], columns=list(CLASSES))
    table = study_table(summary, slices, model, Reference(labels, list(CLASSES)), "cq500")
    assert table["status"].to_dict() == {
        "CQ500-CT-1": "ok", "CQ500-CT-2": "not_in_labels", "CQ500-CT-3": "unreadable", "CQ500-CT-4": "not_in_data"
    }  # fmt: skip
    assert table.at["CQ500-CT-1", "study_uids"] == "u1;u2"
    assert table.at["CQ500-CT-1", "reason"] == "partly unreadable: no usable axial CT series"
    assert table.at["CQ500-CT-3", "reason"] == "no readable DICOM study: 1 file(s) skipped (1× not DICOM)"
    assert np.isclose(table.at["CQ500-CT-1", "p_any"], 0.7) and np.isnan(table.at["CQ500-CT-4", "p_any"])
