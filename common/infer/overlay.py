"""PNG overlays of a predicted mask: an axial and a coronal slice of the CT with organs in colour, and a legend.

Dependency-free: the PNG is written with zlib + struct and the legend text with a built-in 5x7 bitmap font.
Slices go through the centre of the labelled voxels and are shown in radiological convention (patient's right
on the image's left, anterior up in the axial view, head up in the coronal view), with square physical pixels.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from common.core.files import write_bytes_atomic
from common.core.labels import FLARE22, LabelSet

# Display window for abdominal soft tissue, in HU.
DISPLAY_WINDOW_HU = (-160.0, 240.0)
ALPHA = 0.45
PANEL_HEIGHT_PX = 320
FONT_SCALE = 2

# Label colours (RGB): label l gets PALETTE[(l - 1) % 13], so FLARE22's 13 organs each have their own.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 80, 60), (70, 170, 70), (60, 110, 220), (240, 200, 40), (230, 30, 30), (60, 200, 220), (240, 120, 200),
    (190, 100, 240), (120, 230, 120), (240, 150, 60), (170, 120, 80), (250, 240, 150), (30, 140, 140),
)


def label_colour(label: int) -> tuple[int, int, int]:
    """The colour of label `label` (>= 1)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]

# 5x7 glyphs, one string of 5 cells per row ('#' = ink). Lower case is drawn as upper case.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    " ": (".....",) * 7,
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _GLYPHS.items()}
GLYPH_W, GLYPH_H = 5, 7


# ------------------------------------------------------------------------------------------------ PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image (8-bit truecolour, no filtering, zlib level 6)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG, atomically (its size checked before the rename)."""
    write_bytes_atomic(path, encode_png(rgb))


# ------------------------------------------------------------------------------------------------ drawing


def draw_text(image: np.ndarray, text: str, top: int, left: int, colour: Sequence[int] = (255, 255, 255),
              scale: int = FONT_SCALE) -> int:
    """Draw `text` in place with the 5x7 font (unknown characters as '?'); returns the x after the text."""
    x = left
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT["?"])
        big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        h, w = big.shape
        region = image[top:top + h, x:x + w]
        if region.shape[:2] != big.shape:  # clipped at the border
            big = big[:region.shape[0], :region.shape[1]]
        region[big] = colour
        x += (GLYPH_W + 1) * scale
    return x


def _resample_rows_cols(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, ...) array."""
    rows = np.minimum((np.arange(out_h) + 0.5) * image.shape[0] / out_h, image.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * image.shape[1] / out_w, image.shape[1] - 1).astype(np.int64)
    return image[rows][:, cols]


def _panel(ct_slice: np.ndarray, label_slice: np.ndarray, spacing_rc: Sequence[float], height_px: int) -> np.ndarray:
    """RGB panel of one slice (rows, cols), organs blended in colour, scaled to square physical pixels."""
    lo, hi = DISPLAY_WINDOW_HU
    grey = np.clip((ct_slice.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    palette = np.zeros((256, 3), dtype=np.float32)
    for label in range(1, 256):
        palette[label] = label_colour(label)
    labelled = label_slice > 0
    rgb[labelled] = (1 - ALPHA) * rgb[labelled] + ALPHA * palette[label_slice[labelled]]
    extent_r, extent_c = ct_slice.shape[0] * spacing_rc[0], ct_slice.shape[1] * spacing_rc[1]
    out_h = height_px
    out_w = max(1, int(round(height_px * extent_c / max(extent_r, 1e-6))))
    return _resample_rows_cols(rgb.astype(np.uint8), out_h, out_w)


def organ_centre(labels_zyx: np.ndarray) -> tuple[int, int, int]:
    """Centre (z, y, x) of the labelled voxels (volume centre if none), from a subsampled grid."""
    step = tuple(max(1, n // 128) for n in labels_zyx.shape)
    sub = labels_zyx[::step[0], ::step[1], ::step[2]] > 0
    if not sub.any():
        return tuple(n // 2 for n in labels_zyx.shape)  # type: ignore[return-value]
    centre = []
    for axis in range(3):
        profile = sub.sum(axis=tuple(a for a in range(3) if a != axis))
        index = np.arange(profile.size) * step[axis]
        centre.append(int(round(float((profile * index).sum() / profile.sum()))))
    return tuple(min(c, n - 1) for c, n in zip(centre, labels_zyx.shape))  # type: ignore[return-value]


def render_overlay(ct_zyx: np.ndarray, labels_zyx: np.ndarray, spacing_zyx: Sequence[float],
                   title: str = "", panel_height_px: int = PANEL_HEIGHT_PX, labels: LabelSet = FLARE22) -> np.ndarray:
    """(H, W, 3) uint8 image: axial and coronal slices through the organs' centre plus a legend.

    ct_zyx (HU) and labels_zyx (uint8) are in the canonical orientation (reference 1.2: index z towards the head,
    y towards anterior, x towards the patient's right), as `to_canonical` gives them.
    """
    if ct_zyx.shape != labels_zyx.shape:
        raise ValueError(f"CT {ct_zyx.shape} and labels {labels_zyx.shape} differ in shape")
    zc, yc, _ = organ_centre(labels_zyx)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    # Radiological display: anterior up (flip y), patient's right on the left (flip x), head up (flip z).
    axial = _panel(ct_zyx[zc][::-1, ::-1], labels_zyx[zc][::-1, ::-1], (sy, sx), panel_height_px)
    coronal = _panel(ct_zyx[:, yc][::-1, ::-1], labels_zyx[:, yc][::-1, ::-1], (sz, sx), panel_height_px)

    counts = np.bincount(np.asarray(labels_zyx, dtype=np.uint8).reshape(-1), minlength=labels.num_organs + 1)
    present = [int(v) for v in np.flatnonzero(counts[:labels.num_organs + 1]) if v > 0]
    line_h = (GLYPH_H + 3) * FONT_SCALE
    names = [label.name for label in labels]
    legend_w = (max(len(n) for n in names) + 3) * (GLYPH_W + 1) * FONT_SCALE + 12
    height = max(panel_height_px, (len(present) + 3) * line_h + 8)
    gap = 6
    width = axial.shape[1] + coronal.shape[1] + legend_w + 3 * gap
    image = np.full((height, width, 3), 24, dtype=np.uint8)
    image[:axial.shape[0], gap:gap + axial.shape[1]] = axial
    x_cor = 2 * gap + axial.shape[1]
    image[:coronal.shape[0], x_cor:x_cor + coronal.shape[1]] = coronal
    x_leg = x_cor + coronal.shape[1] + gap
    y = 6
    if title:
        draw_text(image, title[:max(1, (legend_w - 12) // ((GLYPH_W + 1) * FONT_SCALE))], y, x_leg)
        y += line_h
    draw_text(image, f"axial z={zc} coronal y={yc}", y, x_leg, colour=(180, 180, 180), scale=1)
    y += line_h
    if not present:
        draw_text(image, "no organs", y, x_leg, colour=(200, 200, 200))
    for label in present:
        box = GLYPH_H * FONT_SCALE
        image[y:y + box, x_leg:x_leg + box] = label_colour(label)
        draw_text(image, f"{label} {labels[label].name}", y, x_leg + box + 6)
        y += line_h
    return image


def write_overlay(path: str | os.PathLike, ct_zyx: np.ndarray, labels_zyx: np.ndarray, spacing_zyx: Sequence[float],
                  flips: Sequence[bool], title: str = "", labels: LabelSet = FLARE22) -> Path:
    """Render an overlay of arrays in the file's order (`flips` from `canonical_flips`) and write it as PNG."""
    index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    write_png(path, render_overlay(ct_zyx[index], labels_zyx[index], spacing_zyx, title=title, labels=labels))
    return Path(path)
