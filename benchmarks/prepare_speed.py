"""Speed of data_prepare on full-size synthetic CTs (512 x 512 x 80..200 int16): cases per minute.

Generates N cases (half labeled, half unlabeled) with data_prepare.synthetic, then prepares them twice in the
same run with the stage's default sizes (160^3 coarse, 192^3 fine): with the configured worker processes and
with one worker (in-process), each from scratch (overwrite=true). The time is the whole `main()` call: worker
start-up, reading, resizing, writing npy and LMDB, the split. DESIGN 6 bar: >= 20 cases of 512x512x200 per
minute on 2 cores; the "200-slice equivalent" figure scales by the mean slice count of the generated cases.

    PYTHONPATH=. .venv/bin/python benchmarks/prepare_speed.py [--cases 6] [--workers 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from common.config import PrepareConfig
from common.core.typed_config import load_config
from common.storage.lmdb_store import open_store
from data_prepare.run import STAGE_DIR, main
from data_prepare.synthetic import write_dataset


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished (waited-for) children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare_once(base: Path, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one full preparation of the dataset at `base` (everything redone).

    The CPU time includes the worker processes (the pool joins them before main() returns).
    """
    cfg = load_config(PrepareConfig, STAGE_DIR / "config.yaml",
                      [f"data_base_dir={base}", f"num_workers={workers}", "overwrite=true"])
    cpu = _cpu_seconds()
    start = time.perf_counter()
    code = main(cfg)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    if code != 0:
        raise SystemExit(f"data_prepare failed (exit code {code}); see {base / 'db' / 'failed_cases.txt'}")
    return seconds, cpu


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6, help="full-size synthetic cases to generate")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: config.yaml)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder to generate into / reuse (default: a temporary folder, removed after)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workers = args.workers if args.workers is not None else load_config(
        PrepareConfig, STAGE_DIR / "config.yaml").num_workers

    tmp = None
    base = args.data
    if base is None:
        tmp = tempfile.mkdtemp(prefix="prepare_speed_")
        base = Path(tmp) / "dataset"
    try:
        start = time.perf_counter()
        n_labeled = args.cases // 2
        meta = write_dataset(base, labeled=n_labeled, unlabeled=args.cases - n_labeled, val=0, seed=args.seed,
                             size="full", hard_fraction=0.0, workers=max(1, workers))
        generated = time.perf_counter() - start
        slices = [entry["shape_zyx"][0] for entry in meta.values()]
        in_plane = {tuple(entry["shape_zyx"][1:]) for entry in meta.values()}
        mean_slices = sum(slices) / len(slices)

        timings = {}
        load_before = os.getloadavg()[0]
        for n_workers in (workers, 1):
            timings[n_workers] = prepare_once(base, n_workers)
        load_after = os.getloadavg()[0]
        n_cases = len(open_store(base / "db" / "seg_pre-process_database")) + len(
            open_store(base / "db" / "segu_pre-process_database"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable; python {platform.python_version()}")
    print(f"data: {n_cases} synthetic cases, in-plane {sorted(in_plane)}, slices {min(slices)}..{max(slices)} "
          f"(mean {mean_slices:.0f}); generated in {generated:.0f} s")
    print(f"load average (1 min) before/after: {load_before:.1f} / {load_after:.1f} "
          "(wall-clock rates are only meaningful on an otherwise idle machine)")
    print(f"{'workers':>8} {'wall s':>8} {'cases/min':>10} {'200-slice eq/min':>17} {'CPU s/case':>11} "
          f"{'CPU-bound cases/min':>20}")
    for n_workers, (seconds, cpu) in timings.items():
        rate = n_cases / seconds * 60.0
        # what the run would reach with `n_workers` idle cores if it were CPU-bound (no I/O waits)
        cpu_rate = n_cases / (cpu / max(1, min(n_workers, os.cpu_count() or 1))) * 60.0
        print(f"{n_workers:>8} {seconds:>8.1f} {rate:>10.1f} {rate * mean_slices / 200.0:>17.1f} "
              f"{cpu / n_cases:>11.2f} {cpu_rate:>20.1f}")
    print("bar (DESIGN 6): >= 20 cases of 512x512x200 per minute on 2 cores")


if __name__ == "__main__":
    main_cli()
