"""Synthetic abdominal CT phantoms with FLARE22-style 13-organ masks, for tests, demos and benchmarks.

Each case is a body ellipse-cylinder (skin, subcutaneous fat, muscle wall), a spine (vertebral body with cortical
rim, discs, canal, posterior elements), paraspinal and psoas muscles, lung bases and mediastinum above the
diaphragm domes, a fat/bowel-textured abdominal cavity, and the 13 FLARE22 organs at anatomically plausible
positions (patient right = -x in LPS). Organ shapes are randomly rotated, scaled and smoothly deformed
superellipsoids (solid organs) or tubes along smooth paths (aorta, IVC, esophagus, pancreas, duodenum). Organs are
painted in a fixed order and a later organ only takes voxels nobody owns yet, so masks never overlap; image
intensities are derived from the final label map, so every organ voxel carries its organ's HU.

Geometry: in-plane spacing 0.6-1.0 mm (times a size factor for the small sizes), slice spacing 1.5-5 mm for
`full`; random non-zero origin; about half the cases stored LPS (identity direction), the rest RAS-like
(direction diag(-1, -1, 1), array flipped in x and y so that physical positions are unchanged). Masks are written
with exactly their image's geometry.

A fraction of the unlabeled cases are "hard" (heavy noise, metal streaks, truncated field of view); which ones, and
how, is recorded in `<out>/synthetic_meta.json`.

Scan profiles (`--scan-profiles shift`, a model of FLARE22, whose labeled scans come from few centres and whose
unlabeled and test scans come from many): the labeled cases keep the one narrow profile (portal-venous phase,
normal noise, thin slices, no scanner offset); unlabeled and validation cases each draw a profile: contrast phase
(non-contrast / arterial / portal-venous organ HU), noise level (x1 / x2 / x3), slice thickness (thin, or thick:
a Gaussian partial-volume blur along z) and a scanner HU offset (-60..60). `strong_shift`: the same with noise
x1 / x3 / x5, slice blur 0 / 1.2 / 2.4 voxels and offsets -100..100. `fixed` (default): every case is drawn as
before. The profile is drawn from its own random stream, so geometry and anatomy do not change with it.

Anatomy (`--anatomy varied`): organ centres, radii, rotations, surface deformation, overall organ sizes, organ HU
and body build vary far more from case to case (`AnatomySpread`), so that a few labeled scans no longer show the
range the others cover. `standard` (default): the original spreads.

Truth of the unlabeled cases: their masks go to `trainu_mask_hidden/` (`HIDDEN_MASK_DIR`, named per case as
"hidden_mask" in synthetic_meta.json). No stage reads it; only benchmarks (true pseudo-label quality) do.

CLI: `python -m data_prepare.synthetic --out DIR --labeled N --unlabeled M --val K [--seed S]
[--size demo|full|tiny] [--hard-fraction 0.2] [--scan-profiles fixed|shift|strong_shift] [--anatomy standard|varied]
[--fold1-val N] [--workers W] [--overwrite]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from common.core.files import atomic_path, write_json_atomic, write_text_atomic
from common.core.labels import FLARE22
from common.core.logger import get_logger, progress, setup_logging
from data_prepare import FOLD1_VAL_LIST

logger = get_logger(__name__)

SIZES = ("full", "demo", "tiny")
HARD_KINDS = ("noise", "metal", "truncated_xy", "truncated_z")
# Split name -> (image folder, mask folder or None, file-list name, id format, seed code)
SPLITS: dict[str, tuple[str, str | None, str, str, int]] = {
    "train": ("train_images", "train_mask", "train_series_uids.txt", "train_{:03d}", 0),
    "trainu": ("trainu_images", None, "trainu_series_uids.txt", "trainu_{:04d}", 1),
    "val": ("val_images", "val_mask", "val_series_uids.txt", "validation_{:03d}", 2),
}
META_NAME = "synthetic_meta.json"
HIDDEN_MASK_DIR = "trainu_mask_hidden"  # truth of the unlabeled cases: for benchmarks only, never read by a stage
PROFILE_MODES = ("fixed", "shift", "strong_shift")
ANATOMY_MODES = ("standard", "varied")
PHASES = ("non_contrast", "arterial", "portal_venous")
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
LPS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
MIN_ORGAN_VOXELS = 6  # every organ keeps at least this many voxels in a standard case, whatever the size
NIFTI_COMPRESSION_LEVEL = 1  # gzip level: noisy CT barely compresses better at higher levels, and 1 is much faster

# Internal label ids beyond the 13 organs: sub-regions with their own HU that belong to an organ's mask.
_STOMACH_GAS, _RK_MEDULLA, _LK_MEDULLA = 14, 15, 16
_INTERNAL_TO_LABEL = np.array([*range(FLARE22.num_organs + 1), 11, 2, 13], dtype=np.uint8)
# Nominal HU per internal label (organ values after the design brief; contrast-enhanced portal-venous look).
_BASE_HU = np.array([0, 60, 150, 50, 45, 180, 120, 30, 30, 10, 40, 20, 30, 150, -850, 95, 95], dtype=np.float32)
# Amplitude (HU) of the low-frequency texture per internal label.
_TEXTURE_HU = np.array([0, 8, 10, 6, 6, 4, 4, 4, 4, 3, 5, 6, 6, 10, 40, 8, 8], dtype=np.float32)
_ENHANCING = (2, 5, 6, 13, 15, 16)  # labels whose HU scales with the per-case contrast factor


@dataclass(frozen=True)
class _SizeSpec:
    shape_yx: tuple[int, int]
    slices: tuple[int, int]  # inclusive range of the number of slices
    inplane_factor: float  # in-plane spacing = base spacing (0.6-1.0 mm) * factor, so the body always fits
    shape_step_mm: float  # organ shapes are evaluated on a grid of about this spacing, then interpolated


_SIZE_SPECS = {
    "full": _SizeSpec((512, 512), (80, 200), 1.0, 2.5),
    "demo": _SizeSpec((96, 96), (32, 64), 512 / 96, 2.0),
    "tiny": _SizeSpec((40, 48), (20, 20), 512 / 48, 2.0),
}


@dataclass
class CasePlan:
    """Everything drawn before any voxel is made: geometry, body build and hard-case kinds.

    Coordinates "array mm" are index * spacing in the LPS-ordered array (x = i*sx grows to patient left,
    y = j*sy grows posterior, z = k*sz grows superior). Anatomy coordinates (u, v, w) are array mm minus the body
    centre (bx, by) and the anatomy reference level bz (about the renal hilum).
    """

    size: str
    hard: bool
    hard_kinds: list[str]
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_lps_xyz: tuple[float, float, float]  # origin of the LPS-ordered array
    lps: bool
    scale_u: float
    scale_v: float
    scale_w: float
    body_half_u_mm: float
    body_half_v_mm: float
    body_exponent: float
    skin_mm: float
    fat_mm: float
    muscle_mm: float
    center_x_mm: float
    center_y_mm: float
    center_z_mm: float
    noise_sigma_hu: float
    truncation: str = ""  # "", "right", "left", "anterior", "top", "bottom"
    profile: "ScanProfile | None" = None  # None: the fixed look (same as NARROW_PROFILE)
    anatomy: str = "standard"  # how much organ placement, size and shape vary (ANATOMY_SPREADS)

    def meta(self) -> dict:
        """JSON-safe description recorded in synthetic_meta.json (geometry as stored)."""
        return {
            "hard": self.hard,
            "hard_kinds": list(self.hard_kinds),
            "spacing_zyx": list(self.spacing_zyx),
            "shape_zyx": list(self.shape_zyx),
            "origin_xyz": list(_stored_origin(self)),
            "lps": self.lps,
            "size": self.size,
            "noise_sigma_hu": round(self.noise_sigma_hu, 2),
            "truncation": self.truncation,
            "profile": (self.profile or NARROW_PROFILE).meta(),
            **({"anatomy": self.anatomy} if self.anatomy != "standard" else {}),
        }


@dataclass(frozen=True)
class ScanProfile:
    """How a scanner/protocol renders a case: contrast phase, noise factor, slice blur and HU offset."""

    phase: str = "portal_venous"
    noise_factor: float = 1.0  # multiplies the case's noise sigma
    slice_blur_vox: float = 0.0  # Gaussian sigma along z in voxels (thick-slice partial volume); 0: thin slices
    hu_offset: float = 0.0  # added to every voxel (scanner calibration)

    def meta(self) -> dict:
        return {"phase": self.phase, "noise_factor": self.noise_factor, "slice_blur_vox": self.slice_blur_vox,
                "hu_offset": round(self.hu_offset, 1)}


NARROW_PROFILE = ScanProfile()


@dataclass(frozen=True)
class AnatomySpread:
    """How much the anatomy varies from case to case (`--anatomy`). `standard` are the generator's original
    spreads (its output is unchanged); the others draw the same random numbers with wider ranges, plus (only
    when `organ_size` differs from (1, 1)) one overall size factor per organ."""

    body_scale: tuple[float, float] = (0.85, 1.08)  # abdominal cavity scale (uniform)
    position_sd_mm: float = 5.0  # organ centre offset (normal, per axis, times the body scale)
    radius_range: tuple[float, float] = (0.85, 1.15)  # per-axis radius factor (uniform)
    angle_sd_deg: float = 8.0  # organ axis rotation (normal, per angle)
    wave_amp: float = 0.1  # largest amplitude of each of the three shape deformation waves
    tube_sd_mm: float = 3.0  # tube control point offset (normal, per axis)
    organ_size: tuple[float, float] = (1.0, 1.0)  # overall size factor per organ (uniform, log scale)
    organ_hu_sd: float = 5.0  # per-case offset of each organ's HU (normal)


ANATOMY_SPREADS = {
    "standard": AnatomySpread(),
    # Organs placed, sized and shaped far less alike (a few scans no longer show the range): centres +-12 mm (sd),
    # radii 0.7-1.4 per axis and 0.75-1.35 per organ (enlarged or small organs), rotations of 20 degrees, twice
    # the surface deformation, wider body builds and organ HU varying by 15 HU (sd) from case to case.
    "varied": AnatomySpread(body_scale=(0.78, 1.1), position_sd_mm=12.0, radius_range=(0.7, 1.4), angle_sd_deg=20.0,
                            wave_amp=0.2, tube_sd_mm=7.0, organ_size=(0.75, 1.35), organ_hu_sd=15.0),
}


def draw_profile(rng: np.random.Generator) -> ScanProfile:
    """One of the wide set of profiles of the unlabeled and evaluation scans."""
    return ScanProfile(phase=str(rng.choice(PHASES)), noise_factor=float(rng.choice([1.0, 2.0, 3.0])),
                       slice_blur_vox=float(rng.choice([0.0, 1.2])), hu_offset=float(rng.uniform(-60.0, 60.0)))


def draw_strong_profile(rng: np.random.Generator) -> ScanProfile:
    """`strong_shift`: a profile further from the labeled cases' than `draw_profile`'s (low-dose noise up to x5,
    slices up to twice as thick, larger scanner offsets), which per-crop normalisation does not undo."""
    return ScanProfile(phase=str(rng.choice(PHASES)), noise_factor=float(rng.choice([1.0, 3.0, 5.0])),
                       slice_blur_vox=float(rng.choice([0.0, 1.2, 2.4])), hu_offset=float(rng.uniform(-100.0, 100.0)))


PROFILE_DRAWS = {"shift": draw_profile, "strong_shift": draw_strong_profile}


def _phase_contrast(phase: str, rng_contrast: float) -> dict[int, float]:
    """Contrast factor per enhancing internal label (HU = 40 + (base - 40) * factor) for a contrast phase."""
    if phase == "non_contrast":
        return {lab: 0.1 for lab in _ENHANCING}
    if phase == "arterial":  # aorta very bright, veins and parenchyma barely enhanced, renal cortex bright
        factors = {lab: 0.45 for lab in _ENHANCING}
        factors.update({5: 2.0, 6: 0.2, 15: 1.3, 16: 1.3})
        return factors
    return {lab: rng_contrast for lab in _ENHANCING}


@dataclass
class SyntheticCase:
    """One generated case, in its stored orientation (arrays (z, y, x))."""

    image: np.ndarray  # int16 HU
    mask: np.ndarray  # uint8 labels 0..13
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major as SimpleITK GetDirection
    plan: CasePlan = field(repr=False)


# ----------------------------------------------------------------------------------------------- plan


def _stored_origin(plan: CasePlan) -> tuple[float, float, float]:
    """Origin of the array as stored: RAS-like storage flips x and y, so the origin moves to the far corner."""
    ox, oy, oz = plan.origin_lps_xyz
    if plan.lps:
        return (ox, oy, oz)
    nz, ny, nx = plan.shape_zyx
    sz, sy, sx = plan.spacing_zyx
    return (round(ox + (nx - 1) * sx, 4), round(oy + (ny - 1) * sy, 4), oz)


def _organ_span_w(scale_w: float) -> tuple[float, float]:
    """Superior-inferior range (anatomy mm) a standard case must contain: kidney lower poles to liver dome."""
    return (-85.0 * scale_w, 155.0 * scale_w)


def _hard_kinds(rng: np.random.Generator, hard: bool) -> list[str]:
    """What makes a hard case hard: noise, metal, a truncated field of view (at least one)."""
    kinds: list[str] = []
    if hard:
        if rng.random() < 0.75:
            kinds.append("noise")
        if rng.random() < 0.45:
            kinds.append("metal")
        if rng.random() < 0.4:
            kinds.append("truncated_xy" if rng.random() < 0.5 else "truncated_z")
        if not kinds:
            kinds.append("noise")
    return kinds


@dataclass(frozen=True)
class _Build:
    """Body build: the abdominal cavity (inside the muscle wall) sets the anatomy scale; the body's half axes."""

    scale: float
    depth_ratio: float
    scale_w: float
    skin: float
    fat: float
    muscle: float
    exponent: float
    half_u: float
    half_v: float


def _draw_build(rng: np.random.Generator, spread: AnatomySpread, fov_x: float, fov_y: float) -> _Build:
    scale = float(rng.uniform(*spread.body_scale))
    depth_ratio = float(rng.uniform(0.92, 1.08))
    scale_w = scale * float(rng.uniform(0.92, 1.08))
    skin, fat, muscle = 2.0, float(rng.uniform(6.0, 35.0)), float(rng.uniform(8.0, 14.0))
    exponent = float(rng.uniform(2.0, 2.6))
    for _ in range(2):  # shrink the fat first, then the anatomy, until the body fits the field of view
        wall = skin + fat + muscle
        max_scale = min((0.47 * fov_x - wall) / 126.0, (0.47 * fov_y - wall) / (95.0 * depth_ratio))
        if max_scale >= 0.8 or fat <= 6.0:
            break
        fat = 6.0
    scale = min(scale, max_scale)
    return _Build(scale, depth_ratio, scale_w, skin, fat, muscle, exponent, half_u=126.0 * scale + wall,
                  half_v=95.0 * scale * depth_ratio + wall)


def _draw_placement(rng: np.random.Generator, fov_x: float, fov_y: float, build: _Build,
                    truncated_xy: bool) -> tuple[float, float, str]:
    """In-plane centre (x, y mm) and truncation side: centred with a little jitter, or pushed across a border for a
    truncated field of view."""
    half_u, half_v = build.half_u, build.half_v
    slack_x, slack_y = max(0.0, fov_x / 2 - half_u), max(0.0, fov_y / 2 - half_v)
    cx = fov_x / 2 + float(rng.uniform(-0.5, 0.5)) * slack_x
    cy = fov_y / 2 + float(rng.uniform(-0.5, 0.5)) * slack_y
    truncation = ""
    if truncated_xy:
        cut = float(rng.uniform(0.12, 0.25))
        truncation = str(rng.choice(["right", "left", "anterior"]))
        if truncation == "right":  # patient right = low x in LPS
            cx = half_u - 2 * half_u * cut
        elif truncation == "left":
            cx = fov_x - half_u + 2 * half_u * cut
        else:  # anterior = low y
            cy = half_v - 2 * half_v * cut
    return cx, cy, truncation


def _draw_slices(rng: np.random.Generator, size: str, scale_w: float,
                 truncated_z: bool) -> tuple[int, float, float, str]:
    """(slice count, spacing, anatomy reference level, "top"/"bottom"/""): full draws the slice spacing; small sizes
    spread a plausible extent over their slice count; a truncated z cuts through the upper or lower organs."""
    spec = _SIZE_SPECS[size]
    w_lo, w_hi = _organ_span_w(scale_w)
    need = w_hi - w_lo
    if size == "full":
        dz = round(float(rng.uniform(1.5, 5.0)), 3)
        nz = int(np.clip(round(float(rng.uniform(300.0, 420.0)) / dz), spec.slices[0], spec.slices[1]))
        nz = max(nz, min(spec.slices[1], math.ceil(need / dz) + 2))
    else:
        nz = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
        extent = need + float(rng.uniform(5.0, 40.0 if size == "tiny" else 140.0))
        dz = round(extent / (nz - 1), 3)
    extent_z = (nz - 1) * dz
    lo, hi = -w_lo, extent_z - w_hi  # admissible anatomy reference levels keeping the organs inside
    cz = float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2
    truncation = ""
    if truncated_z:
        if rng.random() < 0.5:
            truncation = "top"  # volume ends inside liver, spleen and stomach
            cz = extent_z - float(rng.uniform(40.0, 100.0)) * scale_w
        else:
            truncation = "bottom"  # volume starts inside the kidneys
            cz = -float(rng.uniform(-25.0, 15.0)) * scale_w
    return nz, dz, cz, truncation


def draw_plan(rng: np.random.Generator, size: str, hard: bool, anatomy: str = "standard") -> CasePlan:
    """Draw the geometry, body build and hard-case kinds of one case (cheap; no voxels)."""
    if size not in _SIZE_SPECS:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    if anatomy not in ANATOMY_SPREADS:
        raise ValueError(f"unknown anatomy {anatomy!r}; expected one of {ANATOMY_MODES}")
    ny, nx = _SIZE_SPECS[size].shape_yx
    base_spacing = float(rng.uniform(0.6, 1.0))
    sxy = round(base_spacing * _SIZE_SPECS[size].inplane_factor, 4)
    lps = bool(rng.random() < 0.5)
    kinds = _hard_kinds(rng, hard)
    fov_x, fov_y = (nx - 1) * sxy, (ny - 1) * sxy
    build = _draw_build(rng, ANATOMY_SPREADS[anatomy], fov_x, fov_y)
    cx, cy, truncation = _draw_placement(rng, fov_x, fov_y, build, "truncated_xy" in kinds)
    nz, dz, cz, truncation_z = _draw_slices(rng, size, build.scale_w, "truncated_z" in kinds)
    origin = (
        round(-fov_x / 2 + float(rng.uniform(-30.0, 30.0)), 2),
        round(-fov_y / 2 + float(rng.uniform(-60.0, 20.0)), 2),
        round(float(rng.uniform(-900.0, 300.0)), 2),
    )
    if origin[2] == 0.0:
        origin = (origin[0], origin[1], 0.5)
    sigma = float(rng.uniform(80.0, 150.0)) if "noise" in kinds else float(rng.uniform(10.0, 20.0))
    return CasePlan(
        size=size, hard=hard, hard_kinds=kinds, shape_zyx=(nz, ny, nx), spacing_zyx=(dz, sxy, sxy),
        origin_lps_xyz=origin, lps=lps, scale_u=build.scale, scale_v=build.scale * build.depth_ratio,
        scale_w=build.scale_w, body_half_u_mm=build.half_u, body_half_v_mm=build.half_v,
        body_exponent=build.exponent, skin_mm=build.skin, fat_mm=build.fat, muscle_mm=build.muscle, center_x_mm=cx,
        center_y_mm=cy, center_z_mm=cz, noise_sigma_hu=sigma, truncation=truncation_z or truncation,
        anatomy=anatomy,
    )


# ------------------------------------------------------------------------------------- shape machinery


class _Grid:
    """Voxel-centre coordinates of the LPS-ordered case array in anatomy mm, and a coarse evaluation grid."""

    def __init__(self, plan: CasePlan) -> None:
        self.shape = plan.shape_zyx
        nz, ny, nx = plan.shape_zyx
        sz, sy, sx = plan.spacing_zyx
        self.spacing = plan.spacing_zyx
        self.u = (np.arange(nx) * sx - plan.center_x_mm).astype(np.float32)
        self.v = (np.arange(ny) * sy - plan.center_y_mm).astype(np.float32)
        self.w = (np.arange(nz) * sz - plan.center_z_mm).astype(np.float32)
        step = _SIZE_SPECS[plan.size].shape_step_mm
        self.factor = (max(1, round(step / sz)), max(1, round(step / sy)), max(1, round(step / sx)))
        self.axes = (self.w, self.v, self.u)

    def box(self, lo_uvw: np.ndarray, hi_uvw: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Fine index slices (z, y, x) covering [lo, hi] (anatomy mm), aligned to the coarse grid; None if empty."""
        slices = []
        for axis, (lo, hi) in enumerate(zip(lo_uvw[::-1], hi_uvw[::-1])):
            coords, step, f = self.axes[axis], self.spacing[axis], self.factor[axis]
            n = len(coords)
            i0 = math.floor((lo - coords[0]) / step)
            i1 = math.ceil((hi - coords[0]) / step)
            i0, i1 = max(0, i0), min(n - 1, i1)
            if i1 < i0:
                return None
            i0 = (i0 // f) * f
            slices.append(slice(i0, i1 + 1))
        return tuple(slices)  # type: ignore[return-value]

    def coarse_coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Coordinates (w, v, u) of the coarse points for a fine box (starting at the box start)."""
        out = []
        for axis, sl in enumerate(box):
            f, step = self.factor[axis], self.spacing[axis]
            count = -(-(sl.stop - 1 - sl.start) // f) + 1
            out.append((self.axes[axis][sl.start] + np.arange(count) * f * step).astype(np.float32))
        return out

    def upsample(self, coarse: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Linearly interpolate a field on the coarse points of `box` onto the box's fine voxels."""
        out = coarse
        for axis, sl in enumerate(box):
            f = self.factor[axis]
            n_fine = sl.stop - sl.start
            if f == 1:
                out = out[(slice(None),) * axis + (slice(0, n_fine),)]
                continue
            out = _lerp_axis(out, np.arange(n_fine, dtype=np.float32) / f, axis)
        return out


def _lerp_axis(a: np.ndarray, t: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `a` along `axis` at fractional indices `t` (clamped to the ends)."""
    n = a.shape[axis]
    if n == 1:
        return np.repeat(a, len(t), axis=axis)
    i0 = np.clip(np.floor(t).astype(np.intp), 0, n - 2)
    w = np.clip(t - i0, 0.0, 1.0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    lo, hi = np.take(a, i0, axis=axis), np.take(a, i0 + 1, axis=axis)
    return lo + (hi - lo) * w


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Rotation matrix whose columns are the organ axes in (u, v, w): yaw about w, pitch about u, roll about v."""
    a, b, c = np.radians([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


@dataclass
class _Blob:
    """Rotated superellipsoid with a smooth sinusoidal deformation; field < 0 inside."""

    center: np.ndarray  # (u, v, w) mm
    radii: np.ndarray  # mm along the organ axes
    rot: np.ndarray  # 3x3, columns = organ axes
    exponent: float
    waves: list[tuple[np.ndarray, float, float]]  # (frequency vector in normalised coords, phase, amplitude)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        rho = 3.0 ** max(0.0, 0.5 - 1.0 / self.exponent) * (1.0 + sum(a for _, _, a in self.waves))
        half = rho * np.sqrt(((self.rot * self.radii[None, :]) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def field(self, w: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
        du = (u - self.center[0])[None, None, :]
        dv = (v - self.center[1])[None, :, None]
        dw = (w - self.center[2])[:, None, None]
        q = [(self.rot[0, k] * du + self.rot[1, k] * dv + self.rot[2, k] * dw) / self.radii[k] for k in range(3)]
        e = self.exponent
        if abs(e - 2.0) < 1e-6:
            f = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        else:
            f = (np.abs(q[0]) ** e + np.abs(q[1]) ** e + np.abs(q[2]) ** e) ** (1.0 / e)
        f -= 1.0
        for freq, phase, amp in self.waves:
            f += amp * np.sin(freq[0] * q[0] + freq[1] * q[1] + freq[2] * q[2] + phase)
        return f.astype(np.float32, copy=False)


def _union(fields: list[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]):
    def field(w: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.minimum.reduce([f(w, v, u) for f in fields])

    return field


@dataclass
class _Tube:
    """Tube of varying radius along a smooth path; field = min over path samples of distance/radius - 1."""

    points: np.ndarray  # (N, 3) samples (u, v, w) mm
    radii: np.ndarray  # (N,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radii[:, None]
        return (self.points - r).min(axis=0), (self.points + r).max(axis=0)

    def field(self, w: np.ndarray, v: np.ndarray, u: np.ndarray, reach_mm: float) -> np.ndarray:
        out = np.full((len(w), len(v), len(u)), 10.0, dtype=np.float32)
        for (pu, pv, pw), r in zip(self.points, self.radii):
            reach = 1.3 * r + reach_mm  # exact values near the surface; interpolation never sees the filler
            sl = []
            for coords, c in ((w, pw), (v, pv), (u, pu)):
                i0 = int(np.searchsorted(coords, c - reach))
                i1 = int(np.searchsorted(coords, c + reach, side="right"))
                sl.append(slice(i0, i1))
            if any(s.stop <= s.start for s in sl):
                continue
            d2 = ((w[sl[0]] - pw) ** 2)[:, None, None] + ((v[sl[1]] - pv) ** 2)[None, :, None]
            d2 = d2 + ((u[sl[2]] - pu) ** 2)[None, None, :]
            sub = out[sl[0], sl[1], sl[2]]
            np.minimum(sub, np.sqrt(d2) / r - 1.0, out=sub)
        return out


def _smooth_path(control: np.ndarray, step_mm: float) -> np.ndarray:
    """Chaikin-smoothed polyline through `control` (N, 3), resampled every `step_mm`."""
    pts = control
    for _ in range(3):
        q = 0.75 * pts[:-1] + 0.25 * pts[1:]
        r = 0.25 * pts[:-1] + 0.75 * pts[1:]
        pts = np.concatenate([pts[:1], np.stack([q, r], axis=1).reshape(-1, 3), pts[-1:]])
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0.0, arc[-1], max(2, int(math.ceil(arc[-1] / step_mm)) + 1))
    return np.stack([np.interp(s, arc, pts[:, k]) for k in range(3)], axis=1)


# --------------------------------------------------------------------------------------------- anatomy

# Reference anatomy for a cavity of half-width 126 mm and half-depth 95 mm (u: patient left, v: posterior,
# w: superior, mm from the body centre and the renal-hilum level). Blobs: centre, radii (u, v, w), yaw/pitch/roll.
_BLOBS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]] = {
    7: ((-38.0, 30.0, 38.0), (5.0, 13.0, 18.0), (-30.0, 0.0, 10.0)),  # right adrenal: above-medial of RK
    8: ((36.0, 28.0, 30.0), (5.0, 13.0, 18.0), (30.0, 0.0, -10.0)),  # left adrenal
    9: ((-45.0, -45.0, 20.0), (14.0, 16.0, 35.0), (10.0, 30.0, 0.0)),  # gallbladder under the liver
    2: ((-75.0, 45.0, -15.0), (28.0, 25.0, 52.0), (25.0, 0.0, -12.0)),  # right kidney (lower than the left)
    13: ((75.0, 45.0, -5.0), (28.0, 25.0, 52.0), (-25.0, 0.0, 12.0)),  # left kidney
    3: ((90.0, 25.0, 60.0), (22.0, 50.0, 45.0), (-35.0, 0.0, 10.0)),  # spleen, along the left posterior wall
    11: ((50.0, -30.0, 70.0), (45.0, 35.0, 55.0), (20.0, -20.0, 0.0)),  # stomach, left upper quadrant
}
_LIVER_LOBES = (
    ((-60.0, 5.0, 75.0), (68.0, 80.0, 72.0), (-8.0, 0.0, 5.0)),  # right lobe
    ((5.0, -45.0, 100.0), (60.0, 35.0, 38.0), (10.0, 0.0, 0.0)),  # left lobe, anterior across the midline
)
_TOP = 1.0e4  # placeholder "beyond the top of the volume" for tubes that continue into the chest
# Tubes: control points (u, v, w) and radii (mm) at the control points.
_TUBES: dict[int, tuple[list[tuple[float, float, float]], list[float]]] = {
    5: ([(26, 20, _TOP), (24, 19, 140), (15, 14, 60), (11, 11, 0), (9, 10, -95)], [11, 11, 10, 10, 9]),  # aorta
    6: ([(-24, 12, 160), (-26, 8, 100), (-24, 10, 40), (-20, 12, -20), (-14, 14, -95)], [12, 11, 11, 11, 10]),
    10: ([(4, 4, _TOP), (5, 4, 135), (10, 0, 115), (22, -6, 104)], [8, 8, 8, 9]),  # esophagus -> cardia
    4: ([(-32, -5, -10), (-10, -15, 0), (20, -5, 8), (55, 10, 18), (80, 25, 25)], [14, 12, 10, 9, 8]),  # pancreas
    12: (  # duodenum: bulb, descending, horizontal (anterior to IVC and aorta), ascending to the DJ flexure
        [(-8, -32, 12), (-35, -22, 10), (-52, -5, -5), (-50, 0, -35), (-30, -8, -50), (0, -10, -55),
         (20, -8, -45), (28, -10, -30)],
        [12, 11, 10, 10, 10, 10, 10, 10],
    ),
}
# Paint order: vessels and small organs first (they keep their voxels), the liver last (it wraps around them).
_PAINT_ORDER = (5, 6, 10, 7, 8, 9, 2, 13, 4, 12, 3, 11, 1)
_ABOVE_DIAPHRAGM_OK = frozenset({5, 6, 10})  # tubes that continue into the chest


def _draw_waves(rng: np.random.Generator, max_amp: float) -> list[tuple[np.ndarray, float, float]]:
    waves = []
    for _ in range(3):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-9
        waves.append((direction * rng.uniform(1.5, 3.5), float(rng.uniform(0, 2 * np.pi)),
                      float(rng.uniform(0.0, max_amp))))
    return waves


def _scaled(plan: CasePlan, uvw: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    return np.array([uvw[0] * plan.scale_u, uvw[1] * plan.scale_v, uvw[2] * plan.scale_w], dtype=np.float64)


def _organ_size_factor(rng: np.random.Generator, spread: AnatomySpread) -> float:
    """One overall size factor for an organ (log-uniform); no draw at all for the standard spread's (1, 1)."""
    lo, hi = spread.organ_size
    if lo == hi == 1.0:
        return 1.0
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _make_blob(rng: np.random.Generator, plan: CasePlan, spec, min_radius: float, size_factor: float = 1.0) -> _Blob:
    spread = ANATOMY_SPREADS[plan.anatomy]
    center, radii, angles = spec
    c = _scaled(plan, center) + rng.normal(0.0, spread.position_sd_mm, size=3) * plan.scale_u
    mean_scale = (plan.scale_u + plan.scale_v + plan.scale_w) / 3
    r = np.array(radii) * mean_scale * rng.uniform(*spread.radius_range, size=3)
    if size_factor != 1.0:
        r = r * size_factor
    r = np.maximum(r, min_radius)
    rot = _rotation(*(np.array(angles) + rng.normal(0.0, spread.angle_sd_deg, size=3)))
    return _Blob(c, r, rot, float(rng.uniform(1.9, 2.6)), _draw_waves(rng, spread.wave_amp))


def _make_tube(rng: np.random.Generator, plan: CasePlan, spec, min_radius: float, w_top: float) -> _Tube:
    spread = ANATOMY_SPREADS[plan.anatomy]
    control, radii = spec
    pts = np.array([_scaled(plan, p) for p in control])
    pts[:, 2] = np.minimum(pts[:, 2], w_top)  # chest-bound tubes end just above the volume
    pts[:, :2] += rng.normal(0.0, spread.tube_sd_mm, size=(len(pts), 2)) * plan.scale_u
    pts[1:-1, 2] += rng.normal(0.0, spread.tube_sd_mm, size=len(pts) - 2) * plan.scale_w
    r_ctrl = np.array(radii, dtype=np.float64) * plan.scale_u * rng.uniform(*spread.radius_range)
    size_factor = _organ_size_factor(rng, spread)
    if size_factor != 1.0:
        r_ctrl = r_ctrl * size_factor
    r_ctrl = np.maximum(r_ctrl, min_radius)
    step = 0.3 * float(r_ctrl.min())
    path = _smooth_path(pts, step)
    # Radius along the path: interpolate the control radii by arc fraction, plus a gentle ripple.
    t = np.linspace(0.0, 1.0, len(path))
    r = np.interp(t, np.linspace(0.0, 1.0, len(r_ctrl)), r_ctrl)
    r *= 1.0 + rng.uniform(0.0, 0.1) * np.sin(2 * np.pi * rng.uniform(1.0, 3.0) * t + rng.uniform(0, 2 * np.pi))
    return _Tube(path, np.maximum(r, min_radius))


# ----------------------------------------------------------------------------------------------- render


def _body_templates(plan: CasePlan, grid: _Grid) -> dict[str, np.ndarray]:
    """2D (y, x) templates: base HU for vertebra and disc slices, cavity mask, mediastinum mask, diaphragm level."""
    u = grid.u[None, :]
    v = grid.v[:, None]
    p = plan.body_exponent

    def ellipse(cu: float, cv: float, ru: float, rv: float, exponent: float = 2.0) -> np.ndarray:
        return (np.abs((u - cu) / ru) ** exponent + np.abs((v - cv) / rv) ** exponent) <= 1.0

    a, b = plan.body_half_u_mm, plan.body_half_v_mm
    base = np.full(np.broadcast_shapes(u.shape, v.shape), -1000.0, dtype=np.float32)
    base[ellipse(0, 0, a, b, p)] = 40.0  # skin
    t = plan.skin_mm
    base[ellipse(0, 0, a - t, b - t, p)] = -100.0  # subcutaneous fat
    t += plan.fat_mm
    base[ellipse(0, 0, a - t, b - t, p)] = 50.0  # muscle wall
    t += plan.muscle_mm
    cavity = ellipse(0, 0, a - t, b - t, p)
    su, sv = plan.scale_u, plan.scale_v
    muscles = np.zeros_like(cavity)
    psoas = np.zeros_like(cavity)  # only below the psoas origin (about L1); see _PSOAS_TOP_W
    for side in (-1, 1):
        muscles |= ellipse(side * 32 * su, 85 * sv, 22 * su, 18 * sv)  # erector spinae
        psoas |= ellipse(side * 36 * su, 44 * sv, 13 * su, 13 * sv)
    vert_body = ellipse(0, 45 * sv, 18 * su, 15 * sv)
    vert_inner = ellipse(0, 45 * sv, 18 * su - 2.5, 15 * sv - 2.5)
    canal = ellipse(0, 68 * sv, 8 * su, 7 * sv)
    posterior = ellipse(0, 68 * sv, 15 * su, 14 * sv) & (v > 62 * sv) & ~canal
    posterior |= ellipse(0, 90 * sv, 4 * su, 13 * sv)  # spinous process
    for side in (-1, 1):
        posterior |= ellipse(side * 25 * su, 64 * sv, 14 * su, 4.5 * sv)  # transverse processes
    bone = vert_body | posterior
    base[muscles & ellipse(0, 0, a, b, p)] = 50.0
    base[cavity & ~muscles & ~bone] = 0.0  # filled later with bowel/fat (or lung/mediastinum)
    vert = base.copy()
    vert[vert_body] = 950.0
    vert[vert_inner] = 450.0
    vert[posterior] = 800.0
    vert[canal] = 15.0
    disc = vert.copy()
    disc[vert_body] = 90.0
    cavity_free = cavity & ~muscles & ~bone & ~canal
    mediastinum = cavity_free & ellipse(5 * su, -25 * sv, 55 * su, 60 * sv)  # heart and mediastinum
    # Diaphragm: two domes (right higher); above it lie the lung bases and the mediastinum.
    domes = []
    for cu, top in ((-55.0, 150.0), (55.0, 135.0)):
        d2 = (u - cu * su) ** 2 + (v - 10.0 * sv) ** 2
        domes.append(top * plan.scale_w - d2 / (2 * 110.0 * su))
    diaphragm_w = np.maximum(domes[0], domes[1]).astype(np.float32)
    return {"vert": vert, "disc": disc, "cavity": cavity_free, "mediastinum": mediastinum,
            "diaphragm_w": diaphragm_w, "psoas": psoas & cavity_free}


def _texture(rng: np.random.Generator, grid: _Grid, step_mm: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Low-frequency random field of about unit variance with features of a few centimetres.

    Returned factored for slab-wise use: (field on coarse slices, already interpolated in-plane: (nz_c, ny, nx),
    fractional coarse-slice coordinate of every slice: (nz,)); see `_texture_slab`. Plain numpy (no BLAS calls:
    threaded BLAS stalls badly on a shared, loaded machine).
    """
    shape_c, coords = [], []
    for axis in range(3):
        n, s = grid.shape[axis], grid.spacing[axis]
        shape_c.append(int(math.ceil((n - 1) * s / step_mm)) + 2)
        coords.append(np.arange(n, dtype=np.float32) * np.float32(s / step_mm))
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape_c).astype(np.float32), 0.7, mode="wrap")
    coarse /= coarse.std() + 1e-6
    inplane = _lerp_axis(_lerp_axis(coarse, coords[2], 2), coords[1], 1)
    return inplane, coords[0]


def _texture_slab(inplane: np.ndarray, z_coords: np.ndarray, z0: int, z1: int) -> np.ndarray:
    """Slices z0..z1-1 of the texture field: linear interpolation between coarse slices."""
    return _lerp_axis(inplane, z_coords[z0:z1], 0)


def _paint(labels: np.ndarray, grid: _Grid, templates: dict[str, np.ndarray], label: int,
           shape: _Blob | _Tube | Callable, bounds: tuple[np.ndarray, np.ndarray], below_diaphragm: bool,
           ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Paint `label` where the shape's field < 0, the voxel is free and allowed. Returns (box, painted mask)."""
    box = grid.box(*bounds)
    if box is None:
        return None
    wc, vc, uc = grid.coarse_coords(box)
    if isinstance(shape, _Tube):
        reach = 2.0 * max(f * s for f, s in zip(grid.factor, grid.spacing))
        coarse = shape.field(wc, vc, uc, reach)
    elif isinstance(shape, _Blob):
        coarse = shape.field(wc, vc, uc)
    else:
        coarse = shape(wc, vc, uc)
    inside = grid.upsample(coarse, box) < 0.0
    zs, ys, xs = box
    allowed = templates["cavity"][ys, xs][None]
    if below_diaphragm:
        allowed = allowed & (grid.w[zs][:, None, None] < templates["diaphragm_w"][ys, xs][None])
    psoas_slices = grid.w[zs] < templates["psoas_top_w"]
    if psoas_slices.any():
        allowed = allowed & ~(templates["psoas"][ys, xs][None] & psoas_slices[:, None, None])
    sub = labels[box]
    region = inside & allowed & (sub == 0)
    sub[region] = label
    return box, region


def _ensure_min_voxels(labels: np.ndarray, grid: _Grid, centers: dict[int, np.ndarray]) -> None:
    """Force a small block for any organ left with fewer than MIN_ORGAN_VOXELS voxels (only in tiny grids)."""
    counts = np.bincount(_INTERNAL_TO_LABEL[labels].ravel(), minlength=FLARE22.num_organs + 1)
    for label in _PAINT_ORDER:
        if counts[label] >= MIN_ORGAN_VOXELS or label not in centers:
            continue
        idx = [int(np.argmin(np.abs(coords - c))) for coords, c in zip(grid.axes, centers[label][::-1])]
        block = tuple(slice(max(0, i - 1), i + 2) for i in idx)
        sub = labels[block]
        owner = _INTERNAL_TO_LABEL[sub]
        take = (owner == 0) | (counts[owner] > 20 * MIN_ORGAN_VOXELS)
        sub[take] = label
        counts = np.bincount(_INTERNAL_TO_LABEL[labels].ravel(), minlength=FLARE22.num_organs + 1)
        logger.debug("organ %d forced to %d voxels", label, counts[label])


def _metal_streaks(rng: np.random.Generator, grid: _Grid, plan: CasePlan,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A metal implant with bright/dark radial streaks over a run of slices: (streak pattern (y, x) HU,
    implant disk (y, x) bool, per-slice strength (z,) in 0..1)."""
    su, sv = plan.scale_u, plan.scale_v
    if rng.random() < 0.5:  # pedicle screw beside the vertebral body
        mu, mv = float(rng.choice([-1, 1])) * 12 * su, 58 * sv
    else:  # clip/implant somewhere in the abdomen
        mu, mv = float(rng.uniform(-60, 60)) * su, float(rng.uniform(-50, 20)) * sv
    mw = float(rng.uniform(-40, 80)) * plan.scale_w
    half_len = max(float(rng.uniform(8.0, 40.0)), grid.spacing[0])
    strength = (0.5 + 0.5 * np.cos(np.clip((grid.w - mw) / half_len, -1, 1) * np.pi / 2)).astype(np.float32)
    strength[np.abs(grid.w - mw) > half_len] = 0.0
    if not strength.any():  # the implant level fell outside the volume: put it on the nearest slice
        strength[int(np.argmin(np.abs(grid.w - mw)))] = 1.0
    du, dv = grid.u[None, :] - mu, grid.v[:, None] - mv
    theta, radius = np.arctan2(dv, du), np.hypot(du, dv)
    pattern = np.zeros(radius.shape, dtype=np.float32)
    for _ in range(int(rng.integers(8, 20))):
        angle = rng.uniform(-np.pi, np.pi)
        width = rng.uniform(0.01, 0.05)
        amp = rng.uniform(200.0, 900.0) * (1 if rng.random() < 0.5 else -1)
        diff = np.angle(np.exp(1j * (theta - angle)))
        pattern += (amp * np.exp(-((diff / width) ** 2))).astype(np.float32)
    pattern *= (1.0 / (1.0 + radius / 60.0)).astype(np.float32)
    pattern += (1500.0 * np.exp(-radius / 6.0)).astype(np.float32)  # blooming around the implant
    disk = radius <= rng.uniform(2.5, 5.0)
    if not disk.any():
        disk.flat[int(np.argmin(radius))] = True
    return pattern, disk, strength


_Shapes = dict[int, tuple[object, tuple[np.ndarray, np.ndarray], np.ndarray]]  # label: (field, bounds, centre)


def render(plan: CasePlan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Make the (image int16 HU, internal label uint8) arrays in LPS order (z, y, x) for a drawn plan."""
    grid = _Grid(plan)
    labels = np.zeros(plan.shape_zyx, dtype=np.uint8)
    templates = _body_templates(plan, grid)
    templates["psoas_top_w"] = np.float32(15.0 * plan.scale_w)
    shapes = _draw_shapes(rng, plan, grid)
    _paint_organs(labels, grid, templates, shapes)
    if not plan.truncation and plan.size != "full":
        _ensure_min_voxels(labels, grid, {lab: s[2] for lab, s in shapes.items()})
    image = _intensities(rng, plan, grid, templates, labels)
    profile = plan.profile or NARROW_PROFILE
    if profile.slice_blur_vox > 0:
        blurred = ndimage.gaussian_filter1d(image.astype(np.float32), profile.slice_blur_vox, axis=0)
        image = np.rint(blurred).astype(np.int16)
    return image, labels


def _draw_shapes(rng: np.random.Generator, plan: CasePlan, grid: _Grid) -> _Shapes:
    """Every organ's shape, drawn in a fixed order so that the case is a function of the rng alone."""
    min_radius = 0.9 * max(plan.spacing_zyx) if plan.size != "full" else 0.0
    w_top = float(grid.w[-1]) + 20.0
    spread = ANATOMY_SPREADS[plan.anatomy]
    shapes: _Shapes = {}
    for label in _PAINT_ORDER:
        if label in _TUBES:
            tube = _make_tube(rng, plan, _TUBES[label], min_radius, w_top)
            shapes[label] = (tube, tube.bounds(), tube.points[len(tube.points) // 2])
        elif label in _BLOBS:
            blob = _make_blob(rng, plan, _BLOBS[label], min_radius, _organ_size_factor(rng, spread))
            shapes[label] = (blob, blob.bounds(), blob.center)
        else:  # liver: union of two lobes
            factor = _organ_size_factor(rng, spread)
            lobes = [_make_blob(rng, plan, spec, min_radius, factor) for spec in _LIVER_LOBES]
            bounds = [lobe.bounds() for lobe in lobes]
            lo = np.minimum(bounds[0][0], bounds[1][0])
            hi = np.maximum(bounds[0][1], bounds[1][1])
            shapes[label] = (_union([lobe.field for lobe in lobes]), (lo, hi), lobes[0].center)
    return shapes


def _paint_organs(labels: np.ndarray, grid: _Grid, templates: dict[str, np.ndarray], shapes: _Shapes) -> None:
    """Paint the organs into `labels` in paint order, with the kidneys' darker cores and the stomach's gas cap."""
    for label in _PAINT_ORDER:
        shape, bounds, _ = shapes[label]
        painted = _paint(labels, grid, templates, label, shape, bounds, label not in _ABOVE_DIAPHRAGM_OK)
        if painted is None:
            continue
        box, region = painted
        if label in (2, 13):  # darker medulla/sinus in the kidney core
            blob = shape
            wc, vc, uc = grid.coarse_coords(box)
            core = (grid.upsample(blob.field(wc, vc, uc), box) < -0.4) & region
            labels[box][core] = _RK_MEDULLA if label == 2 else _LK_MEDULLA
        elif label == 11:  # gas cap in the non-dependent (anterior, upper) stomach
            blob = shape
            zs, ys, xs = box
            front = grid.v[ys][None, :, None] < blob.center[1] - 0.55 * blob.radii[1]
            upper = grid.w[zs][:, None, None] > blob.center[2]
            labels[box][region & front & upper] = _STOMACH_GAS


def _intensities(rng: np.random.Generator, plan: CasePlan, grid: _Grid, templates: dict[str, np.ndarray],
                 labels: np.ndarray) -> np.ndarray:
    """The HU image, slab by slab (cache-sized temporaries keep a 512x512x200 case within a few seconds)."""
    nz, ny, nx = plan.shape_zyx
    tex_coarse, tex_z = _texture(rng, grid)
    disc_period = 32.0 * plan.scale_w
    disc_phase = float(rng.uniform(0, disc_period))
    is_disc = np.mod(grid.w + disc_phase, disc_period) < 6.0
    psoas_slices = grid.w < templates["psoas_top_w"]
    hu = _BASE_HU.copy()
    profile = plan.profile or NARROW_PROFILE
    contrast = float(rng.uniform(0.75, 1.15))
    for lab, factor in _phase_contrast(profile.phase, contrast).items():
        hu[lab] = 40.0 + (hu[lab] - 40.0) * factor
    noise_sigma = np.float32(plan.noise_sigma_hu * profile.noise_factor)
    hu[1:FLARE22.num_organs + 1] += rng.normal(0.0, ANATOMY_SPREADS[plan.anatomy].organ_hu_sd,
                                               size=FLARE22.num_organs).astype(np.float32)
    metal = _metal_streaks(rng, grid, plan) if "metal" in plan.hard_kinds else None
    vert, disc, cavity = templates["vert"], templates["disc"], templates["cavity"]
    mediastinum, diaphragm_w, psoas = templates["mediastinum"], templates["diaphragm_w"], templates["psoas"]
    image = np.empty((nz, ny, nx), dtype=np.int16)
    slab = max(1, (1 << 20) // (ny * nx))
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        tex = _texture_slab(tex_coarse, tex_z, z0, z1)
        img = np.where(is_disc[z0:z1, None, None], disc, vert)
        above = grid.w[z0:z1, None, None] > diaphragm_w
        chest = np.where(mediastinum, 40.0 + 5.0 * tex, -850.0 + 30.0 * tex)
        bowel = -100.0 + 140.0 * np.clip(0.5 + 0.8 * tex, 0.0, 1.0)
        img = np.where(cavity, np.where(above, chest, bowel), img)
        img[psoas_slices[z0:z1, None, None] & psoas] = 50.0
        lab = labels[z0:z1]
        organ = lab > 0
        organ_lab = lab[organ]
        img[organ] = hu[organ_lab] + _TEXTURE_HU[organ_lab] * tex[organ]
        img += noise_sigma * rng.standard_normal(img.shape, dtype=np.float32)
        if profile.hu_offset:
            img += np.float32(profile.hu_offset)
        if metal is not None:
            pattern, disk, strength = metal
            for k in range(z0, z1):
                if strength[k] > 0:
                    img[k - z0] += strength[k] * pattern
                    img[k - z0][disk] = 3000.0
        np.clip(img, -1024.0, 3071.0, out=img)
        image[z0:z1] = np.rint(img, out=img)
    return image


def generate_case(rng: np.random.Generator, size: str = "demo", hard: bool = False,
                  anatomy: str = "standard") -> SyntheticCase:
    """Draw and render one case; arrays and geometry are in the stored orientation (LPS or RAS-like)."""
    plan = draw_plan(rng, size, hard, anatomy)
    image, internal = render(plan, rng)
    mask = _INTERNAL_TO_LABEL[internal]
    direction = LPS_DIRECTION
    if not plan.lps:
        image = np.ascontiguousarray(image[:, ::-1, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1, ::-1])
        direction = RAS_DIRECTION
    return SyntheticCase(image, mask, plan.spacing_zyx, _stored_origin(plan), direction, plan)


def make_case(rng: np.random.Generator, size: str = "demo", hard: bool = False,
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple[float, float, float],
                         tuple[float, ...]]:
    """One synthetic case: (image int16 (z, y, x) HU, mask uint8 (z, y, x), spacing_zyx mm, origin_xyz mm,
    direction (9 values, row-major)). Write both arrays with this geometry."""
    case = generate_case(rng, size, hard)
    return case.image, case.mask, case.spacing_zyx, case.origin_xyz, case.direction


# ---------------------------------------------------------------------------------------------- writing


def _write_nifti(array: np.ndarray, spacing_zyx, origin_xyz, direction, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    image.SetOrigin(tuple(float(o) for o in origin_xyz))
    image.SetDirection(tuple(float(d) for d in direction))
    with atomic_path(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True, compressionLevel=NIFTI_COMPRESSION_LEVEL)


def _case_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split][4], index])


def is_hard(index: int, seed: int, hard_fraction: float) -> bool:
    """Whether unlabeled case `index` is hard: evenly spread with a seed-dependent phase, so any prefix of the
    cases holds floor or ceil of fraction * count hard cases and adding cases never changes earlier ones."""
    frac = Fraction(hard_fraction).limit_denominator(1000)
    if frac <= 0:
        return False
    offset = int(np.random.default_rng([seed, 99]).integers(0, frac.denominator))
    k = index + offset
    return (k + 1) * frac.numerator // frac.denominator > k * frac.numerator // frac.denominator


def hidden_mask_path(out: str | Path, case_id: str) -> Path:
    """Where the truth of unlabeled case `case_id` is kept (benchmarks only)."""
    return Path(out) / HIDDEN_MASK_DIR / f"{case_id}.nii.gz"


def _case_paths(out: Path, split: str, case_id: str) -> tuple[Path, Path | None]:
    image_dir, mask_dir = SPLITS[split][0], SPLITS[split][1]
    image_path = out / image_dir / f"{case_id}_0000.nii.gz"
    mask_path = out / mask_dir / f"{case_id}.nii.gz" if mask_dir else None
    if split == "trainu":
        mask_path = hidden_mask_path(out, case_id)
    return image_path, mask_path


def _make_and_write(task: tuple[str, str, int, int, str, bool, str, bool, str, str]) -> tuple[str, dict, bool]:
    """Worker: (out, split, index, seed, size, hard, case_id, overwrite, profiles, anatomy) -> (case_id, meta,
    written)."""
    out, split, index, seed, size, hard, case_id, overwrite, profiles, anatomy = task
    out_path = Path(out)
    image_path, mask_path = _case_paths(out_path, split, case_id)
    rng = _case_rng(seed, split, index)
    plan = draw_plan(rng, size, hard, anatomy)
    if profiles in PROFILE_DRAWS and split != "train":
        plan.profile = PROFILE_DRAWS[profiles](np.random.default_rng([seed, SPLITS[split][4], index, 17]))
    meta = {"split": split, **plan.meta()}
    if split == "trainu":
        meta["hidden_mask"] = f"{HIDDEN_MASK_DIR}/{case_id}.nii.gz"
    if not overwrite and image_path.exists() and (mask_path is None or mask_path.exists()):
        return case_id, meta, False
    image, internal = render(plan, rng)
    mask = _INTERNAL_TO_LABEL[internal]
    direction = LPS_DIRECTION
    if not plan.lps:
        image, mask, direction = image[:, ::-1, ::-1], mask[:, ::-1, ::-1], RAS_DIRECTION
    origin = _stored_origin(plan)
    _write_nifti(np.ascontiguousarray(image), plan.spacing_zyx, origin, direction, image_path)
    if mask_path is not None:
        _write_nifti(np.ascontiguousarray(mask), plan.spacing_zyx, origin, direction, mask_path)
    meta["organs_present"] = [int(x) for x in np.unique(mask) if x > 0]
    return case_id, meta, True


def _dataset_problem(labeled: int, unlabeled: int, val: int, size: str, hard_fraction: float, profiles: str,
                     fold1_val: int, anatomy: str) -> str | None:
    """What is wrong with write_dataset's options, or None."""
    if size not in _SIZE_SPECS:
        return f"unknown size {size!r}; expected one of {SIZES}"
    if not 0.0 <= hard_fraction <= 1.0:
        return f"hard_fraction must be within [0, 1], got {hard_fraction}"
    if min(labeled, unlabeled, val) < 0:
        return "case counts must be non-negative"
    if profiles not in PROFILE_MODES:
        return f"unknown scan profiles {profiles!r}; expected one of {PROFILE_MODES}"
    if anatomy not in ANATOMY_MODES:
        return f"unknown anatomy {anatomy!r}; expected one of {ANATOMY_MODES}"
    if not 0 <= fold1_val <= labeled:
        return f"fold1_val must be within [0, labeled={labeled}], got {fold1_val}"
    return None


def _make_cases(tasks: Sequence[tuple], size: str, workers: int) -> tuple[dict[str, dict], int]:
    """Make and write every task's case (in `workers` processes); returns ({case_id: its meta}, cases written)."""
    meta: dict[str, dict] = {}
    written = 0
    bar = progress(total=len(tasks), desc=f"synthetic {size}", unit="case", disable=len(tasks) == 0)
    if workers > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for case_id, case_meta, did_write in pool.map(_make_and_write, tasks):
                meta[case_id] = case_meta
                written += did_write
                bar.update()
    else:
        for task in tasks:
            case_id, case_meta, did_write = _make_and_write(task)
            meta[case_id] = case_meta
            written += did_write
            bar.update()
    bar.close()
    return meta, written


def write_dataset(out: str | Path, labeled: int, unlabeled: int, val: int, seed: int = 0, size: str = "demo",
                  hard_fraction: float = 0.2, overwrite: bool = False, workers: int = 1,
                  profiles: str = "fixed", fold1_val: int = 0, anatomy: str = "standard") -> dict:
    """Write a synthetic dataset tree (DESIGN.md section 3) under `out`; returns the metadata written to
    `<out>/synthetic_meta.json`: {case_id: {"hard", "hard_kinds", "spacing_zyx", "lps", "split", ...}}.

    Labeled cases `train_%03d` (train_images + train_mask), unlabeled `trainu_%04d` (trainu_images, truth in
    trainu_mask_hidden/; a fraction `hard_fraction` of them hard), validation `validation_%03d` (val_images +
    val_mask), and
    file_list/{train,trainu,val}_series_uids.txt. Existing cases are skipped unless `overwrite`.
    `fold1_val` > 0: the last `fold1_val` labeled cases are listed in file_list/fold1_val_series_uids.txt, so
    data_prepare validates fold 1 on exactly them and trains on the other labeled cases (0: no such file).
    """
    problem = _dataset_problem(labeled, unlabeled, val, size, hard_fraction, profiles, fold1_val, anatomy)
    if problem:
        raise ValueError(problem)
    out = Path(out)
    counts = {"train": labeled, "trainu": unlabeled, "val": val}
    tasks = []
    ids: dict[str, list[str]] = {}
    for split, count in counts.items():
        id_format = SPLITS[split][3]
        ids[split] = [id_format.format(i) for i in range(count)]
        for i, case_id in enumerate(ids[split]):
            hard = split == "trainu" and is_hard(i, seed, hard_fraction)
            tasks.append((str(out), split, i, seed, size, hard, case_id, overwrite, profiles, anatomy))

    old_meta: dict = {}
    meta_path = out / META_NAME
    if meta_path.exists():
        try:
            old_meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old_meta = {}
    start = time.perf_counter()
    meta, written = _make_cases(tasks, size, workers)
    for case_id, entry in meta.items():  # keep what a skipped case's earlier run knew (organs present)
        if "organs_present" not in entry and "organs_present" in old_meta.get(case_id, {}):
            entry["organs_present"] = old_meta[case_id]["organs_present"]

    for split, names in ids.items():
        write_text_atomic(out / "file_list" / SPLITS[split][2], "".join(f"{n}\n" for n in names))
    if fold1_val:
        write_text_atomic(out / "file_list" / FOLD1_VAL_LIST, "".join(f"{n}\n" for n in ids["train"][-fold1_val:]))
    for split in ("train", "val"):  # empty splits still get their folders, as the tree expects
        (out / SPLITS[split][0]).mkdir(parents=True, exist_ok=True)
        (out / SPLITS[split][1]).mkdir(parents=True, exist_ok=True)  # type: ignore[operator]
    (out / SPLITS["trainu"][0]).mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta_path, meta)
    logger.info("synthetic dataset %s: %d cases written, %d kept, %.1f s", out, written, len(tasks) - written,
                time.perf_counter() - start)
    return meta


LAYOUTS = ("original", "nnunet")
NNUNET_STAGING = ".synthetic_original"  # the original-layout cases an nnU-Net dataset is made from (kept for reruns)
# Names of the phantoms' organs a chosen subset may use: FLARE22's (with underscores) and common dataset.json keys.
ORGAN_IDS: dict[str, int] = {label.key: label.id for label in FLARE22} | {
    "kidney_right": 2, "kidney_left": 13, "ivc": 6, "adrenal_gland_right": 7, "adrenal_gland_left": 8,
    "gall_bladder": 9}


def organ_mapping(organs: Sequence[str] | None) -> tuple[np.ndarray, dict[str, int]]:
    """(FLARE22 label -> new label lookup (256,), dataset.json `labels`) of a chosen organ subset, in its order
    (None: all 13 FLARE22 organs under their names). ValueError naming an unknown or repeated organ."""
    names = [label.key for label in FLARE22] if organs is None else [o.strip() for o in organs if o.strip()]
    unknown = [n for n in names if n not in ORGAN_IDS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"organs {names}: each must be one of {sorted(ORGAN_IDS)}, once")
    lookup = np.zeros(256, dtype=np.uint8)
    for new_id, name in enumerate(names, start=1):
        lookup[ORGAN_IDS[name]] = new_id
    return lookup, {"background": 0, **{name: i for i, name in enumerate(names, start=1)}}


def write_nnunet_dataset(out: str | Path, organs: Sequence[str] | None = None, **kwargs) -> dict:
    """The synthetic dataset in nnU-Net v2's raw layout, with `organs` as its labels (see `organ_mapping`):
    dataset.json, imagesTr/ + labelsTr/ (labeled), imagesTs/ + labelsTs/ (validation), imagesUnlabeled/ (the
    unlabeled cases; their truth relabelled in trainu_mask_hidden/), synthetic_meta.json. The phantoms are those
    `write_dataset(**kwargs)` writes, made under out/.synthetic_original/ (images are hard links of those; masks
    are relabelled, the other organs becoming background). Returns the metadata."""
    out = Path(out)
    lookup, labels = organ_mapping(organs)
    staging = out / NNUNET_STAGING
    meta = write_dataset(staging, **kwargs)
    folders = {"train_images": "imagesTr", "val_images": "imagesTs", "trainu_images": "imagesUnlabeled",
               "train_mask": "labelsTr", "val_mask": "labelsTs", HIDDEN_MASK_DIR: HIDDEN_MASK_DIR}
    for source, target in folders.items():
        (out / target).mkdir(parents=True, exist_ok=True)
        for path in sorted((staging / source).glob("*.nii.gz")):
            dest = out / target / path.name
            if dest.exists():
                continue
            if source.endswith("images"):
                os.link(path, dest)
            else:
                image = sitk.ReadImage(str(path))
                relabelled = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(image)])
                relabelled.CopyInformation(image)
                with atomic_path(dest, suffix=".nii.gz") as tmp:
                    sitk.WriteImage(relabelled, str(tmp), useCompression=True,
                                    compressionLevel=NIFTI_COMPRESSION_LEVEL)
    dataset = {"name": out.name, "channel_names": {"0": "CT"}, "labels": labels,
               "numTraining": len(list((out / "imagesTr").glob("*.nii.gz"))), "file_ending": ".nii.gz"}
    write_json_atomic(out / "dataset.json", dataset)
    write_json_atomic(out / META_NAME, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prepare.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write (train_images/, train_mask/, ...)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases (train_%%03d)")
    parser.add_argument("--unlabeled", type=int, default=8, help="unlabeled training cases (trainu_%%04d)")
    parser.add_argument("--val", type=int, default=2, help="validation cases (validation_%%03d, masks in val_mask/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=SIZES, default="demo",
                        help="full: ~512x512 x 80-200 slices; demo: 96x96 x 32-64; tiny: 20x40x48 (tests)")
    parser.add_argument("--hard-fraction", type=float, default=0.2, help="fraction of unlabeled cases made hard")
    parser.add_argument("--scan-profiles", choices=PROFILE_MODES, default="fixed",
                        help="shift: labeled cases from one narrow scan profile, unlabeled and validation cases "
                             "from all (contrast phase, noise, slice thickness, HU offset); strong_shift: the same, "
                             "further from the labeled profile (noise up to x5, thicker slices, larger offsets)")
    parser.add_argument("--anatomy", choices=ANATOMY_MODES, default="standard",
                        help="varied: organ placement, size, shape and HU vary far more from case to case "
                             "(AnatomySpread); standard: the original spreads")
    parser.add_argument("--fold1-val", type=int, default=0,
                        help="list the last N labeled cases in file_list/fold1_val_series_uids.txt: data_prepare "
                             "then validates fold 1 on exactly them (0: no list, data_prepare's val_ratio draw)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating cases in parallel")
    parser.add_argument("--layout", choices=LAYOUTS, default="original",
                        help="original: the release's folders (train_images/, ...); nnunet: nnU-Net v2 raw layout "
                             "(dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/, imagesUnlabeled/)")
    parser.add_argument("--organs", default=None,
                        help="nnunet layout: comma-separated organs in label order, e.g. "
                             "liver,spleen,kidney_left,kidney_right (default: the 13 FLARE22 organs)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate cases that already exist")
    args = parser.parse_args(argv)
    setup_logging(None)
    kwargs = dict(labeled=args.labeled, unlabeled=args.unlabeled, val=args.val, seed=args.seed, size=args.size,
                  hard_fraction=args.hard_fraction, overwrite=args.overwrite, workers=args.workers,
                  profiles=args.scan_profiles, fold1_val=args.fold1_val, anatomy=args.anatomy)
    problem = _dataset_problem(args.labeled, args.unlabeled, args.val, args.size, args.hard_fraction,
                               args.scan_profiles, args.fold1_val, args.anatomy)
    if problem is not None:  # checked before anything is written, as write_dataset would
        parser.error(problem.replace("fold1_val", "--fold1-val").replace("hard_fraction", "--hard-fraction"))
    organs = args.organs.split(",") if args.organs else None
    if args.layout == "nnunet":
        try:
            organ_mapping(organs)
        except ValueError as exc:
            parser.error(f"--organs: {exc}")
        meta = write_nnunet_dataset(args.out, organs, **kwargs)
    else:
        meta = write_dataset(args.out, **kwargs)
    print(f"{'case':<18} {'split':<7} {'shape_zyx':<16} {'spacing_zyx':<22} {'orient':<6} hard")
    for case_id, entry in meta.items():
        shape = "x".join(str(n) for n in entry["shape_zyx"])
        spacing = ",".join(f"{s:.3g}" for s in entry["spacing_zyx"])
        kinds = "+".join(entry["hard_kinds"]) if entry["hard"] else "-"
        print(f"{case_id:<18} {entry['split']:<7} {shape:<16} {spacing:<22} {'LPS' if entry['lps'] else 'RAS':<6} "
              f"{kinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
