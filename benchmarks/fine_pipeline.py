"""Fine-stage training samples per second: our torch pipeline vs the original's per-sample scipy pipeline.

Both pipelines make the same samples (same case, random box extension and per-organ HU shifts, drawn by
`FineStream.plan` from (seed, stream, index)) from the same memory-mapped canonical regions of full-size
synthetic CTs (512 x 512 x 80..200, prepared by data_prepare with its default sizes):
- ours: int16 crop read on the CPU -> device -> trilinear resize (align_corners) of the image, per-label
  resize of the mask, HU shift, window + z-score, all in torch on the device (fine_efficient_seg.augment); measured per
  sample, and through `FineStream` as training uses it (background reader threads, batch 1);
- baseline (reference 4.6, the original's way): the same crop -> scipy.ndimage.zoom order 1 of the image,
  per-label zoom order 1 + 0.5 threshold of the mask, HU shift, window + z-score in numpy, then to a tensor on
  the device. The original also decoded the NIfTI for every sample; the baseline is spared that cost.
Both are timed in the same run; the first samples are a warm-up. Outputs are compared (max |x| difference,
share of equal labels) so the speed-up is not bought with a different result.

    PYTHONPATH=. .venv/bin/python benchmarks/fine_pipeline.py [--cases 2] [--samples 8] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common.config import PrepareConfig
from common.core.defaults import HU_WINDOW
from common.core.labels import FLARE22
from common.core.typed_config import load_config
from common.train.distributed import resolve_device
from data_prepare.run import STAGE_DIR
from data_prepare.run import main as prepare_main
from data_prepare.synthetic import write_dataset
from fine_efficient_seg.augment import FineAugmentSettings, make_fine_sample
from fine_efficient_seg.dataset import FineCase, FineStream, SampleSpec, StreamSpec, load_cases, read_crop

SIZE_ZYX = (192, 192, 192)


def prepare_dataset(base: Path, cases: int) -> Path:
    """Full-size synthetic labeled cases, prepared (skipped when already there); returns the labeled DB."""
    write_dataset(base, labeled=cases, unlabeled=0, val=0, seed=0, size="full", workers=1)
    cfg = load_config(PrepareConfig, STAGE_DIR / "config.yaml", [f"data_base_dir={base}", "num_workers=1"])
    if prepare_main(cfg) != 0:
        raise SystemExit(f"data_prepare failed; see {base / 'db'}")
    return base / "db" / "seg_pre-process_database"


def scipy_sample(image: np.ndarray, labels: np.ndarray, hu_shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original's per-sample CPU path: zoom order 1 (corner-aligned), per-label mask zoom, shift, z-score."""
    zoom = [o / i for o, i in zip(SIZE_ZYX, image.shape)]
    resized = ndimage.zoom(image.astype(np.float32), zoom, order=1, grid_mode=False, mode="nearest")
    out_labels = np.zeros(SIZE_ZYX, dtype=np.uint8)
    for label in range(1, FLARE22.num_organs + 1):
        binary = labels == label
        if not binary.any():
            continue
        resized_binary = ndimage.zoom(binary.astype(np.float32), zoom, order=1, grid_mode=False, mode="nearest")
        out_labels[resized_binary > 0.5] = label
    resized = resized + hu_shift[out_labels].astype(np.float32)
    clipped = np.clip(resized, *HU_WINDOW)
    x = (clipped - clipped.mean()) / (clipped.std() + 1e-5)
    return x.astype(np.float32), out_labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cases: list[FineCase], samples: int, warmup: int, device: torch.device, seed: int) -> dict:
    settings = FineAugmentSettings()
    stream = FineStream(cases, StreamSpec("labeled", seed, batch_size=1, labeled=True, read_threads=2),
                        SampleSpec(SIZE_ZYX, HU_WINDOW, settings), device, rank=0, world_size=1)
    sampler = stream.sampler(0)
    plans = [stream.plan(pos, sampler.item_at(pos)) for pos in range(warmup + samples)]

    def ours(plan):
        case, aug, slices = plan
        image, labels = read_crop(case, slices)
        x, y = make_fine_sample(torch.from_numpy(image).to(device), torch.from_numpy(labels).to(device),
                                SIZE_ZYX, HU_WINDOW, aug.hu_shift)
        return x, y

    def baseline(plan):
        case, aug, slices = plan
        image, labels = read_crop(case, slices)
        x, y = scipy_sample(image, labels, aug.hu_shift)
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    results: dict = {"crop_voxels_mean": float(np.mean([np.prod([s.stop - s.start for s in p[2]]) for p in plans]))}
    outputs = {}
    for name, fn in (("ours", ours), ("scipy", baseline)):
        for plan in plans[:warmup]:
            fn(plan)
        _sync(device)
        start = time.perf_counter()
        outs = []
        for plan in plans[warmup:]:
            outs.append(fn(plan))
        _sync(device)
        results[name] = samples / (time.perf_counter() - start)
        outputs[name] = outs[:2]
    # Through the training stream (reader threads overlap the device work).
    it = stream(0)
    for _ in range(warmup):
        next(it)
    _sync(device)
    start = time.perf_counter()
    for _ in range(samples):
        next(it)
    _sync(device)
    results["ours_stream"] = samples / (time.perf_counter() - start)
    it.close()
    diffs = [float((a[0][0].float() - b[0]).abs().max()) for a, b in zip(outputs["ours"], outputs["scipy"])]
    agree = [float((a[1].cpu() == b[1].cpu()).float().mean()) for a, b in zip(outputs["ours"], outputs["scipy"])]
    results["max_abs_x_diff"] = max(diffs)
    results["label_agreement"] = min(agree)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: a temporary folder)")
    parser.add_argument("--cases", type=int, default=2, help="full-size synthetic labeled cases")
    parser.add_argument("--samples", type=int, default=8, help="timed samples per pipeline")
    parser.add_argument("--warmup", type=int, default=2, help="untimed samples first")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="fine_pipeline_")
        args.data = Path(tmp.name)
    t0 = time.perf_counter()
    db = prepare_dataset(args.data, args.cases)
    cases = load_cases(db, args.data, labeled=True)
    print(f"prepared {len(cases)} full-size cases in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{c.case_id} {c.shape_zyx}" for c in cases))
    r = run(cases, args.samples, args.warmup, device, args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}); torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}; "
          f"output {SIZE_ZYX}, mean crop {r['crop_voxels_mean'] / 1e6:.1f} M voxels, {args.samples} samples")
    print(f"{'pipeline':<42} {'samples/s':>10} {'ms/sample':>10}")
    rows = (("scipy", "baseline: scipy zoom per sample (CPU)"), ("ours", "ours: torch on the device, per sample"),
            ("ours_stream", "ours: FineStream (reader threads), batch 1"))
    for key, label in rows:
        print(f"{label:<42} {r[key]:>10.2f} {1000.0 / r[key]:>10.0f}")
    print(f"speed-up (per sample): {r['ours'] / r['scipy']:.1f}x; "
          f"through FineStream: {r['ours_stream'] / r['scipy']:.1f}x")
    print(f"same samples: max |x_ours - x_scipy| = {r['max_abs_x_diff']:.2e}, labels equal on "
          f">= {100 * r['label_agreement']:.3f} % of voxels")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
