"""Residual 3D U-Net of the coarse stage (reference 2.1): 10,705,552 parameters with the default widths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.core.labels import FLARE22
from common.networks.blocks import ResFourLayerBlock, ResTwoLayerBlock, init_weights, upsample_to


class UNet(nn.Module):
    """Four max-pool down-samplings with Res4 encoder blocks, concat skips [skip, up] and Res2 decoder blocks.

    forward(x: (N, in_channels, D, H, W) normalised CT) -> logits (N, num_classes, D, H, W); D, H, W must be
    divisible by 16 and at least 32 (a 1-voxel bottleneck cannot be instance-normalised in training).
    No background channel: channel c is organ label c+1.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = FLARE22.num_organs,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), dropout: float = 0.2) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5:
            raise ValueError(f"UNet needs 5 channel widths (4 down-samplings), got {channels}")
        self.channels = channels
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.encoders = nn.ModuleList(
            ResFourLayerBlock(c_in, c_out, dropout=dropout)
            for c_in, c_out in zip((in_channels,) + channels[:-1], channels)
        )
        # decoders[i] produces level i from [enc_i, up(level i+1)].
        self.decoders = nn.ModuleList(
            ResTwoLayerBlock(channels[i] + channels[i + 1], channels[i], dropout=dropout) for i in range(4)
        )
        self.head = nn.Conv3d(channels[0], num_classes, kernel_size=1, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for level in range(3, -1, -1):
            skip = skips.pop()
            x = self.decoders[level](torch.cat([skip, upsample_to(x, skip.shape[2:])], dim=1))
        return self.head(x)
