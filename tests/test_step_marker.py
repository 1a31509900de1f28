"""Tests for common.storage.step_marker: the one way steps record that they are done and from what."""

from __future__ import annotations

import os

from common.storage.step_marker import file_stamp, marker_matches, read_marker, write_marker


def test_marker_matches_its_inputs_and_a_changed_input_does_not(tmp_path):
    source = tmp_path / "input.bin"
    source.write_bytes(b"abc")
    inputs = {"source": file_stamp(source), "keep": (1, 2)}
    marker = tmp_path / "out" / "step.json"
    assert not marker_matches(marker, inputs)            # no marker: not done
    write_marker(marker, inputs)
    assert marker_matches(marker, inputs)                # tuples compare as the JSON lists they are stored as
    os.utime(source, ns=(1, 1))
    assert not marker_matches(marker, {"source": file_stamp(source), "keep": (1, 2)})
    marker.write_text("{broken")
    assert read_marker(marker) is None and not marker_matches(marker, inputs)
