"""CT intensities: HU stored as int16, the HU window and the per-volume z-score (reference 1.4, 2.3).

Intensity normalisation: clip to the HU window, subtract the volume's mean and divide by (std + 1e-5), with the
*population* std (numpy's default; `correction=0` in torch) on both paths so they match. The reference used torch's
unbiased std at test time only; the difference is ~1/(2N) relative.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from common.core.defaults import HU_WINDOW
from common.core.errors import InputError
from common.core.logger import get_logger

logger = get_logger(__name__)

EPS_STD = 1e-5
AIR_HU = -500.0
"""HU below which a voxel is air (outside the body, lungs, bowel gas): a CT holds some (the predictor's and
data_prepare's sanity checks), and the body is what lies above it (`common.volume.boxes.body_box`)."""
INT16_MIN, INT16_MAX = -32768, 32767


def to_int16_hu(array: np.ndarray, path: str | os.PathLike,
                value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The image as int16 HU: rounded if stored as float, clipped to the int16 range with a warning naming `path`
    (InputError for NaN/infinite values or a non-numeric voxel type). The array itself when it is int16.
    `value_range`: the finite (min, max) a check already found (`check_ct`), which saves two passes."""
    if array.dtype == np.int16:
        return array
    if array.dtype.kind == "f":
        if value_range is None and not np.all(np.isfinite(array)):
            raise InputError(path, "image holds NaN or infinite values")
        array = np.rint(array)
    elif array.dtype.kind not in "iub":
        raise InputError(path, f"image has voxel type {array.dtype}; expected CT numbers (HU)")
    # rint is monotonic: the rounded volume's extremes are the rounded extremes
    lo, hi = (array.min(), array.max()) if value_range is None else (np.rint(value_range[0]), np.rint(value_range[1]))
    if lo < INT16_MIN or hi > INT16_MAX:
        logger.warning("%s: intensities %g..%g exceed int16; clipped to %d..%d", path, lo, hi, INT16_MIN, INT16_MAX)
        array = np.clip(array, INT16_MIN, INT16_MAX)
    return array.astype(np.int16)


def normalize_hu(array: np.ndarray, window_hu: Sequence[float] = HU_WINDOW) -> np.ndarray:
    """Clip to `window_hu` then z-score over the whole volume (population std + 1e-5); float32, same shape."""
    x = np.clip(np.asarray(array, dtype=np.float32), float(window_hu[0]), float(window_hu[1]))
    mean = x.mean(dtype=np.float64)
    std = x.std(dtype=np.float64)
    return ((x - np.float32(mean)) / np.float32(std + EPS_STD)).astype(np.float32, copy=False)


def window_and_zscore_torch(t: torch.Tensor, window_hu: Sequence[float] = HU_WINDOW) -> torch.Tensor:
    """Clip to `window_hu` and z-score per volume (per sample of a batch), float32.

    t: (D, H, W) -> one volume; (N, ...) with t.dim() >= 4 -> statistics per sample n.
    """
    x = t.float().clamp(float(window_hu[0]), float(window_hu[1]))
    dims = tuple(range(x.dim())) if x.dim() <= 3 else tuple(range(1, x.dim()))
    std, mean = torch.std_mean(x, dim=dims, correction=0, keepdim=True)
    return (x - mean) / (std + EPS_STD)
