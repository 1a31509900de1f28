"""Tests of common.storage.image_io: round trips in every supported format, orientation, geometry and bad inputs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.core.errors import InputError
from common.storage.image_io import (
    ImageMeta,
    canonical_flips,
    case_id_from_name,
    from_canonical,
    list_images,
    read_image,
    read_mask,
    to_canonical,
    write_image,
    write_mask,
)

SHAPE_ZYX = (45, 47, 33)  # SimpleITK size (x, y, z) = (33, 47, 45)
SPACING_XYZ = (0.8, 0.9, 2.5)
ORIGIN_XYZ = (10.5, -20.25, 30.0)
LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def ct_array(shape=SHAPE_ZYX, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)


def write_sitk(array: np.ndarray, path: Path, spacing=SPACING_XYZ, origin=ORIGIN_XYZ, direction=LPS,
               is_vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(array: np.ndarray, folder: Path, spacing=SPACING_XYZ, origin=ORIGIN_XYZ) -> Path:
    """A minimal CT DICOM series, one file per slice, with position/orientation/spacing tags."""
    folder.mkdir(parents=True)
    volume = sitk.GetImageFromArray(array)
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    uid = "1.2.826.0.1.3680043.2.1125.7"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        s = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{k + 1}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(s)
    return folder


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("direction", [LPS, RAS], ids=["LPS", "RAS"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_round_trip_formats(tmp_path: Path, direction, suffix) -> None:
    array = ct_array()
    path = write_sitk(array, tmp_path / f"ct{suffix}", direction=direction)
    got, meta = read_image(path)
    assert got.dtype == np.int16 and got.shape == SHAPE_ZYX
    np.testing.assert_array_equal(got, array)
    assert meta.size_xyz == (33, 47, 45)
    assert meta.shape_zyx == SHAPE_ZYX
    assert meta.spacing_zyx == pytest.approx(SPACING_XYZ[::-1])
    assert meta.origin_xyz == pytest.approx(ORIGIN_XYZ)
    assert meta.direction == pytest.approx(direction)


def test_float_and_int32_images_keep_their_type(tmp_path: Path) -> None:
    for dtype in (np.float32, np.int32):
        array = ct_array().astype(dtype)
        got, _ = read_image(write_sitk(array, tmp_path / f"ct_{np.dtype(dtype).name}.nii.gz"))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, array)


def test_dicom_series_folder(tmp_path: Path) -> None:
    array = ct_array(shape=(6, 20, 17))
    folder = write_dicom_series(array, tmp_path / "images" / "patient_7")
    got, meta = read_image(folder)
    np.testing.assert_array_equal(got, array)
    assert meta.size_xyz == (17, 20, 6)
    assert meta.spacing_xyz == pytest.approx(SPACING_XYZ, abs=1e-4)
    assert meta.origin_xyz == pytest.approx(ORIGIN_XYZ, abs=1e-4)
    found, skipped, conflicts = list_images(tmp_path / "images")
    assert found == {"patient_7": folder} and skipped == [] and conflicts == {}


def test_meta_to_dict_round_trip(tmp_path: Path) -> None:
    _, meta = read_image(write_sitk(ct_array(), tmp_path / "ct.nii.gz", direction=RAS))
    again = ImageMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta


# ---------------------------------------------------------------------------------------------------- orientation


def test_canonical_flips_from_direction_signs() -> None:
    def meta(direction):
        return ImageMeta((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)

    assert canonical_flips(meta(LPS)) == (False, True, True)
    assert canonical_flips(meta(RAS)) == (False, False, False)
    assert canonical_flips(meta((1, 0, 0, 0, 1, 0, 0, 0, -1))) == (True, True, True)
    assert canonical_flips(meta((-1, 0, 0, 0, 1, 0, 0, 0, -1))) == (True, True, False)


def test_oblique_direction_uses_dominant_sign_and_warns(caplog) -> None:
    c, s = np.cos(0.2), np.sin(0.2)
    oblique = (-c, -s, 0.0, s, -c, 0.0, 0.0, 0.0, 1.0)  # RAS rotated about z
    with caplog.at_level(logging.WARNING):
        flips = canonical_flips(ImageMeta((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), oblique))
    assert flips == (False, False, False)
    assert "oblique" in caplog.text


def test_same_physical_image_in_lps_and_ras_has_one_canonical_array(tmp_path: Path) -> None:
    lps = ct_array()
    lps_path = write_sitk(lps, tmp_path / "lps.nii.gz", direction=LPS)
    lps_image = sitk.ReadImage(str(lps_path))
    # The same voxels stored the RAS way: x and y reversed, origin at the former far corner.
    far_corner = lps_image.TransformIndexToPhysicalPoint((SHAPE_ZYX[2] - 1, SHAPE_ZYX[1] - 1, 0))
    ras_path = write_sitk(np.ascontiguousarray(lps[:, ::-1, ::-1]), tmp_path / "ras.nii.gz", origin=far_corner,
                          direction=RAS)
    a, meta_a = read_image(lps_path)
    b, meta_b = read_image(ras_path)
    ca = to_canonical(a, canonical_flips(meta_a))
    cb = to_canonical(b, canonical_flips(meta_b))
    np.testing.assert_array_equal(ca, cb)


def test_from_canonical_is_exact_inverse() -> None:
    array = ct_array()
    for flips in [(False, False, False), (True, False, True), (True, True, True), (False, True, False)]:
        canonical = to_canonical(array, flips)
        np.testing.assert_array_equal(from_canonical(np.ascontiguousarray(canonical), flips), array)
    batch = np.stack([array, array + 1])
    np.testing.assert_array_equal(to_canonical(batch, (True, False, False))[1], array[::-1] + 1)


def test_write_mask_keeps_exact_geometry(tmp_path: Path) -> None:
    spacing, origin = (0.7421875, 0.7421875, 2.5), (-187.129, 172.63, -1203.4)
    _, meta = read_image(write_sitk(ct_array(), tmp_path / "ct.nii.gz", spacing, origin, RAS))
    mask = np.random.default_rng(1).integers(0, 14, size=SHAPE_ZYX).astype(np.int64)
    out = tmp_path / "out" / "case.nii.gz"
    write_mask(mask, meta, out)
    written = sitk.ReadImage(str(out))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert written.GetSize() == meta.size_xyz
    assert written.GetSpacing() == meta.spacing_xyz
    assert written.GetOrigin() == meta.origin_xyz
    assert written.GetDirection() == meta.direction
    got, _ = read_mask(out, meta)
    np.testing.assert_array_equal(got, mask)
    assert [p.name for p in out.parent.iterdir()] == ["case.nii.gz"]  # no temporary file left
    with pytest.raises(ValueError, match="does not match"):
        write_mask(mask[:-1], meta, tmp_path / "bad.nii.gz")


def test_write_image_keeps_voxel_type(tmp_path: Path) -> None:
    array = ct_array()
    _, meta = read_image(write_sitk(array, tmp_path / "ct.nii.gz"))
    write_image(array, meta, tmp_path / "copy.mha")
    got, meta2 = read_image(tmp_path / "copy.mha")
    np.testing.assert_array_equal(got, array)
    assert meta2 == meta


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.9])
def test_truncated_nifti_gz(tmp_path: Path, keep: float) -> None:
    good = write_sitk(ct_array(), tmp_path / "good.nii.gz")
    data = good.read_bytes()
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as info:
        read_image(bad)
    assert str(bad) in str(info.value) and "truncated" in str(info.value)


def test_truncated_nii_and_mha(tmp_path: Path) -> None:
    for name in ("ct.nii", "ct.mha"):
        good = write_sitk(ct_array(), tmp_path / name)
        bad = tmp_path / f"bad_{name}"
        bad.write_bytes(good.read_bytes()[:-1000])
        with pytest.raises(InputError, match="bad_ct"):
            read_image(bad)


def test_multi_member_gzip_is_not_called_truncated(tmp_path: Path) -> None:
    import gzip

    nii = write_sitk(ct_array(), tmp_path / "ct.nii")
    raw = nii.read_bytes()
    path = tmp_path / "two_members.nii.gz"
    path.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    got, _ = read_image(path)
    np.testing.assert_array_equal(got, ct_array())


def test_2d_image(tmp_path: Path) -> None:
    path = write_sitk(ct_array()[0], tmp_path / "slice_0000.nii.gz", spacing=(1.0, 1.0), origin=(0.0, 0.0),
                      direction=(1.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match="2D image"):
        read_image(path)


def test_4d_image(tmp_path: Path) -> None:
    image = sitk.JoinSeries([sitk.GetImageFromArray(ct_array()), sitk.GetImageFromArray(ct_array(seed=1))])
    path = tmp_path / "dyn_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="4D image"):
        read_image(path)


def test_4d_image_with_one_time_point_reads_as_3d(tmp_path: Path) -> None:
    image = sitk.JoinSeries([sitk.GetImageFromArray(ct_array())])
    path = tmp_path / "one_0000.mha"
    sitk.WriteImage(image, str(path))
    got, meta = read_image(path)
    np.testing.assert_array_equal(got, ct_array())
    assert meta.size_xyz == (33, 47, 45)


def test_vector_image(tmp_path: Path) -> None:
    rgb = np.zeros(SHAPE_ZYX + (3,), dtype=np.uint8)
    path = write_sitk(rgb, tmp_path / "rgb.nii.gz", is_vector=True)
    with pytest.raises(InputError, match="vector image"):
        read_image(path)


def test_missing_and_non_image_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_image(tmp_path / "nope.nii.gz")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputError, match="not an image file"):
        read_image(txt)
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("not gzip at all")
    with pytest.raises(InputError, match="fake.nii.gz"):
        read_image(fake)
    with pytest.raises(InputError, match="no DICOM"):
        read_image(tmp_path)


def _image_meta(tmp_path: Path) -> ImageMeta:
    return read_image(write_sitk(ct_array(), tmp_path / "ct.nii.gz", direction=RAS))[1]


def test_mask_on_another_grid(tmp_path: Path) -> None:
    meta = _image_meta(tmp_path)
    mask = np.zeros(SHAPE_ZYX, np.uint8)
    cases = {
        "spacing": dict(spacing=(0.8, 0.9, 3.0), direction=RAS),
        "origin": dict(origin=(10.5, -20.25, 31.0), direction=RAS),
        "direction": dict(direction=LPS),
    }
    for what, kwargs in cases.items():
        path = write_sitk(mask, tmp_path / f"mask_{what}.nii.gz", **kwargs)
        with pytest.raises(InputError, match=f"not on the image's grid: {what}") as info:
            read_mask(path, meta)
        assert str(path) in str(info.value)
    small = write_sitk(mask[:-1], tmp_path / "mask_size.nii.gz", direction=RAS)
    with pytest.raises(InputError, match="size"):
        read_mask(small, meta)
    # float32 rounding of the geometry (as NIfTI stores it) is tolerated
    tiny = write_sitk(mask, tmp_path / "mask_ok.nii.gz", origin=(10.5 + 2e-6, -20.25, 30.0), direction=RAS)
    read_mask(tiny, meta)


def test_mask_labels_outside_range(tmp_path: Path) -> None:
    mask = np.zeros(SHAPE_ZYX, np.int16)
    mask[3, 4, 5] = 20
    mask[4, 4, 5] = -1
    mask[5, 4, 5] = 2
    path = write_sitk(mask, tmp_path / "m.nii.gz")
    with pytest.raises(InputError, match=r"labels outside 0\.\.13: -1, 20"):
        read_mask(path)


def test_float_masks(tmp_path: Path) -> None:
    mask = np.zeros(SHAPE_ZYX, np.float32)
    mask[1:5, 2:6, 3:7] = 3.0
    got, _ = read_mask(write_sitk(mask, tmp_path / "ok.nii.gz"))
    assert got.dtype == np.uint8 and set(np.unique(got)) == {0, 3}
    mask[0, 0, 0] = 0.5
    with pytest.raises(InputError, match="non-integer values"):
        read_mask(write_sitk(mask, tmp_path / "bad.nii.gz"))


# ---------------------------------------------------------------------------------------------------- folders


def test_list_images_ids_and_skips(tmp_path: Path) -> None:
    folder = tmp_path / "train_images"
    folder.mkdir()
    small = ct_array(shape=(4, 5, 6))
    write_sitk(small, folder / "case_a_0000.nii.gz")
    write_sitk(small, folder / "case_b.mha")
    write_sitk(small, folder / "case_b_0000.nii.gz")  # same id as case_b.mha
    write_sitk(small, folder / "c.nrrd")
    (folder / "README.txt").write_text("stray")
    (folder / ".hidden.nii.gz").write_text("x")
    (folder / "empty_dir").mkdir()
    found, skipped, conflicts = list_images(folder)
    assert list(found) == ["c", "case_a"]  # case_b is refused: two files give it
    assert found["case_a"] == folder / "case_a_0000.nii.gz"
    reasons = {p.name: r for p, r in skipped}
    assert "not an image file" in reasons["README.txt"]
    assert "duplicate case id 'case_b'" in conflicts["case_b"]
    assert "case_b.mha" in conflicts["case_b"] and "case_b_0000.nii.gz" in conflicts["case_b"]
    assert "hidden" in reasons[".hidden.nii.gz"]
    assert "without DICOM" in reasons["empty_dir"]
    with pytest.raises(InputError, match="image folder not found"):
        list_images(tmp_path / "missing")


def test_case_id_from_name() -> None:
    assert case_id_from_name("FLARE22_Tr_0001_0000.nii.gz") == "FLARE22_Tr_0001"
    assert case_id_from_name("FLARE22_Tr_0001.nii.gz") == "FLARE22_Tr_0001"
    assert case_id_from_name("x.NII.GZ") == "x"
    assert case_id_from_name("_0000.nii.gz") == "_0000"
    assert case_id_from_name("notes.txt") is None


# ---------------------------------------------------------------------------------------------------- real CTs


def test_real_cases_read_with_masks(real_data_dir: Path) -> None:
    expected = {
        "case_0001": ((112, 101, 122), (False, False, False), 12),
        "case_0002": ((20, 512, 512), (False, True, True), 7),
        "case_0003": ((30, 101, 122), (False, False, False), 12),
    }
    for case, (shape, flips, n_organs) in expected.items():
        start = time.perf_counter()
        image, meta = read_image(real_data_dir / f"{case}.nii.gz")
        mask, mask_meta = read_mask(real_data_dir / f"{case}_mask.nii.gz", meta)
        elapsed = time.perf_counter() - start
        assert image.shape == shape == mask.shape == meta.shape_zyx
        assert image.dtype.kind == "i" and mask.dtype == np.uint8
        assert -1300 < image.min() < -900 and image.max() > 1000
        assert len(np.unique(mask)) - 1 == n_organs
        assert canonical_flips(meta) == flips
        assert mask_meta.size_xyz == meta.size_xyz
        assert elapsed < 5.0, f"{case} took {elapsed:.1f} s to read"
    _, meta = read_image(real_data_dir / "case_0002.nii.gz")
    assert meta.spacing_zyx == pytest.approx((2.0, 0.9766, 0.9766), abs=1e-4)
    # the real files live in a read-only folder: list_images works there and skips the README/licence
    found, skipped, _ = list_images(real_data_dir)
    assert "case_0001" in found and "case_0001_mask" in found
    assert any(p.name == "README.md" for p, _ in skipped)


# ---------------------------------------------------------------------------------------------------- issue 14


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii", "nan.mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path: Path, name: str, dtype) -> None:
    # SimpleITK's NIfTI reader turns NaN into 0: the raw voxel data must be checked (here a 2-slice NaN slab + inf)
    array = ct_array(shape=(6, 7, 8)).astype(dtype)
    array[2:4] = np.nan
    array[0, 0, 0] = np.inf
    path = write_sitk(array, tmp_path / name)
    with pytest.raises(InputError, match=r"113 voxel values are NaN or infinite") as info:
        read_image(path)
    assert name in str(info.value)
    finite = write_sitk(ct_array(shape=(6, 7, 8)).astype(dtype), tmp_path / f"ok_{name}")
    got, _ = read_image(finite)
    np.testing.assert_array_equal(got, ct_array(shape=(6, 7, 8)).astype(dtype))


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_zero_or_nan_spacing_in_a_nifti_header_is_refused(tmp_path: Path, bad: float) -> None:
    import struct

    path = write_sitk(ct_array(shape=(6, 7, 8)), tmp_path / "ct.nii")
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * 2, bad)  # pixdim[2] = y spacing (SimpleITK would read it as 1 mm)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="pixdim"):
        read_image(path)


@pytest.mark.parametrize("spacing", [(0.8, 0.8, 1e6), (1e-6, 0.8, 2.0), (0.8, 0.8, 75.0)])
def test_implausible_spacing_is_refused_by_the_reader(tmp_path: Path, spacing) -> None:
    for name in ("ct.mha", "ct.nii.gz"):
        path = write_sitk(ct_array(shape=(6, 7, 8)), tmp_path / name, spacing=spacing)
        with pytest.raises(InputError, match="implausible voxel spacing"):
            read_image(path)


def test_duplicate_ids_name_both_files(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.nii", "a.nii.gz", "b.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz"):
        write_sitk(ct_array(shape=(4, 5, 6)), folder / name)
    found, skipped, conflicts = list_images(folder)
    assert list(found) == ["c"] and skipped == []
    assert "a.nii and" in conflicts["a"] and "a.nii.gz" in conflicts["a"]
    assert "b.nii.gz" in conflicts["b"] and "b_0000.nii.gz" in conflicts["b"]


# ------------------------------------------------------------------------------------------------ issue 21


def test_negative_spacing_is_refused_naming_the_axis(tmp_path: Path) -> None:
    """A negative pixdim or ElementSpacing is read as a silent flip of that axis (NIfTI) or dropped (MetaImage):
    readers disagree on what it means, so the file is refused, naming the axis."""
    import struct

    array = ct_array((5, 6, 7))
    plain = write_sitk(array, tmp_path / "plain.nii")
    header = bytearray(plain.read_bytes())
    header[84:88] = struct.pack("<f", -0.9)  # pixdim[2]: y
    (tmp_path / "neg.nii").write_bytes(header)
    with pytest.raises(InputError, match=r"neg.nii: negative voxel spacing along y"):
        read_image(tmp_path / "neg.nii")
    mha = write_sitk(array, tmp_path / "plain.mha").read_bytes()
    assert mha.count(b"ElementSpacing = 0.8") == 1
    (tmp_path / "neg.mha").write_bytes(mha.replace(b"ElementSpacing = 0.8", b"ElementSpacing = -0.8"))
    with pytest.raises(InputError, match=r"neg.mha: negative voxel spacing along x"):
        read_image(tmp_path / "neg.mha")


def test_a_sheared_grid_is_called_non_orthogonal_and_refused(tmp_path: Path) -> None:
    path = write_sitk(ct_array((5, 6, 7)), tmp_path / "shear.mha", direction=(1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match=r"shear.mha: the direction matrix \(1, 0.5, .*\) is not orthogonal"):
        read_image(path)


def test_an_uncompressed_nifti_named_nii_gz_is_read(tmp_path: Path) -> None:
    array = ct_array((5, 6, 7))
    plain = write_sitk(array, tmp_path / "plain.nii")
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    got, meta = read_image(misnamed)
    np.testing.assert_array_equal(got, array)
    misnamed.write_bytes(plain.read_bytes()[:-50])  # and a cut one is still refused
    with pytest.raises(InputError, match="truncated"):
        read_image(misnamed)


def test_a_label_map_name_has_no_channel_suffix(tmp_path):
    """`case_0000.nii.gz` in a mask folder is case `case_0000` (an id may end in four digits); an image of that case
    is `case_0000_0000.nii.gz`."""
    assert case_id_from_name("trainu_0000.nii.gz", channel_suffix=False) == "trainu_0000"
    assert case_id_from_name("trainu_0000_0000.nii.gz") == "trainu_0000"
    assert case_id_from_name("trainu_0000.nii.gz") == "trainu"  # an image name: the suffix is the channel
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("trainu_0000.nii.gz", "trainu_0001.nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8)), str(masks / name))
    found, _, conflicts = list_images(masks, masks=True)
    assert sorted(found) == ["trainu_0000", "trainu_0001"] and not conflicts
