"""The label rule of the project: organ scores -> label map, and label map -> one-hot organ channels (DESIGN 5.1, 7).

Channel c of a network output is label c+1; label 0 (background) has no channel.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

LABEL_THRESHOLD = 0.5
"""Sigmoid probability the best organ needs to win a voxel (DESIGN 5.1); below it the voxel is background."""


def logit(probability: float) -> float:
    """log(p / (1 - p)): the logit-space cut equal to a sigmoid threshold (sigmoid(x) >= p <=> x >= logit(p))."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"a sigmoid threshold must lie in (0, 1), got {probability}")
    return math.log(probability / (1.0 - probability))


LOGIT_THRESHOLD = logit(LABEL_THRESHOLD)  # 0.0


def probs_to_labels(probs: ArrayLike, threshold: float = LABEL_THRESHOLD, dim: int = 0) -> ArrayLike:
    """The label decision rule of the project (DESIGN 5.1, 7): per voxel the organ with the highest score wins
    if that score is >= threshold, else background. Prediction, validation Dice, CPS pseudo labels and the box
    step all decide labels here.

    probs: per-organ scores with the organ channels on axis `dim` (e.g. (13, D, H, W) with dim=0, or
    (N, 13, D, H, W) with dim=1); channel c = label c+1. Sigmoid probabilities with a probability threshold, or
    logits with `logit(threshold)` (LOGIT_THRESHOLD for 0.5). Torch tensor (any device, any float dtype) or
    numpy array. Ties go to the lower label. Returns uint8 labels without the channel axis, of the same kind
    (tensor on the same device, or numpy).
    """
    if probs.ndim < 2:
        raise ValueError(f"probs must have a channel axis and spatial axes, got shape {tuple(probs.shape)}")
    if isinstance(probs, torch.Tensor):
        best, index = probs.max(dim=dim)
        labels = (index + 1).to(torch.uint8)
        return torch.where(best >= threshold, labels, torch.zeros_like(labels))
    probs = np.asarray(probs)
    index = np.argmax(probs, axis=dim)
    best = np.take_along_axis(probs, np.expand_dims(index, dim), axis=dim).squeeze(dim)
    return np.where(best >= threshold, index + 1, 0).astype(np.uint8)


def one_hot_organs(label_map: torch.Tensor, num_organs: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label map (N, D, H, W) with values 0..num_organs -> (N, num_organs, D, H, W); channel c = label c+1.

    Background (0) is the all-zero vector.
    """
    labels = torch.arange(1, num_organs + 1, device=label_map.device).view(1, num_organs, *([1] * (label_map.ndim - 1)))
    return (label_map.unsqueeze(1) == labels).to(dtype)
