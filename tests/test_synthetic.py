"""Tests for the synthetic phantom generator (data_prepare/synthetic.py), on tiny volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.core.labels import FLARE22
from data_prepare import synthetic
from data_prepare.synthetic import MIN_ORGAN_VOXELS, draw_plan, generate_case, is_hard, make_case, write_dataset

LABELED, UNLABELED, VAL, SEED, HARD_FRACTION = 3, 5, 2, 0, 0.4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset written through the CLI."""
    out = tmp_path_factory.mktemp("synthetic")
    rc = synthetic.main(["--out", str(out), "--labeled", str(LABELED), "--unlabeled", str(UNLABELED),
                         "--val", str(VAL), "--seed", str(SEED), "--size", "tiny",
                         "--hard-fraction", str(HARD_FRACTION)])
    assert rc == 0
    return out


def _meta(dataset: Path) -> dict:
    return json.loads((dataset / "synthetic_meta.json").read_text())


def _labeled_pairs(dataset: Path) -> list[tuple[Path, Path]]:
    pairs = [(dataset / "train_images" / f"train_{i:03d}_0000.nii.gz", dataset / "train_mask" / f"train_{i:03d}.nii.gz")
             for i in range(LABELED)]
    pairs += [(dataset / "val_images" / f"validation_{i:03d}_0000.nii.gz",
               dataset / "val_mask" / f"validation_{i:03d}.nii.gz") for i in range(VAL)]
    return pairs


def _centroid_x_lps(mask_img: sitk.Image, mask: np.ndarray, label: int) -> float:
    """Physical LPS x (mm) of a label's centroid; LPS +x is the patient's left."""
    k, j, i = np.nonzero(mask == label)
    point = mask_img.TransformContinuousIndexToPhysicalPoint((float(i.mean()), float(j.mean()), float(k.mean())))
    return point[0]


def _noise_sigma(image: np.ndarray, region: np.ndarray) -> float:
    """Robust noise estimate from neighbouring-voxel differences along x inside `region`."""
    both = region[:, :, 1:] & region[:, :, :-1]
    diff = (image[:, :, 1:].astype(np.float64) - image[:, :, :-1])[both]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def test_tree_and_file_lists(dataset: Path) -> None:
    lists = dataset / "file_list"
    assert (lists / "train_series_uids.txt").read_text().split() == [f"train_{i:03d}" for i in range(LABELED)]
    assert (lists / "trainu_series_uids.txt").read_text().split() == [f"trainu_{i:04d}" for i in range(UNLABELED)]
    assert (lists / "val_series_uids.txt").read_text().split() == [f"validation_{i:03d}" for i in range(VAL)]
    for image_path, mask_path in _labeled_pairs(dataset):
        assert image_path.is_file() and mask_path.is_file()
    for i in range(UNLABELED):
        assert (dataset / "trainu_images" / f"trainu_{i:04d}_0000.nii.gz").is_file()
    assert not (dataset / "trainu_mask").exists()
    assert not list(dataset.rglob("*.tmp*")), "temporary files left behind"
    meta = _meta(dataset)
    assert len(meta) == LABELED + UNLABELED + VAL
    for entry in meta.values():
        assert {"hard", "hard_kinds", "spacing_zyx", "lps", "split", "shape_zyx"} <= set(entry)


def test_masks_match_images(dataset: Path) -> None:
    meta = _meta(dataset)
    for image_path, mask_path in _labeled_pairs(dataset):
        image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
        assert image.GetPixelID() == sitk.sitkInt16 and mask.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == mask.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), mask.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), mask.GetDirection(), atol=1e-6)
        assert image.GetOrigin() != (0.0, 0.0, 0.0)
        labels = sitk.GetArrayViewFromImage(mask)
        present = set(np.unique(labels).tolist())
        assert present == set(range(FLARE22.num_organs + 1)), f"{mask_path.name}: labels {sorted(present)}"
        counts = np.bincount(labels.ravel(), minlength=FLARE22.num_organs + 1)
        assert counts[1:].min() >= MIN_ORGAN_VOXELS
        case_id = mask_path.name.removesuffix(".nii.gz")
        entry = meta[case_id]
        assert entry["hard"] is False
        np.testing.assert_allclose(image.GetSpacing()[::-1], entry["spacing_zyx"], rtol=1e-5)
        assert list(labels.shape) == entry["shape_zyx"]
        assert entry["organs_present"] == list(range(1, FLARE22.num_organs + 1))


def test_intensities_match_masks() -> None:
    """Organ voxels carry their organ's HU (noise averages out over the organ)."""
    image, mask, *_ = make_case(np.random.default_rng(3), "demo", hard=False)
    mean = {label: float(image[mask == label].mean()) for label in range(1, FLARE22.num_organs + 1)}
    assert 35 < mean[1] < 85  # liver
    assert 25 < mean[3] < 75  # spleen
    assert mean[5] > 120  # aorta (contrast)
    assert mean[2] > 80 and mean[13] > 80  # kidneys
    assert mean[9] < 35  # gallbladder (bile)
    assert (image[:, :, :2] < -900).mean() > 0.95  # air beside the body
    assert image.max() >= 900  # cortical bone


def test_spacing_and_shape_ranges(dataset: Path) -> None:
    for seed in range(30):
        plan = draw_plan(np.random.default_rng([seed, 1]), "full", hard=False)
        nz, ny, nx = plan.shape_zyx
        dz, dy, dx = plan.spacing_zyx
        assert (ny, nx) == (512, 512) and 80 <= nz <= 200
        assert 0.6 <= dx == dy <= 1.0 and 1.5 <= dz <= 5.0
    for entry in _meta(dataset).values():
        dz, dy, dx = entry["spacing_zyx"]
        assert entry["shape_zyx"] == [20, 40, 48]
        assert dx == dy and 0.6 <= dx * 48 / 512 <= 1.0 + 1e-6
        assert dz > 0
    demo = draw_plan(np.random.default_rng(1), "demo", hard=False)
    assert demo.shape_zyx[1:] == (96, 96) and 32 <= demo.shape_zyx[0] <= 64


def test_both_orientations_occur(dataset: Path) -> None:
    flags = {entry["lps"] for entry in _meta(dataset).values()}
    assert flags == {True, False}
    for image_path, _ in _labeled_pairs(dataset):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image_path))
        reader.ReadImageInformation()
        case_id = image_path.name.removesuffix("_0000.nii.gz")
        expected = synthetic.LPS_DIRECTION if _meta(dataset)[case_id]["lps"] else synthetic.RAS_DIRECTION
        np.testing.assert_allclose(reader.GetDirection(), expected, atol=1e-6)


def test_organs_on_the_correct_side(dataset: Path) -> None:
    """Patient right = smaller LPS x, whichever way the array is stored."""
    for _, mask_path in _labeled_pairs(dataset):
        mask_img = sitk.ReadImage(str(mask_path))
        mask = sitk.GetArrayFromImage(mask_img)
        x = {label: _centroid_x_lps(mask_img, mask, label) for label in (1, 2, 3, 5, 6, 13)}
        assert x[1] < x[3], f"{mask_path.name}: liver must be on the patient's right of the spleen"
        assert x[2] < x[13], f"{mask_path.name}: right kidney must be right of the left kidney"
        assert x[6] < x[5], f"{mask_path.name}: IVC must be right of the aorta"


def test_anatomy_in_array_frame() -> None:
    """Cranio-caudal and antero-posterior order in the LPS array (z up = superior, y up = posterior)."""
    case = generate_case(np.random.default_rng(11), "demo", hard=False)
    mask = case.mask if case.plan.lps else case.mask[:, ::-1, ::-1]
    centroid = {label: np.array(np.nonzero(mask == label)).mean(axis=1) for label in range(1, FLARE22.num_organs + 1)}
    assert centroid[7][0] > centroid[2][0] and centroid[8][0] > centroid[13][0]  # adrenals above kidneys
    assert centroid[10][0] > centroid[4][0]  # esophagus above the pancreas
    assert centroid[5][1] < centroid[2][1]  # aorta anterior to the kidneys (smaller y)


def test_min_voxels_in_tiny_cases() -> None:
    for seed in range(12):
        _, mask, *_ = make_case(np.random.default_rng([seed, 7]), "tiny", hard=False)
        counts = np.bincount(mask.ravel(), minlength=FLARE22.num_organs + 1)
        assert counts.max() < mask.size and counts[1:].min() >= MIN_ORGAN_VOXELS, counts.tolist()


def test_determinism(dataset: Path, tmp_path: Path) -> None:
    a = make_case(np.random.default_rng([4, 1, 2]), "tiny", hard=True)
    b = make_case(np.random.default_rng([4, 1, 2]), "tiny", hard=True)
    c = make_case(np.random.default_rng([5, 1, 2]), "tiny", hard=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]
    assert not np.array_equal(a[0], c[0])
    # A second run with the same seed (two workers this time) writes identical data; another seed differs.
    write_dataset(tmp_path / "same", 2, 1, 0, seed=SEED, size="tiny", hard_fraction=HARD_FRACTION, workers=2)
    write_dataset(tmp_path / "other", 1, 0, 0, seed=SEED + 1, size="tiny")
    for rel in ("train_images/train_001_0000.nii.gz", "train_mask/train_000.nii.gz",
                "trainu_images/trainu_0000_0000.nii.gz"):
        first = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / rel)))
        again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "same" / rel)))
        np.testing.assert_array_equal(first, again)
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "train_images/train_000_0000.nii.gz")))
    other = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "other/train_images/train_000_0000.nii.gz")))
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_skip_existing_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out, 1, 0, 0, seed=2, size="tiny")
    path = out / "train_images" / "train_000_0000.nii.gz"
    path.write_bytes(b"sentinel")  # a kept case is not touched
    meta = write_dataset(out, 1, 0, 0, seed=2, size="tiny")
    assert path.read_bytes() == b"sentinel"
    assert meta["train_000"]["organs_present"] == list(range(1, FLARE22.num_organs + 1))  # carried over from before
    write_dataset(out, 1, 0, 0, seed=2, size="tiny", overwrite=True)
    assert sitk.ReadImage(str(path)).GetSize() == (48, 40, 20)


def test_hard_fraction(dataset: Path) -> None:
    meta = _meta(dataset)
    hard = [case_id for case_id, entry in meta.items() if entry["hard"]]
    assert all(case_id.startswith("trainu_") for case_id in hard)
    assert len(hard) in (int(np.floor(HARD_FRACTION * UNLABELED)), int(np.ceil(HARD_FRACTION * UNLABELED)))
    for case_id in hard:
        assert meta[case_id]["hard_kinds"] and set(meta[case_id]["hard_kinds"]) <= set(synthetic.HARD_KINDS)
    for fraction in (0.0, 0.2, 0.35, 1.0):
        count = sum(is_hard(i, seed=3, hard_fraction=fraction) for i in range(100))
        assert abs(count - fraction * 100) <= 1
    with pytest.raises(ValueError):
        write_dataset(dataset / "bad", 1, 1, 0, hard_fraction=1.5)


def test_hard_cases_are_harder() -> None:
    standard_sigmas = []
    for seed in range(4):
        case = generate_case(np.random.default_rng([seed, 9]), "tiny", hard=False)
        standard_sigmas.append(_noise_sigma(case.image, case.mask == 1))
    kinds_seen: set[str] = set()
    for seed in range(16):
        case = generate_case(np.random.default_rng([seed, 9]), "tiny", hard=True)
        kinds = set(case.plan.hard_kinds)
        kinds_seen |= kinds
        image = case.image
        if "noise" in kinds:
            assert _noise_sigma(image, case.mask == 1) > 3 * max(standard_sigmas)
        if "metal" in kinds:
            assert image.max() >= 2500
        if "truncated_xy" in kinds:
            border = np.concatenate([image[:, :, 0].ravel(), image[:, :, -1].ravel(), image[:, 0, :].ravel(),
                                     image[:, -1, :].ravel()])
            assert (border > -500).mean() > 0.05, "body must be cut by the image border"
        if "truncated_z" in kinds:
            ends = np.concatenate([case.mask[0].ravel(), case.mask[-1].ravel()])
            assert np.isin(ends, (1, 2, 3, 11, 13)).any(), "an organ must be cut by the first or last slice"
    assert kinds_seen == set(synthetic.HARD_KINDS)


def test_hidden_truth_of_unlabeled_cases(dataset: Path) -> None:
    """Every unlabeled case's mask is in trainu_mask_hidden/, named in the meta, with its image's geometry."""
    meta = _meta(dataset)
    for i in range(UNLABELED):
        case = f"trainu_{i:04d}"
        assert meta[case]["hidden_mask"] == f"{synthetic.HIDDEN_MASK_DIR}/{case}.nii.gz"
        mask_img = sitk.ReadImage(str(dataset / meta[case]["hidden_mask"]))
        img = sitk.ReadImage(str(dataset / "trainu_images" / f"{case}_0000.nii.gz"))
        assert mask_img.GetSize() == img.GetSize() and mask_img.GetOrigin() == img.GetOrigin()
        mask = sitk.GetArrayFromImage(mask_img)
        assert meta[case]["organs_present"] == [int(x) for x in np.unique(mask) if x > 0]
    assert not any("hidden_mask" in meta[f"train_{i:03d}"] for i in range(LABELED))


def test_scan_profiles_shift(tmp_path: Path) -> None:
    """shift: labeled cases keep the narrow profile (and are byte-identical to the fixed look), unlabeled and
    validation cases draw profiles; the profile changes intensities but not the anatomy."""
    fixed = write_dataset(tmp_path / "fixed", labeled=2, unlabeled=6, val=2, seed=4, size="tiny")
    shift = write_dataset(tmp_path / "shift", labeled=2, unlabeled=6, val=2, seed=4, size="tiny", profiles="shift")
    narrow = synthetic.NARROW_PROFILE.meta()
    assert all(e["profile"] == narrow for e in fixed.values())
    assert all(shift[f"train_{i:03d}"]["profile"] == narrow for i in range(2))
    drawn = [shift[c]["profile"] for c in shift if not c.startswith("train_")]
    assert any(p != narrow for p in drawn)
    assert len({p["phase"] for p in drawn}) >= 2
    for case, entry in shift.items():
        split_dir = {"train": "train_images", "trainu": "trainu_images", "val": "val_images"}[entry["split"]]
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fixed" / split_dir / f"{case}_0000.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "shift" / split_dir / f"{case}_0000.nii.gz")))
        assert entry["shape_zyx"] == fixed[case]["shape_zyx"]
        assert entry["organs_present"] == fixed[case]["organs_present"]
        assert np.array_equal(a, b) == (entry["profile"] == narrow), case
    with pytest.raises(ValueError, match="scan profiles"):
        write_dataset(tmp_path / "bad", labeled=1, unlabeled=0, val=0, profiles="wide")


def test_fold1_val_list(tmp_path: Path) -> None:
    """--fold1-val N lists the last N labeled cases for data_prepare's fold-1 validation; 0 writes no list."""
    from data_prepare import FOLD1_VAL_LIST

    write_dataset(tmp_path / "pinned", labeled=4, unlabeled=0, val=0, seed=1, size="tiny", fold1_val=2)
    assert (tmp_path / "pinned" / "file_list" / FOLD1_VAL_LIST).read_text().split() == ["train_002", "train_003"]
    write_dataset(tmp_path / "plain", labeled=2, unlabeled=0, val=0, seed=1, size="tiny")
    assert not (tmp_path / "plain" / "file_list" / FOLD1_VAL_LIST).exists()
    with pytest.raises(ValueError, match="fold1_val"):
        write_dataset(tmp_path / "bad", labeled=1, unlabeled=0, val=0, size="tiny", fold1_val=2)


def test_varied_anatomy() -> None:
    """--anatomy varied: same geometry draws, every organ still there, and organ sizes and places spread more than
    with the standard anatomy (whose output the option leaves unchanged)."""
    def organ_stats(anatomy: str) -> tuple[np.ndarray, np.ndarray]:
        volumes, centres = [], []
        for seed in range(8):
            case = generate_case(np.random.default_rng([seed, 21]), "demo", hard=False, anatomy=anatomy)
            mask = case.mask if case.plan.lps else case.mask[:, ::-1, ::-1]
            counts = np.bincount(mask.ravel(), minlength=FLARE22.num_organs + 1)
            assert counts[1:].min() >= MIN_ORGAN_VOXELS, counts.tolist()
            volumes.append(counts[1:] * np.prod(case.plan.spacing_zyx))
            origin = np.array([case.plan.center_z_mm, case.plan.center_y_mm, case.plan.center_x_mm])
            centres.append([np.array(np.nonzero(mask == k)).mean(axis=1) * case.plan.spacing_zyx - origin
                            for k in range(1, FLARE22.num_organs + 1)])
        return np.array(volumes), np.array(centres)

    std_vol, std_centre = organ_stats("standard")
    var_vol, var_centre = organ_stats("varied")
    cv = lambda v: v.std(axis=0) / v.mean(axis=0)  # noqa: E731 - per-organ coefficient of variation
    assert np.median(cv(var_vol)) > 1.5 * np.median(cv(std_vol))
    assert np.median(var_centre.std(axis=0)) > 1.5 * np.median(std_centre.std(axis=0))
    plain = generate_case(np.random.default_rng([3, 21]), "demo", hard=False)
    standard = generate_case(np.random.default_rng([3, 21]), "demo", hard=False, anatomy="standard")
    np.testing.assert_array_equal(plain.image, standard.image)
    assert "anatomy" not in plain.plan.meta()
    varied = generate_case(np.random.default_rng([3, 21]), "demo", hard=False, anatomy="varied")
    assert varied.plan.meta()["anatomy"] == "varied" and varied.plan.shape_zyx == plain.plan.shape_zyx
    with pytest.raises(ValueError, match="anatomy"):
        draw_plan(np.random.default_rng(0), "demo", hard=False, anatomy="odd")


def test_scan_profiles_strong_shift(tmp_path: Path) -> None:
    """strong_shift: labeled cases as with shift (the narrow profile), the others from the stronger set."""
    shift = write_dataset(tmp_path / "shift", labeled=1, unlabeled=6, val=2, seed=4, size="tiny", profiles="shift")
    strong = write_dataset(tmp_path / "strong", labeled=1, unlabeled=6, val=2, seed=4, size="tiny",
                           profiles="strong_shift")
    assert strong["train_000"] == shift["train_000"]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "shift" / "train_images" / "train_000_0000.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "strong" / "train_images" / "train_000_0000.nii.gz")))
    np.testing.assert_array_equal(a, b)
    drawn = [strong[c]["profile"] for c in strong if not c.startswith("train_")]
    assert {p["noise_factor"] for p in drawn} <= {1.0, 3.0, 5.0} and max(p["noise_factor"] for p in drawn) > 1.0
    assert all(p["slice_blur_vox"] in (0.0, 1.2, 2.4) and abs(p["hu_offset"]) <= 100.0 for p in drawn)
    for case in strong:
        assert strong[case]["shape_zyx"] == shift[case]["shape_zyx"]
        assert strong[case]["organs_present"] == shift[case]["organs_present"]


@pytest.mark.parametrize("layout", ["original", "nnunet"])
def test_bad_options_name_the_option_and_write_nothing(tmp_path: Path, capsys, layout: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(out), "--labeled", "1", "--fold1-val", "5", "--layout", layout])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --fold1-val must be within [0, labeled=1], got 5" in err and "error: --organs" not in err
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(out), "--layout", "nnunet", "--organs", "liver,heart"])
    assert "error: --organs" in capsys.readouterr().err
    assert not out.exists()
