"""common.infer.overlay: PNG encoding (checked by decoding it back), text, rendering and the file writer."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from common.core.labels import FLARE22
from common.infer.overlay import (
    _GLYPHS,
    draw_text,
    encode_png,
    label_colour,
    organ_centre,
    render_overlay,
    write_overlay,
)


def decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for the files we write (8-bit RGB, filter 0): checks signature, CRCs and IDAT size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.uint8))


def test_font_covers_organ_names_and_draws():
    for label in FLARE22:
        assert all(ch.upper() in _GLYPHS for ch in label.name)
    assert all(len(rows) == 7 and all(len(r) == 5 for r in rows) for rows in _GLYPHS.values())
    image = np.zeros((20, 80, 3), np.uint8)
    end = draw_text(image, "Liver 1", 2, 2, colour=(255, 0, 0), scale=2)
    assert end > 2 and image[..., 0].any() and not image[..., 1].any()
    draw_text(image, "clipped at the border~", 15, 70)  # clipping and unknown characters do not raise


def _phantom():
    z, y, x = np.meshgrid(np.arange(24), np.arange(40), np.arange(36), indexing="ij")
    ct = np.full((24, 40, 36), -1000, np.int16)
    ct[(y - 20) ** 2 + (x - 18) ** 2 < 15 ** 2] = 40
    labels = np.zeros(ct.shape, np.uint8)
    labels[(z - 12) ** 2 + (y - 22) ** 2 + (x - 12) ** 2 < 36] = 1
    labels[(z - 10) ** 2 + (y - 18) ** 2 + (x - 26) ** 2 < 16] = 13
    return ct, labels


def test_render_overlay_colours_legend_and_aspect():
    ct, labels = _phantom()
    image = render_overlay(ct, labels, (5.0, 0.8, 0.8), title="case_01", panel_height_px=120)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] >= 120
    # organ colours are blended into the panels and drawn as legend swatches
    swatch = np.array(label_colour(13), np.uint8)
    assert (image == swatch).all(axis=2).sum() >= 14 * 14
    assert (image == np.array(label_colour(1), np.uint8)).all(axis=2).sum() >= 14 * 14
    # the axial panel is square-ish (32 x 28.8 mm), the coronal one wide (28.8 mm across, 120 mm high -> narrow)
    assert organ_centre(labels)[0] in range(9, 14)


def test_render_overlay_without_organs():
    ct, labels = _phantom()
    image = render_overlay(ct, np.zeros_like(labels), (2.0, 1.0, 1.0))
    assert image.shape[2] == 3
    assert organ_centre(np.zeros_like(labels)) == (12, 20, 18)


def test_write_overlay_is_a_valid_png(tmp_path):
    ct, labels = _phantom()
    path = write_overlay(tmp_path / "c_overlay.png", ct, labels, (5.0, 0.8, 0.8), (False, True, True), title="c")
    image = decode_png(path.read_bytes())
    assert image.shape[0] >= 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
