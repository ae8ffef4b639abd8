"""MLP stacker over the level-2 features, in torch on CPU.

Probability features enter as logits (the base models' evidence adds up on that scale), then every feature is
standardised with the training rows' mean and std. Loss: BCE with the competition class weights; early stopping
on a patient-grouped inner validation split, keeping the best epoch's weights.

In a bundle: ``mlp.safetensors`` (the network's weights) and ``mlp.json`` (layer sizes, dropout, the scaler's mean
and std, which features are probabilities). torch is imported when a stacker is used, so registering it stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rsna19.core.constants import CLASS_WEIGHTS, CLASSES
from rsna19.core.errors import UserError
from rsna19.core.threads import resolve_threads
from rsna19.stacking.base import Reader, inner_split, read_json, read_tensors, save_json, save_tensors
from rsna19.stacking.config import MlpConfig
from rsna19.stacking.features import Level2Data
from rsna19.stacking.registry import register_stacker
from rsna19.stacking.start import check_start, fit_start, start_logit

if TYPE_CHECKING:
    import torch
    from torch import nn

_EPS = 1e-6


def _mlp(n_in: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    from torch import nn

    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
        n_in = h
    layers.append(nn.Linear(n_in, len(CLASSES)))
    return nn.Sequential(*layers)


@register_stacker("mlp", config=MlpConfig)
class MlpStacker:
    """A small fully connected network with six sigmoid outputs."""

    name = "mlp"

    @classmethod
    def from_config(cls, cfg: MlpConfig, seed: int = 0) -> MlpStacker:
        """From the ``mlp:`` section and the stack config's seed."""
        return cls(cfg, seed)

    def __init__(self, cfg: MlpConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or MlpConfig()
        self.seed = seed
        self.net: nn.Sequential | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.prob_mask: np.ndarray | None = None
        self.history: list[float] = []
        self.hidden: tuple[int, ...] = tuple(self.cfg.hidden)  # the widths used (``capacity: auto`` may cap them)
        self.start_weights: np.ndarray | None = None  # (M, 6) convex weights of the start, or None

    def _start(self, data: Level2Data) -> torch.Tensor:
        """(N, 6) starting logits added to the network's output (zeros without a start)."""
        import torch

        if self.start_weights is None:
            return torch.zeros((len(data), len(CLASSES)))
        return torch.from_numpy(start_logit(data.base, self.start_weights).astype(np.float32))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """(N, F) raw features with the probability columns replaced by their logits (float32 copy)."""
        X = np.array(X, dtype=np.float32, copy=True)
        p = np.clip(X[:, self.prob_mask], _EPS, 1 - _EPS)
        X[:, self.prob_mask] = np.log(p) - np.log1p(-p)
        return X

    def _transform(self, X: np.ndarray) -> torch.Tensor:
        """(N, F) raw features → standardised float32 tensor."""
        import torch

        return torch.from_numpy((self._logits(X) - self.mean) / self.std)

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        """Train on ``data`` (N rows), labels ``y`` (N, 6)."""
        import torch

        c = self.cfg
        threads = torch.get_num_threads()
        torch.set_num_threads(resolve_threads(c.num_threads, "mlp.num_threads"))
        try:
            self._fit(data, y)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, data: Level2Data, y: np.ndarray) -> None:
        import torch
        from torch import nn

        c = self.cfg
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        tr, va = inner_split(data.groups, c.inner_val_fraction, self.seed)
        check_start(c.start)
        self.start_weights = fit_start(data.base[tr], y[tr]) if c.start == "convex" else None
        self.hidden = tuple(c.hidden)
        if c.capacity == "auto":
            cap = max(8, len(np.unique(data.groups)) // 2)
            self.hidden = tuple(min(h, cap) for h in self.hidden)
        s_tr, s_va = self._start(data.take(tr)), self._start(data.take(va))
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

        net = _mlp(x_tr.shape[1], self.hidden, c.dropout)
        if self.start_weights is not None:
            # Zero output layer: before any step the network predicts the start exactly.
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        with torch.no_grad():
            start_val = float((loss_fn(net(x_va) + s_va, y_va) * w).sum(dim=1).mean())
        # The untrained network (the start itself, with a start) is the first candidate: epochs must beat it.
        best, best_state, stale = start_val, copy.deepcopy(net.state_dict()), 0
        self.history = []
        for _ in range(c.epochs):
            net.train()
            order = torch.randperm(len(x_tr), generator=gen)
            for i in range(0, len(order), c.batch_size):
                idx = order[i : i + c.batch_size]
                loss = (loss_fn(net(x_tr[idx]) + s_tr[idx], y_tr[idx]) * w).sum(dim=1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val = float((loss_fn(net(x_va) + s_va, y_va) * w).sum(dim=1).mean())
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
        import torch

        if self.net is None:
            raise RuntimeError("MlpStacker.predict before fit")
        out = []
        threads = torch.get_num_threads()
        torch.set_num_threads(resolve_threads(self.cfg.num_threads, "mlp.num_threads"))
        with contextlib.ExitStack() as stack:
            stack.callback(torch.set_num_threads, threads)
            stack.enter_context(torch.no_grad())
            for i in range(0, len(data.X), batch_size):
                part = data.take(np.arange(i, min(i + batch_size, len(data))))
                out.append(torch.sigmoid(self.net(self._transform(part.X)) + self._start(part)).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(CLASSES)))

    def save(self, dest: Path) -> dict[str, Any]:
        """Write ``mlp.safetensors`` (weights) and ``mlp.json`` (layer sizes, scaler, probability mask)."""
        if self.net is None or self.mean is None or self.std is None or self.prob_mask is None:
            raise RuntimeError("MlpStacker.save before fit")
        save_tensors(self.net.state_dict(), dest / "mlp.safetensors")
        meta = {
            "hidden": list(self.hidden),
            "dropout": self.cfg.dropout,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "prob_mask": self.prob_mask.tolist(),
        }
        if self.start_weights is not None:
            meta["start_weights"] = np.asarray(self.start_weights).tolist()
        save_json(meta, dest / "mlp.json")
        return {"weights": "mlp.safetensors", "meta": "mlp.json"}

    @classmethod
    def load(cls, info: dict[str, Any], read: Reader) -> MlpStacker:
        """The stacker :meth:`save` wrote, in eval mode."""
        m = read_json(read, info["meta"])
        hidden, dropout = tuple(int(h) for h in m["hidden"]), float(m["dropout"])
        st = cls(MlpConfig(hidden=hidden, dropout=dropout))
        st.hidden = hidden
        if m.get("start_weights") is not None:  # bundles written before the residual start have none
            st.start_weights = np.asarray(m["start_weights"], dtype=np.float64)
            if st.start_weights.ndim != 2 or st.start_weights.shape[1] != len(CLASSES):
                raise UserError(f"stacker file {info['meta']}: start weights of shape {st.start_weights.shape}")
        st.mean = np.asarray(m["mean"], dtype=np.float32)
        st.std = np.asarray(m["std"], dtype=np.float32)
        st.prob_mask = np.asarray(m["prob_mask"], dtype=bool)
        if not (st.mean.ndim == 1 and st.mean.shape == st.std.shape == st.prob_mask.shape):
            raise UserError(f"stacker file {info['meta']}: mean, std and prob_mask differ in shape")
        net = _mlp(len(st.mean), hidden, dropout)
        try:
            net.load_state_dict(read_tensors(read, info["weights"]))
        except RuntimeError as exc:  # state dict does not fit the layer sizes
            raise UserError(f"stacker file {info['weights']} does not fit {info['meta']}: {exc}") from None
        st.net = net.eval()
        return st
