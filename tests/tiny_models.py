"""Exported model folders of tiny random networks (channels 2,4,4,8,8), for predictor tests and the red-team pass."""

from __future__ import annotations

from pathlib import Path

import torch

from common import inference
from common.checkpoint import export_model
from common.networks import build_network

TINY = [2, 4, 4, 8, 8]
STAGE_DIRS = {"coarse": inference.COARSE_DIR, "fine": inference.FINE_DIR}


def export_tiny_stage(weights_dir: Path, stage: str, name: str, size: int, seed: int,
                      config: dict | None = None) -> Path:
    """Export networks A (seed) and B (seed + 1) of `name` at size^3 into `weights_dir/<stage folder>`."""
    kwargs: dict = {"channels": TINY, "dropout": 0.0}
    if name == "efficient_seg_net":
        kwargs["input_size_zyx"] = [size] * 3
    nets = {}
    for i, key in enumerate(("a", "b")):
        torch.manual_seed(seed + i)
        nets[key] = build_network(name, **kwargs).state_dict()
    preprocess = {"size_zyx": [size] * 3, "hu_window": [-325.0, 325.0]}
    if stage == "fine":
        preprocess["extend_size_mm"] = 20.0
    folder = Path(weights_dir) / STAGE_DIRS[stage]
    export_model(folder, stage=stage, model={"name": name, "kwargs": kwargs}, networks=nets, primary="a",
                 preprocess=preprocess, config=config or {"model": {"name": name}})
    return folder
