"""Boxes on (z, y, x) voxel grids: organ and body boxes, the crop and region rules around them (reference 1.5, 6.2).

A `Box` is inclusive (min, max) voxel indices per axis (z, y, x); crops are `slice` triples (upper end exclusive).
Records on disk store a box as [[z0, z1], [y0, y1], [x0, x1]] (`box_to_json` / `as_box`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.ndimage as ndi

from common.volume.intensity import AIR_HU

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # inclusive (min, max) per axis (z, y, x)


def label_bboxes(mask: np.ndarray, num_labels: int | None = None) -> dict[int, Box]:
    """Inclusive bounding box (z, y, x) of every label 1..num_labels (None: every label) present in `mask` (one
    pass)."""
    m = np.asarray(mask)
    if m.dtype.kind not in "iub":
        raise ValueError(f"mask must hold integers, got {m.dtype}")
    boxes: dict[int, Box] = {}
    if m.dtype == np.bool_:
        m = m.view(np.uint8)
    for index, slices in enumerate(ndi.find_objects(m, max_label=num_labels or 0)):  # 0: every label
        if slices is not None:
            boxes[index + 1] = tuple((s.start, s.stop - 1) for s in slices)  # type: ignore[assignment]
    return boxes


def organ_bbox(mask: np.ndarray) -> Box | None:
    """Inclusive (min, max) per axis (z, y, x) of all voxels with mask > 0; None if the mask is empty."""
    m = np.asarray(mask) != 0
    zy = m.any(axis=2)
    z_any = zy.any(axis=1)
    if not z_any.any():
        return None
    y_any = zy.any(axis=0)
    x_any = m.any(axis=(0, 1))
    box = []
    for profile in (z_any, y_any, x_any):
        idx = np.flatnonzero(profile)
        box.append((int(idx[0]), int(idx[-1])))
    return tuple(box)  # type: ignore[return-value]


def margin_voxels(spacing_zyx: Sequence[float], margin_mm: float) -> tuple[int, int, int]:
    """Margin per axis in voxels: int(margin_mm / spacing) (reference 1.5)."""
    return tuple(int(float(margin_mm) / float(s)) for s in spacing_zyx)  # type: ignore[return-value]


def region_slices(bbox: Box, spacing_zyx: Sequence[float], margin_mm: float,
                  shape_zyx: Sequence[int]) -> tuple[slice, slice, slice]:
    """The stored region of a case: bbox +/- M voxels inclusive per axis, M = int(margin_mm / spacing), clipped to
    the volume. With margin_mm = max_extend_size_mm it holds every crop the fine stage can draw around the box
    (random extensions e < M per face, `crop_box_with_margin` with extend_size_mm <= margin_mm), so crops read from
    the region equal crops of the whole volume. Used for the labeled regions (data_prepare) and the unlabeled ones
    (the fine stage's boxes step)."""
    slices = []
    for (lo, hi), m, n in zip(bbox, margin_voxels(spacing_zyx, margin_mm), shape_zyx):
        slices.append(slice(max(0, int(lo) - m), min(int(n), int(hi) + m + 1)))
    return tuple(slices)  # type: ignore[return-value]


def crop_box_with_margin(
    bbox: Box, spacing_zyx: Sequence[float], margin_mm: float, shape_zyx: Sequence[int]
) -> tuple[slice, slice, slice]:
    """Crop slices [max(0, min - m), min(shape, max + m)) per axis with m = int(margin_mm / spacing).

    As in the reference the upper end is exclusive (the high side gets m - 1 voxels past the box); it is
    never allowed to cut the box itself (when m = 0 the crop still ends at max + 1).
    """
    slices = []
    for (lo, hi), m, n in zip(bbox, margin_voxels(spacing_zyx, margin_mm), shape_zyx):
        start = max(0, int(lo) - m)
        stop = min(int(n), max(int(hi) + m, int(hi) + 1))
        slices.append(slice(start, stop))
    return tuple(slices)  # type: ignore[return-value]


def body_box(image_hu: np.ndarray, threshold_hu: float = AIR_HU) -> Box | None:
    """Inclusive bbox of the voxels above `threshold_hu` (the body), or None if there are none."""
    inside = np.asarray(image_hu) > threshold_hu
    if not inside.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(inside.any(axis=other))
        box.append((int(hits[0]), int(hits[-1])))
    return tuple(box)  # type: ignore[return-value]


def grid_box_to_raw(box: Sequence[Sequence[int]], grid_shape_zyx: Sequence[int], raw_shape_zyx: Sequence[int]) -> Box:
    """Map an inclusive box on a resized grid (e.g. the 160^3 coarse grid) to raw voxels (reference 6.2 step 5):
    int(index * raw/grid) for each end, clipped to the volume. Returns an inclusive raw box."""
    out = []
    for (lo, hi), n_grid, n_raw in zip(box, grid_shape_zyx, raw_shape_zyx):
        zoom = float(n_raw) / float(n_grid)
        lo_raw = min(max(int(lo * zoom), 0), int(n_raw) - 1)
        hi_raw = min(max(int(hi * zoom), lo_raw), int(n_raw) - 1)
        out.append((lo_raw, hi_raw))
    return tuple(out)  # type: ignore[return-value]


def canonical_to_file_slices(box: Sequence[slice], flips: Sequence[bool],
                             shape_zyx: Sequence[int]) -> tuple[slice, slice, slice]:
    """Map a box given in canonical (flipped) coordinates to the same voxels in the file's array order."""
    out = []
    for sl, flip, n in zip(box, flips, shape_zyx):
        start, stop = sl.start, sl.stop
        out.append(slice(n - stop, n - start) if flip else slice(start, stop))
    return tuple(out)  # type: ignore[return-value]


def format_box(box: Sequence[slice] | None) -> str:
    """"z0:z1,y0:y1,x0:x1" (upper ends exclusive) or "" for no box."""
    return "" if box is None else ",".join(f"{s.start}:{s.stop}" for s in box)


def as_box(value: Any) -> Box | None:
    """A stored box ([[z0, z1], [y0, y1], [x0, x1]], inclusive) as a `Box`, or None for None; ValueError when the
    value is not an inclusive 3-D box."""
    if value is None:
        return None
    box = tuple((int(lo), int(hi)) for lo, hi in value)
    if len(box) != 3 or any(hi < lo for lo, hi in box):
        raise ValueError(f"not an inclusive 3-D box: {value!r}")
    return box  # type: ignore[return-value]


def box_to_json(box: Box | None) -> list[list[int]] | None:
    """The stored form of a box: [[z0, z1], [y0, y1], [x0, x1]] (inclusive), or None."""
    return None if box is None else [[int(lo), int(hi)] for lo, hi in box]
