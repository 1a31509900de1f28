"""Surface Dice (normalised surface distance) as in the DeepMind surface-distance method used by FLARE22.

Surface elements ("surfels") live on the corners of the voxel grid: every corner gets the 8-bit code of
the 2x2x2 voxels around it, a code other than 0 and 255 is a surfel, and its area in mm^2 comes from a
per-code table of marching-cubes triangles scaled by the voxel spacing. Distances between the two
surfaces come from Euclidean distance transforms of the surfel maps.

The per-code triangles are derived here (no table is copied): for each of the 256 corner configurations
the marching-cubes contour runs through the midpoints of the cube edges whose two corners differ; on each
face the contour segments are fixed by the face's corners, with the ambiguous face (two diagonal corners
set) split so that the smaller of the two corner sets of the cube is kept apart (a configuration and its
complement therefore get the same surface, as in the classic marching-cubes table). The closed loops are
triangulated with the triangulation of largest total area in the unit cube (for the pentagon of three
corners on a face: the flat triangle across the three cut edges plus a planar quad); the triangulations
that tie give identical areas under any axis scaling (tested), so the table is unique.
Verified against the official FLARE22 script's output (tests/test_metrics.py).

Arrays here keep whatever axis order the caller uses; `spacing` must be in that same order.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import numpy as np
from scipy import ndimage

# Corner (a, b, c) of the 2x2x2 neighbourhood, offsets along array axes 0, 1, 2. The code of a grid corner
# sets bit 7 - (4a + 2b + c) when voxel (i-1+a, j-1+b, k-1+c) is inside, i.e. the weights
# [[[128, 64], [32, 16]], [[8, 4], [2, 1]]] correlated with the mask.
_CORNERS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((0, 1), repeat=3))


def _corner_bit(corner: tuple[int, int, int]) -> int:
    a, b, c = corner
    return 7 - (4 * a + 2 * b + c)


def _cube_faces() -> list[list[tuple[int, int, int]]]:
    """The 6 faces of the unit cube, each as its 4 corners in cyclic order."""
    faces = []
    for axis in range(3):
        u, v = (d for d in range(3) if d != axis)
        for level in (0, 1):
            cycle = []
            for p, q in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[u], corner[v] = level, p, q
                cycle.append(tuple(corner))
            faces.append(cycle)
    return faces


def _contour_loops(inside: frozenset[tuple[int, int, int]]) -> list[list[np.ndarray]]:
    """Closed marching-cubes contour loops of one cube configuration, as lists of edge-midpoint vertices."""
    # On an ambiguous face keep apart the corners of the smaller set (inside when <= 4 corners are inside).
    separate_inside = len(inside) <= 4
    segments: list[tuple[tuple, tuple]] = []
    for cycle in _cube_faces():
        is_in = [corner in inside for corner in cycle]
        edges = [tuple(sorted((cycle[i], cycle[(i + 1) % 4]))) for i in range(4)]  # edge i: corner i -> i+1
        cut = [i for i in range(4) if is_in[i] != is_in[(i + 1) % 4]]
        if len(cut) == 2:
            segments.append((edges[cut[0]], edges[cut[1]]))
        elif len(cut) == 4:
            # Ambiguous face: cut off each corner of the kept-apart set (corner i lies between edges i-1 and i).
            for i in range(4):
                if is_in[i] == separate_inside:
                    segments.append((edges[i - 1], edges[i]))
    neighbours: dict[tuple, list[tuple]] = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in neighbours:  # every cut edge has exactly two neighbours: the graph is a union of cycles
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        seen.add(start)
        while True:
            following = neighbours[current][0] if neighbours[current][0] != previous else neighbours[current][1]
            if following == start:
                break
            loop.append(following)
            seen.add(following)
            previous, current = current, following
        loops.append([np.mean(np.asarray(edge, dtype=np.float64), axis=0) for edge in loop])
    return loops


@functools.lru_cache(maxsize=None)
def _polygon_triangulations(n: int) -> np.ndarray:
    """All triangulations of a polygon with vertices 0..n-1: int array (K, n-2, 3) of vertex indices."""

    def recurse(ids: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
        if len(ids) < 3:
            return [[]]
        result = []
        first, last = ids[0], ids[-1]
        for k in range(1, len(ids) - 1):  # the triangle on edge (first, last) has apex ids[k]
            for left in recurse(ids[: k + 1]):
                for right in recurse(ids[k:]):
                    result.append(left + right + [(first, ids[k], last)])
        return result

    return np.array(recurse(tuple(range(n))), dtype=np.int64).reshape(-1, n - 2, 3)


@functools.lru_cache(maxsize=None)
def neighbour_code_normals() -> tuple[np.ndarray, ...]:
    """For each 2x2x2 code 0..255, the (T, 3) area-weighted normals of its marching-cubes triangles.

    Axis order = the array axes of the masks; lengths are areas in the unit cube (voxel units).
    """
    table = []
    for code in range(256):
        inside = frozenset(c for c in _CORNERS if (code >> _corner_bit(c)) & 1)
        normals = []
        for loop in _contour_loops(inside):
            points = np.asarray(loop)
            triangles = points[_polygon_triangulations(len(loop))]  # (K, T, 3 vertices, 3 coordinates)
            options = 0.5 * np.cross(triangles[:, :, 1] - triangles[:, :, 0], triangles[:, :, 2] - triangles[:, :, 0])
            areas = np.linalg.norm(options, axis=2).sum(axis=1)
            normals.append(options[int(np.argmax(areas))])
        table.append(np.concatenate(normals) if normals else np.zeros((0, 3)))
    return tuple(table)


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """(256,) surfel area in mm^2 per neighbour code for voxel `spacing` (mm, array axis order)."""
    return _surfel_area_table(tuple(float(s) for s in spacing)).copy()


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Cached. A triangle normal n scales to (n0*s1*s2, n1*s0*s2, n2*s0*s1); a surfel's area is the sum of the
    scaled triangles' areas."""
    s0, s1, s2 = (float(s) for s in spacing)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.array([np.linalg.norm(n * scale, axis=1).sum() for n in neighbour_code_normals()])


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Codes (uint8) of all grid corners of a boolean 3-D mask: shape = mask.shape + 1 per axis.

    Corner (i, j, k) sits between voxels i-1..i, j-1..j, k-1..k (outside the array counts as empty).
    """
    padded = np.zeros(tuple(n + 2 for n in mask.shape), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    out_shape = tuple(n + 1 for n in mask.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    for corner in _CORNERS:
        a, b, c = corner
        view = padded[a : a + out_shape[0], b : b + out_shape[1], c : c + out_shape[2]]
        codes |= view << np.uint8(_corner_bit(corner))
    return codes


def _distances_at(border: np.ndarray, points: tuple[np.ndarray, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each grid corner in `points` (np.nonzero form) to the nearest surfel of `border`.

    Same arithmetic as scipy's distance_transform_edt(~border, sampling=spacing) read at `points`, but the
    distances are formed only at those points instead of over the whole crop. Infinite without surfels.
    """
    if not border.any():
        return np.full(points[0].shape, np.inf)
    nearest = ndimage.distance_transform_edt(~border, sampling=spacing, return_distances=False, return_indices=True)
    total = np.zeros(points[0].shape, dtype=np.float64)
    for axis, (coords, step) in enumerate(zip(points, spacing)):
        offset = (nearest[axis][points] - coords).astype(np.float64) * step
        total += offset * offset
    return np.sqrt(total)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding all True voxels of a 3-D mask, or None if it is empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def surface_distances(
    mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]
) -> dict[str, np.ndarray]:
    """Distances (mm) of each surfel to the other surface, and surfel areas (mm^2).

    Both masks are cropped to the bounding box of their union (plus one empty layer at the high end,
    as the official code does), so the cost scales with the organ, not the volume.
    Returns keys distances_gt_to_pred, distances_pred_to_gt, surfel_areas_gt, surfel_areas_pred
    (empty arrays when both masks are empty).
    """
    mask_gt = np.asarray(mask_gt, dtype=bool)
    mask_pred = np.asarray(mask_pred, dtype=bool)
    if mask_gt.shape != mask_pred.shape or mask_gt.ndim != 3:
        raise ValueError(f"masks must be 3-D and of equal shape, got {mask_gt.shape} and {mask_pred.shape}")
    crop = _bounding_box(mask_gt | mask_pred)
    if crop is None:
        empty = np.zeros(0)
        return {"distances_gt_to_pred": empty, "distances_pred_to_gt": empty,
                "surfel_areas_gt": empty, "surfel_areas_pred": empty}
    spacing_f = tuple(float(s) for s in spacing)
    codes_gt = neighbour_codes(mask_gt[crop])
    codes_pred = neighbour_codes(mask_pred[crop])
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    points_gt = np.nonzero(border_gt)
    points_pred = np.nonzero(border_pred)
    areas = _surfel_area_table(spacing_f)
    return {
        "distances_gt_to_pred": _distances_at(border_pred, points_gt, spacing_f),
        "distances_pred_to_gt": _distances_at(border_gt, points_pred, spacing_f),
        "surfel_areas_gt": areas[codes_gt[points_gt]],
        "surfel_areas_pred": areas[codes_pred[points_pred]],
    }


def surface_dice_at_tolerance(distances: dict[str, np.ndarray], tolerance_mm: float) -> float:
    """(GT area within tolerance + predicted area within tolerance) / total area; "<=" counts the boundary.

    NaN when both surfaces are empty (as the official code, which divides 0 by 0).
    """
    area_gt = distances["surfel_areas_gt"]
    area_pred = distances["surfel_areas_pred"]
    total = area_gt.sum() + area_pred.sum()
    if total == 0:
        return float("nan")
    overlap_gt = area_gt[distances["distances_gt_to_pred"] <= tolerance_mm].sum()
    overlap_pred = area_pred[distances["distances_pred_to_gt"] <= tolerance_mm].sum()
    return float((overlap_gt + overlap_pred) / total)


def surface_dice(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice of two boolean 3-D masks at `tolerance_mm` (spacing in array axis order)."""
    return surface_dice_at_tolerance(surface_distances(mask_gt, mask_pred, spacing), tolerance_mm)
