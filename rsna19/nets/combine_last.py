"""``combine_last``: a shared 2D encoder per slice, merged over the slice axis at the end.

Each of the S slices (with its windows as channels) goes through the same encoder; the S feature maps are
merged by a Conv3d with kernel (S, 1, 1) that starts as the identity on the centre slice (so training starts
from a plain 2D model of the labelled slice and learns how much the neighbours add), then concat pooling
(avg ⊕ max) and a linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from rsna19.core.constants import CLASSES
from rsna19.nets.common import GlobalPool, Head
from rsna19.nets.pretrained import create_backbone
from rsna19.nets.registry import register_model


class CombineLast(nn.Module):
    """Shared per-slice encoder + slice-merging Conv3d + concat pooling + linear head.

    Args:
        backbone: timm model name.
        n_windows: channels per slice.
        n_slices: slices per sample (S).
        num_classes, pretrained, weights, drop_rate, drop_path_rate: as :class:`~rsna19.nets.clf2d.Clf2d`.

    Input (B, S, n_windows, H, W) → logits (B, num_classes).
    """

    def __init__(
        self,
        backbone: str,
        n_windows: int,
        n_slices: int,
        num_classes: int = len(CLASSES),
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_slices = n_slices
        self.backbone = create_backbone(backbone, n_windows, pretrained, weights, drop_path_rate=drop_path_rate)
        f = self.backbone.num_features
        self.combine = nn.Conv3d(f, f, kernel_size=(n_slices, 1, 1))
        with torch.no_grad():
            # Identity on the centre slice: output channel o = input channel o of slice S // 2.
            self.combine.weight.zero_()
            self.combine.weight[torch.arange(f), torch.arange(f), n_slices // 2, 0, 0] = 1.0
            self.combine.bias.zero_()
        self.pool = GlobalPool("catavgmax")
        self.num_features = 2 * f
        self.head = Head(self.num_features, num_classes, drop_rate)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled merged features (B, 2F)."""
        b, s, c, h, w = x.shape
        maps = self.backbone.forward_features(x.reshape(b * s, c, h, w))  # (B·S, F, h', w')
        maps = maps.reshape(b, s, *maps.shape[1:]).transpose(1, 2)  # (B, F, S, h', w')
        merged = self.combine(maps).squeeze(2)  # (B, F, h', w')
        return self.pool(merged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(
    "combine_last",
    family="combine_last",
    description="per-slice shared encoder, Conv3d over slices (centre-initialised), concat pooling",
    input_layout="stack",
)
def combine_last(
    backbone: str = "resnet18",
    n_windows: int = 3,
    n_slices: int = 5,
    num_classes: int = len(CLASSES),
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> CombineLast:
    """Combine-last 2.5D model over ``n_slices`` slices."""
    return CombineLast(backbone, n_windows, n_slices, num_classes, pretrained, weights, drop_rate, drop_path_rate)
