"""Exported model folders of tiny random networks (channels 2,4,4,8,8), for predictor tests and the red-team pass."""

from __future__ import annotations

from pathlib import Path

import torch

from common.core.labels import FLARE22, LabelSet
from common.networks import build_network
from common.storage import model_folder
from common.storage.model_folder import PreprocessSpec, export_model

TINY = [2, 4, 4, 8, 8]
STAGE_DIRS = {"coarse": model_folder.COARSE_DIR, "fine": model_folder.FINE_DIR}


def export_tiny_stage(weights_dir: Path, stage: str, name: str, size: int, seed: int,
                      config: dict | None = None, labels: LabelSet = FLARE22) -> Path:
    """Export networks A (seed) and B (seed + 1) of `name` at size^3, segmenting `labels`, into
    `weights_dir/<stage folder>`."""
    kwargs: dict = {"channels": TINY, "dropout": 0.0, "num_classes": labels.num_organs}
    if name == "efficient_seg_net":
        kwargs["input_size_zyx"] = [size] * 3
    nets = {}
    for i, key in enumerate(("a", "b")):
        torch.manual_seed(seed + i)
        nets[key] = build_network(name, **kwargs).state_dict()
    folder = Path(weights_dir) / STAGE_DIRS[stage]
    export_model(folder, stage=stage, model={"name": name, "kwargs": kwargs}, networks=nets, primary="a",
                 preprocess=PreprocessSpec(stage, (size,) * 3), config=config or {"model": {"name": name}},
                 labels=labels)
    return folder


def prepared_tiny_dataset(root: Path, *, labeled: int, unlabeled: int, seed: int, hard_fraction: float,
                          size: int = 32, prepare_overrides: tuple[str, ...] = ()) -> Path:
    """A `tiny` synthetic dataset in root/dataset, prepared by data_prepare at size^3 (plus `prepare_overrides`),
    and an exported coarse model of one random tiny U-Net (torch seed 0) in root/coarse_model. Returns the dataset."""
    from common.config import PrepareConfig
    from common.core.typed_config import load_config
    from common.storage.checkpoint import model_state_dict
    from data_prepare import run as prepare_run
    from data_prepare.synthetic import write_dataset

    data = Path(root) / "dataset"
    write_dataset(data, labeled=labeled, unlabeled=unlabeled, val=0, seed=seed, size="tiny",
                  hard_fraction=hard_fraction)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(PrepareConfig, repo / "data_prepare" / "config.yaml",
                      [f"data_base_dir={data}", f"coarse_size_zyx=[{size},{size},{size}]",
                       f"fine_size_zyx=[{size},{size},{size}]", "num_workers=0", *prepare_overrides])
    assert prepare_run.main(cfg) == 0
    torch.manual_seed(0)
    kwargs = {"channels": TINY, "dropout": 0.0}
    export_model(Path(root) / "coarse_model", stage="coarse", model={"name": "unet", "kwargs": kwargs},
                 networks={"a": model_state_dict(build_network("unet", **kwargs))}, primary="a",
                 preprocess=PreprocessSpec("coarse", (size,) * 3), config={})
    return data
