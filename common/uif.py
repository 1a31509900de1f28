"""Uncertainty-based image filtering (UIF): image-level uncertainty scores and the selection of certain cases.

Our design (DESIGN 5.6; the original release describes UIF but ships no code for it): after a first CPS round,
every unlabeled case is scored by how much the two CPS networks disagree on it (or, as an option, by the
entropy of their sigmoids inside the predicted organs); the `keep_count` most certain cases form the unlabeled
pool of the second round.

Everything here works on one case's probability maps at a time and is independent of the networks, the
crops and the data format, so it can be tested with hand-made maps and reused by any stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from common.labels import NUM_ORGANS
from common.logger import get_logger

logger = get_logger(__name__)

UIF_SCORES = ("disagreement", "entropy")


def hard_organ_masks(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard per-organ masks by the pseudo-label rule (DESIGN 5.1): the organ with the highest sigmoid wins
    if that sigmoid is >= `threshold`, else background.

    probs: (13, D, H, W) sigmoids. Returns bool (13, D, H, W); the organ masks are disjoint.
    """
    if probs.ndim != 4:
        raise ValueError(f"expected probabilities (C, D, H, W), got shape {tuple(probs.shape)}")
    best, index = probs.max(dim=0)
    channels = torch.arange(probs.shape[0], device=probs.device).view(-1, 1, 1, 1)
    return (index.unsqueeze(0) == channels) & (best >= threshold).unsqueeze(0)


def per_organ_dice(masks_a: torch.Tensor, masks_b: torch.Tensor) -> torch.Tensor:
    """Dice of two sets of hard organ masks, per organ; an organ absent from both counts as agreement (1).

    masks_a, masks_b: bool (C, D, H, W). Returns float64 (C,) on the CPU.
    """
    if masks_a.shape != masks_b.shape:
        raise ValueError(f"mask shapes differ: {tuple(masks_a.shape)} vs {tuple(masks_b.shape)}")
    dims = tuple(range(1, masks_a.ndim))
    inter = (masks_a & masks_b).sum(dim=dims).double()
    total = (masks_a.sum(dim=dims) + masks_b.sum(dim=dims)).double()
    dice = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))
    return dice.cpu()


def disagreement_score(probs_a: torch.Tensor, probs_b: torch.Tensor, threshold: float = 0.5) -> float:
    """1 - mean per-organ Dice between the hard masks of network A and network B (0 = full agreement).

    probs_a, probs_b: (13, D, H, W) sigmoids of the two networks on the same crop. Organs absent in both
    predictions agree. Our addition: when neither network finds any organ at all, the case carries no usable
    pseudo label, so it gets the worst score (1.0) instead of a perfect one.
    """
    masks_a = hard_organ_masks(probs_a, threshold)
    masks_b = hard_organ_masks(probs_b, threshold)
    if not bool(masks_a.any()) and not bool(masks_b.any()):
        return 1.0
    return float(1.0 - per_organ_dice(masks_a, masks_b).mean())


def binary_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Voxel-wise binary entropy in bits (0 for a confident 0 or 1, 1 for 0.5); same shape as `probs`."""
    p = probs.float().clamp(eps, 1.0 - eps)
    return -(p * torch.log2(p) + (1.0 - p) * torch.log2(1.0 - p))


def entropy_score(probs_a: torch.Tensor, probs_b: torch.Tensor | None = None, threshold: float = 0.5) -> float:
    """Mean binary entropy (bits, in [0, 1]) of the sigmoids inside the predicted organs.

    probs_a, probs_b: (13, D, H, W) sigmoids; with both given, their mean is scored (the ensemble's
    uncertainty). Per voxel the entropy is averaged over the 13 channels; the score is its mean over the
    voxels that the (mean) prediction assigns to any organ. No organ predicted -> 1.0 (worst).
    """
    probs = probs_a.float() if probs_b is None else 0.5 * (probs_a.float() + probs_b.float())
    inside = hard_organ_masks(probs, threshold).any(dim=0)
    count = int(inside.sum())
    if count == 0:
        return 1.0
    voxel_entropy = binary_entropy(probs).mean(dim=0)
    return float(voxel_entropy[inside].double().sum() / count)


def uncertainty_score(method: str, probs_a: torch.Tensor, probs_b: torch.Tensor, threshold: float = 0.5) -> float:
    """Dispatch to `disagreement_score` or `entropy_score` by name (see UIF_SCORES)."""
    if probs_a.shape[0] != NUM_ORGANS or probs_b.shape[0] != NUM_ORGANS:
        raise ValueError(f"expected {NUM_ORGANS} organ channels, got {probs_a.shape[0]} and {probs_b.shape[0]}")
    if method == "disagreement":
        return disagreement_score(probs_a, probs_b, threshold)
    if method == "entropy":
        return entropy_score(probs_a, probs_b, threshold)
    raise ValueError(f"unknown UIF score {method!r}; expected one of {UIF_SCORES}")


def keep_size(pool_size: int, keep_count: int | None = None, keep_ratio: float = 0.1) -> int:
    """How many cases to keep: `keep_count` if given, else round(keep_ratio * pool_size); always in
    [1, pool_size] for a non-empty pool (0 for an empty one)."""
    if pool_size <= 0:
        return 0
    if keep_count is not None:
        if keep_count < 1:
            raise ValueError(f"keep_count must be >= 1, got {keep_count}")
        if keep_count > pool_size:
            logger.warning("keep_count %d exceeds the pool of %d cases; keeping all", keep_count, pool_size)
        wanted = keep_count
    else:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        wanted = math.floor(keep_ratio * pool_size + 0.5)
    return max(1, min(pool_size, wanted))


@dataclass(frozen=True)
class UifRow:
    """One scored case: rank 1 is the most certain; `kept` marks the selected ones."""

    case: str
    score: float
    kept: bool
    rank: int


def select_certain(
    scores: Mapping[str, float], keep_count: int | None = None, keep_ratio: float = 0.1
) -> list[UifRow]:
    """Rank cases from most to least certain (lowest score first) and mark the first `keep_size` as kept.

    Ties are broken by case id (ascending) so the selection is deterministic; NaN scores rank last.
    Returns one row per case, in rank order.
    """
    def order(item: tuple[str, float]) -> tuple[bool, float, str]:
        case, score = item
        bad = math.isnan(score)
        return (bad, 0.0 if bad else score, case)

    ranked = sorted(scores.items(), key=order)
    keep = keep_size(len(ranked), keep_count, keep_ratio)
    return [UifRow(case, float(score), rank <= keep, rank) for rank, (case, score) in enumerate(ranked, start=1)]
