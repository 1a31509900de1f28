"""Post-processing on small synthetic arrays: overlap rule, largest component, coarse box, raw crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.core.labelmaps import probs_to_labels
from common.infer.postprocess import coarse_box, coarse_organ_box, keep_largest_component, organ_box
from common.storage.model_folder import PreprocessSpec
from common.volume.boxes import crop_box_with_margin


def test_probs_to_labels_highest_wins_and_threshold():
    probs = np.zeros((13, 2, 3, 4), dtype=np.float32)
    probs[0, 0, 0, 0] = 0.9  # liver alone
    probs[0, 0, 0, 1], probs[2, 0, 0, 1] = 0.7, 0.8  # overlap: spleen (label 3) higher
    probs[4, 0, 0, 2] = 0.49  # below threshold
    probs[5, 0, 0, 3], probs[6, 0, 0, 3] = 0.6, 0.6  # tie: the lower label
    probs[12, 1, 2, 3] = 0.5  # exactly the threshold counts
    labels = probs_to_labels(probs)
    assert labels.dtype == np.uint8 and labels.shape == (2, 3, 4)
    assert labels[0, 0].tolist() == [1, 3, 0, 6]
    assert labels[1, 2, 3] == 13 and labels.sum() == 1 + 3 + 6 + 13
    torch_labels = probs_to_labels(torch.from_numpy(probs))
    assert torch_labels.dtype == torch.uint8
    np.testing.assert_array_equal(torch_labels.numpy(), labels)
    np.testing.assert_array_equal(probs_to_labels(torch.from_numpy(probs).half()).numpy(), labels)
    assert probs_to_labels(probs, threshold=0.85)[0, 0].tolist() == [1, 0, 0, 0]


def test_keep_largest_component_per_organ():
    labels = np.zeros((11, 13, 12), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels
    labels[6:10, 6:10, 6:10] = 1  # 64 voxels: kept
    labels[0:2, 10:12, 0:2] = 2  # 8 voxels, a single component of another organ
    labels[5, 0, 11] = 3
    labels[6, 1, 10] = 3  # diagonal neighbour: the same 26-connected component
    out = keep_largest_component(labels, (1.0, 1.0, 1.0), min_volume_mm3=0.0)
    assert (out == 1).sum() == 64 and out[2, 2, 2] == 0
    assert (out == 2).sum() == 8 and (out == 3).sum() == 2
    assert (labels == 1).sum() == 91  # the input is not modified


def test_keep_largest_component_threshold_uses_spacing():
    labels = np.zeros((6, 7, 8), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 4  # 8 voxels
    small = keep_largest_component(labels, (1.0, 1.0, 1.0), min_volume_mm3=10.0)  # 8 mm^3 < 10
    assert not small.any()
    large = keep_largest_component(labels, (2.0, 1.0, 1.0), min_volume_mm3=10.0)  # 16 mm^3 >= 10
    assert (large == 4).sum() == 8
    exact = keep_largest_component(labels, (1.0, 1.0, 1.25), min_volume_mm3=10.0)  # exactly 10 mm^3 kept
    assert (exact == 4).sum() == 8


def test_coarse_box_window_around_largest_region():
    labels = np.zeros((40, 20, 30), dtype=np.uint8)
    labels[2:38, 5:9, 3:7] = 4  # long thin organ: largest bbox, fewer voxels (576)
    labels[20:30, 10:18, 10:25] = 1  # liver: 1200 voxels, centroid z = 24.5 -> round to 24
    labels[0:1, 0:1, 29:30] = 2  # one far voxel widens the labelled box
    box = coarse_box(labels, (5.0, 1.0, 1.0), z_window_mm=40.0)  # d = 8 slices
    assert box == ((16, 32), (0, 17), (3, 29))
    # A large window is clipped to the labelled voxels' extent.
    assert coarse_box(labels, (5.0, 1.0, 1.0), z_window_mm=1000.0)[0] == (0, 37)
    assert coarse_box(np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0)) is None


def test_coarse_box_regions_are_equal_label_and_connected():
    labels = np.zeros((30, 10, 10), dtype=np.uint8)
    labels[0:4, 0:5, 0:5] = 1  # liver split in two pieces of 100 and 75 voxels
    labels[20:23, 0:5, 0:5] = 1
    labels[8:12, 0:6, 0:6] = 3  # spleen: 144 voxels in one piece -> the largest region
    box = coarse_box(labels, (1.0, 1.0, 1.0), z_window_mm=2.0)
    assert box == ((8, 12), (0, 5), (0, 5))  # centroid z 9.5 -> 10 (round half to even), window +-2


def test_organ_box_maps_to_raw_and_the_crop_is_the_training_crop():
    # zoom z = 200/160 = 1.25, y = x = 512/160 = 3.2; margin 20 mm -> int(8.0) = 8 slices, int(25.6) = 25 voxels
    labels = np.zeros((160, 160, 160), dtype=np.uint8)
    labels[10:101, 40:121, 0:160] = 1
    spacing = (2.5, 0.78125, 0.78125)
    box = organ_box(labels, (200, 512, 512), spacing, min_volume_mm3=0.0, z_window_mm=1000.0)
    assert box == ((12, 125), (128, 384), (0, 508))
    crop = crop_box_with_margin(box, spacing, 20.0, (200, 512, 512))
    assert crop[0] == slice(4, 133)      # [12 - 8, 125 + 8)
    assert crop[1] == slice(103, 409)    # [128 - 25, 384 + 25): the low face one voxel tighter than the
    assert crop[2] == slice(0, 512)      # reference's float margin int(128 - 25.6) = 102, as training crops
    # a component below the volume threshold leaves no box
    assert organ_box(labels, (200, 512, 512), spacing, min_volume_mm3=1e12) is None


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_probs_to_labels_on_device(device):
    probs = torch.rand(13, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    expected = probs_to_labels(probs.numpy())
    got = probs_to_labels(probs.to(device))
    assert got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), expected)


def test_coarse_organ_box_is_organ_box_with_the_models_settings_or_the_whole_volume():
    """The one box rule of the predictor and the fine boxes step: the organ box with the coarse model's settings,
    the whole volume (and fallback) when no organ survives."""
    labels = np.zeros((16, 16, 16), dtype=np.uint8)
    labels[4:9, 5:10, 6:12] = 1
    labels[12, 12, 12] = 3  # one voxel: dropped by the minimum volume below
    raw_shape, spacing = (40, 64, 64), (2.5, 0.8, 0.8)
    coarse = PreprocessSpec("coarse", (32, 32, 32), min_volume_mm3=100.0, z_window_mm=100.0)  # a voxel: 64 mm^3
    box, fallback = coarse_organ_box(labels, raw_shape, spacing, coarse)
    assert not fallback and box == organ_box(labels, raw_shape, spacing, 100.0, 100.0)
    assert box != organ_box(labels, raw_shape, spacing, 0.0, 100.0)  # the settings are the model's
    empty, fallback = coarse_organ_box(np.zeros_like(labels), raw_shape, spacing, coarse)
    assert fallback and empty == ((0, 39), (0, 63), (0, 63))
