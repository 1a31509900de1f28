"""Coarse-stage training speed: CPS iterations per second with the real data pipeline vs the bare CPS step.

Both are measured in one run with the same two networks, optimisers and AMP settings:
- bare: `common.train.cps.cps_step` on normalised tensors that already sit on the device (the ceiling);
- pipeline: what training does every iteration (common.train.engine's loop): next batch from the coarse stage's
  DataLoader streams (memory-mapped int16 npy files read in worker processes, pinned), copy to the device, clip +
  z-score and one-hot on the device, then the same CPS step. The time spent waiting for data is reported too.
The gap between the two is what data loading costs. The prepared data are written by this script (random int16
volumes with spheres, listed in LMDB databases as data_prepare does) unless --data-base-dir points at a
prepared dataset.

    PYTHONPATH=. .venv/bin/python benchmarks/coarse_pipeline.py                       # full size (GPU)
    PYTHONPATH=. .venv/bin/python benchmarks/coarse_pipeline.py --size 32 --channels 2,4,4,8,8   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from coarse_base_seg.dataset import CoarseData
from common.config import CoarseTrainConfig
from common.core.amp import AmpSettings, amp_settings, make_grad_scaler
from common.core.labelmaps import one_hot_organs
from common.core.labels import FLARE22
from common.core.typed_config import load_config
from common.storage.lmdb_store import LmdbStore
from common.train.cps import CPSSettings, Learner, Pair, cps_step
from common.train.distributed import DistInfo, resolve_device
from common.train.engine import build_cps_networks
from common.train.losses import build_loss

STAGE_CONFIG = Path(__file__).resolve().parents[1] / "coarse_base_seg" / "config.yaml"


def write_fake_prepared(base: Path, size: int, cases: int, seed: int = 0) -> None:
    """`cases` labeled + `cases` unlabeled + 2 validation int16/uint8 npy volumes of size^3 and their LMDB records."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.mgrid[:size, :size, :size]).astype(np.float32)
    (base / "coarse_image").mkdir(parents=True, exist_ok=True)
    (base / "coarse_mask").mkdir(parents=True, exist_ok=True)
    dbs = {"seg_train_fold_1": ("L", cases, True), "seg_trainu": ("U", cases, False), "seg_val_fold_1": ("V", 2, True)}
    for db, (prefix, count, labeled) in dbs.items():
        records = {}
        for i in range(count):
            case_id = f"{prefix}{i:03d}"
            image = rng.normal(-300, 200, (size,) * 3).astype(np.float32)
            labels = np.zeros((size,) * 3, np.uint8)
            for label in (1, 3, 5, 11):
                center = rng.uniform(0.25 * size, 0.75 * size, 3).reshape(3, 1, 1, 1)
                inside = ((grid - center) ** 2).sum(0) < (0.12 * size) ** 2
                labels[inside] = label
                image[inside] = rng.normal(40 * label, 30, int(inside.sum()))
            image_path = base / "coarse_image" / f"{case_id}.npy"
            np.save(image_path, image.astype(np.int16))
            record = {"coarse_image_path": str(image_path)}
            if labeled:
                mask_path = base / "coarse_mask" / f"{case_id}.npy"
                np.save(mask_path, labels)
                record["coarse_mask_path"] = str(mask_path)
            records[case_id] = record
        store = LmdbStore(base / "db" / db, readonly=False)
        store.put_many(records)
        store.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_args() -> argparse.Namespace:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160, help="cubic input size (divisible by 16)")
    parser.add_argument("--channels", default="16,32,64,128,256", help="U-Net widths")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", type=int, default=8, help="labeled (and unlabeled) cases written")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per stream")
    parser.add_argument("--precision", default="bf16", help="bf16 | fp16 | fp32 (CPU: always fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-base-dir", default=None, help="a prepared dataset instead of written fake data")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def _build_learners(cfg: CoarseTrainConfig, channels: list[int], device: torch.device,
                    args: argparse.Namespace) -> tuple[Pair, CPSSettings, AmpSettings]:
    """The two networks with their optimisers and grad scalers, the CPS settings and the AMP settings."""
    spec = {"name": "unet", "kwargs": {"channels": channels, "dropout": cfg.model.dropout}}
    net_a, net_b = build_cps_networks(spec, cfg.model.seed_a, cfg.model.seed_b)
    net_a.to(device)
    net_b.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt_a, opt_b = (torch.optim.Adam(n.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                     weight_decay=cfg.optim.weight_decay) for n in (net_a, net_b))
    amp = amp_settings(args.precision, device)
    scaler_a, scaler_b = make_grad_scaler(amp), make_grad_scaler(amp)
    model_a, model_b = (torch.compile(n) for n in (net_a, net_b)) if args.compile else (net_a, net_b)
    learners = Pair(Learner(model_a, opt_a, scaler_a), Learner(model_b, opt_b, scaler_b))
    settings = CPSSettings(build_loss(cfg.loss.name), cfg.cps.weight, amp)
    return learners, settings, amp


def _time_bare(step: Callable, data: CoarseData, labeled: Iterator, unlabeled: Iterator, device: torch.device,
               warmup: int, iterations: int) -> float:
    """Seconds per CPS step on one fixed batch, already normalised and on the device."""
    x_raw, y_raw = next(labeled)
    u_raw = next(unlabeled)
    x_l = data.normalize(x_raw.to(device))
    y_l = one_hot_organs(y_raw.to(device).long(), FLARE22.num_organs)
    x_u = data.normalize(u_raw.to(device))
    for _ in range(warmup):
        step(x_l, y_l, x_u)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        step(x_l, y_l, x_u)
    _sync(device)
    return (time.perf_counter() - t0) / iterations


def _time_pipeline(step: Callable, data: CoarseData, labeled: Iterator, unlabeled: Iterator, device: torch.device,
                   warmup: int, iterations: int) -> tuple[float, float]:
    """Seconds per iteration of the engine's per-iteration work, and of its waiting for data."""
    def pipeline_iteration() -> float:
        t = time.perf_counter()
        xb, yb = next(labeled)
        ub = next(unlabeled)
        xb = data.normalize(xb.to(device, non_blocking=True))
        yb = one_hot_organs(yb.to(device, non_blocking=True).long(), FLARE22.num_organs)
        ub = data.normalize(ub.to(device, non_blocking=True))
        wait = time.perf_counter() - t
        step(xb, yb, ub)
        return wait

    for _ in range(warmup):
        pipeline_iteration()
    _sync(device)
    t0 = time.perf_counter()
    wait_s = sum(pipeline_iteration() for _ in range(iterations)) / iterations
    _sync(device)
    pipe_s = (time.perf_counter() - t0) / iterations
    return pipe_s, wait_s


def _report(args: argparse.Namespace, device: torch.device, channels: list[int], amp: AmpSettings, bare_s: float,
            pipe_s: float, wait_s: float) -> None:
    """Print the results table and write the JSON file if asked."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    results = {
        "device": name, "size": args.size, "channels": channels, "precision": amp.dtype and str(amp.dtype),
        "compile": args.compile, "workers": args.workers, "iterations": args.iterations,
        "bare_s_per_it": bare_s, "pipeline_s_per_it": pipe_s, "pipeline_data_wait_s_per_it": wait_s,
        "bare_it_per_s": 1 / bare_s, "pipeline_it_per_s": 1 / pipe_s, "pipeline_vs_bare": bare_s / pipe_s,
    }
    print(f"device {name}; U-Net {channels} at {args.size}^3, batch 1+1, "
          f"{'autocast ' + str(amp.dtype) if amp.enabled else 'fp32'}{', compiled' if args.compile else ''}")
    print(f"{'mode':<34} {'s/it':>8} {'it/s':>8}")
    print(f"{'bare CPS step (tensors on device)':<34} {bare_s:8.4f} {1 / bare_s:8.3f}")
    print(f"{'real data pipeline + CPS step':<34} {pipe_s:8.4f} {1 / pipe_s:8.3f}   "
          f"(waiting for data {wait_s:.4f} s/it; {100 * bare_s / pipe_s:.0f} % of the bare speed)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    args = _parse_args()
    device = resolve_device(args.device)
    channels = [int(c) for c in args.channels.split(",")]
    with tempfile.TemporaryDirectory(prefix="coarse_bench_") as tmp:
        base = Path(args.data_base_dir) if args.data_base_dir else Path(tmp)
        if args.data_base_dir is None:
            t0 = time.perf_counter()
            write_fake_prepared(base, args.size, args.cases)
            print(f"wrote {2 * args.cases + 2} fake prepared cases of {args.size}^3 "
                  f"in {time.perf_counter() - t0:.1f} s")
        cfg = load_config(CoarseTrainConfig, STAGE_CONFIG, [
            f"data_base_dir={base}", f"data.size_zyx=[{args.size},{args.size},{args.size}]",
            f"model.channels=[{args.channels}]", f"data.num_workers={args.workers}", f"amp.precision={args.precision}",
            f"device={device}"])
        info = DistInfo(0, 1, 0, device)
        data = CoarseData(cfg, info)
        learners, settings, amp = _build_learners(cfg, channels, device, args)

        def step(x_l, y_l, x_u):
            return cps_step(learners, x_l, y_l, x_u, settings)

        labeled = data.labeled_stream(0)
        unlabeled = data.unlabeled_stream(0)
        # bare: one fixed batch, already normalised and on the device
        bare_s = _time_bare(step, data, labeled, unlabeled, device, args.warmup, args.iterations)
        # pipeline: the engine's per-iteration work on fresh streams
        pipe_s, wait_s = _time_pipeline(step, data, labeled, unlabeled, device, args.warmup, args.iterations)

    _report(args, device, channels, amp, bare_s, pipe_s, wait_s)


if __name__ == "__main__":
    main()
