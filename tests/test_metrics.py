"""FLARE22 DSC/NSD against the official script's output, each official rule on constructed cases, hard Dice."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.core.labelmaps import probs_to_labels
from common.core.labels import FLARE22
from common.evaluation.metrics import flare_case_scores, hard_dice_per_organ, official_round, to_label_uint8
from common.evaluation.surface_distance import (
    _contour_loops,
    _polygon_triangulations,
    neighbour_code_normals,
    neighbour_codes,
    surface_dice,
    surface_distances,
    surfel_area_table,
)

# (case name in the official CSV, ground truth, prediction) relative to ../shared/data/real
OFFICIAL_PAIRS = (
    ("case_0001.nii.gz", "case_0001_mask.nii.gz", "eval_check/case_0001_pred.nii.gz"),
    ("case_0002.nii.gz", "case_0002_mask.nii.gz", "eval_check/case_0002_pred.nii.gz"),
    ("case_0003.nii.gz", "case_0003_mask.nii.gz", "case_0003_mask_fast.nii.gz"),
)


def _read_ijk(path):
    """Array in nibabel (i, j, k) order and the spacing in that order, read with SimpleITK."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), image.GetSpacing()


@pytest.fixture(scope="module")
def official_rows(real_data_dir):
    with open(real_data_dir / "eval_check" / "official_DSC_NSD.csv", newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("name,gt_file,pred_file", OFFICIAL_PAIRS)
def test_official_values_reproduced(real_data_dir, official_rows, name, gt_file, pred_file):
    gt, spacing = _read_ijk(real_data_dir / gt_file)
    pred, _ = _read_ijk(real_data_dir / pred_file)
    scores = flare_case_scores(pred, gt, spacing)
    official = official_rows[name]
    mismatches = []
    for label, short in ((lb.id, lb.short) for lb in FLARE22):
        for value, column in zip(scores[label], (f"{short}_DSC", f"{short}_NSD")):
            expected = float(official[column])
            if round(float(value), 4) != expected or value != expected:
                mismatches.append(f"{column}: got {value}, official {official[column]}")
            # The official CSV writes ints only in all-int columns; an int there must be an int here.
            if "." not in official[column]:
                assert isinstance(value, int), column
    assert not mismatches, "\n".join(mismatches)


# ---------------------------------------------------------------- constructed cases, one per official rule

SHAPE = (24, 22, 20)


def _blank() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint8)


def _box(array: np.ndarray, label: int, lo, hi) -> np.ndarray:
    array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return array


def test_both_empty_scores_integer_one():
    scores = flare_case_scores(_blank(), _blank(), (1.0, 1.0, 1.0))
    assert all(scores[label] == (1, 1) and isinstance(scores[label][0], int) for label in range(1, 14))


def test_false_positive_organ_scores_zero():
    pred = _box(_blank(), 3, (5, 5, 5), (10, 10, 10))
    scores = flare_case_scores(pred, _blank(), (1.0, 1.0, 1.0))
    assert scores[3] == (0, 0) and isinstance(scores[3][1], int)


def test_missed_organ_scores_zero():
    gt = _box(_blank(), 4, (5, 5, 5), (10, 10, 10))
    scores = flare_case_scores(_blank(), gt, (1.0, 1.0, 1.0))
    assert scores[4] == (0, 0)


def test_identical_organ_scores_one():
    gt = _box(_blank(), 1, (3, 4, 5), (15, 14, 12))
    scores = flare_case_scores(gt.copy(), gt, (0.8, 0.8, 2.5))
    assert scores[1] == (1.0, 1.0) and isinstance(scores[1][0], float)


def test_dsc_below_gate_sets_nsd_zero():
    gt = _box(_blank(), 1, (2, 2, 2), (12, 12, 12))  # 1000 voxels
    pred = _box(_blank(), 1, (11, 11, 11), (21, 21, 19))  # overlaps gt in one voxel
    dsc, nsd = flare_case_scores(pred, gt, (1.0, 1.0, 1.0))[1]
    assert 0 < dsc < 0.2 and nsd == 0
    # Just above the gate the surface Dice is computed (and is not 0 here).
    pred = _box(_blank(), 1, (2, 2, 2), (12, 12, 4))
    dsc, nsd = flare_case_scores(pred, gt, (1.0, 1.0, 1.0))[1]
    assert 0.2 <= dsc < 1 and nsd > 0


@pytest.mark.parametrize("label", [5, 6, 10])
def test_z_crop_ignores_last_gt_slice_and_slices_outside(label):
    gt = _box(_blank(), label, (8, 8, 4), (12, 12, 16))  # k = 4..15
    pred = gt.copy()
    pred[:, :, 15] = 0  # the top GT slice is outside the official crop
    assert flare_case_scores(pred, gt, (1.0, 1.0, 1.0))[label] == (1.0, 1.0)
    pred = gt.copy()
    pred[8:12, 8:12, 16:20] = label  # predicted slices above the GT range are ignored
    pred[8:12, 8:12, 0:4] = label  # ... and below
    assert flare_case_scores(pred, gt, (1.0, 1.0, 1.0))[label] == (1.0, 1.0)
    pred = gt.copy()
    pred[:, :, 4] = 0  # the bottom GT slice counts (5 mm slices: its loss moves the surface beyond tolerance)
    dsc, nsd = flare_case_scores(pred, gt, (1.0, 1.0, 5.0))[label]
    assert dsc == official_round(2 * 4 * 4 * 10 / (4 * 4 * 11 + 4 * 4 * 10)) and nsd < 1


def test_other_organs_are_not_z_cropped():
    gt = _box(_blank(), 1, (8, 8, 4), (12, 12, 16))
    pred = gt.copy()
    pred[:, :, 15] = 0
    assert flare_case_scores(pred, gt, (1.0, 1.0, 1.0))[1][0] < 1.0


def test_z_cropped_organ_on_one_gt_slice_gives_nan_like_official():
    gt = _box(_blank(), 5, (8, 8, 4), (12, 12, 5))
    dsc, nsd = flare_case_scores(gt.copy(), gt, (1.0, 1.0, 1.0))[5]
    assert math.isnan(dsc) and math.isnan(nsd)


def test_shift_of_exactly_tolerance_counts():
    """A right kidney (tolerance 3 mm) shifted by one 3 mm voxel still has NSD 1; by 3.01 mm it does not."""
    assert FLARE22[2].nsd_tolerance_mm == 3.0
    gt = _box(_blank(), 2, (6, 5, 4), (16, 15, 12))
    pred = _box(_blank(), 2, (7, 5, 4), (17, 15, 12))  # shift along array axis 0
    assert flare_case_scores(pred, gt, (3.0, 1.0, 1.0))[2][1] == 1.0
    assert flare_case_scores(pred, gt, (3.01, 1.0, 1.0))[2][1] < 1.0
    # The spacing is per axis: the same shift is tiny along an axis of 1 mm voxels.
    assert flare_case_scores(pred, gt, (1.0, 3.01, 3.01))[2][1] == 1.0


def test_labels_cast_to_uint8_like_official():
    gt = _box(np.zeros(SHAPE, dtype=np.int32), 3, (5, 5, 5), (10, 10, 10))
    pred = _box(np.zeros(SHAPE, dtype=np.int32), 256 + 3, (5, 5, 5), (10, 10, 10))  # wraps to 3
    assert flare_case_scores(pred, gt, (1.0, 1.0, 1.0))[3] == (1.0, 1.0)
    assert to_label_uint8(np.array([3.7, 259.0])).tolist() == [3, 3]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        flare_case_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1))


# ---------------------------------------------------------------- the derived surfel table


def test_surfel_table_basic_areas():
    unit = surfel_area_table((1.0, 1.0, 1.0))
    assert unit[0] == 0 and unit[255] == 0
    assert unit[1] == pytest.approx(math.sqrt(3) / 8)  # one corner: triangle through 3 edge midpoints
    # Four corners on one face: a flat square of the face's size, scaled by the two in-face spacings.
    spacing = (0.7, 1.3, 2.9)
    table = surfel_area_table(spacing)
    face_k0 = 128 + 32 + 8 + 2  # corners with c = 0
    assert table[face_k0] == pytest.approx(0.7 * 1.3)
    face_i0 = 128 + 64 + 32 + 16  # corners with a = 0
    assert table[face_i0] == pytest.approx(1.3 * 2.9)


def test_surfel_table_complement_symmetric_and_tie_free():
    spacing = (0.77, 1.9, 3.1)
    table = surfel_area_table(spacing)
    np.testing.assert_allclose(table, table[::-1], rtol=0, atol=1e-12)  # code c and 255 - c
    # Every maximal-area triangulation of every loop gives the same scaled area: the table is unique.
    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    for code in (7, 11, 23, 27, 30, 39, 60, 77, 105, 113, 150, 232):
        corners = frozenset(
            c for c in itertools.product((0, 1), repeat=3) if code >> (7 - (4 * c[0] + 2 * c[1] + c[2])) & 1
        )
        for loop in _contour_loops(corners):
            unit_areas, scaled_areas = [], []
            for tris in _polygon_triangulations(len(loop)):
                normals = np.array([0.5 * np.cross(loop[b] - loop[a], loop[c] - loop[a]) for a, b, c in tris])
                assert len(tris) == len(loop) - 2
                unit_areas.append(np.linalg.norm(normals, axis=1).sum())
                scaled_areas.append(np.linalg.norm(normals * scale, axis=1).sum())
            best = max(unit_areas)
            tied = [s for u, s in zip(unit_areas, scaled_areas) if u > best - 1e-9]
            assert max(tied) - min(tied) < 1e-12
    assert len(neighbour_code_normals()) == 256


def test_neighbour_codes_single_voxel():
    codes = neighbour_codes(np.ones((1, 1, 1), dtype=bool))
    assert codes.shape == (2, 2, 2)
    # The corner at (0,0,0) sees the voxel at its high offset (1,1,1) -> bit 0; the corner at (1,1,1) -> bit 7.
    assert codes[0, 0, 0] == 1 and codes[1, 1, 1] == 128
    assert surface_distances(np.ones((1, 1, 1)), np.ones((1, 1, 1)), (1, 1, 1))["surfel_areas_gt"].sum() == \
        pytest.approx(math.sqrt(3))


def test_surface_dice_empty_and_partial():
    empty = np.zeros((5, 5, 5), dtype=bool)
    assert math.isnan(surface_dice(empty, empty, (1, 1, 1), 1.0))
    a = empty.copy()
    a[1:4, 1:4, 1:4] = True
    assert surface_dice(a, a, (1, 1, 1), 0.0) == 1.0
    assert surface_dice(a, empty, (1, 1, 1), 5.0) == 0.0


# ---------------------------------------------------------------- hard Dice for training validation


def test_hard_dice_per_organ_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 13, 5, 6, 7, generator=gen)
    target = (torch.rand(2, 13, 5, 6, 7, generator=gen) > 0.6).float()
    target[:, 4] = 0
    logits[:, 4] = -5.0  # organ 5 empty in both -> 1
    logits[:, 7] = -5.0  # organ 8 missed -> 0
    dice = hard_dice_per_organ(logits, target)
    assert dice.shape == (13,)
    # the prediction's rule: the highest sigmoid wins where it is >= 0.5 (disjoint organ masks)
    probs_np = torch.sigmoid(logits).numpy()
    best = probs_np.argmax(axis=1)
    pred = (best[:, None] == np.arange(13)[None, :, None, None, None]) & (probs_np.max(axis=1) >= 0.5)[:, None]
    tgt = target.numpy() > 0.5
    for c in range(13):
        inter = (pred[:, c] & tgt[:, c]).sum()
        total = pred[:, c].sum() + tgt[:, c].sum()
        expected = 1.0 if total == 0 else 2 * inter / total
        assert dice[c].item() == pytest.approx(expected, abs=1e-6)
    assert dice[4] == 1.0 and dice[7] == 0.0
    probs = torch.sigmoid(logits)
    torch.testing.assert_close(hard_dice_per_organ(probs, target, from_logits=False), dice)
    # Other thresholds: compare with the probability path.
    torch.testing.assert_close(hard_dice_per_organ(logits, target, threshold=0.8),
                               hard_dice_per_organ(probs, target, threshold=0.8, from_logits=False))


def test_validation_dice_uses_the_prediction_label_rule():
    """Two channels above 0.5 on one voxel: only the higher one predicts it (as in a predicted mask), so the
    lower organ's Dice is not inflated by voxels prediction gives to its neighbour."""
    logits = torch.full((1, 13, 1, 1, 2), -5.0)
    logits[0, 0, 0, 0, :] = torch.tensor([3.0, 1.0])  # liver above 0.5 on both voxels
    logits[0, 1, 0, 0, 1] = 2.0                         # right kidney higher on voxel 1
    target = torch.zeros(1, 13, 1, 1, 2)
    target[0, 0, 0, 0, 0] = 1.0
    target[0, 1, 0, 0, 1] = 1.0
    dice = hard_dice_per_organ(logits, target)
    assert dice[0].item() == pytest.approx(1.0) and dice[1].item() == pytest.approx(1.0)
    labels = probs_to_labels(logits[0].sigmoid())
    assert labels.flatten().tolist() == [1, 2]


def test_distances_match_scipy_edt_bit_for_bit():
    from scipy import ndimage

    from common.evaluation.surface_distance import _distances_at

    rng = np.random.default_rng(0)
    border = rng.random((17, 13, 11)) > 0.97
    queries = rng.random(border.shape) > 0.5
    spacing = (0.7, 1.3, 2.9)
    expected = ndimage.distance_transform_edt(~border, sampling=spacing)[queries]
    np.testing.assert_array_equal(_distances_at(border, np.nonzero(queries), spacing), expected)
