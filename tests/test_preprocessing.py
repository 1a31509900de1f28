"""Tests of common.volume.intensity: numpy and torch paths agree, corner-aligned semantics, masks, boxes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from common.core.defaults import HU_WINDOW
from common.volume.boxes import crop_box_with_margin, label_bboxes, margin_voxels, organ_bbox
from common.volume.intensity import normalize_hu, to_int16_hu, window_and_zscore_torch
from common.volume.resize import resize_hu_int16, resize_mask, resize_mask_torch, resize_volume, resize_volume_torch

SHAPES = [(32, 32, 32), (17, 60, 23), (45, 47, 33), (90, 20, 71), (16, 16, 16)]


def ct(shape=(45, 47, 33), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


def blocks_mask(shape=(45, 47, 33), seed=0, n_labels=13) -> np.ndarray:
    """Overlapping random boxes of labels 1..n, including thin and single-voxel ones."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    for label in range(1, n_labels + 1):
        lo = [int(rng.integers(0, n)) for n in shape]
        hi = [min(n, a + int(rng.integers(1, 15))) for a, n in zip(lo, shape)]
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    mask[-1, -1, -1] = 13  # touches the far corner
    return mask


def reference_resize_mask(mask: np.ndarray, shape) -> np.ndarray:
    """The reference's per-label rule with scipy zoom on the whole volume."""
    out = np.zeros(shape, np.uint8)
    for label in range(1, 14):
        binary = (mask == label).astype(np.float32)
        if binary.any():
            out[resize_volume(binary, shape) > 0.5] = label
    return out


# ---------------------------------------------------------------------------------------------------- intensities


def test_normalize_hu_numpy_equals_torch() -> None:
    image = ct()
    a = normalize_hu(image, HU_WINDOW)
    b = window_and_zscore_torch(torch.from_numpy(image), HU_WINDOW).numpy()
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert abs(float(a.mean())) < 1e-4 and float(a.std()) == pytest.approx(1.0, abs=1e-3)
    clipped = np.clip(image.astype(np.float64), *HU_WINDOW)
    np.testing.assert_allclose(a, (clipped - clipped.mean()) / (clipped.std() + 1e-5), atol=1e-4)


def test_window_and_zscore_per_sample() -> None:
    batch = torch.from_numpy(np.stack([ct(seed=1), ct(seed=2) // 2]))[:, None]  # (2,1,D,H,W) int16
    out = window_and_zscore_torch(batch, HU_WINDOW)
    assert out.shape == batch.shape and out.dtype == torch.float32
    for n in range(2):
        np.testing.assert_allclose(out[n, 0].numpy(), normalize_hu(batch[n, 0].numpy()), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- image resize


@pytest.mark.parametrize("shape", SHAPES)
def test_resize_volume_numpy_equals_torch_and_scipy(shape) -> None:
    image = normalize_hu(ct())
    a = resize_volume(image, shape)
    b = resize_volume_torch(torch.from_numpy(image), shape).numpy()
    factors = [o / i for o, i in zip(shape, image.shape)]
    c = ndi.zoom(image, factors, order=1, grid_mode=False)
    assert a.shape == b.shape == tuple(shape) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(a, c, atol=1e-4)


def test_resize_is_corner_aligned_and_exact_on_linear_ramps() -> None:
    z, y, x = np.meshgrid(np.arange(45), np.arange(47), np.arange(33), indexing="ij")
    ramp = (2.0 * z - 3.0 * y + 0.5 * x).astype(np.float32)
    out = resize_volume_torch(torch.from_numpy(ramp), (20, 90, 16)).numpy()
    zo, yo, xo = np.meshgrid(np.linspace(0, 44, 20), np.linspace(0, 46, 90), np.linspace(0, 32, 16), indexing="ij")
    np.testing.assert_allclose(out, 2.0 * zo - 3.0 * yo + 0.5 * xo, atol=2e-4)
    image = ct().astype(np.float32)
    for resized in (resize_volume(image, (20, 90, 16)), resize_volume_torch(torch.from_numpy(image), (20, 90, 16))):
        resized = np.asarray(resized)
        for corner in [(0, 0, 0), (-1, -1, -1), (0, -1, 0), (-1, 0, -1)]:
            assert resized[corner] == pytest.approx(image[corner], abs=1e-3)


def test_resize_volume_torch_layouts_and_dtypes() -> None:
    image = torch.from_numpy(ct())
    batch = torch.stack([image, image])[:, None]
    out = resize_volume_torch(batch, (8, 9, 10))
    assert out.shape == (2, 1, 8, 9, 10) and out.dtype == torch.float32
    np.testing.assert_allclose(out[1, 0].numpy(), resize_volume_torch(image, (8, 9, 10)).numpy(), atol=1e-6)
    assert resize_volume_torch(image.double(), (8, 9, 10)).dtype == torch.float64
    same = resize_volume_torch(image, image.shape)
    assert torch.equal(same, image.float())
    with pytest.raises(ValueError):
        resize_volume_torch(image[0], (4, 4, 4))
    with pytest.raises(ValueError):
        resize_volume(ct(), (4, 4))


def test_resize_hu_int16_rounds() -> None:
    image = ct()
    out = resize_hu_int16(image, (20, 30, 40))
    assert out.dtype == np.int16 and out.shape == (20, 30, 40)
    expected = np.rint(resize_volume(image, (20, 30, 40)))
    assert np.abs(out.astype(np.float32) - expected).max() <= 1.0
    assert (out != expected).mean() < 1e-3  # only float32 ties at .5 may differ
    # non-contiguous (flipped) input works
    flipped = resize_hu_int16(image[::-1, :, ::-1], (20, 30, 40))
    np.testing.assert_array_equal(flipped, resize_hu_int16(np.ascontiguousarray(image[::-1, :, ::-1]), (20, 30, 40)))


# ---------------------------------------------------------------------------------------------------- mask resize


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [1])
def test_resize_mask_numpy_equals_torch_and_reference(shape, seed) -> None:
    mask = blocks_mask(seed=seed)
    a = resize_mask(mask, shape)
    b = resize_mask_torch(torch.from_numpy(mask), shape, 13).numpy()
    c = reference_resize_mask(mask, shape)
    assert a.dtype == np.uint8 and b.dtype == np.uint8 and a.shape == tuple(shape)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_resize_mask_random_shapes_agree() -> None:
    rng = np.random.default_rng(5)
    for _ in range(15):
        in_shape = tuple(int(v) for v in rng.integers(4, 30, 3))
        out_shape = tuple(int(v) for v in rng.integers(3, 40, 3))
        mask = blocks_mask(in_shape, seed=int(rng.integers(1000)))
        np.testing.assert_array_equal(resize_mask(mask, out_shape),
                                      resize_mask_torch(torch.from_numpy(mask), out_shape, 13).numpy())


def test_resize_mask_threshold_is_strictly_above_half() -> None:
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[1, 1, 1] = 4
    out = resize_mask(mask, (5, 5, 5))  # samples at 0, .5, 1, 1.5, 2 -> 0.5 at the half-way voxels
    expected = np.zeros((5, 5, 5), np.uint8)
    expected[2, 2, 2] = 4
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(resize_mask_torch(torch.from_numpy(mask), (5, 5, 5), 13).numpy(), expected)


def test_resize_mask_later_labels_win_and_num_labels() -> None:
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:8, 2:8, 2:8] = 2
    mask[4:6, 4:6, 4:6] = 9
    out = resize_mask(mask, (19, 19, 19))
    assert out[9, 9, 9] == 9 and out[5, 5, 5] == 2 and out[0, 0, 0] == 0
    assert set(np.unique(resize_mask(mask, (19, 19, 19), num_labels=5))) == {0, 2}


def test_resize_mask_of_empty_mask() -> None:
    out = resize_mask(np.zeros((5, 6, 7), np.uint8), (8, 8, 8))
    assert out.shape == (8, 8, 8) and not out.any()


# ---------------------------------------------------------------------------------------------------- boxes


def test_organ_bbox_and_label_bboxes() -> None:
    mask = np.zeros((20, 30, 40), np.uint8)
    assert organ_bbox(mask) is None
    assert label_bboxes(mask) == {}
    mask[3:7, 10:12, 5] = 1
    mask[15, 0, 39] = 13
    assert organ_bbox(mask) == ((3, 15), (0, 11), (5, 39))
    assert label_bboxes(mask) == {1: ((3, 6), (10, 11), (5, 5)), 13: ((15, 15), (0, 0), (39, 39))}
    assert organ_bbox(mask.astype(bool)) == organ_bbox(mask)


def test_crop_box_with_margin_in_mm() -> None:
    spacing_zyx = (2.5, 0.8, 0.9)
    assert margin_voxels(spacing_zyx, 20.0) == (8, 25, 22)
    shape = (100, 200, 300)
    box = ((10, 50), (5, 150), (100, 290))
    slices = crop_box_with_margin(box, spacing_zyx, 20.0, shape)
    # [max(0, min - m), min(shape, max + m)): the upper end is exclusive as in the reference
    assert slices == (slice(2, 58), slice(0, 175), slice(78, 300))
    # zero margin never cuts the box
    assert crop_box_with_margin(box, spacing_zyx, 0.0, shape) == (slice(10, 51), slice(5, 151), slice(100, 291))
    # margins larger than the spacing allows: int() truncates (3 mm at 2.5 mm spacing = 1 voxel)
    assert crop_box_with_margin(box, spacing_zyx, 3.0, shape)[0] == slice(9, 51)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16])
def test_to_int16_hu_with_a_known_range_equals_the_full_scan(dtype, caplog) -> None:
    """read_canonical_ct hands check_ct's (min, max) on, which spares two passes: same voxels, same warning."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, 7, 8)) * 40000.0 - 500.0 + 0.49
    array = (np.abs(values) if dtype == np.uint16 else values).astype(dtype)
    caplog.set_level("WARNING")
    scanned = to_int16_hu(array, "ct.nii.gz")
    first = caplog.text
    caplog.clear()
    known = to_int16_hu(array, "ct.nii.gz", (float(array.min()), float(array.max())))
    assert known.dtype == np.int16 and np.array_equal(known, scanned)
    assert caplog.text.split("WARNING")[-1] == first.split("WARNING")[-1] and "exceed int16" in first
