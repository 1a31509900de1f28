"""Segmentation metrics: the official FLARE22 DSC/NSD per case, and a fast hard Dice for training validation.

`flare_case_scores` reproduces FLARE22_DSC_NSD_Eval.py including its quirks (see
../shared/design/flare22_eval.md): arrays in nibabel (i, j, k) order, i.e. a SimpleITK array (z, y, x)
transposed to (x, y, z); spacing = the ground truth's voxel size in that same order (SimpleITK GetSpacing());
labels cast to uint8; aorta, IVC and esophagus cut to the ground truth's k-range without its last slice;
NSD = 0 when DSC < 0.2; per-organ tolerances; values rounded to 4 decimals.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from common.core.labelmaps import LABEL_THRESHOLD, logit, one_hot_organs, probs_to_labels
from common.core.labels import FLARE22, LabelSet
from common.evaluation.surface_distance import surface_dice

# DSC below this: NSD is not computed and set to 0 (official rule).
NSD_DSC_GATE = 0.2

# A score is an int (1 or 0) where the official script's "empty" branches fire, else a float rounded to 4
# decimals (NaN where the official code divides 0 by 0: an aorta/IVC/esophagus lying on one GT slice only).
Score = Union[int, float]


def official_round(value: float) -> float:
    """Round to 4 decimals as the official script (Python round of a numpy float64 = numpy's rounding)."""
    return float(np.round(np.float64(value), 4))


def to_label_uint8(array: np.ndarray) -> np.ndarray:
    """Cast a label array to uint8 the way `np.uint8(img.get_fdata())` does (truncate floats, wrap modulo 256)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.trunc(array).astype(np.int64)
    return array.astype(np.uint8)


def flare_case_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], labels: LabelSet = FLARE22
) -> dict[int, tuple[Score, Score]]:
    """Official FLARE22 (DSC, NSD) of every label of `labels` (FLARE22: organs 1..13) for one case, each with its
    NSD tolerance and axial crop.

    pred, gt: label maps of equal shape in nibabel (i, j, k) order (SimpleITK array.transpose(2, 1, 0));
    spacing: the ground truth's voxel size in mm in the same (i, j, k) order = SimpleITK GetSpacing().
    Returns {label: (dsc, nsd)}; both empty -> (1, 1), one empty -> (0, 0) (ints, as the official code),
    otherwise floats rounded to 4 decimals.
    """
    pred = to_label_uint8(np.asarray(pred))
    gt = to_label_uint8(np.asarray(gt))
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape} (or not 3-D)")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries, got {tuple(spacing)}")
    # One pass per volume finds every organ's box; all later work is inside the boxes.
    gt_boxes = _organ_boxes(gt, labels.num_organs)
    pred_boxes = _organ_boxes(pred, labels.num_organs)
    scores: dict[int, tuple[Score, Score]] = {}
    for label in labels.ids:
        gt_box, pred_box = gt_boxes[label - 1], pred_boxes[label - 1]
        if gt_box is None and pred_box is None:
            scores[label] = (1, 1)
            continue
        if gt_box is None or pred_box is None:
            scores[label] = (0, 0)
            continue
        region = [slice(min(g.start, p.start), max(g.stop, p.stop)) for g, p in zip(gt_box, pred_box)]
        if labels[label].z_cropped:
            # Official slicing [:, :, z_lower:z_upper] with z_upper = last GT slice: that slice is left out.
            k_lower, k_upper = gt_box[2].start, gt_box[2].stop - 1
            region[2] = slice(k_lower, k_upper)
        region_t = tuple(region)
        mask_gt = gt[region_t] == label
        mask_pred = pred[region_t] == label
        scores[label] = _scores_nonempty(mask_gt, mask_pred, spacing, labels[label].nsd_tolerance_mm)
    return scores


def _organ_boxes(labels: np.ndarray, num_labels: int) -> list[tuple[slice, ...] | None]:
    """Bounding box per label 1..num_labels (None if absent), scanning the array in its memory order.

    A SimpleITK array transposed to (i, j, k) is Fortran-ordered; scanning its transpose is much faster.
    """
    if not labels.flags.c_contiguous and labels.T.flags.c_contiguous:
        return [None if box is None else box[::-1] for box in ndimage.find_objects(labels.T, max_label=num_labels)]
    return ndimage.find_objects(np.ascontiguousarray(labels), max_label=num_labels)


def _scores_nonempty(
    mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[Score, Score]:
    """DSC, gate, NSD for the branch where both organs exist (masks possibly emptied by the z-crop)."""
    volume_sum = int(mask_gt.sum()) + int(mask_pred.sum())
    if volume_sum == 0:  # official code: DSC NaN, then NSD 0/0 -> NaN
        return float("nan"), float("nan")
    dsc = 2.0 * int(np.count_nonzero(mask_gt & mask_pred)) / volume_sum
    if dsc < NSD_DSC_GATE:
        return official_round(dsc), 0
    nsd = surface_dice(mask_gt, mask_pred, spacing, tolerance_mm)
    return official_round(dsc), official_round(nsd)


def hard_dice_per_organ(
    logits: torch.Tensor, target_onehot: torch.Tensor, threshold: float = LABEL_THRESHOLD, from_logits: bool = True
) -> torch.Tensor:
    """Hard Dice per organ channel, summed over the batch: Tensor (C,) float32 on the input's device.

    logits: (N, C, D, H, W) network outputs (or sigmoid probabilities with from_logits=False);
    target_onehot: (N, C, D, H, W) 0/1. The predicted label map is made by the prediction's rule
    (`common.core.labelmaps.probs_to_labels`: the highest channel wins where its sigmoid >= threshold), so the
    organ masks are disjoint, as in a predicted mask. A channel empty in both prediction and target scores 1.
    """
    if logits.shape != target_onehot.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target_onehot.shape)} differ in shape")
    with torch.no_grad():
        cut = logit(threshold) if from_logits else threshold
        labels = probs_to_labels(logits, cut, dim=1)
        pred = one_hot_organs(labels, num_organs=logits.shape[1], dtype=torch.bool)
        target = target_onehot > 0.5
        dims = [0] + list(range(2, logits.ndim))
        intersection = (pred & target).sum(dim=dims).float()
        total = pred.sum(dim=dims).float() + target.sum(dim=dims).float()
        dice = torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0), torch.ones_like(total))
    return dice
