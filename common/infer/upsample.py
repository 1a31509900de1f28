"""Network-grid organ scores -> labels at the crop's full resolution, without the full-size score tensor.

`upsample_labels` equals `probs_to_labels(F.interpolate(scores, out_shape, trilinear, align_corners=True))` up to
float rounding, touching only the cells on organ boundaries (see its docstring); `default_chunk_elements` sizes its
chunks by device (benchmarks/upsample_memory.py measured the bytes per element).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.core.labelmaps import probs_to_labels

# Cost of resizing one channel at one boundary voxel (8 gathers) relative to one voxel of a separable resize of a
# whole chunk (measured on CPU); decides per chunk which of the two `upsample_labels` uses.
SPARSE_COST = 6.0


def _axis_map(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corner-aligned linear resampling n_in -> n_out: per output index the two source indices and the weight.

    i0 <= n_in - 2, so (i0, i0 + 1) is always a source cell (n_in >= 2).
    """
    if n_out == 1:
        src = np.zeros(1, dtype=np.float64)
    else:
        src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 2)
    return i0, i0 + 1, src - i0


def _resize_channels_chunk(scores: torch.Tensor, wanted: Sequence[int], maps: Sequence[tuple[np.ndarray, ...]],
                           out_yx: tuple[int, int], z0: int, z1: int, threshold: float,
                           chunk_elements: int) -> torch.Tensor:
    """Labels of output slices [z0, z1) from a resize of the `wanted` channels: linear in z, then F.interpolate
    bilinear (align_corners=True) over the whole (y, x) plane, which gives the same sample positions."""
    device, dtype = scores.device, scores.dtype
    channel_index = torch.tensor(list(wanted), device=device)
    out = torch.empty((z1 - z0, *out_yx), dtype=torch.uint8, device=device)
    step = max(1, chunk_elements // max(len(wanted) * out_yx[0] * out_yx[1], 1))
    for a0 in range(z0, z1, step):
        a1 = min(a0 + step, z1)
        i0, i1, w = (m[a0:a1] for m in maps[0])
        src0, src1 = int(i0[0]), int(i1[-1]) + 1
        t = scores[:, src0:src1].index_select(0, channel_index)  # (C', nz, h, w)
        lo = t.index_select(1, torch.from_numpy(i0 - src0).to(device))
        hi = t.index_select(1, torch.from_numpy(i1 - src0).to(device))
        t = torch.lerp(lo, hi, torch.from_numpy(w).to(device=device, dtype=dtype)[None, :, None, None])
        del lo, hi
        t = F.interpolate(t.transpose(0, 1), size=out_yx, mode="bilinear", align_corners=True)  # (nz, C', Y, X)
        values, index = t.max(dim=1)
        del t
        labels = channel_index.to(torch.uint8).add(1)[index]
        out[a0 - z0:a1 - z0] = labels.masked_fill_(values < threshold, 0)
    return out


MIXED = 255  # cell label where the 8 corners of a source cell disagree (a boundary cell)
# Worst-case bytes of temporaries per chunk element in `upsample_labels` (an untrained network: boundaries
# everywhere), fp16 scores, int32 indices: 45.9 measured by benchmarks/upsample_memory.py (93.7 with int64).
UPSAMPLE_BYTES_PER_ELEMENT = 48
# Temporaries one chunk may allocate on a GPU: well inside what the fine forward pass has already reserved, so
# the resize adds little to total - free (the figure the 1.5 GB bar is held against).
UPSAMPLE_CUDA_BUDGET_MB = 128
UPSAMPLE_CPU_CHUNK = 1 << 21  # CPU: a cache-sized chunk (the former CPU default, unchanged)


def default_chunk_elements(device: torch.device) -> int:
    """Chunk size of `upsample_labels` for `device`: UPSAMPLE_CPU_CHUNK on a CPU; on a GPU the CUDA budget over the
    bytes per element (2.8 M elements, <= 128 MB; the former fixed 1 << 24 could take 1.5 GB per chunk)."""
    if device.type != "cuda":
        return UPSAMPLE_CPU_CHUNK
    return (UPSAMPLE_CUDA_BUDGET_MB << 20) // UPSAMPLE_BYTES_PER_ELEMENT


def _cell_labels(corner: torch.Tensor) -> torch.Tensor:
    """Label of each source cell (d-1, h-1, w-1) from the corner labels (d, h, w): the label its 8 corners share,
    or MIXED where they disagree (max != min over the corners)."""
    cell_max, cell_min = corner, corner
    for axis in range(3):
        n = corner.shape[axis]
        cell_max = torch.maximum(cell_max.narrow(axis, 0, n - 1), cell_max.narrow(axis, 1, n - 1))
        cell_min = torch.minimum(cell_min.narrow(axis, 0, n - 1), cell_min.narrow(axis, 1, n - 1))
    return cell_max.masked_fill_(cell_max != cell_min, MIXED)


def _labelled_box(corner: torch.Tensor, maps: Sequence[tuple[np.ndarray, ...]]) -> list[tuple[int, int]] | None:
    """Per axis, the output index range [lo, hi) of the cells with a labelled corner; None if no corner is
    labelled (everything is background)."""
    positive = corner > 0
    extents = [positive.any(2).any(1), positive.any(2).any(0), positive.any(1).any(0)]
    ranges = []
    for axis, extent in enumerate(extents):
        hits = np.flatnonzero(extent.cpu().numpy())
        if hits.size == 0:
            return None
        ranges.append((int(np.searchsorted(maps[axis][0], hits[0] - 1, side="left")),
                       int(np.searchsorted(maps[axis][0], hits[-1], side="right"))))
    return ranges


# Channels whose reach fits one integer per cell (int64's sign bit unused); a label set with more goes dense.
MAX_REACH_CHANNELS = 63
# Up to this many channels the voxels per channel come from one histogram of the bit patterns (a 2^C table).
HISTOGRAM_CHANNELS = 15


def _reach_bits(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat (cells,) int16 (int64 above HISTOGRAM_CHANNELS channels): bit c set where channel c is >= threshold at
    some corner of the cell, i.e. the only channels that can win inside it (bits instead of a (C, cells) mask: one
    gather per voxel, not per channel)."""
    dtype = torch.int16 if scores.shape[0] <= HISTOGRAM_CHANNELS else torch.int64
    reach = torch.zeros(scores.shape[1:], dtype=dtype, device=scores.device)
    for c in range(scores.shape[0]):
        reach.bitwise_or_((scores[c] >= threshold).to(dtype) << c)
    for axis in range(3):
        n = reach.shape[axis]
        reach = reach.narrow(axis, 0, n - 1) | reach.narrow(axis, 1, n - 1)
    return reach.reshape(-1)


def _interpolate_boundary(flat_scores: torch.Tensor, wanted: Sequence[int], bits: torch.Tensor, base: torch.Tensor,
                          weights_zyx: Sequence[torch.Tensor], hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """Labels (uint8, one per boundary voxel) from the exact trilinear value of each channel in `wanted` that can
    win there (its bit in `bits`): 8 corner gathers from `base` (flat index of the cell's 000 corner) per voxel.

    flat_scores: (C, d*h*w); weights_zyx: the voxel's fractional positions inside its cell; hw: (h, w).
    """
    h, w = hw
    corners = (0, 1, w, w + 1, h * w, h * w + 1, h * w + w, h * w + w + 1)  # offsets of (z, y, x) 000 ... 111
    wz, wy, wx = weights_zyx
    best = torch.full(bits.shape, float("-inf"), dtype=flat_scores.dtype, device=flat_scores.device)
    out = torch.zeros(bits.shape, dtype=torch.uint8, device=flat_scores.device)
    for c in wanted:
        sel = ((bits >> c) & 1).nonzero().squeeze(1).to(base.dtype)
        b = base[sel]
        v = [flat_scores[c].index_select(0, b + offset) for offset in corners]
        wx_s, wy_s, wz_s = wx[sel], wy[sel], wz[sel]
        x00, x01 = torch.lerp(v[0], v[1], wx_s), torch.lerp(v[2], v[3], wx_s)
        x10, x11 = torch.lerp(v[4], v[5], wx_s), torch.lerp(v[6], v[7], wx_s)
        del v
        value = torch.lerp(torch.lerp(x00, x01, wy_s), torch.lerp(x10, x11, wy_s), wz_s)
        current = best[sel]
        win = (value >= threshold) & (value > current)
        best[sel] = torch.where(win, value, current)
        out[sel] = torch.where(win, c + 1, out[sel]).to(torch.uint8)
    return out


def upsample_labels(scores: torch.Tensor, out_shape_zyx: Sequence[int], threshold: float,
                    chunk_elements: int = UPSAMPLE_CPU_CHUNK) -> torch.Tensor:
    """Labels at `out_shape_zyx` of the trilinear resize (align_corners=True) of network-grid scores (C, d, h, w).

    Equals `probs_to_labels(F.interpolate(scores, out_shape, trilinear, align_corners=True), threshold)` up to
    float rounding, without ever holding the 13-channel resized scores. The resized value at an output voxel
    is a convex combination of the 8 corners of its source cell, so:
    - where all 8 corners carry the same label (background included), the voxel has that label: organ L wins
      over every other channel at all corners and is >= threshold there, hence everywhere between them;
    - elsewhere (cells on an organ boundary) only channels >= threshold at some corner can win; they are
      interpolated exactly, voxel by voxel, for those voxels only -- or, where boundaries are everywhere
      (untrained networks), by a separable resize of whole chunks of slices, whichever is cheaper (SPARSE_COST);
    - only the output box of the cells with a labelled corner is touched at all.
    The output box is walked in chunks of about `chunk_elements` voxels (`default_chunk_elements` sizes it by
    device); indices are int32 wherever they fit. Returns uint8 (Z, Y, X) on the scores' device.
    """
    out_shape = tuple(int(s) for s in out_shape_zyx)
    for axis in range(1, 4):  # a 1-voxel axis has no cells: repeat it (resizing it is a copy anyway)
        if scores.shape[axis] == 1:
            scores = torch.cat([scores, scores], dim=axis)
    device = scores.device
    maps = [_axis_map(n_in, n_out) for n_in, n_out in zip(scores.shape[1:], out_shape)]
    corner = probs_to_labels(scores, threshold)
    box = _labelled_box(corner, maps)
    if box is None:
        return torch.zeros(out_shape, dtype=torch.uint8, device=device)
    (zl, zh), (yl, yh), (xl, xh) = box
    i0_long = [torch.from_numpy(m[0]).to(device) for m in maps]
    # Cell labels expanded to the output voxels of the box (broadcast advanced indexing: the fast gather on CPU
    # and GPU; int64 index vectors, since int32 ones are widened after broadcasting): final wherever the corners
    # agree, MIXED on boundaries.
    sub = _cell_labels(corner)[i0_long[0][zl:zh, None, None], i0_long[1][None, yl:yh, None],
                               i0_long[2][None, None, xl:xh]]
    del i0_long, corner
    boundary = _Boundary(scores, maps, box, out_shape, threshold, chunk_elements)
    chunk_z = max(1, chunk_elements // max((yh - yl) * (xh - xl), 1))
    for z0 in range(0, zh - zl, chunk_z):
        z1 = min(z0 + chunk_z, zh - zl)
        boundary.resolve(sub[z0:z1].reshape(-1), z0, z1)
    labels = torch.zeros(out_shape, dtype=torch.uint8, device=device)
    labels[zl:zh, yl:yh, xl:xh] = sub
    return labels


class _Boundary:
    """Labels of the boundary voxels (MIXED) of `upsample_labels`' output box, chunk by chunk of output slices."""

    def __init__(self, scores: torch.Tensor, maps: Sequence[tuple[np.ndarray, ...]], box: Sequence[tuple[int, int]],
                 out_shape: tuple[int, ...], threshold: float, chunk_elements: int) -> None:
        channels, d, h, w = scores.shape
        device = scores.device
        (zl, zh), (yl, yh), (xl, xh) = box
        self.scores, self.maps, self.box, self.out_shape = scores, maps, box, out_shape
        self.threshold, self.chunk_elements = threshold, chunk_elements
        self.index_dtype = torch.int32 if max(d * h * w, (zh - zl) * (yh - yl) * (xh - xl)) < 2**31 else torch.int64
        self.i0 = [torch.from_numpy(m[0]).to(device).to(self.index_dtype) for m in maps]
        self.frac = [torch.from_numpy(m[2]).to(device=device, dtype=scores.dtype) for m in maps]
        self.reach = _reach_bits(scores, threshold) if channels <= MAX_REACH_CHANNELS else None
        self.bit_table = None
        if channels <= HISTOGRAM_CHANNELS:
            patterns = torch.arange(1 << channels, device=device)[:, None]
            self.bit_table = ((patterns >> torch.arange(channels, device=device)[None, :]) & 1).double()  # (2^C, C)
        self.flat_scores = scores.reshape(channels, -1)

    def _voxels_per_channel(self, bits: torch.Tensor) -> list[float]:
        """How many of the boundary voxels each channel can win at (from their reach bits)."""
        channels = self.scores.shape[0]
        if self.bit_table is not None:  # one pass: a histogram of the bit patterns
            histogram = torch.bincount(bits, minlength=1 << channels).double()
            return (histogram[:, None] * self.bit_table).sum(0).tolist()
        return [float(((bits >> c) & 1).sum()) for c in range(channels)]

    def resolve(self, block: torch.Tensor, z0: int, z1: int) -> None:
        """Replace the MIXED entries of `block` (the flat output box slices [z0, z1) relative to the box) by labels."""
        todo = (block == MIXED).nonzero().squeeze(1).to(self.index_dtype)
        if todo.numel() == 0:
            return
        channels, _, h, w = self.scores.shape
        (zl, _), (yl, yh), (xl, xh) = self.box
        if self.reach is None:  # too many channels for reach bits: the dense resize of the chunk, every channel
            dense = _resize_channels_chunk(self.scores, list(range(channels)), self.maps, self.out_shape[1:],
                                           z0 + zl, z1 + zl, self.threshold, self.chunk_elements)
            block[todo] = dense[:, yl:yh, xl:xh].reshape(-1)[todo]
            return
        nx = xh - xl
        plane = (yh - yl) * nx
        # Output (z, y, x) of each boundary voxel, and its source cell.
        oz = todo // plane + (z0 + zl)
        oy = (todo % plane) // nx + yl
        ox = todo % nx + xl
        cz, cy, cx = self.i0[0][oz], self.i0[1][oy], self.i0[2][ox]
        bits = self.reach.index_select(0, (cz * (h - 1) + cy) * (w - 1) + cx)
        counts = self._voxels_per_channel(bits)
        wanted = [c for c in range(channels) if counts[c]]
        if SPARSE_COST * sum(counts) > len(wanted) * block.numel():
            # Boundaries everywhere (e.g. an untrained network): a separable resize of the whole chunk, for
            # the channels that reach a boundary cell in it, is cheaper than 8 gathers per voxel and channel.
            del oz, oy, ox, cz, cy, cx, bits
            dense = _resize_channels_chunk(self.scores, wanted, self.maps, self.out_shape[1:], z0 + zl, z1 + zl,
                                           self.threshold, self.chunk_elements)
            block[todo] = dense[:, yl:yh, xl:xh].reshape(-1)[todo]
            return
        weights = (self.frac[0][oz], self.frac[1][oy], self.frac[2][ox])
        base = (cz * h + cy) * w + cx
        del oz, oy, ox, cz, cy, cx
        block[todo] = _interpolate_boundary(self.flat_scores, wanted, bits, base, weights, (h, w), self.threshold)
