"""UIF scores and selection (common/evaluation/uncertainty.py, fine_efficient_seg/uif.py) on hand-made probability
maps, and the fine stage's uif step."""

from __future__ import annotations

import math

import pytest
import torch

from common.evaluation.uncertainty import (
    binary_entropy,
    change_score,
    disagreement_score,
    entropy_score,
    hard_organ_masks,
    keep_size,
    labels_disagreement,
    masks_disagreement,
    select_certain,
    stability_score,
    uncertainty_score,
)

SHAPE = (6, 7, 5)


def organ_probs(boxes: dict[int, tuple[slice, slice, slice]], high: float = 0.9, low: float = 0.05) -> torch.Tensor:
    """(13, *SHAPE) sigmoids: `high` inside each organ's box (label -> box), `low` elsewhere."""
    probs = torch.full((13, *SHAPE), low)
    for label, box in boxes.items():
        probs[(label - 1, *box)] = high
    return probs


LIVER = (slice(0, 3), slice(0, 4), slice(0, 3))
SPLEEN = (slice(3, 6), slice(4, 7), slice(2, 5))
SHIFTED_LIVER = (slice(0, 3), slice(1, 4), slice(0, 3))   # 27 voxels, 27 shared with LIVER, clear of SPLEEN


def test_hard_masks_follow_pseudo_label_rule():
    probs = torch.zeros(13, 1, 1, 3)
    probs[0, 0, 0, 0], probs[1, 0, 0, 0] = 0.6, 0.8   # both >= 0.5: the higher (label 2) wins
    probs[0, 0, 0, 1] = 0.4                           # below threshold: background
    probs[4, 0, 0, 2] = 0.5                           # exactly the threshold counts
    masks = hard_organ_masks(probs)
    assert masks.sum().item() == 2
    assert masks[1, 0, 0, 0] and not masks[0, 0, 0, 0]
    assert masks[4, 0, 0, 2]


def test_absent_organs_do_not_count():
    """The issue's probe: absent organs used to count as agreement, so a scan with one organ at A/B Dice 0.6
    looked more certain (0.031) than one with 13 organs at Dice 0.9 (0.100). Only present organs count now."""
    a = hard_organ_masks(organ_probs({1: LIVER}))
    assert masks_disagreement(a, a.clone()) == 0.0
    b = hard_organ_masks(organ_probs({1: LIVER, 3: SPLEEN}))
    assert masks_disagreement(a, b) == pytest.approx(0.5)  # liver Dice 1, spleen Dice 0 (only in B)


def test_one_organ_vs_thirteen_organs():
    """Disjoint 1-D organs: one organ at Dice 0.6 must be LESS certain than 13 organs at Dice 0.9."""
    def pair(n_organs: int, dice: float) -> tuple[torch.Tensor, torch.Tensor]:
        length = 20
        shared = round(dice * length)  # A and B have `length` voxels each, `shared` of them common
        a = torch.zeros(13 * 2 * length, dtype=torch.uint8)
        b = torch.zeros_like(a)
        for organ in range(n_organs):
            start = organ * 2 * length
            a[start:start + length] = organ + 1
            b[start + length - shared:start + 2 * length - shared] = organ + 1
        return a, b

    one = labels_disagreement(*pair(1, 0.6), 13)
    thirteen = labels_disagreement(*pair(13, 0.9), 13)
    assert one == pytest.approx(0.4)
    assert thirteen == pytest.approx(0.1)
    assert one > thirteen


def test_disagreement_values():
    agree = organ_probs({1: LIVER, 3: SPLEEN})
    assert disagreement_score(agree, agree.clone()) == 0.0
    # One organ missing in B: that organ has Dice 0, the other Dice 1 -> 0.5.
    missing = organ_probs({1: LIVER})
    assert disagreement_score(agree, missing) == pytest.approx(0.5)
    # Partial overlap of the liver: Dice = 2 |A & B| / (|A| + |B|); the spleen agrees.
    shifted = organ_probs({1: SHIFTED_LIVER, 3: SPLEEN})
    liver_dice = 2 * 27 / (36 + 27)
    expected = 1.0 - (1 + liver_dice) / 2
    assert disagreement_score(agree, shifted) == pytest.approx(expected)
    # Symmetric.
    assert disagreement_score(shifted, agree) == pytest.approx(expected)
    # Volume weighting: the organs' Dice weighted by their voxel counts (liver 36 + 27, spleen 27 + 27).
    volume = 1.0 - 2.0 * (27 + 27) / (36 + 27 + 27 + 27)
    assert disagreement_score(agree, shifted, weighting="volume") == pytest.approx(volume)
    with pytest.raises(ValueError, match="weighting"):
        disagreement_score(agree, shifted, weighting="area")


def test_all_thirteen_organs_agree():
    boxes = {}
    for label in range(1, 14):  # 13 disjoint single-voxel-row organs in a 6 x 7 x 5 grid
        z, y = divmod(label - 1, 7)
        boxes[label] = (slice(z, z + 1), slice(y, y + 1), slice(0, 5))
    probs = organ_probs(boxes)
    assert hard_organ_masks(probs).sum(dim=(1, 2, 3)).tolist() == [5] * 13
    assert disagreement_score(probs, probs.clone()) == 0.0
    worse = probs.clone()
    worse[12, 1, 5, 0] = 0.01  # organ 13 loses one of its 5 voxels in B: Dice 8/9, the 12 others 1
    assert disagreement_score(probs, worse) == pytest.approx((1 - 8 / 9) / 13)


def test_disagreement_all_empty_is_worst():
    empty = torch.full((13, *SHAPE), 0.1)
    assert disagreement_score(empty, empty) == 1.0
    labels = torch.zeros(4, 4, 4, dtype=torch.uint8)
    assert labels_disagreement(labels, labels, 13) == 1.0


def test_one_network_empty():
    """One network finds organs, the other nothing: every present organ has Dice 0 -> 1.0, whichever is empty."""
    empty = torch.full((13, *SHAPE), 0.1)
    full = organ_probs({1: LIVER, 3: SPLEEN})
    assert disagreement_score(full, empty) == 1.0
    assert disagreement_score(empty, full) == 1.0


def test_stability_score():
    final = organ_probs({1: LIVER, 3: SPLEEN})
    assert stability_score(final, [final.clone(), final.clone()]) == 0.0
    shifted = organ_probs({1: SHIFTED_LIVER, 3: SPLEEN})
    one_off = disagreement_score(final, shifted)
    assert one_off > 0
    # Mean over the snapshots of their disagreement with the final prediction.
    assert stability_score(final, [final, shifted]) == pytest.approx(one_off / 2)
    assert uncertainty_score("stability", final, final, snapshots=[shifted]) == pytest.approx(one_off)
    with pytest.raises(ValueError, match="snapshot"):
        stability_score(final, [])


def test_entropy_score():
    confident = organ_probs({1: LIVER}, high=0.999, low=0.001)
    unsure = organ_probs({1: LIVER}, high=0.6, low=0.3)
    assert entropy_score(confident) < 0.02
    assert entropy_score(unsure) > entropy_score(confident)
    # Mean of the two networks' sigmoids is scored.
    assert entropy_score(confident, unsure) > entropy_score(confident)
    assert entropy_score(torch.full((13, *SHAPE), 0.2)) == 1.0   # nothing predicted: worst
    assert binary_entropy(torch.tensor([0.5])).item() == pytest.approx(1.0)


def test_uncertainty_score_dispatch_and_errors():
    p = organ_probs({1: LIVER})
    assert uncertainty_score("disagreement", p, p) == 0.0
    assert uncertainty_score("entropy", p, p) == pytest.approx(entropy_score(p, p))
    with pytest.raises(ValueError, match="unknown UIF score"):
        uncertainty_score("variance", p, p)
    with pytest.raises(ValueError, match="give 13 and 3 organ channels"):
        uncertainty_score("disagreement", p, p[:3])
    assert uncertainty_score("disagreement", p[:3], p[:3]) == 0.0  # a 3-label set: A and B agree on its label 1


def test_keep_size():
    assert keep_size(2000) == 200
    assert keep_size(15, keep_ratio=0.1) == 2          # 1.5 rounds half up
    assert keep_size(3, keep_ratio=0.1) == 1           # at least one
    assert keep_size(10, keep_count=4) == 4
    assert keep_size(10, keep_count=40) == 10          # capped at the pool
    assert keep_size(0) == 0
    with pytest.raises(ValueError):
        keep_size(10, keep_count=0)
    with pytest.raises(ValueError):
        keep_size(10, keep_ratio=1.5)


def constructed_pool() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Cases agree_* where the networks agree, and disagree_* where they do not (growing disagreement)."""
    reference = organ_probs({1: LIVER, 3: SPLEEN})
    pool = {f"agree_{i}": (reference, reference.clone()) for i in range(3)}
    pool["disagree_small"] = (reference, organ_probs({1: SHIFTED_LIVER, 3: SPLEEN}))
    pool["disagree_large"] = (reference, organ_probs({1: SHIFTED_LIVER}))
    pool["disagree_total"] = (reference, organ_probs({2: SPLEEN, 4: LIVER}))
    return pool


def test_selection_keeps_agreeing_cases():
    scores = {case: disagreement_score(a, b) for case, (a, b) in constructed_pool().items()}
    rows = select_certain(scores, keep_count=3)
    kept = {row.case for row in rows if row.kept}
    assert kept == {"agree_0", "agree_1", "agree_2"}
    # Ranks follow the disagreement, ties (the three agree_* at 0.0) by case id.
    assert [row.case for row in rows] == [
        "agree_0", "agree_1", "agree_2", "disagree_small", "disagree_large", "disagree_total"]
    assert [row.rank for row in rows] == [1, 2, 3, 4, 5, 6]
    # By ratio: 0.5 of 6 = 3.
    assert {r.case for r in select_certain(scores, keep_ratio=0.5) if r.kept} == kept
    assert sum(r.kept for r in select_certain(scores, keep_ratio=0.1)) == 1


def test_selection_ties_and_nan_are_deterministic():
    scores = {"c": 0.2, "a": 0.2, "b": 0.2, "z": float("nan"), "y": 0.1}
    rows = select_certain(scores, keep_count=2)
    assert [r.case for r in rows] == ["y", "a", "b", "c", "z"]
    assert [r.kept for r in rows] == [True, True, False, False, False]
    assert math.isnan(rows[-1].score)
    # The input order does not matter.
    shuffled = dict(reversed(list(scores.items())))
    assert [r.case for r in select_certain(shuffled, keep_count=2)] == [r.case for r in rows]


def test_change_score_is_the_changed_voxels_over_the_foreground():
    """The FLARE22 winner's criterion: voxels whose pseudo label changed since the earlier networks, over the
    current foreground."""
    now = organ_probs({1: LIVER})  # 36 liver voxels
    assert change_score(now, now) == 0.0
    moved = organ_probs({1: SHIFTED_LIVER})  # 27 of them: 9 liver voxels were background before
    assert change_score(now, moved) == pytest.approx(9 / 36)
    assert change_score(moved, now) == pytest.approx(9 / 27)
    assert change_score(organ_probs({}), now) == 1.0  # nothing predicted now: least certain
    relabelled = organ_probs({3: LIVER})  # same voxels, another organ: every voxel changed
    assert change_score(now, relabelled) == pytest.approx(1.0)
    assert uncertainty_score("change", now, now, snapshots=[moved, now]) == 0.0  # the latest snapshot counts
    with pytest.raises(ValueError, match="earlier networks"):
        uncertainty_score("change", now, now)
