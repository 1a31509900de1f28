"""Fine crop and augmentation (fine_efficient_seg/augment.py): extension bounds, HU shift inside organs, alignment,
determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.core.defaults import HU_WINDOW
from common.volume.boxes import crop_box_with_margin, margin_voxels
from common.volume.resize import resize_mask_torch, resize_volume_torch
from fine_efficient_seg.augment import (
    FineAugmentation,
    FineAugmentSettings,
    apply_hu_shift,
    extended_crop_slices,
    extension_range,
    fine_crop_slices,
    make_fine_sample,
    resize_labels,
    sample_fine_augmentation,
    sample_rng,
)

SPACING_ZYX = (2.5, 0.8, 0.7)
SHAPE_ZYX = (33, 47, 45)
SETTINGS = FineAugmentSettings()


def test_max_extension_and_range():
    assert margin_voxels(SPACING_ZYX, 40.0) == (16, 50, 57)
    assert extension_range(16) == (-6, 16)       # floor(-16/3) = -6
    assert extension_range(57) == (-19, 57)
    assert extension_range(0) == (0, 1)           # spacing above 40 mm: no extension


def test_extension_within_bounds_in_voxels_and_mm():
    m_vox = margin_voxels(SPACING_ZYX, SETTINGS.max_extend_size_mm)
    seen_lo = [math.inf] * 3
    seen_hi = [-math.inf] * 3
    extended = 0
    for n in range(600):
        aug = sample_fine_augmentation(sample_rng(7, "labeled", n), SPACING_ZYX, SETTINGS, labeled=True, num_organs=13)
        if aug.extension_vox is None:
            continue
        extended += 1
        for axis, ((e_lo, e_hi), m, s) in enumerate(zip(aug.extension_vox, m_vox, SPACING_ZYX)):
            for e in (e_lo, e_hi):
                assert math.floor(-m / 3) <= e < m
                assert -40.0 / 3 - s < e * s < 40.0        # the same bound in mm
                seen_lo[axis] = min(seen_lo[axis], e)
                seen_hi[axis] = max(seen_hi[axis], e)
    # p = 0.5 of extension (binomial, 600 draws: far inside +-5 sigma).
    assert 240 < extended < 360
    # Both ends of the range are reached on the short axis.
    assert seen_lo[0] == math.floor(-m_vox[0] / 3) and seen_hi[0] == m_vox[0] - 1


def test_extended_crop_clips_to_volume_and_keeps_a_voxel():
    box = ((5, 20), (10, 30), (0, 44))
    slices = extended_crop_slices(box, ((3, -2), (-4, 100), (2, 5)), SHAPE_ZYX)
    assert slices == (slice(2, 18), slice(14, 47), slice(0, 45))
    # Shrinking a thin box past itself leaves its centre voxel.
    thin = ((10, 11), (10, 12), (10, 10))
    slices = extended_crop_slices(thin, ((-5, -5), (-3, -3), (0, 0)), SHAPE_ZYX)
    assert slices == (slice(10, 11), slice(11, 12), slice(10, 11))


def test_fixed_margin_crop_matches_crop_box_with_margin():
    box = ((5, 20), (10, 30), (3, 40))
    aug = FineAugmentation(None, np.zeros(14, dtype=np.int64))
    slices = fine_crop_slices(box, SPACING_ZYX, SHAPE_ZYX, aug, SETTINGS)
    assert tuple(slices) == tuple(crop_box_with_margin(box, SPACING_ZYX, 20.0, SHAPE_ZYX))
    assert slices[0] == slice(0, 28)             # margin int(20 / 2.5) = 8 voxels


def test_hu_shift_sampling():
    draws = [sample_fine_augmentation(sample_rng(3, "labeled", n), SPACING_ZYX, SETTINGS, labeled=True,
                                      num_organs=13).hu_shift for n in range(400)]
    shifts = np.stack(draws)
    assert shifts.shape == (400, 14)
    assert np.all(shifts[:, 0] == 0)
    assert shifts.min() >= -200 and shifts.max() < 200
    active = (shifts[:, 1:] != 0).mean()
    assert 0.4 < active < 0.6
    unlabeled = sample_fine_augmentation(sample_rng(3, "unlabeled", 0), SPACING_ZYX, SETTINGS, labeled=False,
                                         num_organs=13)
    assert not np.any(unlabeled.hu_shift)


def test_sampling_is_deterministic_per_index():
    a = sample_fine_augmentation(sample_rng(11, "labeled", 42), SPACING_ZYX, SETTINGS, True, num_organs=13)
    b = sample_fine_augmentation(sample_rng(11, "labeled", 42), SPACING_ZYX, SETTINGS, True, num_organs=13)
    c = sample_fine_augmentation(sample_rng(11, "unlabeled", 42), SPACING_ZYX, SETTINGS, True, num_organs=13)
    assert a.extension_vox == b.extension_vox and np.array_equal(a.hu_shift, b.hu_shift)
    different = [sample_fine_augmentation(sample_rng(11, "labeled", n), SPACING_ZYX, SETTINGS, True, num_organs=13)
                 for n in range(8)]
    assert len({(d.extension_vox, tuple(d.hu_shift)) for d in different}) > 1
    assert (a.extension_vox, tuple(a.hu_shift)) != (c.extension_vox, tuple(c.hu_shift))   # streams differ


def test_hu_shift_only_inside_organs():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(-300, 300, (9, 10, 11), generator=gen).float()
    labels = torch.zeros(9, 10, 11, dtype=torch.uint8)
    labels[2:5, 3:7, 1:4] = 1
    labels[6:8, 1:3, 5:10] = 11
    shift = np.zeros(14, dtype=np.int64)
    shift[1], shift[11], shift[4] = 150, -75, 99      # label 4 is absent: no effect
    out = apply_hu_shift(image, labels, shift)
    diff = out - image
    assert torch.all(diff[labels == 0] == 0)
    assert torch.all(diff[labels == 1] == 150)
    assert torch.all(diff[labels == 11] == -75)


def test_make_fine_sample_shift_and_normalization():
    gen = torch.Generator().manual_seed(1)
    crop = torch.randint(-200, 200, (16, 16, 16), generator=gen).to(torch.int16)
    labels = torch.zeros(16, 16, 16, dtype=torch.uint8)
    labels[4:10, 4:10, 4:10] = 3
    shift = np.zeros(14, dtype=np.int64)
    shift[3] = 100
    x, y = make_fine_sample(crop, labels, (16, 16, 16), (-1000.0, 1000.0), shift)
    assert x.shape == (1, 16, 16, 16) and x.dtype == torch.float32
    assert y.shape == (16, 16, 16) and y.dtype == torch.int64
    assert torch.equal(y, labels.long())                       # same size: labels unchanged
    expected = crop.float() + 100.0 * (labels == 3)
    expected = (expected - expected.mean()) / (expected.std(unbiased=False) + 1e-5)
    assert torch.allclose(x[0], expected, atol=1e-4)
    # Unlabeled: no labels, no shift.
    x_u, y_u = make_fine_sample(crop, None, (8, 8, 8), HU_WINDOW, shift)
    assert y_u is None and x_u.shape == (1, 8, 8, 8)


@pytest.mark.parametrize("extension", [((3, 7), (-4, 12), (0, 20)), None])
def test_image_and_labels_stay_aligned(extension):
    """An image that is 1000 HU exactly where the organ is: after crop + resize both give the same organ."""
    labels = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    labels[8:20, 12:30, 10:33] = 5
    labels[20:24, 25:40, 30:40] = 2
    image = np.where(labels == 5, 1000, 0).astype(np.int16)
    box = ((8, 23), (12, 39), (10, 39))
    aug = FineAugmentation(extension, np.zeros(14, dtype=np.int64))
    slices = fine_crop_slices(box, SPACING_ZYX, SHAPE_ZYX, aug, SETTINGS)
    crop_image = torch.from_numpy(image[slices])
    crop_labels = torch.from_numpy(labels[slices])
    size = (16, 32, 32)
    resized_image = resize_volume_torch(crop_image.float(), size)
    resized_labels = resize_mask_torch(crop_labels, size, 13)
    assert torch.equal(resized_image > 500, resized_labels == 5)
    x, y = make_fine_sample(crop_image, crop_labels, size, (-2000.0, 2000.0))
    assert torch.equal(y, resized_labels.long())
    threshold = (500 - resized_image.mean()) / (resized_image.std(unbiased=False) + 1e-5)
    assert torch.equal(x[0] > threshold, y == 5)
    assert set(torch.unique(y).tolist()) == {0, 2, 5}


def test_resize_labels_matches_resize_mask_torch():
    gen = torch.Generator().manual_seed(4)
    labels = torch.zeros(19, 23, 17, dtype=torch.uint8)
    labels[3:9, 2:15, 4:11] = 1
    labels[10:18, 5:9, 1:16] = 7
    labels[12:14, 18:22, 3:5] = 13
    labels[torch.rand(19, 23, 17, generator=gen) > 0.97] = 4
    for size in ((32, 32, 32), (8, 40, 12)):
        assert torch.equal(resize_labels(labels, size, 13), resize_mask_torch(labels, size, 13))


# Ops that make the host wait for a CUDA device: they need a result's value or size on the CPU.
HOST_SYNC_OPS = ("aten.nonzero", "aten._local_scalar_dense", "aten._unique", "aten.unique", "aten.masked_select",
                 "aten.item", "aten.equal", "aten.is_nonzero")


class _RecordOps(TorchDispatchMode):
    """Records every aten op run inside it, and whether it indexes through a boolean mask (a hidden nonzero)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()))
        if name.startswith(HOST_SYNC_OPS) or bool_index:
            self.syncing.append(name)
        return func(*args, **(kwargs or {}))


def test_fine_sample_device_path_never_waits_for_the_device(monkeypatch):
    """The ops the fine sample runs on a GPU (mask resize, HU shift, window) include none that syncs the host."""
    import fine_efficient_seg.augment as augment

    monkeypatch.setattr(augment, "resize_labels",
                        lambda labels, size, num_labels: resize_mask_torch(labels, size, num_labels))
    gen = torch.Generator().manual_seed(2)
    crop = torch.randint(-200, 200, (11, 14, 13), generator=gen).to(torch.int16)
    labels = torch.zeros(11, 14, 13, dtype=torch.uint8)
    labels[2:8, 3:9, 4:10] = 3
    labels[6:10, 1:5, 2:6] = 9
    shift = np.zeros(14, dtype=np.int64)
    shift[3] = 100
    expected_y = resize_mask_torch(labels, (16, 16, 16), 13)
    with _RecordOps() as recorder:
        x, y = make_fine_sample(crop, labels, (16, 16, 16), HU_WINDOW, shift)
    assert recorder.syncing == []
    assert torch.equal(y, expected_y.long()) and set(np.unique(y.numpy()).tolist()) == {0, 3, 9}
