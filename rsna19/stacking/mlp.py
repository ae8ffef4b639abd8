"""MLP stacker over the level-2 features, in torch on CPU.

Probability features enter as logits (the base models' evidence adds up on that scale), then every feature is
standardised with the training rows' mean and std. Loss: BCE with the competition class weights; early stopping
on a patient-grouped inner validation split, keeping the best epoch's weights.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from rsna19.constants import CLASS_WEIGHTS, CLASSES
from rsna19.stacking.base import inner_split
from rsna19.stacking.config import MlpConfig
from rsna19.stacking.features import Level2Data

_EPS = 1e-6


def _mlp(n_in: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
        n_in = h
    layers.append(nn.Linear(n_in, len(CLASSES)))
    return nn.Sequential(*layers)


class MlpStacker:
    """A small fully connected network with six sigmoid outputs."""

    name = "mlp"

    def __init__(self, cfg: MlpConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or MlpConfig()
        self.seed = seed
        self.net: nn.Sequential | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.prob_mask: np.ndarray | None = None
        self.history: list[float] = []

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """(N, F) raw features with the probability columns replaced by their logits (float32 copy)."""
        X = np.array(X, dtype=np.float32, copy=True)
        p = np.clip(X[:, self.prob_mask], _EPS, 1 - _EPS)
        X[:, self.prob_mask] = np.log(p) - np.log1p(-p)
        return X

    def _transform(self, X: np.ndarray) -> torch.Tensor:
        """(N, F) raw features → standardised float32 tensor."""
        return torch.from_numpy((self._logits(X) - self.mean) / self.std)

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        """Train on ``data`` (N rows), labels ``y`` (N, 6)."""
        c = self.cfg
        threads = torch.get_num_threads()
        torch.set_num_threads(c.num_threads)
        try:
            self._fit(data, y)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, data: Level2Data, y: np.ndarray) -> None:
        c = self.cfg
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        tr, va = inner_split(data.groups, c.inner_val_fraction, self.seed)
        self.prob_mask = data.prob_mask
        raw = self._logits(data.X[tr])
        self.mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        self.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)  # constant columns stay at zero
        x_tr = torch.from_numpy((raw - self.mean) / self.std)
        x_va = self._transform(data.X[va])
        y_tr = torch.from_numpy(y[tr].astype(np.float32))
        y_va = torch.from_numpy(y[va].astype(np.float32))
        w = torch.tensor(CLASS_WEIGHTS, dtype=torch.float32) / sum(CLASS_WEIGHTS)

        net = _mlp(x_tr.shape[1], tuple(c.hidden), c.dropout)
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        best, best_state, stale = float("inf"), copy.deepcopy(net.state_dict()), 0
        self.history = []
        for _ in range(c.epochs):
            net.train()
            order = torch.randperm(len(x_tr), generator=gen)
            for i in range(0, len(order), c.batch_size):
                idx = order[i : i + c.batch_size]
                loss = (loss_fn(net(x_tr[idx]), y_tr[idx]) * w).sum(dim=1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val = float((loss_fn(net(x_va), y_va) * w).sum(dim=1).mean())
            self.history.append(val)
            if val < best - 1e-6:
                best, best_state, stale = val, copy.deepcopy(net.state_dict()), 0
            else:
                stale += 1
                if stale >= c.patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        self.net = net

    def predict(self, data: Level2Data, batch_size: int = 65536) -> np.ndarray:
        """(N, 6) probabilities."""
        if self.net is None:
            raise RuntimeError("MlpStacker.predict before fit")
        out = []
        with torch.no_grad():
            for i in range(0, len(data.X), batch_size):
                out.append(torch.sigmoid(self.net(self._transform(data.X[i : i + batch_size]))).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(CLASSES)))
