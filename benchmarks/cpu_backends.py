"""CPU backends for the predictor's networks, at full size, with their agreement with torch eager.

    python -m benchmarks.cpu_backends [--size-coarse 160] [--size-fine 192] [--variants ...] [--json PATH]

For the full-channel coarse U-Net (160^3) and fine EfficientSegNet (192^3), random seeded weights, on the
synthetic phantom CT resized and windowed to the network size, times one forward (after one warm-up) of:
- torch_eager: the baseline (what `--backend torch` runs);
- torch_channels_last: network and input in channels_last_3d (oneDNN's blocked layout for 3D convolutions);
- torch_jit_freeze: torch.jit.freeze of the traced network (constant folding, conv + norm fusion where possible);
- torch_jit_onednn: torch.jit.optimize_for_inference (freeze + oneDNN weight prepacking);
- torch_bf16: autocast bf16, only when the CPU has native bf16 (avx512_bf16 or amx_bf16 in the flags);
- onnxruntime: `common.infer.backends` (ONNX export opset 17, ONNX Runtime CPU, torch's thread count).
Agreement with torch eager per variant: voxel label agreement (labels as the predictor makes them, logit >= 0,
highest wins), mean DSC over the organs present in either, and the largest logit difference. The fraction of the
CPU's peak (benchmarks.cpu_floor) is printed beside each time.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.cpu_floor import count_macs, cpu_peak, full_network
from common.core.defaults import HU_WINDOW
from common.core.labelmaps import probs_to_labels
from common.evaluation.uncertainty import labels_disagreement
from common.infer.backends import OnnxRuntimeForward, export_onnx, onnxruntime_available
from common.volume.intensity import normalize_hu
from common.volume.resize import resize_volume

VARIANTS = ("torch_eager", "torch_channels_last", "torch_jit_freeze", "torch_jit_onednn", "torch_bf16", "onnxruntime")


def phantom_input(size: int) -> torch.Tensor:
    """The synthetic "full" phantom CT resized to size^3 and windowed / z-scored as the predictor does: (1,1,s,s,s)."""
    from data_prepare.synthetic import make_case

    image = make_case(np.random.default_rng(0), "full")[0]
    x = normalize_hu(resize_volume(image.astype(np.float32), (size,) * 3), HU_WINDOW)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]


def native_bf16() -> bool:
    """True when the CPU flags name a native bf16 dot-product instruction."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_variant(variant: str, net: nn.Module, x: torch.Tensor, work: Path):
    """A callable x -> logits for `variant`, or a string saying why the variant does not apply."""
    if variant == "torch_eager":
        return net
    if variant == "torch_channels_last":
        cl = net.to(memory_format=torch.channels_last_3d)
        return lambda t: cl(t.contiguous(memory_format=torch.channels_last_3d))
    if variant in ("torch_jit_freeze", "torch_jit_onednn"):
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        return torch.jit.optimize_for_inference(frozen) if variant == "torch_jit_onednn" else frozen
    if variant == "torch_bf16":
        if not native_bf16():
            return "no native bf16 on this CPU (no avx512_bf16 / amx_bf16): emulated bf16 is slower than fp32"

        def run(t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(t).float()
        return run
    if variant == "onnxruntime":
        if not onnxruntime_available():
            return "onnxruntime not installed"
        path = export_onnx(net, x.shape[2:], work / f"net_{'x'.join(map(str, x.shape[2:]))}_0.onnx")
        return OnnxRuntimeForward(path)
    raise ValueError(variant)


def agreement(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Voxel label agreement, mean organ DSC (1 - disagreement) and max |logit difference| of two (1,C,...) maps."""
    a, b = probs_to_labels(ref[0], 0.0), probs_to_labels(out[0].float(), 0.0)
    return {"label_agreement": float((a == b).float().mean()), "dsc": 1.0 - labels_disagreement(a, b, 13),
            "max_logit_diff": float((ref - out.float()).abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-coarse", type=int, default=160)
    parser.add_argument("--size-fine", type=int, default=192)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--stages", default="coarse,fine")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    peak = cpu_peak()
    print(f"CPU peak: {peak.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    variants = [v for v in args.variants.split(",") if v]
    results: dict = {"peak_macs_per_s": peak.macs_per_s, "stages": {}}
    sizes = {"coarse": args.size_coarse, "fine": args.size_fine}
    print(f"{'network':<30}{'variant':<22}{'s/forward':>10}{'x eager':>9}{'of peak':>9}{'labels':>9}{'DSC':>8}"
          f"{'max |dlogit|':>13}")
    with tempfile.TemporaryDirectory(prefix="cpu_backends_") as tmp:
        for stage, name, _ in (s for s in (("coarse", "unet", 0), ("fine", "efficient_seg_net", 0))
                               if s[0] in args.stages.split(",")):
            size = sizes[stage]
            torch.manual_seed(0)
            net = full_network(name, size)
            macs = count_macs(net, (1, 1, size, size, size))
            x = phantom_input(size)
            label = f"{stage} {name} {size}^3"
            rows: dict = {}
            ref = None
            for variant in variants:
                try:
                    # a copy per variant (channels_last converts the module in place): same weights as eager
                    fn = build_variant(variant, net if variant == "torch_eager" else copy.deepcopy(net), x, Path(tmp))
                    if isinstance(fn, str):
                        print(f"{label:<30}{variant:<22} skipped: {fn}", flush=True)
                        rows[variant] = {"skipped": fn}
                        continue
                    with torch.inference_mode():
                        fn(x)  # warm-up (oneDNN primitive creation, ORT arena)
                        t0 = time.perf_counter()
                        out = fn(x)
                        seconds = time.perf_counter() - t0
                    out = out.float()
                except Exception as error:  # noqa: BLE001 - report and go on with the other variants
                    print(f"{label:<30}{variant:<22} FAILED: {type(error).__name__}: {str(error)[:200]}", flush=True)
                    rows[variant] = {"failed": f"{type(error).__name__}: {error}"}
                    continue
                if ref is None:
                    ref = out
                row = {"s": seconds, "fraction_of_peak": macs / peak.macs_per_s / seconds, **agreement(ref, out)}
                base = rows.get("torch_eager", {}).get("s", seconds)
                row["speedup"] = base / seconds
                rows[variant] = row
                print(f"{label:<30}{variant:<22}{seconds:>10.2f}{row['speedup']:>9.2f}{row['fraction_of_peak']:>9.1%}"
                      f"{row['label_agreement']:>9.4f}{row['dsc']:>8.4f}{row['max_logit_diff']:>13.2e}", flush=True)
            results["stages"][stage] = {"network": name, "size": size, "macs": macs, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
