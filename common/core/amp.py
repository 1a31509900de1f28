"""Mixed precision settings: torch.autocast (bf16 or fp16) and a GradScaler for fp16 (DESIGN 5.10)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.core.logger import get_logger

logger = get_logger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")
"""The one precision vocabulary (training configs, the predictor, the boxes and uif steps): fp32 = no autocast."""
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class AmpSettings:
    """Autocast device type and dtype; `dtype=None` means plain fp32 (autocast disabled)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None


def amp_settings(precision: str, device: str | torch.device) -> AmpSettings:
    """Settings for `precision` ("bf16" | "fp16" | "fp32") on `device`; always fp32 on CPU.

    CPU autocast is not used for training: bf16 convolutions are slower than fp32 on most CPUs.
    """
    if precision not in PRECISIONS:
        hint = " (fp32 is plain float32, the former 'off')" if precision in ("off", False) else ""
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}{hint}")
    device_type = torch.device(device).type
    if precision == "fp32" or device_type != "cuda":
        if precision != "fp32":
            logger.info("mixed precision %s is not used on device %s; running fp32", precision, device_type)
        return AmpSettings(device_type, None)
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision bf16 is not supported by this GPU; set amp.precision=fp16 (or fp32)")
    return AmpSettings(device_type, _DTYPES[precision])


@contextlib.contextmanager
def autocast(settings: AmpSettings | None) -> Iterator[None]:
    """`torch.autocast` with the settings' dtype, or nothing when `settings` is None or disabled."""
    if settings is None or not settings.enabled:
        yield
        return
    with torch.autocast(device_type=settings.device_type, dtype=settings.dtype):
        yield


def make_grad_scaler(settings: AmpSettings | None) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA (bf16 and fp32 need no loss scaling)."""
    device_type = settings.device_type if settings is not None else "cpu"
    enabled = settings is not None and settings.dtype == torch.float16 and device_type == "cuda"
    return torch.amp.GradScaler(device_type, enabled=enabled)
