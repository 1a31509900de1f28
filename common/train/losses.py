"""Segmentation losses on sigmoid channels, one per label (reference 3, DESIGN 5.3).

All losses take raw logits (N, C, D, H, W), a float target of the same shape (one-hot organs or CPS pseudo labels)
and an optional voxel mask (N, 1, D, H, W) of the voxels that count (CPS's confident pseudo labels; None: every
voxel), and compute in float32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

DICE_EPS = 1e-8

LossFn = Callable[..., torch.Tensor]  # (logits, target, mask=None) -> scalar


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """1 - mean over channels of (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps), p = sigmoid(logits).

    Sums run over the spatial axes (the voxels of `mask` only) of each sample and channel; the per-sample losses
    are averaged (`reduction="mean"`, training) or summed (`"sum"`, the reference's validation loss) over the batch.
    """
    _check(logits, target)
    p = torch.sigmoid(logits.float())
    g = target.float()
    if mask is not None:
        p, g = p * mask, g * mask
    dims = tuple(range(2, p.ndim))
    intersection = (p * g).sum(dims)
    denominator = (p * p).sum(dims) + (g * g).sum(dims)
    dice = (2.0 * intersection + DICE_EPS) / (denominator + DICE_EPS)  # (N, C)
    per_sample = 1.0 - dice.mean(dim=1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'sum'")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-element values over the elements of `mask` (N, 1, ...) broadcast over the channels (all: None)."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logits) vs target, averaged over every element (log-sum-exp stable)."""
    _check(logits, target)
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return _masked_mean(F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none"), mask)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, alpha: float = 0.5,
               gamma: float = 2.0) -> torch.Tensor:
    """Per-voxel sigmoid focal loss: mean of alpha_t (1 - p_t)^gamma BCE (DESIGN 5.3).

    p_t = p where target is 1 and 1 - p where it is 0; alpha_t = alpha for positives, 1 - alpha for negatives
    (soft targets interpolate linearly).
    """
    _check(logits, target)
    x = logits.float()
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1.0 - p) * (1.0 - t)
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    return _masked_mean(alpha_t * (1.0 - p_t).pow(gamma) * bce, mask)


def reference_focal_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                         alpha: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """The reference's "focal" loss, kept for ablations (reference 3 [QUIRK/BUG]).

    p clamped to [1e-4, 1 - 1e-4]; w = alpha (1-p)^gamma on positives, alpha p^gamma elsewhere;
    loss = mean(BCE) * sum(w) / max(#positive target elements, 1) -- a scalar BCE times summed weights,
    not a per-voxel focal loss. With a `mask` only its voxels count.
    """
    _check(logits, target)
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1.0 - 1e-4)
    t = target.float()
    keep = torch.ones_like(t, dtype=torch.bool) if mask is None else mask.bool().expand_as(t)
    positive = (t == 1) & keep
    weight = torch.where(positive, alpha * (1.0 - p).pow(gamma), alpha * p.pow(gamma)) * keep
    mean_bce = _masked_mean(F.binary_cross_entropy(p, t, reduction="none"), mask)
    return mean_bce * weight.sum() / positive.sum().clamp(min=1)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice + BCE, 1:1 (the fine stage's loss)."""
    return soft_dice_loss(logits, target, mask) + bce_loss(logits, target, mask)


def dice_focal_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice + per-voxel focal loss (alpha 0.5, gamma 2), 1:1 (the coarse stage's loss)."""
    return soft_dice_loss(logits, target, mask) + focal_loss(logits, target, mask)


def dice_reference_focal_loss(logits: torch.Tensor, target: torch.Tensor,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice + the reference's scalar-BCE "focal" loss (bug-compatible ablation)."""
    return soft_dice_loss(logits, target, mask) + reference_focal_loss(logits, target, mask)


LOSSES: dict[str, LossFn] = {
    "dice": soft_dice_loss,
    "dice_bce": dice_bce_loss,
    "dice_focal": dice_focal_loss,
    "dice_focal_reference": dice_reference_focal_loss,
}


def build_loss(name: str) -> LossFn:
    """The loss function `name` (see LOSSES): callable(logits, target, mask=None) -> scalar tensor."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
