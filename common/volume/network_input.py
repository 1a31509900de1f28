"""Network input layer for prediction: resize + HU window + per-volume z-score on the tensor's device.

Same result as the data-preparation path `normalize_hu(resize_volume(...))` of `common.volume.intensity`
(corner-aligned trilinear resize, clip, subtract the mean, divide by population std + 1e-5), so a network sees
the same intensities at training and at prediction time (reference 1.4, 2.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.core.defaults import HU_WINDOW
from common.volume.intensity import window_and_zscore_torch
from common.volume.resize import resize_volume_torch

SLAB_SLICES = 16  # input slices converted to float32 at a time by `resize_in_slabs`


def resize_in_slabs(raw: torch.Tensor, size_zyx: Sequence[int], slab_slices: int = SLAB_SLICES) -> torch.Tensor:
    """Trilinear resize (align_corners=True) of (N, C, D, H, W) of any dtype to float32 (N, C, *size_zyx), without a
    full-resolution float copy: `slab_slices` input slices at a time are converted and resized bilinearly in
    (y, x), then the stack of small planes is resized linearly in z.

    Trilinear interpolation is separable, so this is the one-pass resize up to float rounding; the largest
    temporary is a slab (16 x 512 x 512 float32 = 16 MB) instead of the whole volume (210 MB at 200 slices).
    """
    n, c, d, h, w = raw.shape
    out_d, out_h, out_w = (int(v) for v in size_zyx)
    if (h, w) == (out_h, out_w):
        return resize_volume_torch(raw.float(), (out_d, out_h, out_w))
    planes = torch.empty((n, c, d, out_h, out_w), dtype=torch.float32, device=raw.device)
    for z0 in range(0, d, slab_slices):
        z1 = min(z0 + slab_slices, d)
        slab = raw[:, :, z0:z1].float().reshape(n, c * (z1 - z0), h, w)
        planes[:, :, z0:z1] = F.interpolate(slab, size=(out_h, out_w), mode="bilinear",
                                            align_corners=True).reshape(n, c, z1 - z0, out_h, out_w)
    return resize_volume_torch(planes, (out_d, out_h, out_w))


def prepare_input(raw_hu: torch.Tensor, size_zyx: Sequence[int],
                  window_hu: Sequence[float] = HU_WINDOW) -> torch.Tensor:
    """Resize raw HU (N, 1, D, H, W) of any dtype to (N, 1, *size_zyx) float32, clip, z-score per sample.

    The resize is trilinear with align_corners=True (= scipy.ndimage.zoom order 1, grid_mode=False), computed
    in float32 slab by slab (`resize_in_slabs`); the z-score uses the population std (torch `correction=0`,
    numpy's default) plus 1e-5.
    """
    if raw_hu.ndim != 5:
        raise ValueError(f"expected (N, C, D, H, W), got shape {tuple(raw_hu.shape)}")
    return window_and_zscore_torch(resize_in_slabs(raw_hu, size_zyx), window_hu)
