"""Pieces shared by the model families: pooling and the classification head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rsna19.constants import CLASSES
from rsna19.errors import UserError

Pool = Literal["avg", "catavgmax"]


class GlobalPool(nn.Module):
    """Global average pooling, or the concatenation of average and max pooling (``catavgmax``).

    Maps (B, F, h, w) to (B, F) or (B, 2F).
    """

    def __init__(self, kind: Pool = "avg") -> None:
        super().__init__()
        if kind not in ("avg", "catavgmax"):
            raise UserError(f"pool must be 'avg' or 'catavgmax', got {kind!r}")
        self.kind = kind

    def factor(self) -> int:
        """Output features per input feature."""
        return 2 if self.kind == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=(-2, -1))
        if self.kind == "avg":
            return avg
        return torch.cat([avg, x.amax(dim=(-2, -1))], dim=1)


class Head(nn.Module):
    """Dropout + linear layer: (B, D) features → (B, num_classes) logits."""

    def __init__(self, in_features: int, num_classes: int = len(CLASSES), drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))
