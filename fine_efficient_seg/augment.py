"""Fine-stage crop, resize and augmentation (reference 4.6), with the tensor work in torch on any device.

A training sample is made in two halves so the GPU is never starved and resume is exact:
- `sample_fine_augmentation` draws every random decision of one sample (box extension, per-organ HU shifts)
  from a numpy Generator on the CPU; `sample_rng(seed, stream, index)` seeds it from the sample's identity
  only, so sample n of a stream is the same whatever happened before it.
- `fine_crop_slices` turns an organ box and those decisions into crop slices of the canonical raw volume;
  the caller reads that int16 crop (memory-mapped) and moves it to the device;
- `make_fine_sample` then resizes, HU-shifts, windows and z-scores the crop on the tensor's device.

Boxes are inclusive voxel boxes ((z_min, z_max), (y_min, y_max), (x_min, x_max)) in canonical raw voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from common.core.defaults import EXTEND_SIZE_MM, MAX_EXTEND_SIZE_MM
from common.core.labels import FLARE22
from common.train.distributed import derive_seed
from common.volume.boxes import Box, crop_box_with_margin, margin_voxels
from common.volume.intensity import window_and_zscore_torch
from common.volume.resize import resize_mask, resize_mask_torch, resize_volume_torch


@dataclass(frozen=True)
class FineAugmentSettings:
    """Settings of the fine crop and augmentation (FineTrainConfig.crop); the defaults are the reference's."""

    extend_size_mm: float = EXTEND_SIZE_MM          # fixed margin around the box (with p 1 - random_extend_prob)
    max_extend_size_mm: float = MAX_EXTEND_SIZE_MM  # M = int(max_extend_size_mm / spacing) voxels per axis
    random_extend_prob: float = 0.5     # probability of the random box extension
    hu_shift_prob: float = 0.5          # per organ, probability of an additive HU shift (labeled cases)
    hu_shift_max: int = 200             # shift drawn as an integer in [-hu_shift_max, hu_shift_max)


@dataclass(frozen=True)
class FineAugmentation:
    """The random decisions of one sample.

    extension_vox: ((z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi)) voxels added beyond each face of the box
    (negative values shrink it), or None for the fixed margin crop.
    hu_shift: int (C + 1,) HU added to the voxels of each label, index 0 (background) always 0; None: no shift.
    """

    extension_vox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None
    hu_shift: np.ndarray | None


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, stream name, sample index) (all >= 0)."""
    return np.random.default_rng(derive_seed(seed, stream, index))


def extension_range(m_vox: int) -> tuple[int, int]:
    """Half-open range [floor(-M/3), M) of one face's random extension in voxels (M >= 1; M = 0 gives 0)."""
    if m_vox <= 0:
        return 0, 1
    return math.floor(-m_vox / 3), m_vox


def sample_fine_augmentation(
    rng: np.random.Generator, spacing_zyx: Sequence[float], settings: FineAugmentSettings, labeled: bool,
    num_organs: int,
) -> FineAugmentation:
    """Draw the decisions of one sample: random extension with p `random_extend_prob` (each face
    independently in [floor(-M/3), M) voxels), and for labeled cases an integer HU shift in
    [-hu_shift_max, hu_shift_max) for each organ independently with p `hu_shift_prob`.

    The same number of draws is made whatever the outcome, so later decisions do not depend on earlier ones.
    """
    do_extend = rng.random() < settings.random_extend_prob
    m_vox = margin_voxels(spacing_zyx, settings.max_extend_size_mm)  # M per axis, the stored region's margin
    faces = []
    for m in m_vox:
        lo, hi = extension_range(m)
        e = rng.integers(lo, hi, size=2)
        faces.append((int(e[0]), int(e[1])))
    shift_on = rng.random(num_organs) < settings.hu_shift_prob
    shift_hu = rng.integers(-settings.hu_shift_max, settings.hu_shift_max, size=num_organs)
    hu_shift = np.zeros(num_organs + 1, dtype=np.int64)
    if labeled and settings.hu_shift_max > 0:
        hu_shift[1:] = np.where(shift_on, shift_hu, 0)
    return FineAugmentation(tuple(faces) if do_extend else None, hu_shift)  # type: ignore[arg-type]


def extended_crop_slices(box: Box, extension_vox, shape_zyx: Sequence[int]) -> tuple[slice, slice, slice]:
    """Crop [max(0, min - e_lo), min(shape, max + e_hi)) per axis -- the margin-crop rule with a per-face
    extension instead of one margin. A crop that the shrinking would empty keeps one voxel at the box centre.
    """
    slices = []
    for (lo_box, hi_box), (e_lo, e_hi), size in zip(box, extension_vox, shape_zyx):
        start = max(0, lo_box - e_lo)
        stop = min(int(size), hi_box + e_hi)
        if stop <= start:
            centre = min(max((lo_box + hi_box) // 2, 0), int(size) - 1)
            start, stop = centre, centre + 1
        slices.append(slice(start, stop))
    return tuple(slices)  # type: ignore[return-value]


def fine_crop_slices(
    box: Box, spacing_zyx: Sequence[float], shape_zyx: Sequence[int], aug: FineAugmentation,
    settings: FineAugmentSettings,
) -> tuple[slice, slice, slice]:
    """Crop slices in canonical raw voxels: the random extension if drawn, else the `extend_size_mm` margin."""
    if aug.extension_vox is not None:
        return extended_crop_slices(box, aug.extension_vox, shape_zyx)
    return tuple(crop_box_with_margin(box, spacing_zyx, settings.extend_size_mm, shape_zyx))  # type: ignore


def apply_hu_shift(image_hu: torch.Tensor, labels: torch.Tensor, hu_shift: np.ndarray) -> torch.Tensor:
    """Add `hu_shift[label]` to every voxel (0 for background), i.e. one shift per organ.

    image_hu: float (D, H, W) HU; labels: integer (D, H, W) in 0..C on the same device.
    """
    table = torch.from_numpy(np.ascontiguousarray(hu_shift))
    if image_hu.device.type == "cuda":  # a pinned, asynchronous upload: no wait for the GPU per sample
        table = table.pin_memory().to(image_hu.device, non_blocking=True)
    return image_hu + table.to(image_hu.dtype)[labels.long()]


def resize_labels(labels: torch.Tensor, size_zyx: Sequence[int], num_labels: int) -> torch.Tensor:
    """Per-label linear resize + 0.5 threshold (later labels win) of a label map (D, H, W) on its device; uint8.

    On the CPU the bounding-box-restricted `resize_mask` (the same result, several times faster there) is used;
    on a GPU `resize_mask_torch`.
    """
    if labels.device.type == "cpu":
        return torch.from_numpy(resize_mask(labels.numpy(), size_zyx, num_labels))
    return resize_mask_torch(labels, size_zyx, num_labels)


def make_fine_sample(
    crop_hu: torch.Tensor,
    crop_labels: torch.Tensor | None,
    size_zyx: Sequence[int],
    hu_window: Sequence[float],
    hu_shift: np.ndarray | None = None,
    num_labels: int = FLARE22.num_organs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize a raw crop to the network size, apply the per-organ HU shift, window and z-score.

    crop_hu: (d, h, w) any dtype (int16 from the memmap) on the target device; crop_labels: uint8 (d, h, w) with
    labels 0..num_labels, or None (unlabeled). Resize: trilinear with align_corners=True for the image, per-label
    linear + 0.5 threshold for the labels. The HU shift uses the resized labels (reference order: resize, then shift).
    Returns x float32 (1, *size_zyx) normalized, labels int64 (*size_zyx) or None.
    """
    size = tuple(int(s) for s in size_zyx)
    image = resize_volume_torch(crop_hu.float(), size)
    labels = None
    if crop_labels is not None:
        labels = resize_labels(crop_labels, size, num_labels).long()
        if hu_shift is not None and np.any(hu_shift):
            image = apply_hu_shift(image, labels, hu_shift)
    x = window_and_zscore_torch(image, hu_window)
    return x.unsqueeze(0), labels
