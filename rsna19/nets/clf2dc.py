"""``clf2dc``: 2.5D — neighbouring slices × windows as channels (``3c``, ``5c``, ``7c``), and the three-branch
``3x3`` form: nine slices in three groups of three, each group through one shared encoder, features concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.nets.clf2d import Clf2d
from rsna19.nets.common import GlobalPool, Head, Pool, scale_neighbour_inputs
from rsna19.nets.pretrained import create_backbone
from rsna19.nets.registry import register_model


class BranchClf(nn.Module):
    """Shared encoder over ``branches`` groups of input channels, features concatenated, one linear head.

    Args:
        backbone: timm model name.
        in_chans: channels of one group (slices per group × windows).
        branches: number of groups; the input has ``branches · in_chans`` channels, group ``g`` being the
            contiguous channels ``g·in_chans … (g+1)·in_chans − 1`` (consecutive slices, since channels are
            slice-major).
        num_classes, pretrained, weights, drop_rate, drop_path_rate, pool: as :class:`Clf2d`.

    Input (B, branches·in_chans, H, W) → logits (B, num_classes).
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        branches: int,
        num_classes: int = len(CLASSES),
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pool: Pool = "avg",
    ) -> None:
        super().__init__()
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.branches = branches
        self.in_chans = in_chans
        self.backbone = create_backbone(backbone, in_chans, pretrained=pretrained, weights=weights, **extra)
        self.pool = GlobalPool(pool)
        self.num_features = self.backbone.num_features * self.pool.factor() * branches
        self.head = Head(self.num_features, num_classes, drop_rate)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled features of the branches, (B, num_features)."""
        b, _, h, w = x.shape
        groups = x.reshape(b * self.branches, self.in_chans, h, w)  # the batch axis carries the branches
        feats = self.pool(self.backbone.forward_features(groups))  # (B·branches, F)
        return feats.reshape(b, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("clf2dc", family="clf2dc", description="2.5D: slices × windows as channels (3c/5c/7c/9c)")
def clf2dc(
    backbone: str = "resnet18",
    n_windows: int = 3,
    n_slices: int = 5,
    num_classes: int = len(CLASSES),
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pool: Pool = "avg",
    branches: int = 1,
    neighbour_init: float | None = None,
) -> nn.Module:
    """2.5D classifier; ``branches > 1`` splits the slices into groups through a shared encoder.

    ``neighbour_init``: scale of the first convolution's weights for the non-centre slices after creation (0
    starts as a 2D model of the centre slice, see :func:`scale_neighbour_inputs`); None leaves timm's init. The
    long keyword list must stay: a registered factory's keywords are the ``model:`` keys users set in YAML
    (docs/extending.md).
    """
    if branches < 1 or n_slices % branches:
        raise UserError(f"clf2dc: data.slices ({n_slices}) must be a multiple of branches ({branches})")
    if branches == 1:
        model = Clf2d(backbone, n_slices * n_windows, num_classes, pretrained, weights, drop_rate, drop_path_rate, pool)
        if neighbour_init is not None:
            scale_neighbour_inputs(model.backbone, n_slices, n_windows, neighbour_init)
        return model
    if neighbour_init is not None:
        raise UserError("clf2dc: neighbour_init applies to the one-branch form (branches: 1)")
    in_chans = n_slices // branches * n_windows
    return BranchClf(backbone, in_chans, branches, num_classes, pretrained, weights, drop_rate, drop_path_rate, pool)


@register_model("clf2dc_3x3", family="clf2dc", description="2.5D 3x3: 9 slices in 3 groups, shared encoder")
def clf2dc_3x3(
    backbone: str = "resnet18",
    n_windows: int = 3,
    n_slices: int = 9,
    num_classes: int = len(CLASSES),
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pool: Pool = "avg",
) -> nn.Module:
    """The seed's ``3x3``: nine neighbouring slices as three groups of three through one shared encoder."""
    return clf2dc(backbone, n_windows, n_slices, num_classes, pretrained, weights, drop_rate, drop_path_rate, pool, 3)
