"""Export the coarse networks for prediction: `python -m coarse_base_seg.export [key=value ...]`
(or `sh run.sh step=export`).

Copies `<output_dir>/checkpoints/best_model_<export.network>.pt` (the primary network) and the other network's
best checkpoint (kept for `--ensemble` prediction) with the resolved training config into `export.dir`
(default ../model_weights/base_coarse_model): model.pt + config.yaml, see common.checkpoint.export_model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from common.checkpoint import export_model, load_checkpoint
from common.config import CoarseTrainConfig, ConfigError, parse_cli
from common.errors import InputError
from common.logger import get_logger, setup_logging

logger = get_logger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")


def export(cfg: CoarseTrainConfig) -> Path:
    """Write the model folder `cfg.export.dir`; returns the path of its model.pt."""
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    primary = cfg.export.network
    payloads = {}
    for name in ("a", "b"):
        path = ckpt_dir / f"best_model_{name}.pt"
        if path.is_file():
            payloads[name] = load_checkpoint(path)
        elif name == primary:
            raise InputError(path, "not found: train first (sh run.sh), or point output_dir at a finished run")
        else:
            logger.warning("%s not found: exporting network %s only", path, primary)
    spec = payloads[primary]["model"]
    for name, payload in payloads.items():
        if payload.get("model") != spec:
            raise InputError(ckpt_dir / f"best_model_{name}.pt", f"model {payload.get('model')} differs from "
                                                                   f"network {primary}'s {spec}")
    config = payloads[primary]["config"]
    preprocess = {"size_zyx": list(config["data"]["size_zyx"]), "hu_window": list(config["data"]["hu_window"])}
    path = export_model(
        cfg.export.dir,
        stage="coarse",
        model=spec,
        networks={name: payload["net"] for name, payload in payloads.items()},
        primary=primary,
        preprocess=preprocess,
        config=config,
        best_dice={name: float("nan") if p.get("dice") is None else float(p["dice"]) for name, p in payloads.items()},
    )
    logger.info("exported coarse network %s (validation mean Dice %s, iteration %s) to %s", primary,
                payloads[primary].get("dice"), payloads[primary].get("iteration"), path.parent)
    return path


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line: same config and overrides as training; step is ignored."""
    setup_logging(None)
    try:
        cfg = parse_cli(CoarseTrainConfig, DEFAULT_CONFIG, argv)
        export(cfg)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
