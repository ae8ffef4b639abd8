"""What a validation writes for people: ``summary.txt`` (a few sentences a clinician can read), ``table.md`` (laid
out like the published CQ500 table, so the numbers sit side by side) and ``report.png`` (ROC and reliability)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import write_text
from rsna19.viz.plots import plot_roc_reliability

#: Order and names of the findings in Chilamkurthy et al. (2018), and the classes they map to.
FINDING_ROWS: tuple[tuple[str, str], ...] = (
    ("any", "Intracranial haemorrhage (ICH)"),
    ("intraparenchymal", "Intraparenchymal (IPH)"),
    ("intraventricular", "Intraventricular (IVH)"),
    ("subdural", "Subdural (SDH)"),
    ("epidural", "Extradural (EDH)"),
    ("subarachnoid", "Subarachnoid (SAH)"),
)
#: Study-level AUCs on CQ500 (majority of three reads) published by Chilamkurthy et al., Lancet 2018, to two
#: decimals, as in the paper's abstract (ICH 0.94; IPH 0.95, IVH 0.93, SDH 0.95, EDH 0.97, SAH 0.96): for comparison
#: only (their model, not this one).
PUBLISHED_AUC: dict[str, float] = {
    "any": 0.94,
    "intraparenchymal": 0.95,
    "intraventricular": 0.93,
    "subdural": 0.95,
    "epidural": 0.97,
    "subarachnoid": 0.96,
}


def _pct(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{100 * v:.0f} %"


def _ci(v: float, lo: float, hi: float, pct: bool = False) -> str:
    if not math.isfinite(v):
        return "–"
    if pct:
        return f"{100 * v:.1f} ({100 * lo:.1f}–{100 * hi:.1f})" if math.isfinite(lo) else f"{100 * v:.1f}"
    return f"{v:.3f} ({lo:.3f}–{hi:.3f})" if math.isfinite(lo) else f"{v:.3f}"


def _row(result: pd.DataFrame, cls: str, point: str, model: str = "bundle") -> pd.Series | None:
    sel = result[(result["model"] == model) & (result["class"] == cls) & (result["point"] == point)]
    return None if sel.empty else sel.iloc[0]


def cq500_table(result: pd.DataFrame, info: dict[str, Any]) -> str:
    """The markdown table: one row a finding, in the published order, with the published AUC next to ours."""
    head = (
        "| Finding | Positive / negative studies | AUC (95 % CI) | Operating point: sensitivity % (95 % CI) "
        "| Operating point: specificity % (95 % CI) | Specificity % at 90 % sensitivity | Sensitivity % at 90 % "
        "specificity | Published AUC, CQ500 |"
    )
    lines = [head, "|" + "---|" * 8]
    for cls, name in FINDING_ROWS:
        op = _row(result, cls, "operating_point")
        if op is None:
            continue
        s90 = _row(result, cls, "sensitivity_0.90")
        c90 = _row(result, cls, "specificity_0.90")
        lines.append(
            f"| {name} | {int(op['n_pos'])} / {int(op['n_neg'])} | {_ci(op['auc'], op['auc_lo'], op['auc_hi'])} "
            f"| {_ci(op['sensitivity'], op['sensitivity_lo'], op['sensitivity_hi'], True)} "
            f"| {_ci(op['specificity'], op['specificity_lo'], op['specificity_hi'], True)} "
            f"| {_ci(s90['specificity'], s90['specificity_lo'], s90['specificity_hi'], True)} "
            f"| {_ci(c90['sensitivity'], c90['sensitivity_lo'], c90['sensitivity_hi'], True)} "
            f"| {PUBLISHED_AUC[cls]:.2f} |"
        )
    ref = "majority of three readers" if info["format"] == "cq500" else "the site's labels"
    if info.get("fleiss_kappa"):
        kappas = [
            f"{name.split('(')[-1].rstrip(')')} {info['fleiss_kappa'][cls]['kappa']:.2f}"
            for cls, name in FINDING_ROWS
            if isinstance((info["fleiss_kappa"].get(cls) or {}).get("kappa"), float)
            and math.isfinite(info["fleiss_kappa"][cls]["kappa"])
        ]
        lines += ["", "Inter-reader agreement (Fleiss' κ, three readers): " + ", ".join(kappas) + "."]
    lines.append("")
    lines.append(
        f"Reference: {ref}. AUC intervals: study bootstrap ({info['bootstrap']['resamples']} resamples, seed "
        f"{info['bootstrap']['seed']}); sensitivity / specificity: Wilson 95 %. Operating point: the bundle's "
        "(target sensitivity chosen on its training out-of-fold studies). Published: Chilamkurthy et al., "
        "Lancet 2018, their model on CQ500, for comparison."
    )
    return "\n".join(lines) + "\n"


def clinical_summary(result: pd.DataFrame, info: dict[str, Any]) -> str:
    """A few plain sentences: what was checked, how well the bundle found hemorrhage, what could not be checked."""
    n = info["n_studies"]
    where = "CQ500-format studies" if info["format"] == "cq500" else "labelled studies of the site"
    ref = "the majority of three radiologists' reads" if info["format"] == "cq500" else "the site's labels"
    lines = [f"Checked on {n['ok']} {where} against {ref}."]
    op = _row(result, "any", "operating_point")
    if op is not None:
        lines.append(
            f"Hemorrhage of any type ({int(op['n_pos'])} positive, {int(op['n_neg'])} negative studies): AUC "
            f"{_ci(op['auc'], op['auc_lo'], op['auc_hi'])}. At the bundle's operating point it flagged "
            f"{int(op['tp'])} of {int(op['n_pos'])} studies with hemorrhage (sensitivity {_pct(op['sensitivity'])}, "
            f"95 % CI {_pct(op['sensitivity_lo'])}–{_pct(op['sensitivity_hi'])}) and cleared {int(op['tn'])} of "
            f"{int(op['n_neg'])} without (specificity {_pct(op['specificity'])}, 95 % CI "
            f"{_pct(op['specificity_lo'])}–{_pct(op['specificity_hi'])}); {int(op['fn'])} hemorrhage(s) missed."
        )
        lines.append(
            f"Calibration: Brier score {op['brier']:.3f}, expected calibration error {op['ece']:.3f} (0 is "
            "perfect: a stated 30 % should be right 30 % of the time)."
        )
    subs = []
    for cls, name in FINDING_ROWS[1:]:
        r = _row(result, cls, "operating_point")
        if r is not None and r["n_pos"] > 0:
            subs.append(f"{name.split(' (')[0].lower()} {r['auc']:.2f} ({int(r['n_pos'])} positive)")
    if subs:
        lines.append("Subtype AUCs: " + "; ".join(subs) + ".")
    small = [c for c in info["classes"] if 0 < info["n_positive"].get(c, 0) < 10]
    if small:
        lines.append(
            f"Fewer than 10 positive studies for {', '.join(small)}: those numbers are rough (see the intervals)."
        )
    if info.get("fleiss_kappa"):
        k = info["fleiss_kappa"].get("any", {})
        if k and math.isfinite(k.get("kappa", float("nan"))):
            lines.append(f"The three readers agreed on hemorrhage with Fleiss' kappa {k['kappa']:.2f}.")
    probs = info["problems"]
    left = [f"{probs[k]['message']}: {probs[k]['count']}" for k in probs if probs[k]["count"] and k != "label_rows"]
    if left:
        lines.append("Not evaluated or incomplete: " + "; ".join(left) + ".")
    recal = info.get("recalibration")
    if recal:
        cv = _row(result, "any", "operating_point", "recalibrated_cv")
        if cv is not None:
            lines.append(
                f"Recalibrated on these studies ({recal['cv_folds']}-fold cross-validated): sensitivity "
                f"{_pct(cv['sensitivity'])}, specificity {_pct(cv['specificity'])}, Brier {cv['brier']:.3f}, "
                f"ECE {cv['ece']:.3f} for any hemorrhage; new bundle {recal['bundle']}."
            )
    lines.append("This is a check of the software on these studies, not a clinical approval.")
    return "\n".join(lines) + "\n"


def write_report(result: pd.DataFrame, table: pd.DataFrame, info: dict[str, Any], out: Path) -> str:
    """Write ``summary.txt``, ``table.md`` and ``report.png``; returns the summary text."""
    ok = table[table["status"] == "ok"]
    curves, ops = {}, {}
    for c in info["classes"]:
        y = ok[f"y_{c}"].to_numpy(dtype=np.float64)
        known = ~np.isnan(y)
        curves[c] = (y[known], ok[f"p_{c}"].to_numpy(dtype=np.float64)[known])
        r = _row(result, c, "operating_point")
        if r is not None:
            ops[c] = (float(r["sensitivity"]), float(r["specificity"]))
    title = f"{info['format']} validation: {info['n_studies']['ok']} studies, bundle {info['bundle_sha256'][:12]}"
    plot_roc_reliability(curves, ops, out / "report.png", title, info["ece_bins"])
    text = clinical_summary(result, info)
    write_text(text, out / "summary.txt")
    write_text(cq500_table(result, info), out / "table.md")
    return text
