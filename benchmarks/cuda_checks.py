"""The CUDA decisions of issue #15 that only a GPU can make, in one short run (for benchmarks/gpu_check.py).

    python -m benchmarks.cuda_checks [--size Z,Y,X] [--cases N] [--json PATH]

Needs a CUDA device (exits 2 without one). Checks, each printed beside its baseline from the same run:
1. fine-pipeline syncs: one labeled fine sample built on the GPU under torch.cuda.set_sync_debug_mode("error")
   (any host sync raises), the per-sample path of training (fine_efficient_seg.augment.make_fine_sample);
2. predictor memory as FLARE measures it (total - free, plus allocated and reserved peaks, common.core.gpu_memory)
   and time per case, with cuDNN autotuning on (the default, as in training) and off: decides whether the
   autotuned kernels' workspace keeps gpu_used_mb under gpu_memory.MEMORY_BAR_MB; randomly initialised full-size
   networks on a synthetic CT (benchmarks.predict_speed's inputs), so the figures are the worst case.
The amp.compile default is decided by benchmarks/train_step.py (eager vs compiled CPS step), not here.
`run_checks(device)` returns the same figures as a dict for gpu_check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.core import gpu_memory
from common.core.defaults import HU_WINDOW
from common.infer.predictor import PredictOptions, Predictor
from common.storage.image_io import read_image
from fine_efficient_seg.augment import make_fine_sample


def check_fine_sample_syncs(device: torch.device) -> dict[str, object]:
    """Build one labeled fine sample on `device` with host syncs turned into errors; {"ok", "error"}."""
    gen = torch.Generator().manual_seed(0)
    crop = torch.randint(-1000, 400, (150, 230, 210), generator=gen).to(torch.int16).pin_memory()
    labels = torch.zeros(150, 230, 210, dtype=torch.uint8)
    labels[30:90, 40:160, 50:150] = 1
    labels[60:120, 100:200, 20:90] = 11
    shift = np.zeros(14, dtype=np.int64)
    shift[1], shift[11] = 40, -25
    image_t = crop.to(device, non_blocking=True)
    labels_t = labels.pin_memory().to(device, non_blocking=True)
    make_fine_sample(image_t, labels_t, (192, 192, 192), HU_WINDOW, shift)  # warm-up (kernels, caches)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        make_fine_sample(image_t, labels_t, (192, 192, 192), HU_WINDOW, shift)
        result = {"ok": True, "error": ""}
    except RuntimeError as exc:
        result = {"ok": False, "error": str(exc).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result


def predictor_memory(weights_dir: Path, volume: np.ndarray, meta, device: torch.device, cudnn_benchmark: bool,
                     cases: int) -> dict[str, float]:
    """Warm time per case and the memory figures of the last case, for one cuDNN setting (fresh cache)."""
    torch.cuda.empty_cache()
    predictor = Predictor(PredictOptions(weights_dir, device=str(device), cudnn_benchmark=cudnn_benchmark,
                                         progress=False))
    predictor.predict(volume, meta)  # warm-up: cuDNN autotuning and allocator growth happen here
    times = []
    memory = gpu_memory.GpuMemory()
    for _ in range(cases):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = predictor.predict(volume, meta)
        times.append(time.perf_counter() - t0)
        memory = memory.max(result.gpu)
    del predictor
    return {"cudnn_benchmark": cudnn_benchmark, "compute_s": float(np.median(times)), **memory.as_row()}


def run_checks(device: torch.device, size_zyx: tuple[int, int, int] = (200, 512, 512), cases: int = 3) -> dict:
    """Every check of this module on `device`; a dict of their figures."""
    from benchmarks.predict_speed import export_random_models, make_ct, write_ct

    out: dict = {"device": torch.cuda.get_device_name(device), "bar_mb": gpu_memory.MEMORY_BAR_MB}
    out["fine_sample_syncs"] = check_fine_sample_syncs(device)
    with tempfile.TemporaryDirectory() as tmp:
        weights_dir = Path(tmp) / "weights"
        export_random_models(weights_dir)
        image, _, spacing, origin, direction = make_ct(size_zyx)
        write_ct(Path(tmp) / "ct.nii.gz", image, spacing, origin, direction)
        volume, meta = read_image(Path(tmp) / "ct.nii.gz")
        out["predictor"] = [predictor_memory(weights_dir, volume, meta, device, on, cases) for on in (True, False)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="200,512,512", help="synthetic CT size Z,Y,X")
    parser.add_argument("--cases", type=int, default=3, help="timed cases per cuDNN setting (after one warm-up)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device; these checks only make sense on a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    results = run_checks(device, tuple(int(v) for v in args.size.split(",")), args.cases)
    syncs = results["fine_sample_syncs"]
    print(f"device {results['device']}; FLARE bar {results['bar_mb']:.0f} MB (total - free)")
    print(f"fine sample without host syncs: {'yes' if syncs['ok'] else 'NO: ' + syncs['error']}")
    print(f"{'cudnn.benchmark':<16}{'compute s':>10}{'alloc MB':>10}{'resv MB':>10}{'used MB':>10}  bar")
    for row in results["predictor"]:
        ok = "ok" if row["gpu_used_mb"] <= results["bar_mb"] else "OVER"
        print(f"{str(row['cudnn_benchmark']):<16}{row['compute_s']:>10.3f}{row['gpu_alloc_peak_mb']:>10.0f}"
              f"{row['gpu_reserved_peak_mb']:>10.0f}{row['gpu_used_mb']:>10.0f}  {ok}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
