"""``clf2dc``: 2.5D — neighbouring slices × windows as channels (``3c``, ``5c``, ``7c``), and the three-branch
``3x3`` form: nine slices in three groups of three, each group through one shared encoder, features concatenated.
"""

from __future__ import annotations

from torch import nn

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.nets.clf2d import Clf2d
from rsna19.nets.common import Pool, scale_neighbour_inputs
from rsna19.nets.registry import register_model


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
    if neighbour_init is not None and branches != 1:
        raise UserError("clf2dc: neighbour_init applies to the one-branch form (branches: 1)")
    in_chans = n_slices // branches * n_windows
    model = Clf2d(backbone, in_chans, num_classes, pretrained, weights, drop_rate, drop_path_rate, pool, branches)
    if neighbour_init is not None:
        scale_neighbour_inputs(model.backbone, n_slices, n_windows, neighbour_init)
    return model


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
