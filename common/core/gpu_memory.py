"""GPU memory figures as the allocator sees them and as FLARE22 measures them (flare22_eval.md).

FLARE counts what nvidia-smi shows in use: total - free of the device, i.e. the CUDA context plus everything the
caching allocator has reserved (and anything else on the GPU). `max_memory_allocated` alone under-reports that by
the context (~0.3-0.5 GB) and the allocator's slack, so every report gives all three figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEMORY_FIELDS = ("gpu_alloc_peak_mb", "gpu_reserved_peak_mb", "gpu_used_mb")
MEMORY_BAR_MB = 1536.0  # DESIGN 6: peak GPU memory per predicted case, held against used_mb (total - free)


@dataclass(frozen=True)
class GpuMemory:
    """Peak allocated and reserved memory of this process since the last reset, and device-wide total - free now.

    All in MiB; zero on a CPU device. `used_mb` is the figure the FLARE22 memory bar is held against.
    """

    alloc_peak_mb: float = 0.0
    reserved_peak_mb: float = 0.0
    used_mb: float = 0.0

    def as_row(self) -> dict[str, float]:
        """The three figures under the CSV column names of `MEMORY_FIELDS`, rounded to 0.1 MiB."""
        values = (self.alloc_peak_mb, self.reserved_peak_mb, self.used_mb)
        return {name: round(value, 1) for name, value in zip(MEMORY_FIELDS, values)}

    def max(self, other: GpuMemory) -> GpuMemory:
        """Field-wise maximum (peaks of several phases)."""
        return GpuMemory(max(self.alloc_peak_mb, other.alloc_peak_mb),
                         max(self.reserved_peak_mb, other.reserved_peak_mb),
                         max(self.used_mb, other.used_mb))


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_peak(device: str | torch.device) -> None:
    """Start a new peak window on `device` (no-op on CPU)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def snapshot(device: str | torch.device) -> GpuMemory:
    """Peaks since `reset_peak` and the device's total - free at this moment (zeros on CPU).

    Call it at the end of a phase, before freeing that phase's tensors, so total - free includes them.
    """
    if not _is_cuda(device):
        return GpuMemory()
    mib = float(2**20)
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(torch.cuda.max_memory_allocated(device) / mib,
                     torch.cuda.max_memory_reserved(device) / mib,
                     (total - free) / mib)
