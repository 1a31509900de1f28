"""The red-team pass (tests/red_team.py): every probe's exit code, message, no traceback, inputs unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_bad_input_is_handled_and_no_input_changes(tmp_path):
    # its own process: the script wraps the entry points to checksum inputs right before each one runs
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "red_team.py"), "--work", str(tmp_path / "w")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok  ", "FAIL"))]
    assert len(lines) == 28, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and all(line.startswith("ok") for line in lines), "\n".join(lines)
