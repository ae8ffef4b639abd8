"""Losses of the model families: the competition-weighted BCE, its masked per-slice form for
slab and sequence models, and the classification + mask loss of the segmentation-aided model.

Every loss is a scalar tensor that stays connected to all of a model's outputs, even where a batch contributes
nothing (no labelled slice, no mask): then it is ``0 · outputs.sum()``, so every parameter still gets a (zero)
gradient and DistributedDataParallel does not wait for gradients that never come.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsna19.core.constants import CLASS_WEIGHTS


def _class_weights(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(CLASS_WEIGHTS, device=like.device, dtype=torch.float32)


def weighted_bce_terms(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-item competition loss: Σ_c w_c · BCE(logit_c, y_c) / Σ_c w_c, weights [1, 1, 1, 1, 1, 2].

    Args:
        logits: (..., 6).
        targets: (..., 6) in [0, 1]; NaN is allowed where the item is masked out later (it is replaced by 0).

    Returns:
        (...) float32.
    """
    w = _class_weights(logits)
    y = torch.nan_to_num(targets.float(), nan=0.0)
    bce = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
    return (bce * w).sum(dim=-1) / w.sum()


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The competition loss on (B, 6) logits, batch mean (the same number as the trainer's ``weighted_bce``)."""
    return weighted_bce_terms(logits, targets).mean()


def masked_seq_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted BCE averaged over the real, labelled slices of per-slice outputs (slab and sequence models).

    Args:
        logits: (B, T, 6).
        targets: (B, T, 6); rows with a NaN label count as unlabelled.
        mask: (B, T) bool, True at the slices that count (real, not padding; e.g. a slab's middle slices).

    Returns:
        Scalar: mean over the counted slices (each slice weighs the same whatever its series' length).
    """
    keep = mask.bool() & torch.isfinite(targets).all(dim=-1)
    terms = weighted_bce_terms(logits, targets)
    n = keep.sum()
    if int(n) == 0:
        return logits.sum() * 0.0
    return torch.where(keep, terms, torch.zeros_like(terms)).sum() / n


def soft_dice_loss(mask_logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per sample and channel, (B, K).

    ``smooth`` keeps empty channels defined: an empty target and an empty prediction give a loss of ~0, an empty
    target with predicted blood is penalised.
    """
    p = torch.sigmoid(mask_logits.float())
    y = masks.float()
    dims = tuple(range(2, p.ndim))
    inter = (p * y).sum(dims)
    return 1.0 - (2.0 * inter + smooth) / (p.sum(dims) + y.sum(dims) + smooth)


def mask_loss(
    mask_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor, dice: float = 1.0
) -> torch.Tensor:
    """Pixel BCE + ``dice`` · soft Dice, averaged over the samples that have a mask only.

    Args:
        mask_logits: (B, K, H, W).
        masks: (B, K, H, W) in {0, 1} (anything where ``has_mask`` is False).
        has_mask: (B,) bool.
        dice: weight of the Dice term.

    Returns:
        Scalar; ``0 · mask_logits.sum()`` when no sample has a mask.
    """
    has = has_mask.bool()
    if not bool(has.any()):
        return mask_logits.sum() * 0.0
    lg, y = mask_logits[has].float(), masks[has].float()
    bce = F.binary_cross_entropy_with_logits(lg, y)
    loss = bce + dice * soft_dice_loss(lg, y).mean() if dice else bce
    # Keep the samples without masks in the graph (zero gradient) so every decoder output is used.
    return loss + mask_logits[~has].sum() * 0.0


def seg_aux_loss(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    has_mask: torch.Tensor,
    lam: float = 1.0,
    dice: float = 1.0,
) -> torch.Tensor:
    """Classification weighted BCE + ``lam`` · mask loss (BCE + soft Dice) over the samples with masks.

    Args:
        cls_logits: (B, 6).
        mask_logits: (B, 5, H, W).
        targets: (B, 6).
        masks: (B, 5, H, W) in {0, 1}.
        has_mask: (B,) bool: False for samples without a mask file (most real data); they train the
            classification head only.
        lam: weight of the mask loss.
        dice: weight of the Dice term inside the mask loss.
    """
    return weighted_bce(cls_logits, targets) + lam * mask_loss(mask_logits, masks, has_mask, dice)
