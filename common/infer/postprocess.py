"""Post-processing of network outputs: largest component per organ, and the organ box of a coarse prediction.

Arrays are (z, y, x); spacings in mm in the same order. The label rule itself is `common.core.labelmaps`.
"""

from __future__ import annotations

from typing import Collection, Sequence

import numpy as np
from scipy import ndimage

from common.core.defaults import COARSE_MIN_VOLUME_MM3, Z_WINDOW_MM
from common.core.logger import get_logger
from common.storage.model_folder import PreprocessSpec
from common.volume.boxes import Box, grid_box_to_raw

logger = get_logger(__name__)

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def keep_largest_component(
    labels: np.ndarray, spacing_zyx: Sequence[float], min_volume_mm3: float = 0.0,
    all_components: Collection[int] = (),
) -> np.ndarray:
    """Keep, per organ, only its largest 26-connected component, and only if that is >= min_volume_mm3; the labels
    in `all_components` (a label set's labels whose `keep_largest` is off) keep every component of that size.

    labels: uint8 (D, H, W) label map; the volume threshold is in mm^3 of this grid (voxel volume =
    product of spacing_zyx). Components are labelled inside each organ's bounding box only.
    Returns a new uint8 array; removed voxels become 0.
    """
    labels = np.asarray(labels)
    out = labels.astype(np.uint8, copy=True)
    voxel_mm3 = float(np.prod([float(s) for s in spacing_zyx]))
    boxes = ndimage.find_objects(out)
    for index, box in enumerate(boxes):
        if box is None:
            continue
        label = index + 1
        view = out[box]
        organ = view == label
        components, count = ndimage.label(organ, structure=_STRUCTURE_26)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] = 0
        largest = int(np.argmax(sizes))
        if label in all_components:
            small = np.flatnonzero(sizes * voxel_mm3 < min_volume_mm3)
            view[organ & np.isin(components, small)] = 0
            continue
        if sizes[largest] * voxel_mm3 < min_volume_mm3:
            view[organ] = 0
            logger.debug("label %d dropped: largest component %.0f mm^3 < %.0f mm^3",
                         label, sizes[largest] * voxel_mm3, min_volume_mm3)
        elif count > 1:
            view[organ & (components != largest)] = 0
    return out


def coarse_box(
    labels_coarse: np.ndarray, spacing_coarse_zyx: Sequence[float], z_window_mm: float = Z_WINDOW_MM
) -> Box | None:
    """Organ box from the coarse label map (reference 6.2 step 4), inclusive indices on the coarse grid.

    The largest connected region of equal labels (26-connectivity; normally the liver) gives the centre
    slice c = round(centroid z); the z-window [c - d, c + d] with d = round(z_window_mm / z spacing) is
    intersected with the bounding box of all labelled voxels. None if nothing is labelled.
    """
    labels_coarse = np.asarray(labels_coarse)
    boxes = ndimage.find_objects(labels_coarse)
    present = [(i + 1, box) for i, box in enumerate(boxes) if box is not None]
    if not present:
        return None
    # Best region: most voxels; ties go to the region met first in raster order (as skimage's label order).
    best: tuple[int, int, float] | None = None  # (size, -first flat index, centroid z)
    shape = labels_coarse.shape
    for label, box in present:
        components, count = ndimage.label(labels_coarse[box] == label, structure=_STRUCTURE_26)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] = 0
        top = int(sizes.max())
        if best is not None and top < best[0]:
            continue
        for component in np.flatnonzero(sizes == top):
            coords = np.nonzero(components == component)
            first = tuple(int(c[0]) + b.start for c, b in zip(coords, box))
            key = (top, -int(np.ravel_multi_index(first, shape)))
            if best is None or key > best[:2]:
                best = (key[0], key[1], float(coords[0].mean()) + box[0].start)
    assert best is not None
    centre_z = int(round(best[2]))
    half_window = int(round(z_window_mm / float(spacing_coarse_zyx[0])))
    z_lo = max(centre_z - half_window, 0)
    z_hi = min(centre_z + half_window, shape[0] - 1)
    all_box = ndimage.find_objects((labels_coarse > 0).astype(np.uint8))[0]
    z0, z1 = max(z_lo, all_box[0].start), min(z_hi, all_box[0].stop - 1)
    if z0 > z1:  # cannot happen for a centroid inside the labelled box; keep the labelled z-range then
        z0, z1 = all_box[0].start, all_box[0].stop - 1
    return ((z0, z1), (all_box[1].start, all_box[1].stop - 1), (all_box[2].start, all_box[2].stop - 1))


def organ_box(
    labels_coarse: np.ndarray,
    raw_shape_zyx: Sequence[int],
    raw_spacing_zyx: Sequence[float],
    min_volume_mm3: float = COARSE_MIN_VOLUME_MM3,
    z_window_mm: float = Z_WINDOW_MM,
) -> Box | None:
    """The organ box of a coarse prediction in raw voxels (reference 6.2 steps 3-5): the one rule the predictor
    and the fine stage's boxes step both use.

    labels_coarse: uint8 (d, h, w) label map on the coarse grid of a raw volume of `raw_shape_zyx` voxels of
    `raw_spacing_zyx` mm; coarse spacing = raw spacing * raw shape / coarse shape. Largest component per organ
    >= `min_volume_mm3` (mm^3 of the coarse grid), then `coarse_box` with `z_window_mm`, then `grid_box_to_raw`.
    Returns the inclusive raw box, or None when no organ survives. The crop around it is
    `common.volume.boxes.crop_box_with_margin` (the training crop rule).
    """
    grid_shape = tuple(int(n) for n in labels_coarse.shape)
    spacing = tuple(float(s) * float(n) / float(m) for s, n, m in zip(raw_spacing_zyx, raw_shape_zyx, grid_shape))
    labels = keep_largest_component(labels_coarse, spacing, min_volume_mm3)
    box = coarse_box(labels, spacing, z_window_mm)
    return None if box is None else grid_box_to_raw(box, grid_shape, raw_shape_zyx)


def coarse_organ_box(labels_coarse: np.ndarray, raw_shape_zyx: Sequence[int], raw_spacing_zyx: Sequence[float],
                     coarse: PreprocessSpec) -> tuple[Box, bool]:
    """The box the fine network crops around, and whether it is the fallback: the one rule of the predictor and the
    fine stage's boxes step.

    `organ_box` with the coarse model's post-processing settings (`coarse.min_volume_mm3`, `coarse.z_window_mm`);
    when no organ survives, the whole volume (DESIGN 5.9), with fallback True. Inclusive raw (canonical) voxels.
    """
    box = organ_box(labels_coarse, raw_shape_zyx, raw_spacing_zyx, coarse.min_volume_mm3, coarse.z_window_mm)
    if box is None:
        return tuple((0, int(n) - 1) for n in raw_shape_zyx), True  # type: ignore[return-value]
    return box, False
