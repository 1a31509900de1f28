"""EfficientSegNet of the fine stage (reference 2.2): 9,366,160 parameters with the default widths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.core.labels import FLARE22
from common.networks.blocks import AnisoBlock, ConvIN, ConvINReLU, ResBaseBlock, init_weights, res_layer, upsample_to


def _avg_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """AvgPool3d(kernel, stride=kernel); an axis shorter than `kernel` is pooled whole.

    At the reference sizes (bottleneck >= 4 voxels per axis) this is exactly AvgPool3d(kernel); the
    clamp only lets tiny inputs (e.g. 32^3 -> 2^3 bottleneck) run.
    """
    k = tuple(min(kernel, s) for s in x.shape[2:])
    return F.avg_pool3d(x, kernel_size=k, stride=k)


def _conv_in(block: ConvIN, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` that also works on a single-voxel map in training mode.

    Instance norm of one voxel is exactly 0 (x - mean = 0), but torch refuses it in training mode. That
    happens for the 4x pooled branch at 64^3 inputs (bottleneck 4^3); return the zero with the conv still in
    the graph, so every parameter gets a (zero) gradient as DDP expects.
    """
    if x.shape[2:].numel() > 1:
        return block(x)
    y = block[0](x)
    return y - y


class AnisotropicAvgPooling(nn.Module):
    """Context block on the bottleneck: multi-scale avg-pool branch + strip-pooling branch (reference 2.2).

    The strips pool over the full bottleneck extent of the two other axes. The reference uses a fixed kernel
    `input_size // 16` per axis, which is the full bottleneck extent at the size the network was built for;
    pooling the actual extent is identical there and keeps the block valid when the network runs on another
    input size (e.g. 160^3 deployment of a 192^3 model, or tiny test volumes).
    """

    def __init__(self, channels: int, input_size_zyx: Sequence[int], dropout: float = 0.2) -> None:
        super().__init__()
        inner = channels // 4
        if inner < 1:
            raise ValueError(f"context block needs >= 4 channels, got {channels}")
        self.strip_kernel_zyx = tuple(int(s) // 16 for s in input_size_zyx)  # documentation of the built size
        self.reduce = ConvINReLU(channels, inner, 1, dropout=dropout)
        # multi-scale branch
        self.scale_in = ConvINReLU(inner, inner, 1, dropout=dropout)
        self.scale1 = ConvIN(inner, inner, 3)
        self.scale2 = ConvIN(inner, inner, 3)
        self.scale4 = ConvIN(inner, inner, 3)
        self.scale_out = ConvINReLU(inner, inner, 3, dropout=dropout)
        # strip branch
        self.strip_in = ConvINReLU(inner, inner, 1, dropout=dropout)
        self.strip_z = ConvIN(inner, inner, (3, 1, 1))
        self.strip_y = ConvIN(inner, inner, (1, 3, 1))
        self.strip_x = ConvIN(inner, inner, (1, 1, 3))
        self.strip_out = ConvINReLU(inner, inner, 3, dropout=dropout)
        self.merge = ConvIN(2 * inner, inner, 1)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Sequential(
            ConvINReLU(inner, inner, 3, dropout=dropout),
            nn.Conv3d(inner, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.reduce(x)
        size = x0.shape[2:]
        d, h, w = size

        a = self.scale_in(x0)
        s = (self.scale1(a)
             + upsample_to(_conv_in(self.scale2, _avg_pool(a, 2)), size)
             + upsample_to(_conv_in(self.scale4, _avg_pool(a, 4)), size))
        b1 = self.scale_out(self.relu(s))

        b = self.strip_in(x0)
        strips = (upsample_to(_conv_in(self.strip_z, F.avg_pool3d(b, (1, h, w))), size)   # (d, 1, 1)
                  + upsample_to(_conv_in(self.strip_y, F.avg_pool3d(b, (d, 1, w))), size)  # (1, h, 1)
                  + upsample_to(_conv_in(self.strip_x, F.avg_pool3d(b, (d, h, 1))), size))  # (1, 1, w)
        b2 = self.strip_out(self.relu(strips))

        y = self.relu(x0 + self.merge(torch.cat([b1, b2], dim=1)))
        return self.out(y)


class EfficientSegNet(nn.Module):
    """Residual encoder with strided convs, strip-pooling context block, slim additive-skip anisotropic decoder.

    forward(x: (N, in_channels, D, H, W) normalised CT) -> logits (N, num_classes, D, H, W); D, H, W must be
    divisible by 16 and at least 32 (a 1-voxel bottleneck cannot be instance-normalised in training).
    `input_size_zyx` is the training input size (the reference's strip kernel = size // 16); other sizes
    work too (see AnisotropicAvgPooling).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = FLARE22.num_organs,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), num_blocks: Sequence[int] = (2, 2, 2, 2),
                 dropout: float = 0.2, input_size_zyx: Sequence[int] = (192, 192, 192)) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        num_blocks = tuple(int(n) for n in num_blocks)
        if len(channels) != 5:
            raise ValueError(f"EfficientSegNet needs 5 channel widths, got {channels}")
        if len(num_blocks) != 4:
            raise ValueError(f"EfficientSegNet needs 4 block counts, got {num_blocks}")
        if len(input_size_zyx) != 3:
            raise ValueError(f"input_size_zyx needs 3 sizes, got {tuple(input_size_zyx)}")
        self.channels = channels
        self.input_size_zyx = tuple(int(s) for s in input_size_zyx)
        # The reference takes enc0's and enc1's block counts both from num_blocks[0].
        counts = (num_blocks[0],) + num_blocks
        ins = (in_channels,) + channels[:-1]
        self.encoders = nn.ModuleList(
            res_layer(ResBaseBlock, ins[i], channels[i], counts[i], stride=1 if i == 0 else 2, dropout=dropout)
            for i in range(5)
        )
        self.context = AnisotropicAvgPooling(channels[4], self.input_size_zyx, dropout=dropout)
        # transitions[i] maps level i+1 to the width of level i before the upsampling.
        self.transitions = nn.ModuleList(ConvINReLU(channels[i + 1], channels[i], 1, dropout=dropout)
                                         for i in range(4))
        self.decoders = nn.ModuleList(
            AnisoBlock(channels[i], channels[i], stride=1, identity_allowed=False, dropout=dropout) for i in range(4)
        )
        self.head = nn.Conv3d(channels[0], num_classes, kernel_size=1, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = self.context(skips.pop())
        for level in range(3, -1, -1):
            skip = skips.pop()
            x = self.decoders[level](upsample_to(self.transitions[level](x), skip.shape[2:]) + skip)
        return self.head(x)
