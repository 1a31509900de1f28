"""Coarse stage entry point: `python -m coarse_base_seg.train [config=PATH] [key=value ...]` (run.sh wraps it).

`main(cfg)` trains the two coarse networks with the shared CPS engine (common.engine) on the prepared 160^3
volumes, or exports the best weights when `step=export`. Tests call `main` directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from coarse_base_seg.dataset import CoarseData
from common.config import CoarseTrainConfig, ConfigError, parse_cli
from common.distributed import destroy_distributed, init_distributed
from common.engine import CPSJob, NonFiniteLossError, TrainingInterrupted, run_cps_training
from common.errors import InputError
from common.logger import setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")


def main(cfg: CoarseTrainConfig) -> dict[str, Any]:
    """Run `cfg.step`: "train" -> the engine's summary dict; "export" -> {"export_dir": model folder}."""
    if cfg.step == "export":
        from coarse_base_seg.export import export

        return {"export_dir": str(export(cfg).parent)}
    info = init_distributed(cfg.device)
    out_dir = Path(cfg.output_dir)
    setup_logging(out_dir / ("train.log" if info.is_main else f"train.rank{info.rank}.log"), rank=info.rank)
    data = CoarseData(cfg, info)
    job = CPSJob(
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
    )
    return run_cps_training(job)


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line: parse the config, run `main`, turn known failures into a one-line message and exit code."""
    try:
        cfg = parse_cli(CoarseTrainConfig, DEFAULT_CONFIG, argv)
        if cfg.step == "export" and not _is_rank0():
            return 0  # `GPUS=4 sh run.sh step=export`: one process exports
        main(cfg)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:  # the engine has logged what happened and where last.pt is
        return int(exc.code)
    finally:
        destroy_distributed()
    return 0


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(cli())
