"""Time one CPS training step (two networks, 1 labeled + 1 unlabeled, fwd + bwd + Adam) of both stages.

Every variant runs in the same process on the same weights and data, so the speed-ups printed are measured
against the PyTorch default (fp32 eager) of the same run (DESIGN 6):

    python -m benchmarks.train_step                       # CUDA if present, else a small CPU smoke run
    python -m benchmarks.train_step --device cpu --size 64
    python -m benchmarks.train_step --device cuda --variants fp32_eager,bf16_eager,bf16_compile

`--size` scales the cube edge of both stages (default: 160 coarse / 192 fine on CUDA, 64 on CPU) with the
full channel widths. Variants: fp32_eager (baseline), bf16_eager, fp16_eager (autocast fp16 with one GradScaler
per network, as training runs it), fp32_compile, bf16_compile, fp32_channels_last (channels_last_3d memory format).
Between variants compiled graphs, garbage and cached GPU memory are dropped, so no variant inherits the previous
one's; cuDNN autotuning is on, as the engine sets it for training. GPU memory: the three figures of
common.core.gpu_memory (allocated peak, reserved peak, device total - free at the end of the timed steps).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.core.amp import AmpSettings, make_grad_scaler
from common.core.gpu_memory import reset_peak, snapshot
from common.core.labelmaps import one_hot_organs
from common.networks import build_network
from common.train.cps import CPSSettings, Learner, Pair, cps_step
from common.train.losses import build_loss

VARIANTS = ("fp32_eager", "bf16_eager", "fp16_eager", "fp32_compile", "bf16_compile", "fp32_channels_last")
DEFAULT_VARIANTS = {"cuda": "fp32_eager,bf16_eager,fp16_eager,bf16_compile",
                    "cpu": "fp32_eager,fp32_channels_last,fp32_compile"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Stage:
    name: str
    network: str
    size: int
    loss: str
    lr: float


def _stages(size: int | None, device_type: str) -> list[Stage]:
    coarse = size or (160 if device_type == "cuda" else 64)
    fine = size or (192 if device_type == "cuda" else 64)
    return [Stage("coarse", "unet", coarse, "dice_focal", 1.0e-2),
            Stage("fine", "efficient_seg_net", fine, "dice_bce", 1.0e-3)]


def _machine_info(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or "?",
            "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
        info["tf32_conv"] = str(torch.backends.cudnn.allow_tf32)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_between_variants(device: torch.device) -> None:
    """Drop compiled graphs, garbage and cached GPU memory so the next variant starts as a fresh process would."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def time_variant(stage: Stage, variant: str, device: torch.device, warmup: int, steps: int,
                 channels: Sequence[int] | None = None, compile_backend: str = "inductor") -> dict[str, float]:
    """Seconds per CPS step (median of `steps`) after `warmup` steps, the first step's time and the GPU memory
    figures (MiB, common.core.gpu_memory) of the run. `channels` overrides the networks' widths and `compile_backend`
    torch.compile's backend ("eager": dynamo only, for smoke runs)."""
    reset_between_variants(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine sets it for training (fixed input sizes)
    precision, mode = variant.split("_", 1)
    amp = AmpSettings(device.type, _DTYPES[precision]) if precision in _DTYPES else None
    scalers = [make_grad_scaler(amp), make_grad_scaler(amp)] if precision == "fp16" else [None, None]
    memory_format = torch.channels_last_3d if mode == "channels_last" else torch.contiguous_format
    kwargs: dict = {"input_size_zyx": (stage.size,) * 3} if stage.network == "efficient_seg_net" else {}
    if channels is not None:
        kwargs["channels"] = list(channels)
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(build_network(stage.network, **kwargs).to(device, memory_format=memory_format).train())
    opts = [torch.optim.Adam(n.parameters(), lr=stage.lr, betas=(0.9, 0.99), weight_decay=5.0e-5) for n in nets]
    loss_fn = build_loss(stage.loss)
    if mode == "compile":
        # the networks only: the losses are a small part of a step
        nets = [torch.compile(n, backend=compile_backend) for n in nets]
    generator = torch.Generator().manual_seed(0)
    shape = (1, 1) + (stage.size,) * 3
    x_l = torch.randn(shape, generator=generator).to(device, memory_format=memory_format)
    x_u = torch.randn(shape, generator=generator).to(device, memory_format=memory_format)
    y_l = one_hot_organs(torch.randint(0, 14, shape[:1] + shape[2:], generator=generator), 13).to(device)
    reset_peak(device)
    times = []
    for _ in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        cps_step(Pair(*(Learner(n, o, s) for n, o, s in zip(nets, opts, scalers))), x_l, y_l, x_u,
                 CPSSettings(loss_fn, weight=1.0, amp=amp))
        _sync(device)
        times.append(time.perf_counter() - start)
    timed = sorted(times[warmup:])
    result = {"s_per_step": timed[len(timed) // 2], "first_step_s": times[0]}
    memory = snapshot(device)  # before the tensors go: total - free includes them
    result.update({"alloc_peak_mb": memory.alloc_peak_mb, "reserved_peak_mb": memory.reserved_peak_mb,
                   "used_mb": memory.used_mb})
    del nets, opts, x_l, x_u, y_l
    reset_between_variants(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--size", type=int, default=None, help="cube edge for both stages (multiple of 16)")
    parser.add_argument("--stages", default="coarse,fine")
    parser.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    variants = (args.variants or DEFAULT_VARIANTS[device.type]).split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if variants[0] != "fp32_eager":
        variants = ["fp32_eager"] + [v for v in variants if v != "fp32_eager"]
    stages = [s for s in _stages(args.size, device.type) if s.name in args.stages.split(",")]

    info = _machine_info(device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"CPS step: 2 networks, batch 1 labeled + 1 unlabeled, fwd+bwd+Adam; warm-up {args.warmup}, "
          f"median of {args.steps} timed steps")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for stage in stages:
        results[stage.name] = {}
        for variant in variants:
            try:
                r = time_variant(stage, variant, device, args.warmup, args.steps)
            except Exception as error:  # e.g. an inductor bug on this platform: report it, keep the other variants
                print(f"{stage.name:6s} {stage.network:17s} {stage.size:3d}^3  {variant:18s} FAILED: "
                      f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
                      flush=True)
                if variant == "fp32_eager":
                    raise
                continue
            results[stage.name][variant] = r
            base = results[stage.name]["fp32_eager"]["s_per_step"]
            memory = (f"  GPU alloc {r['alloc_peak_mb'] / 1024:.1f} / reserved {r['reserved_peak_mb'] / 1024:.1f} / "
                      f"used {r['used_mb'] / 1024:.1f} GiB" if device.type == "cuda" else "")
            print(f"{stage.name:6s} {stage.network:17s} {stage.size:3d}^3  {variant:18s} {r['s_per_step']:8.3f} s/step"
                  f"  x{base / r['s_per_step']:.2f} vs fp32_eager  (first step {r['first_step_s']:.1f} s){memory}",
                  flush=True)
        fastest = min(results[stage.name], key=lambda v: results[stage.name][v]["s_per_step"])
        speedup = results[stage.name]["fp32_eager"]["s_per_step"] / results[stage.name][fastest]["s_per_step"]
        print(f"{stage.name}: fastest {fastest}, speed-up x{speedup:.2f} over fp32_eager")
    if args.json:
        from common.core.files import write_json_atomic

        write_json_atomic(args.json, {"machine": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
