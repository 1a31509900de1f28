"""Uncertainty-based image filtering (UIF): image-level uncertainty scores and the selection of certain cases.

Our design (DESIGN 5.6; the original release describes UIF but ships no code for it): after a first CPS round, every
unlabeled case is scored by how much the two CPS networks disagree on it (`disagreement_from_counts`: the mean A/B
Dice over the organs present in either network; also the predictor's `uncertainty` column), or, as options, by the
entropy of their sigmoids inside the predicted organs, by ST++'s stability (the final networks against K checkpoints
saved during round 1), or by the change of the pseudo label since the previous networks (the voxels whose label
changed over the foreground: the FLARE22 winner's criterion); the `keep_count` most certain cases form the unlabeled
pool of the next round. A scan where neither network finds any organ is the least certain (score 1.0).

Everything here works on one case's probability maps at a time and is independent of the networks, the
crops and the data format, so it can be tested with hand-made maps and reused by any stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from common.core.labelmaps import LABEL_THRESHOLD, probs_to_labels
from common.core.logger import get_logger

logger = get_logger(__name__)

UIF_SCORES = ("disagreement", "entropy", "stability", "change")
WEIGHTINGS = ("organ", "volume")
# Score of a case where neither prediction holds any organ: nothing to learn from, so the least certain.
EMPTY_SCORE = 1.0


def hard_organ_masks(probs: torch.Tensor, threshold: float = LABEL_THRESHOLD) -> torch.Tensor:
    """Per-organ masks of the project's label rule (`common.core.labelmaps.probs_to_labels`).

    probs: (13, D, H, W) sigmoids. Returns bool (13, D, H, W); the organ masks are disjoint.
    """
    if probs.ndim != 4:
        raise ValueError(f"expected probabilities (C, D, H, W), got shape {tuple(probs.shape)}")
    labels = probs_to_labels(probs, threshold)
    organs = torch.arange(1, probs.shape[0] + 1, device=probs.device, dtype=labels.dtype).view(-1, 1, 1, 1)
    return labels.unsqueeze(0) == organs


def disagreement_from_counts(inter: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor,
                             weighting: str = "organ") -> float:
    """THE uncertainty definition of the project (UIF and the predictor's `uncertainty` column).

    inter, size_a, size_b: per-organ voxel counts (C,) of A & B, A and B. Only organs present in either
    prediction count (an organ both networks leave out says nothing about the scan). weighting "organ":
    1 - mean Dice over those organs; "volume": each organ weighted by its voxel count, i.e.
    1 - 2 * sum(inter) / sum(size_a + size_b). In [0, 1]; 0 = full agreement; no organ in either:
    EMPTY_SCORE (1.0, least certain).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    inter, total = inter.double().cpu(), (size_a.double() + size_b.double()).cpu()
    present = total > 0
    if not bool(present.any()):
        return EMPTY_SCORE
    if weighting == "volume":
        return float(1.0 - 2.0 * inter[present].sum() / total[present].sum())
    return float(1.0 - (2.0 * inter[present] / total[present]).mean())


def masks_disagreement(masks_a: torch.Tensor, masks_b: torch.Tensor, weighting: str = "organ") -> float:
    """`disagreement_from_counts` of two sets of hard organ masks, bool (C, D, H, W) each."""
    if masks_a.shape != masks_b.shape:
        raise ValueError(f"mask shapes differ: {tuple(masks_a.shape)} vs {tuple(masks_b.shape)}")
    dims = tuple(range(1, masks_a.ndim))
    return disagreement_from_counts((masks_a & masks_b).sum(dim=dims), masks_a.sum(dim=dims),
                                    masks_b.sum(dim=dims), weighting)


def labels_disagreement(labels_a: torch.Tensor, labels_b: torch.Tensor, num_organs: int,
                        weighting: str = "organ") -> float:
    """`disagreement_from_counts` of two label maps (0 = background, 1..num_organs), any equal shape."""
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"label map shapes differ: {tuple(labels_a.shape)} vs {tuple(labels_b.shape)}")
    n = num_organs + 1
    joint = torch.bincount((labels_a.long() * n + labels_b.long()).flatten(), minlength=n * n).reshape(n, n)
    return disagreement_from_counts(joint.diagonal()[1:], joint.sum(1)[1:], joint.sum(0)[1:], weighting)


def disagreement_score(probs_a: torch.Tensor, probs_b: torch.Tensor, threshold: float = LABEL_THRESHOLD,
                       weighting: str = "organ") -> float:
    """Disagreement (`disagreement_from_counts`) of the hard masks of networks A and B on the same crop.

    probs_a, probs_b: (C, D, H, W) sigmoids, one channel per organ.
    """
    return masks_disagreement(hard_organ_masks(probs_a, threshold), hard_organ_masks(probs_b, threshold), weighting)


def stability_score(probs_final: torch.Tensor, probs_snapshots: Sequence[torch.Tensor],
                    threshold: float = LABEL_THRESHOLD, weighting: str = "organ") -> float:
    """ST++'s image-level stability as an uncertainty: the mean disagreement (`disagreement_from_counts`)
    between the final network's hard masks and those of K checkpoints saved earlier in the same training.

    probs_final: (13, D, H, W) sigmoids of the final network (or ensemble); probs_snapshots: K such maps.
    A scan whose pseudo label keeps changing during training scores high (uncertain).
    """
    if not probs_snapshots:
        raise ValueError("stability needs at least one snapshot (uif.snapshots >= 1 in round 1)")
    final = hard_organ_masks(probs_final, threshold)
    values = [masks_disagreement(final, hard_organ_masks(p, threshold), weighting) for p in probs_snapshots]
    return sum(values) / len(values)


def binary_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Voxel-wise binary entropy in bits (0 for a confident 0 or 1, 1 for 0.5); same shape as `probs`."""
    p = probs.float().clamp(eps, 1.0 - eps)
    return -(p * torch.log2(p) + (1.0 - p) * torch.log2(1.0 - p))


def entropy_score(probs_a: torch.Tensor, probs_b: torch.Tensor | None = None,
                  threshold: float = LABEL_THRESHOLD) -> float:
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


def change_score(probs_now: torch.Tensor, probs_before: torch.Tensor, threshold: float = LABEL_THRESHOLD) -> float:
    """The FLARE22 winner's uncertainty: the voxels whose pseudo label (the label rule) changed between the earlier
    networks' prediction and the current one, over the current foreground (voxels of any organ). No current
    foreground -> EMPTY_SCORE (nothing to learn from). probs_*: (C, D, H, W) sigmoids."""
    now = probs_to_labels(probs_now.float(), threshold)
    before = probs_to_labels(probs_before.float(), threshold)
    foreground = int((now > 0).sum())
    if foreground == 0:
        return EMPTY_SCORE
    return float((now != before).sum()) / foreground


def uncertainty_score(method: str, probs_a: torch.Tensor, probs_b: torch.Tensor, threshold: float = LABEL_THRESHOLD,
                      snapshots: Sequence[torch.Tensor] = (), weighting: str = "organ") -> float:
    """Dispatch by name (see UIF_SCORES): disagreement of A and B, entropy of their mean, stability of their mean
    against the `snapshots` (mean sigmoids of the K earlier checkpoints), or the change of the pseudo label of their
    mean since the latest snapshot (`snapshots[-1]`: the previous round's networks, or round 1's last checkpoint)."""
    if probs_a.shape[0] != probs_b.shape[0]:
        raise ValueError(f"networks A and B give {probs_a.shape[0]} and {probs_b.shape[0]} organ channels")
    if method == "disagreement":
        return disagreement_score(probs_a, probs_b, threshold, weighting)
    if method == "entropy":
        return entropy_score(probs_a, probs_b, threshold)
    if method == "stability":
        return stability_score(0.5 * (probs_a.float() + probs_b.float()), snapshots, threshold, weighting)
    if method == "change":
        if not snapshots:
            raise ValueError("change needs the earlier networks' prediction (a snapshot or the previous round)")
        return change_score(0.5 * (probs_a.float() + probs_b.float()), snapshots[-1], threshold)
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
