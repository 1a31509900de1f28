"""Segmentation networks of both stages, built by name from plain keyword arguments."""

from __future__ import annotations

from typing import Any

from torch import nn

from common.networks.efficient_seg_net import EfficientSegNet
from common.networks.unet import UNet

NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "efficient_seg_net": EfficientSegNet}

__all__ = ["NETWORKS", "EfficientSegNet", "UNet", "build_network"]


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate `NETWORKS[name](**kwargs)`; an unknown name raises ValueError listing the known ones."""
    try:
        cls = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}") from None
    return cls(**kwargs)
