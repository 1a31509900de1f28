"""Two-stage prediction of CT folders: coarse network on the whole volume -> organ box -> fine network on the crop.

Pipeline per case (DESIGN 4, decisions 7-9; reference 6.2):
1. read (background thread), check the volume looks like a CT;
2. the raw HU volume goes to the device once, as it is stored (int16/int32); the coarse input is resized,
   windowed and z-scored there (`prepare_input`) and flipped to the canonical orientation at 160^3;
3. coarse labels (`probs_to_labels`: highest sigmoid >= 0.5 wins), organ box (`organ_box`: largest
   26-connected component per organ >= 1000 mm^3 of the coarse grid, 240 mm z-window around the largest region)
   -> raw crop with a 20 mm margin by the training crop rule (`crop_box_with_margin`); an empty coarse mask
   falls back to the whole volume;
4. the fine network runs on the crop resized to 192^3 (or 160^3); its scores are resized back to the crop size
   on the device, chunk by chunk and only inside each organ's support, straight into a uint8 label map
   (no full-resolution 13-channel float tensor ever exists);
5. largest component per organ >= 500 mm^3 of the crop grid (FINE_MIN_VOLUME_MM3), on each organ's bounding box;
6. paste into a zero uint8 volume in the file's own orientation and write it (background thread) with the
   input's exact size, spacing, origin and direction.

All large arrays stay in the file's orientation: only network-grid tensors are flipped (a corner-aligned resize
commutes with a flip), so no full-volume flip copy is made.

`--ensemble` averages the sigmoid probabilities of networks A and B in both stages. The uncertainty score is the
disagreement of A and B on the fine grid, by UIF's definition (`common.uif.labels_disagreement`: 1 - mean
per-organ Dice of their hard masks over the organs present in either; 1.0 when neither finds an organ; DESIGN 5.6).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gc
import io
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import gpu_memory
from common.amp import PRECISIONS as TRAIN_PRECISIONS
from common.amp import amp_settings, autocast
from common.backends import Forward, make_forwards, resolve_backend
from common.checkpoint import load_exported_model
from common.device import resolve_device, set_cudnn_benchmark
from common.errors import InputError
from common.fileutil import check_writable, folder_lock, remove_stale_temps, write_json_atomic, write_text_atomic
from common.image_io import ImageMeta, canonical_flips, check_spacing, list_images, read_image, write_mask
from common.logger import get_logger
from common.networks.input_layer import prepare_input
from common.original_weights import is_original_layout, load_original_stage
from common.postprocess import (
    COARSE_MIN_VOLUME_MM3,
    EXTEND_SIZE_MM,
    FINE_MIN_VOLUME_MM3,
    LOGIT_THRESHOLD,
    Z_WINDOW_MM,
    keep_largest_component,
    organ_box,
    probs_to_labels,
)
from common.preprocessing import AIR_HU, crop_box_with_margin, to_int16_hu
from common.uif import labels_disagreement

logger = get_logger(__name__)

COARSE_DIR = "base_coarse_model"
FINE_DIR = "efficient_fine_model"
DEFAULT_UNCERTAINTY_THRESHOLD = 0.2
# Cost of resizing one channel at one boundary voxel (8 gathers) relative to one voxel of a separable resize of a
# whole chunk (measured on CPU); decides per chunk which of the two `upsample_labels` uses.
SPARSE_COST = 6.0
PRECISIONS = ("auto",) + TRAIN_PRECISIONS  # the training vocabulary (common.amp) plus auto = by device

CSV_COLUMNS = (
    "case_id", "input_path", "output_path", "status", "error", "read_s", "coarse_s", "fine_s", "post_s",
    "write_s", "total_s", *gpu_memory.MEMORY_FIELDS, "device", "coarse_box", "fallback", "uncertainty", "flagged",
)


class WeightsError(Exception):
    """Missing, corrupt or unusable model weights; the message names the file."""


# ------------------------------------------------------------------------------------------------ checks


def check_ct(array_zyx: np.ndarray, meta: ImageMeta, path: str | os.PathLike) -> None:
    """Raise InputError naming `path` if the volume cannot be a CT in HU (spacing, shape, intensities)."""
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


def read_canonical_ct(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta, tuple[bool, bool, bool]]:
    """Read a CT through the checked reader, check it (`check_ct`), store it as int16 HU (`to_int16_hu`) and flip
    it to the canonical orientation: the one way a raw image becomes the canonical int16 volume that every
    stored region (data_prepare's, the fine boxes step's) is cut from.

    Returns (image int16 (z, y, x) canonical and contiguous, the file's meta, the flips applied (z, y, x)).
    """
    image_raw, meta = read_image(path)
    check_ct(image_raw, meta, path)
    flips = canonical_flips(meta)
    image = torch.from_numpy(to_int16_hu(image_raw, path))
    flip_dims = [axis for axis, f in enumerate(flips) if f]
    # torch's flip makes a contiguous canonical copy much faster than np.ascontiguousarray of a reversed view
    return (image.flip(flip_dims) if flip_dims else image).numpy(), meta, flips


# ------------------------------------------------------------------------------------------------ small helpers


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> fp16 on CUDA, fp32 on CPU; fp16/bf16 on CPU fall back to fp32 (slower there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            logger.info("precision %s is not used on the CPU; running fp32", precision)
        return "fp32"
    return "fp16" if precision == "auto" else precision


def _flip(t: torch.Tensor, flips: Sequence[bool]) -> torch.Tensor:
    """Flip the last three axes (z, y, x) of `t` where `flips` says so (no copy when nothing flips)."""
    dims = [t.ndim - 3 + i for i, f in enumerate(flips) if f]
    return torch.flip(t, dims) if dims else t


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


# ------------------------------------------------------------------------------------------------ resizing


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


def _reach_bits(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat (cells,) int16: bit c set where channel c is >= threshold at some corner of the cell, i.e. the only
    channels that can win inside it (bits instead of a (C, cells) mask: one gather per voxel, not per channel)."""
    reach = torch.zeros(scores.shape[1:], dtype=torch.int16, device=scores.device)
    for c in range(scores.shape[0]):
        reach.bitwise_or_((scores[c] >= threshold).to(torch.int16) << c)
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
    channels, d, h, w = scores.shape
    device, dtype = scores.device, scores.dtype
    maps = [_axis_map(n_in, n_out) for n_in, n_out in zip((d, h, w), out_shape)]
    corner = probs_to_labels(scores, threshold)
    box = _labelled_box(corner, maps)
    if box is None:
        return torch.zeros(out_shape, dtype=torch.uint8, device=device)
    (zl, zh), (yl, yh), (xl, xh) = box
    index_dtype = torch.int32 if max(d * h * w, (zh - zl) * (yh - yl) * (xh - xl)) < 2**31 else torch.int64
    i0_long = [torch.from_numpy(m[0]).to(device) for m in maps]
    i0 = [t.to(index_dtype) for t in i0_long]
    frac = [torch.from_numpy(m[2]).to(device=device, dtype=dtype) for m in maps]
    # Cell labels expanded to the output voxels of the box (broadcast advanced indexing: the fast gather on CPU
    # and GPU; int64 index vectors, since int32 ones are widened after broadcasting): final wherever the corners
    # agree, MIXED on boundaries.
    sub = _cell_labels(corner)[i0_long[0][zl:zh, None, None], i0_long[1][None, yl:yh, None],
                               i0_long[2][None, None, xl:xh]]
    del i0_long
    del corner
    reach = _reach_bits(scores, threshold)
    patterns = torch.arange(1 << channels, device=device)[:, None]
    bit_table = ((patterns >> torch.arange(channels, device=device)[None, :]) & 1).double()  # (2^C, C)
    flat_scores = scores.reshape(channels, -1)
    nx = xh - xl
    plane = (yh - yl) * nx
    chunk_z = max(1, chunk_elements // max(plane, 1))
    for z0 in range(0, zh - zl, chunk_z):
        z1 = min(z0 + chunk_z, zh - zl)
        block = sub[z0:z1].reshape(-1)
        todo = (block == MIXED).nonzero().squeeze(1).to(index_dtype)
        if todo.numel() == 0:
            continue
        # Output (z, y, x) of each boundary voxel, and its source cell.
        oz = todo // plane + (z0 + zl)
        oy = (todo % plane) // nx + yl
        ox = todo % nx + xl
        cz, cy, cx = i0[0][oz], i0[1][oy], i0[2][ox]
        bits = reach.index_select(0, (cz * (h - 1) + cy) * (w - 1) + cx)
        # Voxels per channel to resize, from a histogram of the bit patterns (one pass instead of one per channel).
        histogram = torch.bincount(bits, minlength=1 << channels).double()
        counts = (histogram[:, None] * bit_table).sum(0).tolist()
        wanted = [c for c in range(channels) if counts[c]]
        if SPARSE_COST * sum(counts) > len(wanted) * block.numel():
            # Boundaries everywhere (e.g. an untrained network): a separable resize of the whole chunk, for
            # the channels that reach a boundary cell in it, is cheaper than 8 gathers per voxel and channel.
            del oz, oy, ox, cz, cy, cx, bits
            dense = _resize_channels_chunk(scores, wanted, maps, out_shape[1:], z0 + zl, z1 + zl, threshold,
                                           chunk_elements)
            block[todo] = dense[:, yl:yh, xl:xh].reshape(-1)[todo]
            continue
        weights = (frac[0][oz], frac[1][oy], frac[2][ox])
        base = (cz * h + cy) * w + cx
        del oz, oy, ox, cz, cy, cx
        block[todo] = _interpolate_boundary(flat_scores, wanted, bits, base, weights, (h, w), threshold)
    labels = torch.zeros(out_shape, dtype=torch.uint8, device=device)
    labels[zl:zh, yl:yh, xl:xh] = sub
    return labels


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Stage:
    """One exported stage ready for prediction."""

    name: str
    path: Path
    networks: dict[str, Forward]  # name -> x (1, 1, *size_zyx) -> logits (1, C, ...), on the predictor's backend
    primary: str
    size_zyx: tuple[int, int, int]
    hu_window: tuple[float, float]
    min_volume_mm3: float  # smallest component kept after this stage, mm^3 of its output grid
    z_window_mm: float     # coarse: half height of the box's z-window
    extend_size_mm: float  # fine: margin around the organ box
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the torch networks behind `networks`


def load_stage(model_dir: Path, stage: str, device: torch.device, size_zyx: Sequence[int] | None = None) -> Stage:
    """Load an exported model folder (model.pt + config.yaml), or an original release stage folder (best_model.pt),
    converted in memory; WeightsError naming the file on any problem."""
    try:
        if is_original_layout(model_dir):  # the original release's best_model.pt files, converted in memory
            exported = load_original_stage(model_dir, stage, device)
        else:
            exported = load_exported_model(model_dir, device, stage=stage)
    except InputError as e:
        raise WeightsError(str(e)) from None
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise WeightsError(f"{model_dir / 'model.pt'}: cannot build the {stage} network: {e}") from None
    for key, network in exported.networks.items():  # NaN weights would give empty masks marked "ok"
        bad = [name for name, t in network.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise WeightsError(f"{model_dir / 'model.pt'}: network {key} holds NaN or infinite weights ({bad[0]}"
                               f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); export a good checkpoint")
    pre = exported.preprocess
    try:
        size = tuple(int(s) for s in (size_zyx if size_zyx is not None else pre["size_zyx"]))
        window = (float(pre["hu_window"][0]), float(pre["hu_window"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise WeightsError(f"{model_dir / 'model.pt'}: preprocess settings incomplete ({e!r}); re-export") from None
    if len(size) != 3 or any(s % 16 or s < 32 for s in size):
        raise WeightsError(f"{model_dir / 'model.pt'}: input size {size} must be 3 sizes divisible by 16 and >= 32 "
                           "(preprocess.size_zyx); re-export the model")
    return Stage(stage, Path(model_dir), dict(exported.networks), exported.primary,
                 size, window,  # type: ignore[arg-type]
                 float(pre.get("min_volume_mm3", COARSE_MIN_VOLUME_MM3 if stage == "coarse" else FINE_MIN_VOLUME_MM3)),
                 float(pre.get("z_window_mm", Z_WINDOW_MM)), float(pre.get("extend_size_mm", EXTEND_SIZE_MM)))


@dataclass
class CaseResult:
    """What `Predictor.predict` returns for one volume."""

    mask: np.ndarray                       # (z, y, x) uint8 in the file's orientation
    crop: tuple[slice, slice, slice]       # fine crop, canonical coordinates
    fallback: bool                         # coarse mask was empty: the whole volume was used
    uncertainty: float | None
    times: dict[str, float] = field(default_factory=dict)  # coarse_s, fine_s, post_s
    gpu: gpu_memory.GpuMemory = field(default_factory=gpu_memory.GpuMemory)  # peaks over both stages (zeros: CPU)
    device: str = "cpu"


@dataclass(frozen=True)
class PredictOptions:
    """Every option of a prediction run, in one place: predict.py fills it, `predict_folder` and `Predictor` read it.

    Network options (weights_dir .. chunk_elements) are used by `Predictor`; folder options (overwrite ..
    progress) by `predict_folder`.
    """

    weights_dir: str | os.PathLike = "model_weights"  # folder with base_coarse_model/ and efficient_fine_model/
    device: str | torch.device = "auto"                # auto = cuda if available, else cpu
    precision: str = "auto"                            # one of PRECISIONS; auto = fp16 on CUDA, fp32 on CPU
    fine_size: int | None = None                       # fine input size per axis (multiple of 16); None = model's
    ensemble: bool = False                             # average networks A and B in both stages
    uncertainty: str = "auto"                          # auto / on / off: A/B disagreement score
    # Post-processing (reference 6.2 steps 3-7); None = the value the exported model carries (its training
    # config's postprocess section), or common.postprocess's default for an older export.
    z_window_mm: float | None = None                   # coarse box: half height of the z-window
    coarse_min_volume_mm3: float | None = None         # smallest coarse component kept (mm^3, coarse grid)
    extend_size_mm: float | None = None                # margin around the organ box (mm)
    fine_min_volume_mm3: float | None = None           # smallest fine component kept (mm^3, crop grid)
    chunk_elements: int | None = None                  # elements per resize chunk; None = by device
    cudnn_benchmark: bool = True                       # let cuDNN pick the fastest kernels (fixed input sizes)
    backend: str = "auto"                              # common.backends.BACKENDS; auto = fastest installed
    overwrite: bool = False                            # redo cases whose output exists
    overlays: bool = False                             # also write <id>_overlay.png
    workers: int = 2                                   # background reader threads = cases read ahead
    uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD  # flag cases above it
    progress: bool = True                              # tqdm progress bar


class Predictor:
    """Coarse + fine networks on one device, set up from the network fields of a `PredictOptions`."""

    def __init__(self, options: PredictOptions | None = None) -> None:
        options = options if options is not None else PredictOptions()
        self.options = options
        self.weights_dir = Path(options.weights_dir)
        device, fine_size, ensemble, uncertainty = (options.device, options.fine_size, options.ensemble,
                                                    options.uncertainty)
        self.device = resolve_device(device)
        self.backend = resolve_backend(options.backend, self.device)
        # Fixed network input sizes: cuDNN times its algorithms once per shape and keeps the fastest, as in
        # training. Its workspace counts in total - free; gpu_check measures gpu_used_mb with it on and off.
        set_cudnn_benchmark(self.device, options.cudnn_benchmark)
        self.precision = resolve_precision(options.precision, self.device)
        self.amp = amp_settings(self.precision, self.device)
        # Scores are resized in fp16 on the GPU (half the memory); bf16's 8-bit mantissa is too coarse for the
        # channel comparisons at organ borders, so bf16 networks hand fp32 scores on.
        self.score_dtype = torch.float16 if self.amp.dtype == torch.float16 else torch.float32
        if fine_size is not None and (fine_size < 32 or fine_size % 16):
            raise ValueError(f"fine size must be a multiple of 16 and >= 32 (192 trained, 160 faster), got {fine_size}")
        self.fine_size = fine_size
        self.ensemble = ensemble
        self.chunk_elements = options.chunk_elements or default_chunk_elements(self.device)
        self.coarse = load_stage(self.weights_dir / COARSE_DIR, "coarse", self.device)
        self.fine = load_stage(self.weights_dir / FINE_DIR, "fine", self.device,
                               None if fine_size is None else (fine_size,) * 3)

        def pick(flag: float | None, exported: float) -> float:
            return float(exported if flag is None else flag)

        self.z_window_mm = pick(options.z_window_mm, self.coarse.z_window_mm)
        self.coarse_min_volume_mm3 = pick(options.coarse_min_volume_mm3, self.coarse.min_volume_mm3)
        self.extend_size_mm = pick(options.extend_size_mm, self.fine.extend_size_mm)
        self.fine_min_volume_mm3 = pick(options.fine_min_volume_mm3, self.fine.min_volume_mm3)
        for stage in (self.coarse, self.fine):
            stage.modules = dict(stage.networks)
            stage.networks = make_forwards(self.backend, stage.modules, stage.path, stage.size_zyx)
        if ensemble:
            for stage in (self.coarse, self.fine):
                if len(stage.networks) < 2:
                    raise WeightsError(
                        f"{stage.path}: --ensemble needs networks a and b, this {stage.name} model holds "
                        f"only network {stage.primary} (the original release's fine stage saved network A only); "
                        "predict without --ensemble")
        if uncertainty not in ("auto", "on", "off"):
            raise ValueError(f"uncertainty must be auto, on or off, got {uncertainty!r}")
        both = len(self.fine.networks) >= 2
        if uncertainty == "on" and not both:
            logger.warning("uncertainty needs networks a and b in %s; not computed", self.fine.path / "model.pt")
        # auto: free with --ensemble; on a GPU one more fine forward (~0.1 s); on a CPU it would double the fine
        # stage, so it is left to "on" there.
        self.uncertainty = both and (uncertainty == "on" or (uncertainty == "auto" and (
            ensemble or self.device.type == "cuda")))

    def on_cpu(self) -> "Predictor":
        """The same predictor on the CPU (fp32), for cases that do not fit in GPU memory."""
        return Predictor(dataclasses.replace(self.options, device="cpu", precision="fp32",
                                             uncertainty="on" if self.uncertainty else "off"))

    # -------------------------------------------------------------------------------------------- stages

    def _scores(self, stage: Stage, x: torch.Tensor, want_pair: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Logit scores (C, D, H, W) for input x (1, 1, D, H, W) (labels: LOGIT_THRESHOLD); A/B label maps if
        asked."""
        names = ["a", "b"] if "a" in stage.networks and "b" in stage.networks else [stage.primary]
        use = names if self.ensemble else [stage.primary]
        run = names if (want_pair and len(names) == 2) else use
        outputs: dict[str, torch.Tensor] = {}
        with autocast(self.amp):
            for name in run:
                outputs[name] = stage.networks[name](x)[0].to(self.score_dtype)
        pair = None
        if want_pair and len(names) == 2:
            pair = (probs_to_labels(outputs["a"], LOGIT_THRESHOLD), probs_to_labels(outputs["b"], LOGIT_THRESHOLD))
        if len(use) == 1:
            return outputs[use[0]], pair
        # Average the probabilities (fp32), then back to logits: the ensemble's score map is resized as logits,
        # like a single network's, and equals it when A and B agree.
        probs = outputs.pop(use[0]).float().sigmoid_()
        for name in use[1:]:
            probs.add_(outputs.pop(name).float().sigmoid_())
        probs.div_(len(use)).clamp_(1e-7, 1 - 1e-7)
        return torch.logit(probs).to(self.score_dtype), pair

    @torch.inference_mode()
    def predict(self, raw_zyx: np.ndarray, meta: ImageMeta, case: str = "") -> CaseResult:
        """Segment one volume given in the file's array order; returns the uint8 mask in the same order.

        `raw_zyx` may be a view of page-locked memory (`pinned_copy`): its upload is then asynchronous.
        GPU memory is read at the end of each stage, while its tensors are still alive (`common.gpu_memory`).
        """
        gpu_memory.reset_peak(self.device)
        times: dict[str, float] = {}
        shape = tuple(int(s) for s in raw_zyx.shape)
        spacing = np.asarray(meta.spacing_zyx, dtype=np.float64)
        flips = canonical_flips(meta)
        t0 = time.perf_counter()

        # ---- coarse: whole volume, resized on the device (slab by slab), flipped at network size
        raw = torch.from_numpy(_torch_friendly(raw_zyx)).to(self.device, non_blocking=True)
        x = _flip(prepare_input(raw[None, None], self.coarse.size_zyx, self.coarse.hu_window), flips)
        scores, _ = self._scores(self.coarse, x, want_pair=False)
        del x
        coarse_labels = probs_to_labels(scores, LOGIT_THRESHOLD).cpu().numpy()
        memory = gpu_memory.snapshot(self.device)
        del scores
        t1 = time.perf_counter()
        times["coarse_s"] = t1 - t0

        box = organ_box(coarse_labels, shape, tuple(spacing), self.coarse_min_volume_mm3, self.z_window_mm)
        fallback = box is None
        if fallback:
            logger.warning("%s: coarse mask is empty; the fine network runs on the whole volume", case or "case")
            crop = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        else:
            crop = crop_box_with_margin(box, tuple(spacing), self.extend_size_mm, shape)
        file_crop = canonical_to_file_slices(crop, flips, shape)
        t2 = time.perf_counter()
        times["post_s"] = t2 - t1

        # ---- fine: crop (a view of the device volume), network at 192^3, labels resized back on the device
        region = raw[file_crop]
        crop_shape = tuple(region.shape)
        x = _flip(prepare_input(region[None, None], self.fine.size_zyx, self.fine.hu_window), flips)
        del raw, region
        scores, pair = self._scores(self.fine, x, want_pair=self.uncertainty)
        del x
        uncertainty = labels_disagreement(*pair) if pair is not None else None
        del pair
        scores = _flip(scores, flips)  # the canonical-order scores are dropped here, not kept beside the copy
        crop_labels = upsample_labels(scores, crop_shape, LOGIT_THRESHOLD, self.chunk_elements)
        memory = memory.max(gpu_memory.snapshot(self.device))
        del scores
        crop_labels = crop_labels.cpu().numpy()
        t3 = time.perf_counter()
        times["fine_s"] = t3 - t2

        crop_labels = keep_largest_component(crop_labels, spacing, self.fine_min_volume_mm3)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[file_crop] = crop_labels
        times["post_s"] += time.perf_counter() - t3
        if memory.used_mb > gpu_memory.MEMORY_BAR_MB:
            logger.warning("%s: GPU memory in use (total - free) reached %.0f MB, above the %.0f MB bar",
                           case or "case", memory.used_mb, gpu_memory.MEMORY_BAR_MB)
        return CaseResult(mask, crop, fallback, uncertainty, times, memory, str(self.device))


def _torch_friendly(array: np.ndarray) -> np.ndarray:
    """The array in a dtype torch holds without a float copy (int16/int32 stay), C-contiguous and writable.

    float64 becomes float32 (HU need no more; half the upload and no float64 resize), uint16 int32.
    """
    if array.dtype in (np.int16, np.int32, np.float32, np.uint8, np.int8):
        out = array
    elif array.dtype == np.uint16:
        out = array.astype(np.int32)
    else:
        out = array.astype(np.float32)
    if not out.flags.writeable:
        return np.array(out, order="C")
    return np.ascontiguousarray(out)


def pinned_copy(array: np.ndarray) -> np.ndarray:
    """`_torch_friendly(array)` in page-locked memory (a numpy view that keeps the pinned tensor alive), so the
    predictor's upload to the GPU is asynchronous; done in the reader thread, off the GPU's critical path."""
    return torch.from_numpy(_torch_friendly(array)).pin_memory().numpy()


# ------------------------------------------------------------------------------------------------ folders


def _read_case(path: Path, pin: bool = False) -> tuple[np.ndarray, ImageMeta, float]:
    t0 = time.perf_counter()
    array, meta = read_image(path)
    check_ct(array, meta, path)
    if pin:
        array = pinned_copy(array)
    return array, meta, time.perf_counter() - t0


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error: torch's OutOfMemoryError, or the plain RuntimeError that cuDNN's allocation
    failures (CUDNN_STATUS_ALLOC_FAILED) and some CUDA kernels raise with "out of memory" in the text."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDNN_STATUS_ALLOC_FAILED" in text or "out of memory" in text)


def free_cuda_memory() -> None:
    """Collect what a failed attempt left (reference cycles included) and hand the cached blocks back to CUDA."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_case(mask: np.ndarray, meta: ImageMeta, out_path: Path, overlay_path: Path | None,
                raw: np.ndarray | None, case_id: str) -> float:
    t0 = time.perf_counter()
    write_mask(mask, meta, out_path)
    if overlay_path is not None and raw is not None:
        from common.overlay import write_overlay  # only needed with --overlays
        write_overlay(overlay_path, raw, mask, meta.spacing_zyx, canonical_flips(meta), title=case_id)
    return time.perf_counter() - t0


def output_name(case_id: str) -> str:
    """Output file name of a case: `<id>.nii.gz`."""
    return f"{case_id}.nii.gz"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (InputError, WeightsError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip()


def write_report(path: Path, rows: list[dict[str, Any]]) -> None:
    """predictions.csv (atomic): one row per case and per skipped entry, columns CSV_COLUMNS."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, bool):
        return int(value)
    return value


@dataclass
class FolderCase:
    """One case of an input folder: its id, the CT it is read from and the mask it is written to."""

    case_id: str
    input_path: Path
    output_path: Path


ROWS_DIR = ".predictions"  # per-case report rows beside the masks: out_dir/.predictions/<id>.json


def row_path(out_dir: Path, case_id: str) -> Path:
    """Where a case's report row is kept (written atomically once its mask is written or it failed)."""
    return out_dir / ROWS_DIR / f"{case_id}.json"


def _stored_row(out_dir: Path, case_id: str) -> dict[str, Any] | None:
    """The report row an earlier run kept for `case_id`, or None (missing or unreadable)."""
    try:
        row = json.loads(row_path(out_dir, case_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def check_folders(in_dir: Path, out_dir: Path) -> None:
    """Setup errors (InputError) before any work: the output folder must not be the input folder (masks would
    land among the CTs, and a CT named without _0000 would be overwritten) nor an existing file, and must be
    writable."""
    if not in_dir.is_dir():
        raise InputError(in_dir, "image folder not found")
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve():
        raise InputError(out_dir, "the output folder is the input folder: masks would be written beside (or over) "
                                  "the CTs; give another output folder")
    check_writable(out_dir, "output folder")


def plan_cases(in_dir: Path, out_dir: Path, overwrite: bool) -> tuple[list[FolderCase], list[dict[str, Any]]]:
    """The cases of `in_dir` to predict, and report rows for the rest: entries that are not images (skipped),
    ids given by two files and outputs that would overwrite an input (failed), cases done in an earlier run
    (skipped, with the row that run kept: box, fallback, uncertainty and flag stay in the report)."""
    cases, skipped_entries, conflicts = list_images(in_dir)
    if not cases and not conflicts:
        raise InputError(in_dir, f"no CT images in the folder ({len(skipped_entries)} other entries); expected "
                                 "<id>_0000.nii.gz files (or .nii, .mha, .mhd, .nrrd, DICOM series sub-folders)")
    rows: list[dict[str, Any]] = []
    for entry, reason in skipped_entries:
        if entry.resolve() == out_dir.resolve():
            continue
        logger.info("skipping %s: %s", entry, reason)
        rows.append({"case_id": entry.name, "input_path": str(entry), "status": "skipped", "error": reason})
    for case_id, message in conflicts.items():
        logger.error("%s failed: %s", case_id, message)
        rows.append({"case_id": case_id, "input_path": str(in_dir), "status": "failed", "error": message})
    inputs = {p.resolve() for p in cases.values()} | {e.resolve() for e, _ in skipped_entries}
    todo: list[FolderCase] = []
    for case_id, path in cases.items():
        out_path = out_dir / output_name(case_id)
        if out_path.resolve() in inputs:
            message = f"{out_path}: the output would overwrite an input file; use another output folder"
            logger.error("%s failed: %s", case_id, message)
            rows.append({"case_id": case_id, "input_path": str(path), "output_path": str(out_path),
                         "status": "failed", "error": message})
            continue
        exists = out_path.is_file() and out_path.stat().st_size > 0
        if out_path.is_file() and not exists:
            logger.warning("%s: %s is empty (an interrupted write?); predicting it again", case_id, out_path)
        if exists and not overwrite:
            logger.info("skipping %s: %s exists (use --overwrite to redo it)", case_id, out_path)
            row = _stored_row(out_dir, case_id) or {}
            earlier = row.get("error")
            row.update({"case_id": case_id, "input_path": str(path), "output_path": str(out_path),
                        "status": "skipped", "error": "output exists (use --overwrite to redo it)"
                        + (f"; earlier run: {earlier}" if earlier else "")})
            rows.append(row)
        else:
            todo.append(FolderCase(case_id, path, out_path))
    return todo, rows


class ReadAhead:
    """Reads and checks the CTs of `cases` in order, up to `workers` + 1 of them ahead, in background threads."""

    def __init__(self, cases: Sequence[FolderCase], workers: int, pin: bool = False) -> None:
        self.paths = [c.input_path for c in cases]
        self.pin = pin  # page-locked arrays (for a CUDA predictor): the upload is then asynchronous
        self.workers = max(1, int(workers))
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="predict-read")
        self.pending: collections.deque[Future] = collections.deque()
        self.next_index = 0

    def next(self) -> Future:
        """The read of the next case: its result() is (array, meta, read_s) or raises the read/check error."""
        while self.next_index < len(self.paths) and len(self.pending) <= self.workers:
            self.pending.append(self.pool.submit(_read_case, self.paths[self.next_index], self.pin))
            self.next_index += 1
        return self.pending.popleft()

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


class CaseRunner:
    """Predicts one case at a time (after CUDA out of memory: once more on the GPU, then on the CPU) and writes its
    mask in a background thread while the next case computes; fills each case's report row."""

    def __init__(self, predictor: Predictor, options: PredictOptions, out_dir: Path,
                 on_row_done: Callable[[dict[str, Any]], None]) -> None:
        self.predictor = predictor
        self.cpu_predictor: Predictor | None = None
        self.options = options
        self.out_dir = out_dir
        self.on_row_done = on_row_done
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-write")
        self.writes: collections.deque[tuple[dict[str, Any], Future]] = collections.deque()

    def run(self, case: FolderCase, read: Future, row: dict[str, Any]) -> None:
        """Predict `case` (read by `read`) into `row`; its mask is queued for writing, failures land in the row."""
        case_id = case.case_id
        try:
            raw, meta, row["read_s"] = read.result()
        except Exception as exc:  # noqa: BLE001 - any failure is reported per case
            row["status"], row["error"] = "failed", _error_text(exc)
            logger.error("%s failed: %s", case_id, row["error"])
            self.on_row_done(row)
            return
        try:
            result, note = self._predict(raw, meta, case_id)
            if note:
                row["error"] = note
        except Exception as exc:  # noqa: BLE001
            row["status"], row["error"] = "failed", _error_text(exc)
            logger.exception("%s failed: %s", case_id, row["error"])
            self.on_row_done(row)
            return
        row.update(result.times)
        row.update(result.gpu.as_row())
        row.update({"device": result.device,
                    "coarse_box": format_box(result.crop), "fallback": result.fallback,
                    "uncertainty": result.uncertainty,
                    "flagged": (result.uncertainty is not None
                                and result.uncertainty > self.options.uncertainty_threshold)})
        if result.fallback:
            row["error"] = (row.get("error", "") + "; " if row.get("error") else "") + \
                "coarse mask empty: whole-volume fallback"
        overlays = self.options.overlays
        overlay_path = self.out_dir / f"{case_id}_overlay.png" if overlays else None
        self.writes.append((row, self.writer.submit(_write_case, result.mask, meta, case.output_path, overlay_path,
                                                    raw if overlays else None, case_id)))
        del raw, result
        while len(self.writes) > 1:  # bounded queue: at most one finished mask waits besides the one writing
            self._finish_write(*self.writes.popleft())

    @staticmethod
    def _attempt(predictor: Predictor, raw: np.ndarray, meta: ImageMeta, case_id: str) -> CaseResult | None:
        """`predictor.predict`, or None after a CUDA out-of-memory error (other errors propagate). Returning from
        here drops the exception and its traceback, whose frames hold the failed attempt's GPU tensors."""
        try:
            return predictor.predict(raw, meta, case_id)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are caught, the rest re-raised
            if not is_cuda_oom(exc):
                raise
            logger.warning("%s: CUDA out of memory: %s", case_id, str(exc).splitlines()[0] if str(exc) else "")
        return None

    def _predict(self, raw: np.ndarray, meta: ImageMeta, case_id: str) -> tuple[CaseResult, str | None]:
        """The case's result and a note for its row: after CUDA out of memory, free what the failed attempt held
        (outside its except block), retry once on the GPU, then on the CPU."""
        result = self._attempt(self.predictor, raw, meta, case_id)
        if result is not None:
            return result, None
        free_cuda_memory()
        result = self._attempt(self.predictor, raw, meta, case_id)
        if result is not None:
            return result, "CUDA out of memory; the retry on the GPU succeeded"
        free_cuda_memory()
        logger.warning("%s: CUDA out of memory twice; predicting this case on the CPU", case_id)
        if self.cpu_predictor is None:
            self.cpu_predictor = self.predictor.on_cpu()
        return self.cpu_predictor.predict(raw, meta, case_id), "CUDA out of memory twice; predicted on the CPU"

    def drain(self) -> None:
        """Wait for the queued writes and complete their rows."""
        while self.writes:
            self._finish_write(*self.writes.popleft())

    def close(self) -> None:
        self.writer.shutdown(wait=True)

    def _finish_write(self, row: dict[str, Any], future: Future) -> None:
        try:
            row["write_s"] = future.result()
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is reported per case
            row["status"], row["error"] = "failed", _error_text(exc)
            logger.error("%s: writing failed: %s", row["case_id"], row["error"])
        row["total_s"] = sum(row.get(k) or 0.0 for k in ("read_s", "coarse_s", "fine_s", "post_s", "write_s"))
        self.on_row_done(row)


def summarize(rows: list[dict[str, Any]], csv_path: Path, wall_s: float) -> dict[str, Any]:
    """The run's summary (see `predict_folder`), logged in one line."""
    counts = collections.Counter(r["status"] for r in rows)
    summary = {
        "ok": counts.get("ok", 0), "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
        "flagged": sum(1 for r in rows if r.get("flagged")), "rows": rows, "csv": str(csv_path),
        "wall_s": wall_s,
    }
    logger.info("predicted %d case(s), %d failed, %d skipped in %.1f s; report %s", summary["ok"],
                summary["failed"], summary["skipped"], summary["wall_s"], csv_path)
    return summary


def predict_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PredictOptions | None = None,
                   predictor: Predictor | None = None) -> dict[str, Any]:
    """Segment every CT in `in_dir` into `out_dir/<id>.nii.gz`; write `out_dir/predictions.csv`.

    `options` (default PredictOptions()) gives the folder options and, unless `predictor` is given, the
    networks'. Cases are read `options.workers` ahead in background threads (`ReadAhead`) and written by a
    background thread while the next case computes (`CaseRunner`). A bad case is named with its reason and the
    others go on. Raises InputError for a missing input folder and WeightsError for missing/corrupt weights
    (nothing is predicted then).

    Returns {"ok", "failed", "skipped", "flagged": counts, "rows": per-entry dicts (CSV_COLUMNS), "csv": path,
    "wall_s": seconds}.
    """
    from tqdm import tqdm

    options = options if options is not None else PredictOptions()
    t_start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_folders(in_dir, out_dir)
    csv_path = out_dir / "predictions.csv"
    with folder_lock(out_dir, "predict run"):
        for folder in (out_dir, out_dir / ROWS_DIR):
            remove_stale_temps(folder)
        todo, rows = plan_cases(in_dir, out_dir, options.overwrite)
        if todo and predictor is None:
            predictor = Predictor(options)

        def row_done(row: dict[str, Any]) -> None:
            write_json_atomic(row_path(out_dir, row["case_id"]), {k: row.get(k) for k in CSV_COLUMNS})
            write_report(csv_path, rows)

        pin = predictor is not None and getattr(predictor, "device", torch.device("cpu")).type == "cuda"
        reads = ReadAhead(todo, options.workers, pin=pin)
        runner = CaseRunner(predictor, options, out_dir, row_done)  # type: ignore[arg-type]
        try:
            bar = tqdm(todo, desc="predict", unit="case", disable=not options.progress)
            for case in bar:
                bar.set_postfix_str(case.case_id)
                row: dict[str, Any] = {"case_id": case.case_id, "input_path": str(case.input_path),
                                       "output_path": str(case.output_path), "status": "running"}
                rows.append(row)
                runner.run(case, reads.next(), row)
            runner.drain()
        finally:
            reads.close()
            runner.close()
        write_report(csv_path, rows)
    return summarize(rows, csv_path, time.perf_counter() - t_start)
