"""Pieces shared by the model families: pooling and the classification head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError

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


def first_conv(backbone: nn.Module) -> nn.Conv2d:
    """The convolution that reads the input: timm's ``pretrained_cfg["first_conv"]``, else the first Conv2d.

    Raises:
        UserError: the backbone has no 2D convolution.
    """
    name = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, str):
        try:
            conv = backbone.get_submodule(name)
            if isinstance(conv, nn.Conv2d):
                return conv
        except AttributeError:
            pass
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise UserError(f"{type(backbone).__name__} has no Conv2d to initialise")


@torch.no_grad()
def scale_neighbour_inputs(backbone: nn.Module, n_slices: int, n_windows: int, scale: float) -> None:
    """Multiply the first convolution's weights of the non-centre slices by ``scale`` (0: a 2D start).

    Input channels are slice-major (channel ``s·n_windows + c``). With ``scale = 0`` the 2.5D model starts as a
    2D model of the centre slice (the normalisation after the stem makes the overall magnitude irrelevant) and
    learns from the neighbours as their weights grow from zero: from-scratch 2.5D models otherwise spend their
    first epochs finding out which slice the labels belong to.
    """
    conv = first_conv(backbone)
    if conv.in_channels != n_slices * n_windows:
        raise UserError(f"first conv has {conv.in_channels} inputs, not {n_slices} slices × {n_windows} windows")
    centre = n_slices // 2
    for s in range(n_slices):
        if s != centre:
            conv.weight[:, s * n_windows : (s + 1) * n_windows] *= scale
