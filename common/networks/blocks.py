"""Building blocks shared by the U-Net and EfficientSegNet (reference 2, 2.1, 2.2).

Every convolution is a bias-free `Conv3d`; every normalisation is `InstanceNorm3d` without affine
parameters or running statistics; `Dropout3d` (whole channels) sits between the norm and the ReLU.
Tensors are (N, C, D=z, H=y, W=x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Size3 = int | tuple[int, int, int]


def _triple(value: Size3) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 ints, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _same_padding(kernel_size: Size3) -> tuple[int, int, int]:
    return tuple(k // 2 for k in _triple(kernel_size))  # type: ignore[return-value]


class ConvIN(nn.Sequential):
    """Conv3d (no bias, 'same' padding for odd kernels) -> InstanceNorm3d (no affine)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size3 = 3, stride: Size3 = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=_same_padding(kernel_size),
                      bias=False),
            nn.InstanceNorm3d(out_channels, affine=False, track_running_stats=False),
        )


class ConvINReLU(nn.Sequential):
    """Conv3d (no bias) -> InstanceNorm3d (no affine) -> Dropout3d(p) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size3 = 3, stride: Size3 = 1,
                 dropout: float = 0.2) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=_same_padding(kernel_size),
                      bias=False),
            nn.InstanceNorm3d(out_channels, affine=False, track_running_stats=False),
            nn.Dropout3d(p=dropout),
            nn.ReLU(inplace=True),
        )


class _Residual(nn.Module):
    """relu(main(x) + shortcut(x)); shortcut is identity or a strided 1^3 ConvIN projection."""

    def __init__(self, main: nn.Module, in_channels: int, out_channels: int, stride: Size3,
                 identity_allowed: bool) -> None:
        super().__init__()
        self.main = main
        if identity_allowed and in_channels == out_channels and _triple(stride) == (1, 1, 1):
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ConvIN(in_channels, out_channels, kernel_size=1, stride=stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.main(x) + self.shortcut(x))


class ResBaseBlock(_Residual):
    """ResBase: ConvINReLU 3^3 (stride) -> ConvIN 3^3, plus identity or projection shortcut (reference 2.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: Size3 = 1, identity_allowed: bool = True,
                 dropout: float = 0.2) -> None:
        main = nn.Sequential(
            ConvINReLU(in_channels, out_channels, 3, stride=stride, dropout=dropout),
            ConvIN(out_channels, out_channels, 3),
        )
        super().__init__(main, in_channels, out_channels, stride, identity_allowed)


class AnisoBlock(_Residual):
    """Aniso: ConvINReLU kernel (3,3,1) -> ConvIN kernel (1,1,3) on (D,H,W), plus shortcut (reference 2.2).

    The orientation is the reference code's, not the paper's (reference 2.2 [QUIRK]).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Size3 = 1, identity_allowed: bool = True,
                 dropout: float = 0.2) -> None:
        main = nn.Sequential(
            ConvINReLU(in_channels, out_channels, (3, 3, 1), stride=stride, dropout=dropout),
            ConvIN(out_channels, out_channels, (1, 1, 3)),
        )
        super().__init__(main, in_channels, out_channels, stride, identity_allowed)


class ResTwoLayerBlock(ResBaseBlock):
    """Res2 of the U-Net decoder: a ResBase block that always has a projection shortcut (reference 2.1)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.2) -> None:
        super().__init__(in_channels, out_channels, stride=1, identity_allowed=False, dropout=dropout)


class ResFourLayerBlock(nn.Sequential):
    """Res4 of the U-Net encoder: Res2(in, c) (projection) then ResBase(c, c) (identity) (reference 2.1)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.2) -> None:
        super().__init__(
            ResTwoLayerBlock(in_channels, out_channels, dropout=dropout),
            ResBaseBlock(out_channels, out_channels, stride=1, identity_allowed=True, dropout=dropout),
        )


def res_layer(block: type[ResBaseBlock] | type[AnisoBlock], in_channels: int, out_channels: int, num_blocks: int,
              stride: Size3 = 1, dropout: float = 0.2) -> nn.Sequential:
    """A stage of `num_blocks` blocks: the first strided and always projected, the rest identity (reference 2.2)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    blocks = [block(in_channels, out_channels, stride=stride, identity_allowed=False, dropout=dropout)]
    blocks += [block(out_channels, out_channels, stride=1, identity_allowed=True, dropout=dropout)
               for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def upsample_to(x: torch.Tensor, size_zyx: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of (N,C,D,H,W) to `size_zyx` with align_corners=True (the reference's upsampling)."""
    if tuple(x.shape[2:]) == tuple(size_zyx):
        return x
    return F.interpolate(x, size=tuple(size_zyx), mode="trilinear", align_corners=True)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal init (fan_in, ReLU gain: std = sqrt(2 / fan_in)) of every Conv3d weight."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
