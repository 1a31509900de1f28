"""Network input layer for prediction: resize + HU window + per-volume z-score on the tensor's device.

Same result as the data-preparation path `normalize_hu(resize_volume(...))` of `common.preprocessing`
(corner-aligned trilinear resize, clip, subtract the mean, divide by population std + 1e-5), so a network sees
the same intensities at training and at prediction time (reference 1.4, 2.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.preprocessing import resize_volume_torch, window_and_zscore_torch


def prepare_input(raw_hu: torch.Tensor, size_zyx: Sequence[int],
                  window_hu: Sequence[float] = (-325.0, 325.0)) -> torch.Tensor:
    """Resize raw HU (N, 1, D, H, W) of any dtype to (N, 1, *size_zyx) float32, clip, z-score per sample.

    The resize is trilinear with align_corners=True (= scipy.ndimage.zoom order 1, grid_mode=False), computed
    in float32; the z-score uses the population std (torch `correction=0`, numpy's default) plus 1e-5.
    """
    if raw_hu.ndim != 5:
        raise ValueError(f"expected (N, C, D, H, W), got shape {tuple(raw_hu.shape)}")
    return window_and_zscore_torch(resize_volume_torch(raw_hu.float(), size_zyx), window_hu)
