"""Resizing volumes and label masks to a fixed shape (reference 1.3), on numpy arrays or on torch tensors.

Resizing is to a fixed output *shape* with corner-aligned trilinear interpolation: output voxel o along an
axis of n input / m output voxels samples input coordinate o * (n - 1) / (m - 1). This is scipy's
`zoom(..., grid_mode=False)` and torch's `F.interpolate(..., align_corners=True)`; both paths here agree
to float32 rounding. Masks are resized label by label (binary linear resize, > 0.5), later labels
overwriting earlier ones where they overlap.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from common.volume.boxes import Box, label_bboxes
from common.volume.intensity import INT16_MAX, INT16_MIN


def _check_shape(out_shape_zyx: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in out_shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"output shape must be 3 positive ints (z, y, x), got {tuple(out_shape_zyx)}")
    return shape  # type: ignore[return-value]


def resize_volume(array: np.ndarray, out_shape_zyx: Sequence[int], order: int = 1) -> np.ndarray:
    """Corner-aligned resize of a (z, y, x) volume to `out_shape_zyx` with scipy.ndimage.zoom; float32.

    order 1 = trilinear (reference 1.3). The caller casts (e.g. rounds back to int16 HU).
    """
    shape = _check_shape(out_shape_zyx)
    x = np.asarray(array, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected a 3D array (z, y, x), got shape {x.shape}")
    if tuple(x.shape) == shape:
        return x.copy()
    factors = [o / i for o, i in zip(shape, x.shape)]
    out = ndi.zoom(x, factors, order=order, mode="nearest", grid_mode=False, prefilter=False)
    if tuple(out.shape) != shape:  # zoom derives the shape by rounding in*factor; guard against float surprises
        raise RuntimeError(f"zoom produced {out.shape}, wanted {shape}")
    return out


def resize_volume_torch(t: torch.Tensor, out_shape_zyx: Sequence[int]) -> torch.Tensor:
    """Corner-aligned trilinear resize (F.interpolate, align_corners=True) on the tensor's device.

    t: (D, H, W) or (N, C, D, H, W), any dtype (integers are converted to float32, floats keep their dtype).
    Returns the same layout with spatial size `out_shape_zyx`.
    """
    shape = _check_shape(out_shape_zyx)
    if t.dim() not in (3, 5):
        raise ValueError(f"expected (D,H,W) or (N,C,D,H,W), got shape {tuple(t.shape)}")
    x = t if t.is_floating_point() else t.float()
    x5 = x[None, None] if x.dim() == 3 else x
    out = x5 if tuple(x5.shape[2:]) == shape else F.interpolate(x5, size=shape, mode="trilinear", align_corners=True)
    return out[0, 0] if x.dim() == 3 else out


def resize_hu_int16(array: np.ndarray | torch.Tensor, out_shape_zyx: Sequence[int]) -> np.ndarray:
    """Resize a HU volume (z, y, x) and store it as int16 HU (rounded to nearest, clipped to int16).

    `array`: numpy array (any layout) or CPU tensor; passing a float32 tensor lets a caller convert a volume
    once for several resizes. Runs `resize_volume_torch` on the CPU (the fastest path; equal to
    `resize_volume` up to float32 rounding). The reference truncated toward zero when casting back; we round
    (at most 1 HU difference).
    """
    x = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if x.dtype != torch.float32:
        x = x.float()  # torch's cast is several times faster than numpy's int16 -> float32
    out = resize_volume_torch(x, out_shape_zyx)
    out = torch.round(out).clamp_(INT16_MIN, INT16_MAX)
    return out.to(torch.int16).numpy()




def _axis_coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corner-aligned sample positions along one axis, computed as torch's CPU kernel does (float32).

    Returns (i0 int64 (n_out,), i1 int64 (n_out,), lambda float32 (n_out,)): value = (1-l)*x[i0] + l*x[i1].
    """
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = np.float32(scale) * np.arange(n_out, dtype=np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, lam


def _interp_axis(x: torch.Tensor, axis: int, i0: np.ndarray, i1: np.ndarray, lam: np.ndarray) -> torch.Tensor:
    """Linear interpolation of `x` along `axis` at positions given by (i0, i1, lambda)."""
    shape = [1] * x.dim()
    shape[axis] = lam.shape[0]
    w1 = torch.from_numpy(lam).to(x.device).view(shape)
    w0 = 1.0 - w1
    x0 = x.index_select(axis, torch.from_numpy(i0).to(x.device))
    x1 = x.index_select(axis, torch.from_numpy(i1).to(x.device))
    return x0 * w0 + x1 * w1


def resize_mask(mask: np.ndarray, out_shape_zyx: Sequence[int], num_labels: int | None = None,
                label_boxes: dict[int, Box] | None = None) -> np.ndarray:
    """Resize a label mask (z, y, x) label by label: binary trilinear resize, > 0.5, later labels win; uint8.

    Each label is interpolated only inside the output region its bounding box can reach (elsewhere the
    binary resize is exactly 0), with the same arithmetic as `F.interpolate(align_corners=True)`.
    `label_boxes`: the masks's `label_bboxes` if the caller has them already (saves a pass over the mask).
    `num_labels`: labels above it are left out (None: none is).
    """
    shape = _check_shape(out_shape_zyx)
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"expected a 3D mask (z, y, x), got shape {m.shape}")
    out = np.zeros(shape, dtype=np.uint8)
    coords = [_axis_coords(n, o) for n, o in zip(m.shape, shape)]
    if label_boxes is None:
        label_boxes = label_bboxes(m, num_labels)
    for label, box in sorted(label_boxes.items()):
        if label < 1 or (num_labels is not None and label > num_labels):
            continue
        src_slices, out_slices, local = [], [], []
        for axis, (lo, hi) in enumerate(box):
            n = m.shape[axis]
            i0, i1, lam = coords[axis]
            src = i0.astype(np.float64) + lam
            # Outside (lo - 1, hi + 1) both neighbours are background: the binary resize is exactly 0 there.
            o_lo = int(np.searchsorted(src, lo - 1, side="right"))
            o_hi = int(np.searchsorted(src, hi + 1, side="left"))
            if o_lo >= o_hi:
                break
            a0, a1 = max(lo - 1, 0), min(hi + 1, n - 1)
            src_slices.append(slice(a0, a1 + 1))
            out_slices.append(slice(o_lo, o_hi))
            local.append((i0[o_lo:o_hi] - a0, i1[o_lo:o_hi] - a0, lam[o_lo:o_hi]))
        else:
            binary = (torch.from_numpy(np.ascontiguousarray(m[tuple(src_slices)])) == label).float()
            # Outermost axis first: gathers along z and y copy whole contiguous rows, and the slow element
            # gather along x runs on the already reduced block. (Same trilinear weights as torch; only the
            # float32 rounding order differs, which never moves a value across 0.5 except at ~1e-7 ties.)
            for axis in (0, 1, 2):
                binary = _interp_axis(binary, axis, *local[axis])
            region = out[tuple(out_slices)]
            region[(binary > 0.5).numpy()] = label
    return out


def resize_mask_torch(mask_t: torch.Tensor, out_shape_zyx: Sequence[int], num_labels: int) -> torch.Tensor:
    """`resize_mask` on the tensor's device: mask (D, H, W) integer -> uint8 (out D, H, W)."""
    shape = _check_shape(out_shape_zyx)
    if mask_t.dim() != 3:
        raise ValueError(f"expected a 3D mask (D, H, W), got shape {tuple(mask_t.shape)}")
    out = torch.zeros(shape, dtype=torch.uint8, device=mask_t.device)
    # Every label is resized, present or not: asking which are present (torch.unique) and writing through a
    # boolean index would each wait for the GPU; an absent label resizes to zeros and writes nothing.
    for label in range(1, num_labels + 1):
        binary = (mask_t == label).float()[None, None]
        resized = F.interpolate(binary, size=shape, mode="trilinear", align_corners=True)[0, 0]
        out.masked_fill_(resized > 0.5, label)
    return out
