"""Grad-CAM heat maps for the per-slice classifiers (Selvaraju et al., 2017).

For a class c, Grad-CAM weights each channel k of a convolutional feature map A (1, K, h, w) by the spatial
mean of ∂logit_c/∂A_k and keeps the positive part of the weighted sum: ``relu(Σ_k α_k A_k)``. The map is
upsampled to the input size and scaled to [0, 1]; ``predict-study`` draws it over the top slice for ``any``.

The feature map is either the output of a timm-style ``forward_features`` (then the logits come from
``forward_head``), or the output of a named sub-module caught with a forward hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _resolve_layer(model: nn.Module, target_layer: str | nn.Module) -> nn.Module:
    if isinstance(target_layer, nn.Module):
        return target_layer
    try:
        return model.get_submodule(target_layer)
    except AttributeError as exc:
        raise ValueError(f"grad_cam: model has no sub-module {target_layer!r}") from exc


def cam_target(net: nn.Module) -> nn.Module | None:
    """The layer to take Grad-CAM at: the last 4-D feature stage of a 2D model's backbone (timm ResNets:
    ``layer4``), else its last Conv2d; None when it has neither."""
    backbone = getattr(net, "backbone", net)
    for name in ("layer4", "stages", "features", "blocks"):
        if hasattr(backbone, name):
            return getattr(backbone, name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: int,
    target_layer: str | nn.Module | None = None,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM map of one class for one input.

    The model is run in eval mode (its previous mode is restored) with gradients enabled, even when called
    under ``torch.no_grad()`` or with frozen parameters: the graph is built from the input.

    Args:
        model: a classifier returning logits (1, num_classes), or any output that ``logits_fn`` maps to them.
        x: (1, C, H, W) input on the model's device.
        class_idx: the class whose logit is explained.
        target_layer: None to use ``model.forward_features`` then ``model.forward_head`` (timm models), or a
            sub-module (or its dotted name, e.g. ``"layer3"``) whose output (1, K, h, w) is explained.
        logits_fn: maps the model output to the (1, num_classes) logits (e.g. picks the classification head
            of a segmentation model that returns a tuple); identity when None.

    Returns:
        (H, W) float32 map in [0, 1]; all zeros when no location raises the logit.

    Raises:
        ValueError: ``x`` is not (1, C, H, W), the feature map is not 4-D, the layer is unknown, or the model has
            no ``forward_features``/``forward_head`` and no ``target_layer`` is given.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam: x must be (1, C, H, W), got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hook = None
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            if target_layer is None:
                if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
                    raise ValueError("grad_cam: model has no forward_features/forward_head; give a target_layer")
                features = model.forward_features(inp)
                output = model.forward_head(features)
            else:
                layer = _resolve_layer(model, target_layer)
                hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
                output = model(inp)
                if not captured:
                    raise ValueError(f"grad_cam: target layer {target_layer!r} did not run in the forward pass")
                # A layer called several times (shared encoder): explain its last call.
                features = captured[-1]
            if not isinstance(features, torch.Tensor) or features.ndim != 4:
                shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
                raise ValueError(f"grad_cam: feature map must be (1, K, h, w), got {shape}")
            logits = logits_fn(output) if logits_fn is not None else output
            score = logits.reshape(-1)[class_idx] if logits.ndim == 1 else logits[0, class_idx]
            (grads,) = torch.autograd.grad(score, features)
            weights = grads.mean(dim=(2, 3), keepdim=True)  # α_k: (1, K, 1, 1)
            cam = F.relu((weights * features).sum(dim=1, keepdim=True))  # (1, 1, h, w)
            cam = F.interpolate(cam.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    cam_np = cam[0, 0].detach().cpu().numpy().astype(np.float32)
    cam_np = np.nan_to_num(cam_np, nan=0.0, posinf=0.0, neginf=0.0)
    cam_np -= cam_np.min()
    peak = float(cam_np.max())
    # A flat map (no positive evidence) stays all zeros instead of being blown up from rounding noise.
    return cam_np / peak if peak > 1e-12 else np.zeros_like(cam_np)
