"""Segmentation networks of both stages, built by name from plain keyword arguments (imports common.core only).

`NETWORKS` is the registry the configs choose from; `input_size_problem` is the one rule for a network input size.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from common.networks.efficient_seg_net import EfficientSegNet
from common.networks.unet import UNet

NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "efficient_seg_net": EfficientSegNet}

# Both networks (U-Net and EfficientSegNet, 5 channel levels) halve the input 4 times: the bottleneck is size / 16,
# and instance norm needs at least 2 voxels per axis there.
DOWNSAMPLING = 16
MIN_INPUT_SIZE = 2 * DOWNSAMPLING
# Largest input size per axis: 512^3 already needs tens of GB for one forward pass (192 is trained, 160 the original's);
# a larger value is a typo that would reach the allocator.
MAX_INPUT_SIZE = 512

__all__ = ["DOWNSAMPLING", "MAX_INPUT_SIZE", "MIN_INPUT_SIZE", "NETWORKS", "EfficientSegNet", "UNet", "build_network",
           "input_size_problem"]


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate `NETWORKS[name](**kwargs)`; an unknown name raises ValueError listing the known ones."""
    try:
        cls = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}") from None
    return cls(**kwargs)


def input_size_problem(size_zyx: Sequence[int]) -> str | None:
    """What is wrong with `size_zyx` as a network input size (3 sizes, each a multiple of 16 in 32..512), or None."""
    sizes = list(size_zyx)
    if len(sizes) != 3:
        return f"{sizes} is not 3 sizes (z, y, x)"
    if any(int(s) % DOWNSAMPLING for s in sizes):
        return f"{sizes}: every size must be a multiple of {DOWNSAMPLING} (the networks halve the input 4 times)"
    if any(int(s) < MIN_INPUT_SIZE for s in sizes):
        bottleneck = [int(s) // DOWNSAMPLING for s in sizes]
        return (f"{sizes} leaves a bottleneck of {bottleneck} voxels after the networks' x{DOWNSAMPLING} downsampling; "
                f"instance norm needs at least 2 per axis: use sizes >= {MIN_INPUT_SIZE}")
    if any(int(s) > MAX_INPUT_SIZE for s in sizes):
        return f"{sizes}: every size must be <= {MAX_INPUT_SIZE} (192 is trained, 160 the original predictor's)"
    return None
