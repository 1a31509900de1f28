"""The CPU floor of prediction: multiply-adds of both networks against the CPU's peak multiply-add rate.

    python -m benchmarks.cpu_floor [--measure] [--fma-units 2]

Counts the multiply-adds (MACs) of the full-size coarse U-Net at 160^3 and the fine EfficientSegNet at 192^3
(every Conv3d / ConvTranspose3d, counted by forward hooks on a meta-device forward, so counting costs no compute;
norms, activations and pooling are memory-bound and not counted) and states the CPU's peak:

    peak MAC/s = cores x FMA units per core x fp32 lanes per FMA x clock

lanes from the `lscpu` flags (avx512f: 16, avx2 + fma: 8, fma without avx2: 8, none: no FMA, 4-lane SSE mul+add
counted as 4), FMA units per core from the microarchitecture (2 on AMD Zen 1-5 and Intel Haswell and later; not
in the flags, so a parameter), clock from lscpu's "CPU max MHz" or else /proc/cpuinfo's "cpu MHz". `--measure` also
times one torch eager forward of each network and prints the fraction of peak it reaches.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.networks import build_network

FULL_NETWORKS = (("coarse", "unet", 160), ("fine", "efficient_seg_net", 192))


def count_macs(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward of `net` on an input of `input_shape` (N, C, D, H, W), convolutions only.

    Runs the forward on a meta-device copy (shapes only, no arithmetic); `net` itself is not changed.
    """
    import copy

    meta = copy.deepcopy(net).to("meta").eval()
    total = 0

    def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        if isinstance(module, nn.ConvTranspose3d):
            # every input voxel is spread over a kernel of every output channel of its group
            total += inputs[0].numel() * (module.out_channels // module.groups) * kernel
        else:
            total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(conv_hook) for m in meta.modules()
               if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    try:
        with torch.no_grad():
            meta(torch.empty(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def full_network(name: str, size: int) -> nn.Module:
    """A full-channel network of the predictor at input size `size`^3 (random weights)."""
    kwargs = {"input_size_zyx": [size] * 3} if name == "efficient_seg_net" else {}
    return build_network(name, **kwargs).eval()


@dataclass(frozen=True)
class CpuPeak:
    """The CPU's peak fp32 multiply-add rate and how it was derived."""

    cores: int
    fma_units: int
    lanes: int
    clock_ghz: float
    isa: str

    @property
    def macs_per_s(self) -> float:
        return self.cores * self.fma_units * self.lanes * self.clock_ghz * 1e9

    def describe(self) -> str:
        return (f"{self.cores} cores x {self.fma_units} FMA units x {self.lanes} fp32 lanes ({self.isa}) x "
                f"{self.clock_ghz:.3f} GHz = {self.macs_per_s / 1e9:.1f} GMAC/s ({2 * self.macs_per_s / 1e9:.1f} "
                f"GFLOP/s)")


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def lanes_from_flags(flags: Sequence[str]) -> tuple[int, str]:
    """fp32 lanes of one FMA instruction from CPU flags, and the instruction set it comes from."""
    f = set(flags)
    if "avx512f" in f:
        return 16, "avx512f"
    if "fma" in f and "avx" in f:
        return 8, "avx2+fma" if "avx2" in f else "avx+fma"
    if "avx" in f:
        return 8, "avx (mul+add, no fma)"
    return 4, "sse (mul+add)"


def cpu_peak(fma_units: int = 2, cores: int | None = None) -> CpuPeak:
    """Peak from lscpu (cores used by torch unless `cores` is given) and the flags; see the module doc."""
    info = _lscpu()
    lanes, isa = lanes_from_flags(info.get("Flags", "").split())
    mhz = 0.0
    if info.get("CPU max MHz"):
        mhz = float(info["CPU max MHz"])
    else:
        try:
            with open("/proc/cpuinfo") as f:
                found = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", f.read(), flags=re.MULTILINE)
            mhz = max(float(v) for v in found) if found else 0.0
        except OSError:
            pass
    return CpuPeak(cores or torch.get_num_threads() or os.cpu_count() or 1, fma_units, lanes, mhz / 1000.0, isa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="also time one torch eager forward per network")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core (default: %(default)s)")
    args = parser.parse_args(argv)
    peak = cpu_peak(args.fma_units)
    print(f"CPU peak: {peak.describe()}")
    print(f"{'network':<32}{'GMAC':>9}{'floor s':>9}" + (f"{'eager s':>9}{'of peak':>9}" if args.measure else ""))
    for stage, name, size in FULL_NETWORKS:
        net = full_network(name, size)
        macs = count_macs(net, (1, 1, size, size, size))
        line = f"{stage + ' ' + name + f' {size}^3':<32}{macs / 1e9:>9.1f}{macs / peak.macs_per_s:>9.2f}"
        if args.measure:
            x = torch.randn(1, 1, size, size, size)
            with torch.inference_mode():
                t0 = time.perf_counter()
                net(x)
                seconds = time.perf_counter() - t0
            line += f"{seconds:>9.2f}{macs / peak.macs_per_s / seconds:>9.1%}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
