"""``clf2d``: one slice, its windows as the input channels of any timm backbone."""

from __future__ import annotations

import torch
from torch import nn

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.nets.common import GlobalPool, Head, Pool
from rsna19.nets.pretrained import create_backbone
from rsna19.nets.registry import register_model


class Clf2d(nn.Module):
    """A timm backbone, global pooling and a linear head; the backbone may be shared by ``branches`` input groups.

    Args:
        backbone: timm model name.
        in_chans: input channels of one branch (windows × slices).
        num_classes: outputs (6).
        pretrained: load local ImageNet weights (see :mod:`rsna19.nets.pretrained`).
        weights: a weight file for the backbone.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth inside the backbone.
        pool: ``avg`` or ``catavgmax``.
        branches: groups of input channels through the one backbone, their features concatenated; group ``g``
            is the contiguous channels ``g·in_chans … (g+1)·in_chans − 1`` (consecutive slices, since channels
            are slice-major).

    Input (B, branches·in_chans, H, W) → logits (B, num_classes).
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        num_classes: int = len(CLASSES),
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pool: Pool = "avg",
        branches: int = 1,
    ) -> None:
        super().__init__()
        self.branches = branches
        self.in_chans = in_chans
        self.backbone = create_backbone(backbone, in_chans, pretrained, weights, drop_path_rate=drop_path_rate)
        self.pool = GlobalPool(pool)
        self.num_features = self.backbone.num_features * self.pool.factor() * branches
        self.head = Head(self.num_features, num_classes, drop_rate)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features), the branches' concatenated; e.g. embeddings for a sequence model."""
        b, _, h, w = x.shape
        groups = x.reshape(b * self.branches, self.in_chans, h, w)  # the batch axis carries the branches
        return self.pool(self.backbone.forward_features(groups)).reshape(b, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("clf2d", family="clf2d", description="2D: one slice, windows as channels, any timm backbone")
def clf2d(
    backbone: str = "resnet18",
    n_windows: int = 3,
    n_slices: int = 1,
    num_classes: int = len(CLASSES),
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pool: Pool = "avg",
) -> Clf2d:
    """2D classifier: in_chans = windows of one slice."""
    if n_slices != 1:
        raise UserError(f"clf2d takes one slice (data.slices: 1), got {n_slices}; use clf2dc for 2.5D")
    return Clf2d(backbone, n_windows, num_classes, pretrained, weights, drop_rate, drop_path_rate, pool)
