"""Reading and writing CT volumes and label masks, with the checks that give one clear message per bad file.

Arrays are (z, y, x) as SimpleITK returns them. Geometry travels in an `ImageMeta` (SimpleITK order: x, y, z).
Supported inputs: `.nii.gz`, `.nii`, `.mha`, `.mhd`, `.nrrd` files and DICOM series folders.

Canonical orientation (reference 1.2) is axis flips only, chosen from the signs of the direction matrix
diagonal: flip z if D_zz < 0, y if D_yy > 0, x if D_xx > 0. A flip is its own inverse.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from common.core.errors import InputError
from common.core.files import atomic_path, require_folder, write_failure
from common.core.labels import FLARE22
from common.core.logger import get_logger
from common.volume.intensity import AIR_HU, to_int16_hu

logger = get_logger(__name__)

# File name endings read as images (checked in this order: ".nii.gz" before ".nii" / ".gz").
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
# Image grids of image and mask must agree within these tolerances (spacing/origin relative+absolute, mm).
GRID_ATOL = 1e-4
GRID_RTOL = 1e-4
# Off-diagonal direction entries above this make a direction "oblique" (warned about).
OBLIQUE_TOL = 1e-3
CASE_SUFFIX = "_0000"  # nnU-Net style channel suffix of image files: <id>_0000.nii.gz
# Plausible voxel spacing of a CT (mm, every axis): the one rule of data_prepare and predict.
SPACING_RANGE_MM = (0.05, 50.0)


@dataclass(frozen=True)
class ImageMeta:
    """Geometry of a 3D image in SimpleITK order.

    size_xyz: voxels per axis (x, y, z); spacing_xyz: mm; origin_xyz: mm (LPS);
    direction: 9 floats, row-major 3x3 as `SimpleITK.Image.GetDirection()` (column j = index axis j).
    """

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return (self.size_xyz[2], self.size_xyz[1], self.size_xyz[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing in mm, (z, y, x)."""
        return (self.spacing_xyz[2], self.spacing_xyz[1], self.spacing_xyz[0])

    def to_dict(self) -> dict[str, list]:
        """JSON-safe dict (lists of plain ints/floats)."""
        return {
            "size_xyz": [int(v) for v in self.size_xyz],
            "spacing_xyz": [float(v) for v in self.spacing_xyz],
            "origin_xyz": [float(v) for v in self.origin_xyz],
            "direction": [float(v) for v in self.direction],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageMeta":
        """Inverse of `to_dict`."""
        return cls(
            size_xyz=tuple(int(v) for v in d["size_xyz"]),  # type: ignore[arg-type]
            spacing_xyz=tuple(float(v) for v in d["spacing_xyz"]),  # type: ignore[arg-type]
            origin_xyz=tuple(float(v) for v in d["origin_xyz"]),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in d["direction"]),
        )

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "ImageMeta":
        """Geometry of a 3D SimpleITK image."""
        return cls(
            size_xyz=tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
            spacing_xyz=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
            origin_xyz=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        """Copy spacing, origin and direction onto a SimpleITK image of the same size."""
        image.SetSpacing(self.spacing_xyz)
        image.SetOrigin(self.origin_xyz)
        image.SetDirection(self.direction)


# --------------------------------------------------------------------------------------------------------------
# file type helpers


def image_suffix(path: str | os.PathLike) -> str | None:
    """The supported image suffix that `path`'s name ends with (lower case match), or None."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _looks_like_dicom(path: Path) -> bool:
    """True if the file starts with the DICOM preamble + 'DICM' magic, or is named *.dcm."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_folder(folder: Path) -> bool:
    """True if some of the first files in `folder` are DICOM files."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return False
    return any(_looks_like_dicom(p) for p in files[:8])


# --------------------------------------------------------------------------------------------------------------
# NIfTI checks (SimpleITK reads a truncated NIfTI without any error, padding the missing voxels; it reads NaN
# voxels as 0 and a zero spacing as 1 mm)


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1/2 header the checks need."""

    endian: str              # "<" or ">"
    datatype: int            # NIfTI datatype code (16 float32, 64 float64, ...)
    bitpix: int
    dims: tuple[int, ...]    # dim[1..ndim]
    pixdim: tuple[float, ...]  # pixdim[1..ndim], mm for the spatial axes
    vox_offset: int          # byte offset of the voxel data
    expected_bytes: int      # vox_offset + voxel data, uncompressed


# NIfTI datatype code -> numpy dtype character of the floating-point types (the only ones that hold NaN/inf)
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_header(header: bytes, path: Path) -> _NiftiHeader:
    """Parse a NIfTI-1/2 header (the first 540+ uncompressed bytes)."""
    if len(header) < 348:
        raise InputError(path, "file is truncated or not a NIfTI file (header shorter than 348 bytes)")
    for endian in ("<", ">"):
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540:
            if len(header) < 540:
                raise InputError(path, "file is truncated (NIfTI-2 header shorter than 540 bytes)")
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            vox_offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        raise InputError(path, "not a valid NIfTI file (bad header size field)")
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise InputError(path, f"not a valid NIfTI file (dim[0] = {ndim})")
    voxels = math.prod(max(int(d), 1) for d in dims[1 : ndim + 1])
    offset = max(vox_offset, 352 if sizeof_hdr == 348 else 544)
    return _NiftiHeader(endian, int(datatype), int(bitpix), tuple(int(d) for d in dims[1 : ndim + 1]),
                        tuple(float(p) for p in pixdim[1 : ndim + 1]), offset,
                        offset + voxels * max(int(bitpix), 8) // 8)


def _check_nifti_spacing(header: _NiftiHeader, path: Path) -> None:
    """A zero or NaN spacing in the header: SimpleITK silently reads it as 1 mm, so refuse it here."""
    bad = [p for p in header.pixdim[:3] if not math.isfinite(p) or p == 0.0]
    if bad:
        raise InputError(path, f"voxel spacing in the NIfTI header (pixdim) is {header.pixdim[:3]} mm: zero or NaN "
                               "spacing would be read as 1 mm; fix the header (e.g. re-export the scan)")
    _check_spacing_signs(header.pixdim[:3], path, "pixdim")


def _check_spacing_signs(spacing_xyz: tuple[float, ...], path: Path, field: str) -> None:
    """A negative spacing in a header: SimpleITK flips that axis silently (NIfTI) or drops the sign (MetaImage),
    and readers disagree on it, so the file is refused naming the axis."""
    for axis, value in zip("xyz", spacing_xyz):
        if value < 0:
            raise InputError(path, f"negative voxel spacing along {axis} ({field} {value:g}) in the header: readers "
                                   "disagree on whether it flips that axis; fix the header (positive spacing, the "
                                   "orientation in the direction matrix) or re-export the scan")


_TEXT_SPACING_FIELDS = {".mha": ("ElementSpacing", "ElementSize"), ".mhd": ("ElementSpacing", "ElementSize"),
                        ".nrrd": ("spacings",)}


def _check_text_header_spacing(path: Path, suffix: str) -> None:
    """The spacing of a MetaImage or NRRD text header must not be negative (`_check_spacing_signs`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16).decode("latin-1")
    except OSError:
        return  # the reader reports it
    for line in head.splitlines():
        key, sep, value = line.replace(":", "=", 1).partition("=")
        if sep and key.strip() in _TEXT_SPACING_FIELDS[suffix]:
            try:
                spacing = tuple(float(v) for v in value.split())
            except ValueError:
                continue  # NRRD's "nan" for a non-spatial axis, or text the reader will refuse
            _check_spacing_signs(spacing, path, key.strip())
        if key.strip() in ("ElementDataFile", "") and sep or not line:
            break  # the voxel data follows


def _count_nonfinite_nifti(path: Path, header: _NiftiHeader) -> int:
    """Non-finite voxels in a floating-point NIfTI file, counted on the raw voxel data (SimpleITK's NIfTI reader
    turns NaN/inf into 0). Streams the data in chunks: one extra decompression pass, no full-volume copy."""
    dtype = np.dtype(header.endian + _NIFTI_FLOAT_TYPES[header.datatype])
    remaining = header.expected_bytes - header.vox_offset
    opener = gzip.open if _is_gzip(path) else open
    count, tail = 0, b""
    with opener(path, "rb") as f:
        f.seek(header.vox_offset)
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                break
            remaining -= len(chunk)
            data = tail + chunk
            usable = len(data) - len(data) % dtype.itemsize
            tail = data[usable:]
            values = np.frombuffer(data, dtype=dtype, count=usable // dtype.itemsize)
            count += int(values.size - np.count_nonzero(np.isfinite(values)))
    return count


def _check_nifti(path: Path) -> None:
    """Raise InputError for what SimpleITK's NIfTI reader would pass silently: a truncated file (it pads the
    missing voxels), a zero/NaN spacing (read as 1 mm), NaN/infinite voxels (read as 0)."""
    header = _check_nifti_complete(path)
    _check_nifti_spacing(header, path)
    if header.datatype in _NIFTI_FLOAT_TYPES:
        try:
            bad = _count_nonfinite_nifti(path, header)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(path, f"file is truncated or corrupt ({type(e).__name__}: {e})") from None
        if bad:
            raise InputError(path, f"{bad} voxel values are NaN or infinite (SimpleITK would read them as 0); "
                                   "fix or re-export the image")


def _is_gzip(path: Path) -> bool:
    """True when the file starts with gzip's magic bytes (an uncompressed NIfTI may be named .nii.gz: SimpleITK reads
    it, so it is checked as what it is)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_nifti_complete(path: Path) -> _NiftiHeader:
    """Raise InputError if a .nii/.nii.gz file holds fewer bytes than its header announces; returns the header.

    For .nii.gz the gzip trailer's ISIZE (uncompressed size mod 2^32) is compared with the header; only on a
    mismatch (multi-member gzip, or truncation) is the whole stream decompressed to decide.
    """
    try:
        if not _is_gzip(path):
            with open(path, "rb") as f:
                header = _nifti_header(f.read(544), path)
            expected = header.expected_bytes
            actual = path.stat().st_size
            if actual < expected:
                raise InputError(path, f"file is truncated ({actual} bytes, the header announces {expected})")
            return header
        with gzip.open(path, "rb") as f:
            header = _nifti_header(f.read(544), path)
        expected = header.expected_bytes
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize == expected % (1 << 32):
            return header
        total = 0
        decomp = zlib.decompressobj(wbits=47)  # 32 + 15: gzip/zlib auto-detect
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                while chunk:
                    total += len(decomp.decompress(chunk))
                    chunk = decomp.unused_data
                    if chunk:  # next gzip member
                        decomp = zlib.decompressobj(wbits=47)
        if not decomp.eof or total < expected:
            raise InputError(
                path, f"file is truncated (decompresses to {total} bytes, the header announces {expected})"
            )
        return header
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise InputError(path, f"file is truncated or corrupt ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------------------
# reading


def _sitk_message(e: Exception) -> str:
    """The useful last line of a SimpleITK exception text."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if "ERROR" in line or "error" in line.lower()]
    return (useful[-1] if useful else (lines[-1] if lines else type(e).__name__))[:300]


def _read_dicom_series(folder: Path) -> sitk.Image:
    """Read the DICOM series in `folder` (the one with the most files if there are several)."""
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise InputError(folder, f"cannot scan DICOM folder: {_sitk_message(e)}") from None
    if not series_ids:
        raise InputError(folder, "no DICOM series found in the folder")
    file_lists = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = max(series_ids, key=lambda sid: len(file_lists[sid]))
    if len(series_ids) > 1:
        logger.warning("%s: %d DICOM series found; reading %s (%d files)", folder, len(series_ids), series_id,
                       len(file_lists[series_id]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(file_lists[series_id])
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise InputError(folder, f"cannot read DICOM series: {_sitk_message(e)}") from None


def _read_sitk(path: Path) -> sitk.Image:
    """Read a file or DICOM folder into a SimpleITK image, mapping every failure to InputError."""
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        if not _is_dicom_folder(path):
            raise InputError(path, "folder holds no DICOM files (expected a DICOM series folder)")
        return _read_dicom_series(path)
    suffix = image_suffix(path)
    if suffix is None:
        if not _looks_like_dicom(path):
            raise InputError(path, f"not an image file (supported: {', '.join(IMAGE_SUFFIXES)}, DICOM folders)")
    elif suffix in (".nii.gz", ".nii"):
        _check_nifti(path)
    elif suffix in _TEXT_SPACING_FIELDS:
        _check_text_header_spacing(path, suffix)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(path, f"cannot read image: {_sitk_message(e)}") from None


def _check_volume(image: sitk.Image, path: Path) -> sitk.Image:
    """Reject anything but a scalar 3D volume (a 4D image with one time point is reduced to 3D)."""
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        logger.warning("%s: 4D image with a single time point, reading it as 3D", path)
        image = sitk.Extract(image, (size[0], size[1], size[2], 0), (0, 0, 0, 0))
        dim, size = 3, image.GetSize()
    if dim == 2:
        raise InputError(path, f"is a 2D image (size {size[0]}x{size[1]}); expected a 3D CT volume")
    if dim != 3:
        raise InputError(path, f"is a {dim}D image (size {'x'.join(map(str, size))}); expected a 3D volume")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            path, f"is a vector image ({components} components per voxel, {image.GetPixelIDTypeAsString()}); "
            "expected a scalar 3D volume"
        )
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(path, "has complex voxel values; expected a real-valued volume")
    if min(size) < 2:
        raise InputError(path, f"has a single slice along an axis (size x,y,z = {size}); expected a 3D volume")
    return image


def check_spacing(spacing_zyx: tuple[float, ...], path: str | os.PathLike) -> None:
    """Raise InputError naming `path` unless every spacing lies in SPACING_RANGE_MM (the project's one rule)."""
    lo, hi = SPACING_RANGE_MM
    if not all(math.isfinite(s) and lo <= s <= hi for s in spacing_zyx):
        raise InputError(path, f"implausible voxel spacing (z, y, x) = {tuple(float(f'{s:.6g}') for s in spacing_zyx)} "
                               f"mm; expected {lo:g} to {hi:g} mm per axis (check the header's units)")


def check_direction(direction: tuple[float, ...], path: str | os.PathLike) -> None:
    """Raise InputError naming `path` unless the direction matrix is orthogonal (rotations and flips; a sheared grid
    has no orthogonal axes to flip into the canonical orientation, and nothing here resamples it)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=OBLIQUE_TOL):
        raise InputError(path, f"the direction matrix {_fmt(tuple(direction))} is not orthogonal (a sheared grid); "
                               "resample the image to an orthogonal grid first")


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Read a 3D scalar image: array (z, y, x) in the file's voxel type, and its geometry.

    `path` is a `.nii.gz`/`.nii`/`.mha`/`.mhd`/`.nrrd` file or a DICOM series folder.
    Raises InputError for missing, unreadable or truncated files, 2D, 4D and vector images, an implausible or negative
    spacing (`check_spacing`), a sheared grid (`check_direction`) and NaN/infinite voxels (in NIfTI found in the raw
    data: SimpleITK reads them as 0).
    """
    path = Path(path)
    image = _check_volume(_read_sitk(path), path)
    array = np.array(sitk.GetArrayViewFromImage(image), copy=True)
    meta = ImageMeta.from_sitk(image)
    check_spacing(meta.spacing_zyx, path)
    check_direction(meta.direction, path)
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(path, f"{bad} voxel values are NaN or infinite; fix or re-export the image")
    return array, meta


def read_meta(path: str | os.PathLike) -> ImageMeta:
    """The geometry of an image file from its header alone (no voxels read); InputError naming the file when it
    cannot be read or is not 3-D. (`read_image` reads and checks the voxels too.)"""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"cannot read image header: {_sitk_message(e)}") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise InputError(path, f"is a {len(size)}D image; expected a 3D volume")
    return ImageMeta(tuple(int(v) for v in size), tuple(float(v) for v in reader.GetSpacing()),  # type: ignore
                     tuple(float(v) for v in reader.GetOrigin()), tuple(float(v) for v in reader.GetDirection()))


def same_grid(a: ImageMeta, b: ImageMeta) -> str | None:
    """None if both grids agree (size exactly; spacing, origin, direction within tolerance), else what differs."""
    if tuple(a.size_xyz) != tuple(b.size_xyz):
        return f"size (x,y,z) {tuple(a.size_xyz)} vs {tuple(b.size_xyz)}"
    if not np.allclose(a.spacing_xyz, b.spacing_xyz, rtol=GRID_RTOL, atol=GRID_ATOL):
        return f"spacing (x,y,z) {_fmt(a.spacing_xyz)} vs {_fmt(b.spacing_xyz)}"
    if not np.allclose(a.origin_xyz, b.origin_xyz, rtol=GRID_RTOL, atol=GRID_ATOL):
        return f"origin (x,y,z) {_fmt(a.origin_xyz)} vs {_fmt(b.origin_xyz)}"
    if not np.allclose(a.direction, b.direction, rtol=0.0, atol=GRID_ATOL):
        return f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}"
    return None


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def read_mask(path: str | os.PathLike, image_meta: ImageMeta | None = None,
              num_labels: int = FLARE22.num_organs) -> tuple[np.ndarray, ImageMeta]:
    """Read a label mask as uint8 (z, y, x), checking labels (integers in 0..num_labels: the label set's) and, if
    given, the image's grid.

    Raises InputError naming the offending labels, non-integer values or the grid difference.
    """
    path = Path(path)
    array, meta = read_image(path)
    if image_meta is not None:
        diff = same_grid(meta, image_meta)
        if diff is not None:
            raise InputError(path, f"mask is not on the image's grid: {diff} (mask vs image)")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError(path, "mask holds NaN or infinite values")
        rounded = np.rint(array)
        bad = array != rounded
        if bad.any():
            examples = np.unique(array[bad])[:5]
            raise InputError(path, f"mask holds non-integer values (e.g. {', '.join(f'{v:g}' for v in examples)}); "
                                   f"expected integer labels 0..{num_labels}")
        array = rounded
    elif array.dtype.kind not in "iub":
        raise InputError(path, f"mask has voxel type {array.dtype}; expected integer labels 0..{num_labels}")
    if array.size and (array.min() < 0 or array.max() > num_labels):
        outside = np.unique(array[(array < 0) | (array > num_labels)])
        shown = ", ".join(str(int(v)) for v in outside[:10]) + (" ..." if outside.size > 10 else "")
        raise InputError(path, f"mask holds labels outside 0..{num_labels}: {shown}")
    return array.astype(np.uint8, copy=False), meta


# --------------------------------------------------------------------------------------------------------------
# orientation


def canonical_flips(meta: ImageMeta) -> tuple[bool, bool, bool]:
    """Flips for axes (z, y, x) that bring the array to the canonical orientation (reference 1.2).

    Flip z if D_zz < 0, y if D_yy > 0, x if D_xx > 0, where D_jj is the diagonal of the direction matrix.
    For an oblique or permuted direction each index axis uses the sign of its dominant physical component,
    with a warning.
    """
    d = np.asarray(meta.direction, dtype=np.float64).reshape(3, 3)
    signs = []
    oblique = False
    for axis in range(3):  # index axes x, y, z = columns 0, 1, 2
        column = d[:, axis]
        dominant = int(np.argmax(np.abs(column)))
        if dominant != axis or np.any(np.abs(np.delete(column, axis)) > OBLIQUE_TOL):
            oblique = True
        signs.append(float(np.sign(column[dominant])))
    if oblique:
        logger.warning("oblique or permuted direction %s: flipping by the dominant axis signs",
                       _fmt(tuple(meta.direction)))
    sign_x, sign_y, sign_z = signs
    return (sign_z < 0, sign_y > 0, sign_x > 0)


def to_canonical(array_zyx: np.ndarray, flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Apply axis flips (z, y, x) to the last three axes; returns a view (negative strides, not contiguous)."""
    index = [slice(None)] * (array_zyx.ndim - 3)
    index += [slice(None, None, -1) if f else slice(None) for f in flips]
    return array_zyx[tuple(index)]


def from_canonical(array_zyx: np.ndarray, flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Undo `to_canonical` (a flip is its own inverse); returns a view."""
    return to_canonical(array_zyx, flips)


# --------------------------------------------------------------------------------------------------------------
# writing


def write_image(array_zyx: np.ndarray, meta: ImageMeta, path: str | os.PathLike) -> None:
    """Write a 3D array atomically with exactly `meta`'s spacing, origin and direction (compressed)."""
    path = Path(path)
    if tuple(array_zyx.shape) != tuple(meta.shape_zyx):
        raise ValueError(f"{path}: array shape {array_zyx.shape} does not match the geometry {meta.shape_zyx}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    meta.apply_to(image)
    suffix = image_suffix(path) or "".join(path.suffixes)
    with atomic_path(path, suffix=suffix, verify=lambda tmp: _written_image_problem(tmp, meta)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as e:
            raise write_failure(path, _sitk_message(e)) from None


def _written_image_problem(path: Path, meta: ImageMeta) -> str | None:
    """What is wrong with an image file just written (None: complete): SimpleITK returns without an error from a
    write that a full disk or a file-size limit cut short, so the file is checked before it is renamed into place.
    NIfTI: the header and the gzip trailer against the data (cheap); other formats: read back."""
    try:
        if image_suffix(path) in (".nii.gz", ".nii"):
            _check_nifti_complete(path)
            return None
        size = tuple(int(v) for v in sitk.ReadImage(str(path)).GetSize())
    except InputError as e:
        return e.problem
    except RuntimeError as e:
        return f"cannot read it back: {_sitk_message(e)}"
    return None if size == tuple(meta.size_xyz) else f"reads back with size {size}, expected {meta.size_xyz}"


def write_mask(array_zyx: np.ndarray, meta: ImageMeta, path: str | os.PathLike) -> None:
    """Write a label mask (z, y, x) as uint8, atomically, on exactly `meta`'s grid."""
    write_image(np.asarray(array_zyx).astype(np.uint8, copy=False), meta, path)


# --------------------------------------------------------------------------------------------------------------
# folders


def case_id_from_name(path: str | os.PathLike, channel_suffix: bool = True) -> str | None:
    """Case id of an image file name: `<id>_0000.nii.gz` -> id, other images -> name without extension. A label
    map's name carries no channel suffix (`channel_suffix=False`): `case_0000.nii.gz` is case `case_0000`."""
    name = Path(path).name
    suffix = image_suffix(name)
    if suffix is None:
        return None
    stem = name[: -len(suffix)]
    if channel_suffix and stem.endswith(CASE_SUFFIX) and len(stem) > len(CASE_SUFFIX):
        stem = stem[: -len(CASE_SUFFIX)]
    return stem


def list_images(folder: str | os.PathLike,
                masks: bool = False) -> tuple[dict[str, Path], list[tuple[Path, str]], dict[str, str]]:
    """Images in `folder`: ({case id: path} sorted by id, [(skipped entry, reason)], {case id: problem}).
    `masks`: a folder of label maps, named `<id>.nii.gz` without a channel suffix.

    Image files give `<id>_0000.nii.gz` -> id, other names -> the name without extension; DICOM series
    sub-folders give the folder name. An id given by two entries (`a.nii` and `a.nii.gz`, `a.nii.gz` and
    `a_0000.nii.gz`) is refused: it is in neither the images nor the skipped entries but in the third dict,
    with a message naming both files. Raises InputError if `folder` is not a folder.
    """
    folder = Path(folder)
    require_folder(folder, "image folder")
    found: dict[str, Path] = {}
    skipped: list[tuple[Path, str]] = []
    duplicates: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            skipped.append((entry, "hidden file"))
            continue
        if entry.is_dir():
            if _is_dicom_folder(entry):
                case_id = entry.name
            else:
                skipped.append((entry, "folder without DICOM files"))
                continue
        else:
            case_id = case_id_from_name(entry, channel_suffix=not masks)
            if case_id is None:
                if entry.suffix.lower() in (".raw", ".zraw") and any(
                    (folder / (entry.stem + ext)).exists() for ext in (".mhd", ".MHD")
                ):
                    continue  # voxel data of a .mhd header listed on its own
                if _looks_like_dicom(entry):
                    reason = "single DICOM file (put each DICOM series in its own sub-folder)"
                else:
                    reason = f"not an image file (supported: {', '.join(IMAGE_SUFFIXES)}, DICOM series folders)"
                skipped.append((entry, reason))
                continue
        if case_id in found or case_id in duplicates:
            duplicates.setdefault(case_id, [found.pop(case_id)] if case_id in found else []).append(entry)
            continue
        found[case_id] = entry
    conflicts = {case_id: (f"duplicate case id '{case_id}': given by " + " and ".join(str(p) for p in paths)
                           + "; remove or rename all but one") for case_id, paths in sorted(duplicates.items())}
    return dict(sorted(found.items())), skipped, conflicts


# ------------------------------------------------------------------------------------------------ CT checks


def check_ct(array_zyx: np.ndarray, meta: ImageMeta, path: str | os.PathLike) -> tuple[float, float]:
    """Raise InputError naming `path` if the volume cannot be a CT in HU (spacing, shape, intensities); returns its
    finite (min, max)."""
    check_spacing(meta.spacing_zyx, path)
    if array_zyx.ndim != 3 or min(array_zyx.shape) < 2:
        raise InputError(path, f"array shape {array_zyx.shape} is not a 3D volume")
    if array_zyx.dtype.kind not in "iuf":
        raise InputError(path, f"voxel type {array_zyx.dtype} is not numeric")
    lo, hi = float(array_zyx.min()), float(array_zyx.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(path, "voxel values contain NaN or infinity")
    if hi <= lo:
        raise InputError(path, f"non-CT intensities: every voxel is {lo:g}")
    if lo > AIR_HU:
        raise InputError(path, f"non-CT intensities: minimum {lo:g} > {AIR_HU:g} (no air), range "
                               f"{lo:g}..{hi:g}; expected a CT in Hounsfield units (rescale slope/intercept applied)")
    return lo, hi


def read_canonical_ct(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta, tuple[bool, bool, bool]]:
    """Read a CT through the checked reader, check it (`check_ct`), store it as int16 HU (`to_int16_hu`) and flip
    it to the canonical orientation: the one way a raw image becomes the canonical int16 volume that every
    stored region (data_prepare's, the fine boxes step's) is cut from.

    Returns (image int16 (z, y, x) canonical and contiguous, the file's meta, the flips applied (z, y, x)).
    """
    image_raw, meta = read_image(path)
    value_range = check_ct(image_raw, meta, path)
    flips = canonical_flips(meta)
    image = torch.from_numpy(to_int16_hu(image_raw, path, value_range))
    flip_dims = [axis for axis, f in enumerate(flips) if f]
    # torch's flip makes a contiguous canonical copy much faster than np.ascontiguousarray of a reversed view
    return (image.flip(flip_dims) if flip_dims else image).numpy(), meta, flips
