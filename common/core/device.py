"""The one rule that turns a `device` setting into a torch.device, for training ranks and for prediction.

Accepted settings: "auto", "cpu", "cuda", "cuda:N" (`device_problem` checks the spelling, so the config can reject
a typo before anything starts). Resolution (`resolve_device`):
- "cpu" -> cpu;
- "auto" -> CUDA when available, else cpu; "cuda" -> CUDA, an error without one;
- CUDA without an index -> cuda:(LOCAL_RANK % device_count()). The modulo keeps launchers that give every
  process its own CUDA_VISIBLE_DEVICES (one visible GPU, LOCAL_RANK > 0) working, and is LOCAL_RANK itself under
  plain torchrun on one node;
- "cuda:N" is taken as it is for one process; with WORLD_SIZE > 1 it is refused, because every rank would land
  on GPU N (NCCL refuses two ranks on one GPU): choose the GPUs with CUDA_VISIBLE_DEVICES instead.
"""

from __future__ import annotations

import os
import re

import torch

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(value: str) -> str | None:
    """None if `value` is a valid device setting, else what is wrong with it (for config messages)."""
    if _DEVICE_PATTERN.fullmatch(str(value).strip().lower()):
        return None
    return f"got {value!r}; expected one of 'auto', 'cpu', 'cuda', 'cuda:N'"


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's RANK, WORLD_SIZE, LOCAL_RANK), `default` when unset or empty."""
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None,
                   world_size: int | None = None) -> torch.device:
    """The torch.device of `device` for this process (see the module docstring for the rule).

    local_rank and world_size default to the LOCAL_RANK and WORLD_SIZE that torchrun sets (0 and 1 without it).
    Raises ValueError for an unknown setting, CUDA asked for where there is none, an index beyond the visible
    GPUs, or an explicit cuda:N with several processes.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).strip().lower()
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(f"device: {problem}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine (use device=cpu or auto)")
    count = torch.cuda.device_count()
    local_rank = env_int("LOCAL_RANK", 0) if local_rank is None else int(local_rank)
    world_size = env_int("WORLD_SIZE", 1) if world_size is None else int(world_size)
    if ":" not in name:
        return torch.device("cuda", local_rank % count)
    index = int(name.split(":", 1)[1])
    if world_size > 1:
        raise ValueError(f"device={device!r} with WORLD_SIZE={world_size} would put every rank on GPU {index}; "
                         "use device=cuda (or auto): each rank takes cuda:(LOCAL_RANK % device_count), and "
                         "CUDA_VISIBLE_DEVICES chooses the GPUs")
    if index >= count:
        raise ValueError(f"device={device!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def set_cudnn_benchmark(device: str | torch.device, enabled: bool = True) -> None:
    """Let cuDNN time its convolution algorithms at the first call of each input shape and keep the fastest.

    One setting for training (common.train.engine) and prediction (common.infer.predictor), both of which run fixed
    shapes, so the timing is paid once. No-op off CUDA. Cost to watch: the fastest algorithm may want a larger
    workspace, which the caching allocator then keeps reserved, so it counts in total - free, the figure the 1.5 GB
    prediction bar is held against; benchmarks/gpu_check.py measures gpu_used_mb with it on and off, and
    cuDNN's CUDNN_CONV_WSCAP_DBG=<MiB> environment variable caps the workspace it may choose.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = bool(enabled)
