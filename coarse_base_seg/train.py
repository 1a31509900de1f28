"""Coarse stage entry point: `python -m coarse_base_seg.train [config=PATH] [key=value ...]` (run.sh wraps it).

`main(cfg)` trains the two coarse networks with the shared CPS engine (common.train.engine) on the prepared 160^3
volumes, or exports the best weights when `step=export`. Tests call `main` directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from coarse_base_seg.dataset import CoarseData
from common.config import CoarseTrainConfig
from common.core.logger import log_to_file, setup_logging
from common.stage_cli import stage_cli
from common.storage.labelsets import dataset_labels
from common.storage.step_marker import claim_run_folder
from common.train.distributed import DistInfo, init_distributed
from common.train.engine import CPSJob, run_cps_training, run_folder_lock, run_log_path

DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")


def main(cfg: CoarseTrainConfig) -> dict[str, Any]:
    """Run `cfg.step`: "train" -> the engine's summary dict; "export" -> {"export_dir": model folder}."""
    out_dir = Path(cfg.output_dir)
    if cfg.step == "export":
        from coarse_base_seg.export import export

        claim_run_folder(out_dir, cfg.run_identity("coarse"), write=False)
        return {"export_dir": str(export(cfg).parent)}
    info = init_distributed(cfg.device)
    setup_logging(None, rank=info.rank)  # console; train.log holds the data set-up and the engine's run
    with run_folder_lock(out_dir, info), log_to_file(run_log_path(out_dir, info), rank=info.rank):
        job = _job(cfg, info, out_dir)  # checks the dataset first: a bad data_base_dir claims no folder
        claim_run_folder(out_dir, cfg.run_identity("coarse"), write=info.is_main)
        return run_cps_training(job)


def _job(cfg: CoarseTrainConfig, info: DistInfo, out_dir: Path) -> CPSJob:
    data = CoarseData(cfg, info)
    return CPSJob(
        cfg=cfg,
        out_dir=out_dir,
        labeled_stream=data.labeled_stream,
        unlabeled_stream=data.unlabeled_stream if data.unlabeled_cases is not None else None,
        val_cases=data.val_cases,
        iterations=cfg.schedule.iterations,
        input_transform=data.normalize,
        init_weights=cfg.model.init_from,
        dist=info,
        stage="coarse",
        labels=dataset_labels(cfg.data_base_dir),
    )


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line (common.stage_cli); `GPUS=4 sh run.sh step=export`: only rank 0 exports."""
    return stage_cli(CoarseTrainConfig, DEFAULT_CONFIG, main, argv,
                     skip=lambda cfg: cfg.step == "export" and not _is_rank0())


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(cli())
