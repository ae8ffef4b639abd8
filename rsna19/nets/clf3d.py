"""``clf3d``: a slab of consecutive slices, a shared 2D encoder per slice, Conv3d over the slice axis.

A sample is a window of ``S`` consecutive slices (default 8) of one series, each with its windows (or the CDF
mapping) as channels. Every slice goes through the same timm encoder; the ``S`` feature maps are stacked into a
(B, F, S, h, w) volume and mixed along the slice axis by ``depth`` residual blocks ``x + GELU(Conv3d(x))`` with a
(k, 1, 1) kernel (zero padding at the ends of the slab). The convolutions start at zero, so at initialisation
each slice passes through unchanged (the model starts as a plain 2D classifier of every slice and learns how
much its neighbours add; GELU'(0) = ½, so the zero weights still get gradients). Each slice's mixed map is then
concat-pooled (avg ⊕ max) and a linear head gives its six logits.

The model predicts **all** ``S`` slices: output (B, S, 6). Which of them train (e.g. only the middle ``M``, whose
context is complete) is a choice of the loss mask (:class:`rsna19.data.slab.SlabDataset` ``label_slices``), and
prediction slides windows over the whole series and averages the overlapping predictions
(:func:`rsna19.data.slab.aggregate`), so every slice gets exactly one prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.nets.common import GlobalPool, Head
from rsna19.nets.pretrained import create_backbone
from rsna19.nets.registry import register_model


class SliceMixer(nn.Module):
    """Residual Conv3d blocks over the slice axis of (B, F, S, h, w) maps; the identity at initialisation.

    Args:
        channels: F.
        kernel: odd kernel length along the slice axis.
        depth: number of blocks (receptive field ``depth · (kernel − 1) + 1`` slices).
    """

    def __init__(self, channels: int, kernel: int = 3, depth: int = 2) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise UserError(f"clf3d slice kernel must be odd and >= 1, got {kernel}")
        self.convs = nn.ModuleList(
            nn.Conv3d(channels, channels, kernel_size=(kernel, 1, 1), padding=(kernel // 2, 0, 0)) for _ in range(depth)
        )
        self.act = nn.GELU()
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + self.act(conv(x))
        return x


class Clf3d(nn.Module):
    """Shared per-slice encoder + slice-axis Conv3d mixer + per-slice concat pooling and head.

    Args:
        backbone: timm model name.
        n_windows: channels per slice (C).
        n_slices: slices per slab (S); only used to check inputs.
        num_classes: outputs per slice (6).
        kernel: slice-axis kernel of the mixer.
        depth: mixer blocks.
        pretrained, weights, drop_rate, drop_path_rate: as :class:`~rsna19.nets.clf2d.Clf2d`.

    Input (B, S, C, H, W) → logits (B, S, num_classes).
    """

    def __init__(
        self,
        backbone: str,
        n_windows: int,
        n_slices: int,
        num_classes: int = len(CLASSES),
        kernel: int = 3,
        depth: int = 2,
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_slices = n_slices
        self.n_windows = n_windows
        self.backbone = create_backbone(backbone, n_windows, pretrained, weights, drop_path_rate=drop_path_rate)
        f = self.backbone.num_features
        self.mixer = SliceMixer(f, kernel, depth)
        self.pool = GlobalPool("catavgmax")
        self.num_features = 2 * f
        self.head = Head(self.num_features, num_classes, drop_rate)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled per-slice features (B, S, 2F) after mixing over the slab."""
        if x.ndim != 5 or x.shape[2] != self.n_windows:
            raise ValueError(f"clf3d expects (B, S, {self.n_windows}, H, W), got {tuple(x.shape)}")
        b, s, c, h, w = x.shape
        maps = self.backbone.forward_features(x.reshape(b * s, c, h, w))  # (B·S, F, h', w')
        maps = maps.reshape(b, s, *maps.shape[1:]).transpose(1, 2)  # (B, F, S, h', w')
        mixed = self.mixer(maps).transpose(1, 2)  # (B, S, F, h', w')
        return self.pool(mixed.reshape(b * s, *mixed.shape[2:])).reshape(b, s, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(
    "clf3d",
    family="clf3d",
    description="3D slab: per-slice shared encoder, residual Conv3d over slices, a prediction for every slice",
    input_layout="slab",
)
def clf3d(
    backbone: str = "resnet18",
    n_windows: int = 3,
    n_slices: int = 8,
    num_classes: int = len(CLASSES),
    kernel: int = 3,
    depth: int = 2,
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> Clf3d:
    """Slab model over ``n_slices`` consecutive slices (input (B, S, C, H, W), output (B, S, 6))."""
    if n_slices < 1:
        raise UserError(f"clf3d needs data.slices >= 1, got {n_slices}")
    return Clf3d(
        backbone, n_windows, n_slices, num_classes, kernel, depth, pretrained, weights, drop_rate, drop_path_rate
    )
