"""Export the coarse networks for prediction: `python -m coarse_base_seg.export [key=value ...]`
(or `sh run.sh step=export`).

Copies `<output_dir>/checkpoints/best_model_<export.network>.pt` (the primary network) and the other network's
best checkpoint (kept for `--ensemble` prediction) with the resolved training config into `export.dir`
(default ../model_weights/base_coarse_model): model.pt + config.yaml, see common.storage.model_folder.export_model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from common.config import CoarseTrainConfig
from common.core.logger import get_logger, setup_logging
from common.infer.backends import export_model_graphs
from common.stage_cli import stage_cli
from common.storage.model_folder import export_best_networks

logger = get_logger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")


def export(cfg: CoarseTrainConfig) -> Path:
    """Write the model folder `cfg.export.dir`; returns the path of its model.pt."""
    path, best = export_best_networks(
        cfg.output_dir, cfg.export.dir, stage="coarse", primary=cfg.export.network,
        preprocess=cfg.preprocess_spec)
    export_model_graphs(path.parent, "coarse")  # the ONNX Runtime graphs, checked against torch
    logger.info("exported coarse network %s (validation mean Dice %s, iteration %s) to %s", cfg.export.network,
                best.get("dice"), best.get("iteration"), path.parent)
    return path


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line: same config and overrides as training; step is ignored (common.stage_cli's exit codes)."""
    setup_logging(None)
    return stage_cli(CoarseTrainConfig, DEFAULT_CONFIG, export, argv)


if __name__ == "__main__":
    sys.exit(cli())
