"""What the benchmarks that run the stages share: one subprocess step (its log file, its done marker, the row it
is a cost of), how it runs (threads, PYTHONPATH, the tail of its log on failure), and the override spellings."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from common.core.errors import InputError
from common.core.typed_config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def exit_code_of(body: Callable[[], int]) -> int:
    """`body()`'s exit code; a bad input or config (InputError, ConfigError: a missing run folder, a round that has
    not run) is one line on stderr naming it, and exit code 2, instead of a traceback."""
    try:
        return body()
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cube(n: int) -> str:
    return f"[{n},{n},{n}]"


def int_list(values: Sequence[int]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


@dataclass(frozen=True)
class Step:
    """One subprocess of the pipeline: `name` (its log file), argv, and a marker that says it is done."""

    name: str
    argv: list[str]
    done_marker: Path | None = None  # skip the step when this file exists (stages skip themselves otherwise)
    row: str | None = None  # the row whose own cost this step is (None: shared by several rows)


class StepFailed(RuntimeError):
    pass


def _env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_step(step: Step, log_dir: Path, t0: float, threads: int | None = None, tag: str = "") -> float:
    """Run one step with its output in `log_dir/<name>.log`; returns its wall time (0 when skipped)."""
    if step.done_marker is not None and step.done_marker.is_file():
        print(f"  [{time.perf_counter() - t0:7.0f} s] {tag}{step.name}: done before ({step.done_marker.name} "
              "exists)", flush=True)
        return 0.0
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{step.name}.log"
    print(f"  [{time.perf_counter() - t0:7.0f} s] {tag}{step.name} ...", flush=True)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(step.argv)}\n")
        handle.flush()
        proc = subprocess.run(step.argv, cwd=ROOT, env=_env(threads), stdout=handle, stderr=subprocess.STDOUT,
                              check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise StepFailed(f"step {step.name} failed with exit code {proc.returncode} after {wall:.0f} s\n"
                         f"command: {shlex.join(step.argv)}\nlog: {log}\n--- last lines ---\n{tail}")
    return wall
