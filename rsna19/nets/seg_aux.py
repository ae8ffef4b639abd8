"""``seg_aux``: a segmentation-models-pytorch U-Net with a classification head on its deepest features.

The decoder predicts one mask channel per subtype (five: ``SUBTYPES`` order, the bits of the synthetic
``masks/*.npz``); the classification head (smp ``aux_params``: global pool, dropout, linear) predicts the six
labels from the encoder's last stage. The mask loss is an auxiliary signal that tells the encoder *where* the
blood is; it only applies to samples that have masks (:func:`rsna19.engine.losses.seg_aux_loss`).

Encoders: any smp encoder name, e.g. ``resnet18``/``resnet34`` (smp's own) or ``tu-<timm name>``
(``tu-resnet10t``, ``tu-efficientnet_b0`` …). smp is always built with ``encoder_weights=None`` so nothing is
downloaded; pretrained weights come from a local file (``weights=PATH``) or, for ``tu-`` encoders, from the local
timm/Hugging Face cache (``pretrained=True``, as :mod:`rsna19.nets.pretrained`).

Input (B, S·C, H, W) with H, W multiples of 32 → ``(cls_logits (B, 6), mask_logits (B, 5, H, W))``;
:meth:`SegAux.classify` gives only the class logits (encoder + head, no decoder: what prediction needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.core.errors import UserError
from rsna19.nets.pretrained import offline, weight_file
from rsna19.nets.registry import register_model

#: Prefixes that wrappers (DDP, timm checkpoints saved from a parent module) put before encoder keys.
_STRIP_PREFIXES = ("module.", "model.", "encoder.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.bin`` file (a ``state_dict``/``model`` entry is unwrapped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many kinds for bad files
        raise UserError(f"cannot read weights {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_encoder_weights(encoder: nn.Module, path: Path) -> int:
    """Load a backbone weight file into an smp encoder; returns the number of tensors loaded.

    The classifier is skipped (absent from the encoder), the first convolution is adapted to the encoder's
    input channels (timm's ``adapt_input_conv``), wrapper prefixes are stripped.

    Raises:
        UserError: unreadable file, or fewer than half of the encoder's tensors found in it.
    """
    from timm.models import adapt_input_conv

    target = encoder.model if hasattr(encoder, "model") else encoder  # tu- encoders wrap a timm model
    own = target.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in _read_state_dict(path).items():
        for prefix in _STRIP_PREFIXES:
            if key not in own and key.startswith(prefix):
                key = key[len(prefix) :]
        if key not in own:
            continue
        if value.shape != own[key].shape:
            if value.ndim == 4 and value.shape[0] == own[key].shape[0] and value.shape[2:] == own[key].shape[2:]:
                value = adapt_input_conv(own[key].shape[1], value)
            else:
                continue
        loaded[key] = value
    if len(loaded) < len(own) / 2:
        raise UserError(f"{path}: only {len(loaded)} of the encoder's {len(own)} tensors match; wrong backbone?")
    target.load_state_dict(loaded, strict=False)
    return len(loaded)


class SegAux(nn.Module):
    """smp U-Net with per-subtype mask channels and an auxiliary classification head.

    Args:
        encoder: smp encoder name (``resnet18``, ``tu-resnet10t`` …).
        in_chans: input channels (windows × slices).
        num_classes: classification outputs (6).
        mask_classes: mask channels (5 subtypes).
        drop_rate: dropout of the classification head.
        decoder_channels: U-Net decoder widths, one per encoder stage.
        pretrained: load local ImageNet weights (``tu-`` encoders: from the timm cache).
        weights: a local weight file for the encoder.
    """

    def __init__(
        self,
        encoder: str,
        in_chans: int,
        num_classes: int = len(CLASSES),
        mask_classes: int = len(SUBTYPES),
        drop_rate: float = 0.0,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
        pretrained: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        try:
            with offline():
                self.net = smp.Unet(
                    encoder_name=encoder,
                    encoder_weights=None,  # never download: weights come from local files below
                    encoder_depth=len(decoder_channels),
                    decoder_channels=tuple(decoder_channels),
                    in_channels=in_chans,
                    classes=mask_classes,
                    aux_params={"classes": num_classes, "dropout": drop_rate or None},
                )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot build smp encoder {encoder!r}: {exc}") from exc
        if pretrained and not weights and not encoder.startswith("tu-"):
            raise UserError(
                f"pretrained weights for smp encoder {encoder!r} are only looked up for 'tu-' (timm) encoders; "
                "set model.weights: /path/to/encoder_weights.pth, or use e.g. tu-resnet34"
            )
        file = weight_file(encoder.removeprefix("tu-"), pretrained, weights)
        if file is not None:
            load_encoder_weights(self.net.encoder, file)
        self.num_features = self.net.encoder.out_channels[-1]

    @property
    def backbone(self) -> nn.Module:
        """The encoder: the trainer's backbone parameter group (frozen-backbone warm-up, learning rates).

        A property, not an attribute, so the encoder is not registered twice (its weights once in checkpoints).
        """
        return self.net.encoder

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled deepest encoder features (B, num_features), e.g. embeddings."""
        return self.net.encoder(x)[-1].mean(dim=(-2, -1))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 6) only: encoder + classification head, the decoder is skipped."""
        return self.net.classification_head(self.net.encoder(x)[-1])

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters only the mask branch uses (decoder and segmentation head)."""
        return [*self.net.decoder.parameters(), *self.net.segmentation_head.parameters()]

    def forward(self, x: torch.Tensor, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Class logits (B, 6) and mask logits (B, 5, H, W); with ``decode=False`` the class logits only.

        ``decode=False`` goes through ``forward`` (not :meth:`classify`) so that a DistributedDataParallel wrapper
        sees the call; the mask branch's parameters must then be frozen (they get no gradient).
        """
        if not decode:
            return self.classify(x)
        masks, labels = self.net(x)
        return labels, masks


@register_model(
    "seg_aux",
    family="seg_aux",
    description="smp U-Net: per-subtype masks + classification head; mask loss where masks exist",
    input_layout="channels",
    task="seg_aux",
    masks=True,
    pretrained="smp",
)
def seg_aux(
    backbone: str = "resnet18",
    n_windows: int = 3,
    n_slices: int = 1,
    num_classes: int = len(CLASSES),
    mask_classes: int = len(SUBTYPES),
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 32, 16),
) -> SegAux:
    """Segmentation-aided classifier; ``backbone`` is an smp encoder name (``resnet18``, ``tu-resnet10t`` …)."""
    return SegAux(
        backbone,
        n_windows * n_slices,
        num_classes,
        mask_classes,
        drop_rate,
        tuple(decoder_channels),
        pretrained,
        weights,
    )
