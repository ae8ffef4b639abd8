"""The competition metric against a hand computation and against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from rsna19.metrics import per_class_auc, per_class_log_loss, score_table, study_auc_any, weighted_log_loss


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
