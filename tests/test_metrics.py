"""The competition metric against a hand computation and against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from rsna19.core.metrics import per_class_auc, per_class_log_loss, score_table, study_auc_any, weighted_log_loss


def test_weighted_log_loss_by_hand():
    y = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    p = np.array([[0.1, 0.2, 0.1, 0.1, 0.8, 0.9], [0.5] * 6])
    row0 = -(math.log(0.9) + math.log(0.8) + math.log(0.9) + math.log(0.9) + math.log(0.8) + 2 * math.log(0.9)) / 7
    row1 = -math.log(0.5)
    assert weighted_log_loss(y, p) == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_weighted_log_loss_matches_sklearn_with_sample_weights():
    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.3).astype(float)
    p = rng.random((50, 6))
    # Flatten to one binary problem where every (slice, class) cell carries its class weight.
    weights = np.tile([1, 1, 1, 1, 1, 2], 50)
    expected = log_loss(y.ravel(), p.ravel(), sample_weight=weights, labels=[0, 1])
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-10)


def test_clipping_keeps_loss_finite():
    y = np.array([[1, 0, 0, 0, 0, 1]])
    p = np.array([[0.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    loss = weighted_log_loss(y, p)
    assert np.isfinite(loss) and loss > 5


def test_per_class_and_auc():
    y = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]])
    p = np.array([[0.1, 0.1, 0.1, 0.1, 0.9, 0.9], [0.2] * 6, [0.7, 0.1, 0.1, 0.1, 0.1, 0.8]])
    losses = per_class_log_loss(y, p)
    assert losses["epidural"] == pytest.approx(np.mean([-math.log(0.9), -math.log(0.8), -math.log(0.7)]))
    aucs = per_class_auc(y, p)
    assert aucs["any"] == 1.0 and math.isnan(aucs["intraparenchymal"])
    # Both studies positive: study-level AUC is undefined.
    assert math.isnan(study_auc_any(np.array(["a", "a", "b"]), y[:, 5], p[:, 5]))
    table = score_table(y, p, np.array(["a", "b", "c"]))
    assert table["study_auc_any"] == 1.0 and "loss_any" in table


def test_shape_errors():
    with pytest.raises(ValueError, match="expected"):
        weighted_log_loss(np.zeros((3, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        weighted_log_loss(np.zeros((1, 6)), np.full((1, 6), np.nan))


# ------------------------------------------------------------------------------ decision metrics vs scikit-learn
def _binary_case(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    p = np.clip(rng.beta(2, 5, n) + 0.3 * y, 0, 1)
    p[:7] = [0.0, 1.0, 0.1, 0.2, 0.5, 0.9, 0.99999]  # bin edges and the ends
    return y, p


def test_decision_metrics_match_sklearn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

    from rsna19.core.metrics import decision_metrics, expected_calibration_error, reliability_bins

    y, p = _binary_case()
    m = decision_metrics(y, p, 0.4)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.4).ravel()
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    assert (m["n"], m["n_pos"], m["threshold"]) == (400, y.sum(), 0.4)
    frac_pos, mean_prob = calibration_curve(y, p, n_bins=10, strategy="uniform")
    bins = reliability_bins(y, p, 10)
    full = bins[bins["n"] > 0]
    np.testing.assert_allclose(full["frac_pos"], frac_pos, rtol=1e-12)
    np.testing.assert_allclose(full["mean_prob"], mean_prob, rtol=1e-12)
    ece = float(np.sum(full["n"] / len(y) * np.abs(frac_pos - mean_prob)))
    assert expected_calibration_error(y, p, 10) == pytest.approx(ece, rel=1e-12) == pytest.approx(m["ece"])
    assert bins["n"].sum() == len(y) and len(bins) == 10


def test_decision_metrics_edge_cases():
    from rsna19.core.metrics import decision_metrics, expected_calibration_error

    perfect = decision_metrics(np.array([0, 0, 1, 1]), np.array([0.0, 0.0, 1.0, 1.0]), 0.5)
    assert perfect["auc"] == 1 and perfect["brier"] == 0 and perfect["ece"] == 0
    one_class = decision_metrics(np.zeros(5), np.linspace(0, 1, 5), 0.5)
    assert math.isnan(one_class["auc"]) and math.isnan(one_class["sensitivity"]) and one_class["specificity"] == 0.4
    # All probabilities 0.75 with 3 of 4 positive: calibrated, ECE 0.
    assert expected_calibration_error(np.array([1, 1, 1, 0]), np.full(4, 0.75)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        decision_metrics(np.array([0, 2]), np.array([0.1, 0.2]), 0.5)
    with pytest.raises(ValueError):
        decision_metrics(np.array([0, 1]), np.array([0.1, 1.2]), 0.5)


def test_wilson_interval_is_the_textbook_formula():
    """``wilson_interval`` (SciPy's) equals the closed form ``(p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``
    with z the 97.5 % normal point, to 1e-12, for every k of small and larger n; NaN for n = 0."""
    from rsna19.core.metrics import wilson_interval

    z = 1.959963984540054
    for n in (1, 2, 3, 4, 5, 8, 13, 21, 34, 55):
        for k in range(n + 1):
            p = k / n
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            lo, hi = wilson_interval(k, n)
            assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
            assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
