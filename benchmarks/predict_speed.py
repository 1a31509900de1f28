"""Prediction speed and memory: our pipeline vs the straightforward path, on a full-size synthetic CT.

    python -m benchmarks.predict_speed [--device auto|cpu|cuda] [--backend auto|torch|onnxruntime] [--cases N]
        [--size Z,Y,X] [--quick] [--no-baseline] [--no-empty] [--compare-torch]

Makes a synthetic CT (data_prepare.synthetic, size "full", resampled to --size, default 200x512x512), exports
randomly initialised FULL-size networks (default channels; coarse UNet at 160^3, fine EfficientSegNet at 192^3)
through common.storage.model_folder.export_model, and measures in the same run:
- the two networks' forward passes alone on the chosen backend (the floor; DESIGN 6 CPU bar: total <= 1.2x their
  sum), with their multiply-adds as a fraction of the CPU's peak (benchmarks.cpu_floor) on the CPU;
- our pipeline end to end with organ-shaped outputs: each network runs (its time is paid) but hands on scores
  made from the phantom's ground truth (resized to the network grid, smoothed, +-6), so reading, resizing,
  components and writing do the work a trained model's outputs give them;
- our pipeline (`predict_folder`: device-side resize, fp16 on CUDA, background read/write, chunked label
  resizing, components per organ box) with the random networks (worst case: every organ channel fires all over
  the volume) and with "empty" networks (head weights made negative: nothing fires, the coarse stage falls back
  to the whole volume) -- realistic outputs lie between the two;
- the straightforward path: scipy resize on the CPU, fp32, no background I/O, 13 full-size probability maps,
  connected components on the full volume (run for the first case only, with the random networks);
- the output-dependent step alone (fine labels at crop size + components) on organ-shaped scores made from the
  phantom's ground truth, to show its cost for realistic outputs.
`--compare-torch` also times the forward passes and the organ-shaped case with `--backend torch`, for the
end-to-end gain of the chosen backend. `--no-baseline` skips the straightforward path (CPU-bound; on a GPU it
only spends the GPU's time).
Prints one table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from common.core import gpu_memory
from common.core.defaults import COARSE_MIN_VOLUME_MM3, FINE_MIN_VOLUME_MM3, Z_WINDOW_MM
from common.core.labelmaps import probs_to_labels
from common.core.logger import get_logger, setup_logging
from common.infer.backends import BACKENDS
from common.infer.folder import predict_folder
from common.infer.postprocess import coarse_organ_box, keep_largest_component, organ_box
from common.infer.predictor import PredictOptions, Predictor, resolve_device, resolve_precision
from common.infer.upsample import upsample_labels
from common.networks import build_network
from common.storage.image_io import canonical_flips, read_image, write_mask
from common.storage.model_folder import COARSE_DIR, FINE_DIR, PreprocessSpec, export_model
from common.volume.boxes import crop_box_with_margin
from common.volume.intensity import normalize_hu
from common.volume.resize import resize_volume

logger = get_logger("benchmarks.predict_speed")


# ------------------------------------------------------------------------------------------------ inputs


def make_ct(shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple, tuple, tuple]:
    """Synthetic CT (int16 HU) and mask of `shape_zyx`, resampled from data_prepare.synthetic's "full" phantom."""
    from data_prepare.synthetic import make_case

    image, mask, spacing_zyx, origin_xyz, direction = make_case(np.random.default_rng(seed), "full")
    if image.shape != shape_zyx:
        factors = [o / i for o, i in zip(shape_zyx, image.shape)]
        spacing_zyx = tuple(s * (i - 1) / max(o - 1, 1) for s, i, o in zip(spacing_zyx, image.shape, shape_zyx))
        image = resize_volume(image, shape_zyx).round().astype(np.int16)
        from scipy import ndimage
        mask = ndimage.zoom(mask, factors, order=0, grid_mode=False)
        assert image.shape == mask.shape == shape_zyx, (image.shape, mask.shape)
    return image, mask, spacing_zyx, origin_xyz, direction


def write_ct(path: Path, image: np.ndarray, spacing_zyx, origin_xyz, direction) -> None:
    img = sitk.GetImageFromArray(image)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_xyz))
    img.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(img, str(path), useCompression=True)


def export_random_models(weights_dir: Path, empty: bool = False, channels: list[int] | None = None,
                         sizes: tuple[int, int] = (160, 192)) -> None:
    """Networks with random (seeded) weights, full size unless `channels` / `sizes` (coarse, fine edge) say
    otherwise; `empty` makes every head weight negative (no organ fires: the last features are ReLU outputs >= 0)."""
    stages = (("coarse", "unet", sizes[0], COARSE_DIR), ("fine", "efficient_seg_net", sizes[1], FINE_DIR))
    for stage, name, size, folder in stages:
        kwargs: dict = {} if name == "unet" else {"input_size_zyx": [size] * 3}
        if channels is not None:
            kwargs.update(channels=list(channels), dropout=0.0)
        nets = {}
        for i, key in enumerate(("a", "b")):
            torch.manual_seed(10 + i)
            state = build_network(name, **kwargs).state_dict()
            if empty:
                state["head.weight"] = -state["head.weight"].abs() - 1e-3
            nets[key] = state
        export_model(weights_dir / folder, stage=stage, model={"name": name, "kwargs": kwargs}, networks=nets,
                     primary="a", preprocess=PreprocessSpec(stage, (size,) * 3), config={"benchmark": "random weights"})


# ------------------------------------------------------------------------------------------------ measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preload(predictor: Predictor) -> Predictor:
    """Export and open the primary networks' backend sessions now (done on first use otherwise), so the cases
    timed after it measure prediction, not the one-off export."""
    for stage in (predictor.coarse, predictor.fine):
        load = getattr(stage.networks[stage.primary], "load", None)
        if load is not None:
            load()
    return predictor


def forward_times(predictor: Predictor, repeats: int) -> dict[str, float]:
    """Seconds per forward pass of the primary coarse and fine networks alone (input already on the device)."""
    from common.core.amp import autocast

    out = {}
    for key, stage in (("coarse_forward_s", predictor.coarse), ("fine_forward_s", predictor.fine)):
        net = stage.networks[stage.primary]
        x = torch.randn(1, 1, *stage.size_zyx, device=predictor.device)
        with torch.inference_mode(), autocast(predictor.amp):
            net(x)  # warm-up
            _sync(predictor.device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                net(x)
            _sync(predictor.device)
        out[key] = (time.perf_counter() - t0) / repeats
    return out


def straightforward_case(path: Path, out_path: Path, predictor: Predictor) -> dict[str, float]:
    """The plain path: everything on the CPU in numpy/scipy except the networks (fp32), no overlap, full-size
    probability maps resized with scipy, components on the full volume."""
    device = predictor.device
    gpu_memory.reset_peak(device)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    raw, meta = read_image(path)
    flips = canonical_flips(meta)
    ct = np.ascontiguousarray(raw[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])
    spacing = np.asarray(meta.spacing_zyx)
    t1 = time.perf_counter()
    times["read_s"] = t1 - t0

    coarse = predictor.coarse
    x = normalize_hu(resize_volume(ct, coarse.size_zyx), coarse.hu_window)
    with torch.inference_mode():
        logits = coarse.modules[coarse.primary](torch.from_numpy(x)[None, None].to(device))[0].float().cpu()
    labels = probs_to_labels(torch.sigmoid(logits).numpy(), 0.5)
    t2 = time.perf_counter()
    times["coarse_s"] = t2 - t1
    box = organ_box(labels, ct.shape, tuple(spacing), COARSE_MIN_VOLUME_MM3, Z_WINDOW_MM)
    crop = (tuple(slice(0, n) for n in ct.shape) if box is None
            else crop_box_with_margin(box, tuple(spacing), 20.0, ct.shape))
    t3 = time.perf_counter()
    times["post_s"] = t3 - t2

    fine = predictor.fine
    region = ct[crop]
    x = normalize_hu(resize_volume(region, fine.size_zyx), fine.hu_window)
    with torch.inference_mode():
        logits = fine.modules[fine.primary](torch.from_numpy(x)[None, None].to(device))[0].float().cpu().numpy()
    probs = np.stack([1.0 / (1.0 + np.exp(-resize_volume(channel, region.shape))) for channel in logits])
    labels = probs_to_labels(probs, 0.5)
    del probs
    t4 = time.perf_counter()
    times["fine_s"] = t4 - t3
    labels = keep_largest_component(labels, spacing, FINE_MIN_VOLUME_MM3)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[crop] = labels
    mask = np.ascontiguousarray(mask[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])
    t5 = time.perf_counter()
    times["post_s"] += t5 - t4
    write_mask(mask, meta, out_path)
    times["write_s"] = time.perf_counter() - t5
    times["total_s"] = time.perf_counter() - t0
    times.update(gpu_memory.snapshot(device).as_row())  # allocated / reserved peaks and total - free (FLARE)
    return times


def organ_scores(mask_zyx: np.ndarray, size_zyx) -> torch.Tensor:
    """Organ-shaped logits (13, *size_zyx) float32 from a label map: each organ's indicator resized (trilinear,
    align_corners) to the network grid, smoothed by a 3^3 mean, scaled to +-6 (0 on the organ's border)."""
    channels = []
    for label in range(1, 14):  # one channel at a time: 13 full-resolution float maps would be 2.7 GB
        one = torch.from_numpy(mask_zyx == label).float()[None, None]
        channels.append(F.interpolate(one, size=tuple(size_zyx), mode="trilinear", align_corners=True)[0, 0])
    grid = F.avg_pool3d(torch.stack(channels)[None], 3, stride=1, padding=1)[0]
    return (grid - 0.5) * 12.0


class OrganShapedForward:
    """Runs the real forward (its time is paid) and returns the given organ-shaped scores instead of its output."""

    def __init__(self, forward, scores: torch.Tensor) -> None:
        self.forward, self.scores = forward, scores

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        return self.scores[None].to(device=out.device, dtype=out.dtype)


def organ_shaped_predictor(predictor: Predictor, mask_zyx: np.ndarray, ct_path: Path) -> Predictor:
    """`predictor` with every network wrapped in OrganShapedForward: the coarse stage gets the phantom truth of
    the whole volume at its grid, the fine stage the truth of the crop the predictor derives from that (same
    rules, in canonical orientation, as `Predictor.predict`)."""
    _, meta = read_image(ct_path)
    flips = canonical_flips(meta)
    canonical = np.ascontiguousarray(mask_zyx[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])
    coarse, fine = predictor.coarse, predictor.fine
    coarse_scores = organ_scores(canonical, coarse.size_zyx)
    spacing = np.asarray(meta.spacing_zyx, dtype=np.float64)
    box, _ = coarse_organ_box(probs_to_labels(coarse_scores, 0.0).numpy(), canonical.shape, tuple(spacing),
                              coarse.preprocess)
    crop = crop_box_with_margin(box, tuple(spacing), fine.preprocess.extend_size_mm, canonical.shape)
    fine_scores = organ_scores(np.ascontiguousarray(canonical[crop]), fine.size_zyx)
    for stage, scores in ((coarse, coarse_scores), (fine, fine_scores)):
        stage.networks = {name: OrganShapedForward(fwd, scores) for name, fwd in stage.networks.items()}
    return predictor


def phantom_postprocess(mask_zyx: np.ndarray, spacing_zyx, predictor: Predictor) -> dict[str, float]:
    """Fine labels at full crop size + components, from organ-shaped logits at the fine network size (the ground
    truth resized to 192^3, smoothed, scaled to +-6): the output-dependent work for realistic outputs."""
    device = predictor.device
    scores = organ_scores(mask_zyx, predictor.fine.size_zyx).to(device=device, dtype=predictor.score_dtype)
    _sync(device)
    t0 = time.perf_counter()
    labels = upsample_labels(scores, mask_zyx.shape, 0.0, predictor.chunk_elements).cpu().numpy()
    t1 = time.perf_counter()
    keep_largest_component(labels, spacing_zyx, FINE_MIN_VOLUME_MM3)
    t2 = time.perf_counter()
    agree = float((labels == mask_zyx).mean())
    return {"labels_s": t1 - t0, "components_s": t2 - t1, "voxel_agreement": agree}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="where the networks run")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time the forwards and the organ-shaped case with --backend torch")
    parser.add_argument("--cases", type=int, default=1, help="cases through our pipeline (copies of the CT)")
    parser.add_argument("--size", default="200,512,512", help="CT shape z,y,x (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small CT (100,256,256), for a fast check")
    parser.add_argument("--repeats", type=int, default=None, help="forward passes timed (default 1 CPU, 10 GPU)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the straightforward path")
    parser.add_argument("--no-empty", action="store_true", help="skip the run with empty-output networks")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def _write_inputs(work: Path, shape: tuple[int, ...], cases: int) -> tuple[tuple, Path]:
    """The synthetic CT as `make_ct` gives it, and the input folder holding `cases` copies of it."""
    t0 = time.perf_counter()
    image, mask, spacing_zyx, origin_xyz, direction = make_ct(shape)
    in_dir = work / "in"
    in_dir.mkdir()
    write_ct(in_dir / "bench000_0000.nii.gz", image, spacing_zyx, origin_xyz, direction)
    for i in range(1, cases):
        shutil.copy(in_dir / "bench000_0000.nii.gz", in_dir / f"bench{i:03d}_0000.nii.gz")
    print(f"synthetic CT {shape} spacing {tuple(round(s, 3) for s in spacing_zyx)} mm "
          f"({time.perf_counter() - t0:.1f} s to make)")
    return (image, mask, spacing_zyx, origin_xyz, direction), in_dir


def _forwards(predictor: Predictor, device: torch.device, repeats: int, results: dict) -> float:
    """Time the forward passes alone (and, on the CPU, their share of the peak) into `results`; their sum."""
    results["forward"] = forward_times(predictor, repeats)
    fwd = results["forward"]["coarse_forward_s"] + results["forward"]["fine_forward_s"]
    results["forward"]["sum_s"] = fwd
    print(f"forward alone ({predictor.backend}): coarse {results['forward']['coarse_forward_s']:.3f} s, fine "
          f"{results['forward']['fine_forward_s']:.3f} s, sum {fwd:.3f} s", flush=True)
    if device.type == "cpu":
        from benchmarks.cpu_floor import count_macs, cpu_peak

        peak = cpu_peak()
        macs = sum(count_macs(stage.modules[stage.primary], (1, 1, *stage.size_zyx))
                   for stage in (predictor.coarse, predictor.fine))
        results["floor"] = {"macs": macs, "peak_macs_per_s": peak.macs_per_s, "peak": peak.describe(),
                            "peak_floor_s": macs / peak.macs_per_s}
        print(f"CPU peak {peak.describe()}; both networks {macs / 1e9:.1f} GMAC = {macs / peak.macs_per_s:.2f} s "
              f"at peak; the forwards reach {macs / peak.macs_per_s / fwd:.1%} of peak", flush=True)
    return fwd


def _warm_up(work: Path, image: np.ndarray, shape: tuple[int, ...], spacing_zyx, origin_xyz, direction,
             predictor: Predictor) -> None:
    """A pass of the whole pipeline over a short CT (CUDA context, cuDNN autotuning)."""
    warm = work / "warm_in"
    warm.mkdir()
    write_ct(warm / "warm_0000.nii.gz", image[: max(16, shape[0] // 4)], spacing_zyx, origin_xyz, direction)
    predict_folder(warm, work / "warm_out", PredictOptions(progress=False), predictor=predictor)


def _pipeline_runs(args: argparse.Namespace, options: PredictOptions, predictor: Predictor, repeats: int,
                   work: Path, in_dir: Path, mask: np.ndarray, results: dict) -> None:
    """Our pipeline over the cases with the random, organ-shaped, torch-backend and empty-output networks."""
    def timed_run(pred: Predictor, out_name: str) -> dict:
        """Wall time of predict_folder over the cases with `pred`, and its rows of the cases done."""
        t0 = time.perf_counter()
        summary = predict_folder(in_dir, work / out_name, PredictOptions(workers=args.workers, progress=False),
                                 predictor=pred)
        wall = time.perf_counter() - t0
        rows = [r for r in summary["rows"] if r["status"] == "ok"]
        return {"wall_s": wall, "wall_per_case_s": wall / max(len(rows), 1), "rows": rows}

    def organ_shaped_run(pred: Predictor, out_name: str) -> dict:
        organ_shaped_predictor(pred, mask, in_dir / "bench000_0000.nii.gz")
        result = timed_run(pred, out_name)
        got = read_image(work / out_name / "bench000.nii.gz")[0]
        return {**result, "voxel_agreement": float((got == mask).mean())}

    results["ours_random"] = timed_run(predictor, "out_random")
    results["ours_organ"] = organ_shaped_run(
        preload(Predictor(options)), "out_organ")
    if args.compare_torch and predictor.backend != "torch":
        torch_predictor = preload(Predictor(dataclasses.replace(options, backend="torch")))
        results["torch_forward"] = forward_times(torch_predictor, repeats)
        results["torch_forward"]["sum_s"] = sum(results["torch_forward"].values())
        results["torch_organ"] = organ_shaped_run(torch_predictor, "out_organ_torch")
        del torch_predictor
    if not args.no_empty:
        empty_weights = work / "weights_empty"
        export_random_models(empty_weights, empty=True)
        empty = preload(Predictor(PredictOptions(empty_weights, options.device, options.precision,
                                                 uncertainty="off", backend=args.backend)))
        results["ours_empty"] = timed_run(empty, "out_empty")
        del empty


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging(None, level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (100, 256, 256) if args.quick else tuple(int(v) for v in args.size.split(","))
    device = resolve_device(args.device)
    args.device = str(device)
    precision = resolve_precision(args.precision, device)
    repeats = args.repeats or (10 if device.type == "cuda" else 1)
    work = Path(tempfile.mkdtemp(prefix="predict_speed_"))
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                     f"cpu ({torch.get_num_threads()} threads)", "precision": precision, "shape_zyx": shape,
                     "cases": args.cases}
    try:
        (image, mask, spacing_zyx, origin_xyz, direction), in_dir = _write_inputs(work, shape, args.cases)
        weights = work / "weights"
        export_random_models(weights)

        options = PredictOptions(weights, device, precision, uncertainty="off", backend=args.backend)
        predictor = preload(Predictor(options))
        results["backend"] = predictor.backend
        fwd = _forwards(predictor, device, repeats, results)
        if device.type == "cuda":  # warm-up pass of the whole pipeline (CUDA context, cuDNN autotuning)
            _warm_up(work, image, shape, spacing_zyx, origin_xyz, direction, predictor)

        _pipeline_runs(args, options, predictor, repeats, work, in_dir, mask, results)
        results["phantom_postprocess"] = phantom_postprocess(mask, spacing_zyx, predictor)
        if not args.no_baseline:
            results["baseline"] = straightforward_case(in_dir / "bench000_0000.nii.gz", work / "baseline.nii.gz",
                                                       predictor)
        results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_table(results, fwd)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def print_table(results: dict, forward_sum: float) -> None:
    keys = ("read_s", "coarse_s", "fine_s", "post_s", "write_s", "total_s", *gpu_memory.MEMORY_FIELDS)
    short = {"gpu_alloc_peak_mb": "alloc MB", "gpu_reserved_peak_mb": "resv MB", "gpu_used_mb": "used MB"}
    print(f"\ndevice: {results['device']}, backend {results['backend']}, precision {results['precision']}, "
          f"CT {results['shape_zyx']}, {results['cases']} case(s)")
    print(f"{'path':<34}" + "".join(f"{short.get(k, k.replace('_s', '')):>9}" for k in keys)
          + f"{'wall/case':>10}")

    def line(name: str, row: dict, wall: float | None) -> None:
        cells = "".join(f"{float(row.get(k) or 0):>9.2f}" if k not in short else
                        f"{float(row.get(k) or 0):>9.0f}" for k in keys)
        print(f"{name:<34}{cells}{'' if wall is None else f'{wall:>10.2f}'}")

    for key, label in (("ours_organ", "ours, organ-shaped outputs"), ("torch_organ", "ours+torch, organ-shaped"),
                       ("ours_random", "ours, random nets"), ("ours_empty", "ours, empty-output nets")):
        if key in results:
            for i, row in enumerate(results[key]["rows"]):
                line(f"{label} #{i}", row, results[key]["wall_per_case_s"] if i == 0 else None)
    if "baseline" in results:
        line("straightforward, random nets", results["baseline"], None)
    p = results["phantom_postprocess"]
    print(f"organ-shaped outputs: fine labels at crop size {p['labels_s']:.2f} s + components "
          f"{p['components_s']:.2f} s (voxel agreement with the phantom {p['voxel_agreement']:.4f})")
    print(f"forward alone (coarse + fine): {forward_sum:.2f} s")
    floor = results.get("floor", {}).get("peak_floor_s")
    for key in ("ours_organ", "ours_random", "ours_empty"):
        if key in results:
            total = float(np.mean([r["total_s"] for r in results[key]["rows"]]))
            of_peak = f", {floor / total:.1%} of the CPU's peak" if floor else ""
            print(f"{key}: total {total:.2f} s per case = {total / forward_sum:.2f}x the forward time{of_peak} "
                  f"(wall {results[key]['wall_per_case_s']:.2f} s per case)")
    if "ours_organ" in results:
        print(f"organ-shaped outputs: voxel agreement of the written mask with the phantom "
              f"{results['ours_organ']['voxel_agreement']:.4f}")
    if "torch_organ" in results:
        ours = float(np.mean([r["total_s"] for r in results["ours_organ"]["rows"]]))
        plain = float(np.mean([r["total_s"] for r in results["torch_organ"]["rows"]]))
        print(f"backend {results['backend']} vs torch: forwards {results['torch_forward']['sum_s']:.2f} s -> "
              f"{forward_sum:.2f} s, organ-shaped case end to end {plain:.2f} s -> {ours:.2f} s "
              f"({plain / ours:.2f}x)")
    if "baseline" in results:
        print(f"straightforward: total {results['baseline']['total_s']:.2f} s = "
              f"{results['baseline']['total_s'] / forward_sum:.2f}x the forward time")
    print(f"max RSS {results['max_rss_mb']:.0f} MB")


if __name__ == "__main__":
    raise SystemExit(main())
