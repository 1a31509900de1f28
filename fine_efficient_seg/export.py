"""The export step: the best fine networks + config into `export.dir` (default ../model_weights/efficient_fine_model).

Source: the best checkpoints of the last round (round 1 + uif.rounds; round 1 without an unlabeled pool), or of
`export.round`. Both networks are stored (A and B, for `--ensemble` prediction); `export.network` is the primary.
The model folder's preprocess entry tells prediction how to build the fine input and post-process its output:
{"size_zyx", "hu_window", "extend_size_mm" (box margin), "min_volume_mm3" (smallest component kept)}.
`<output_dir>/export.json` records what was exported, so the step is skipped while it is current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import FineTrainConfig
from common.core.errors import InputError
from common.core.logger import get_logger
from common.infer.backends import export_model_graphs
from common.storage.model_folder import EXPORT_FILE, best_checkpoint_paths, export_best_networks
from common.storage.step_marker import file_stamp, marker_matches, write_marker
from fine_efficient_seg.layout import RunLayout

logger = get_logger(__name__)

def export_round(cfg: FineTrainConfig) -> int:
    """The round the export takes: export.round, else the last of the run (1 + uif.rounds; 1 without an unlabeled
    pool, where there is nothing to filter)."""
    if cfg.export.round is not None:
        return cfg.export.round
    return 1 if cfg.data.unlabeled_db is None else 1 + cfg.uif.rounds


def export_round_dir(cfg: FineTrainConfig) -> Path:
    """The folder of the exported round, which must have its best checkpoints (a finished round does)."""
    k = export_round(cfg)
    round_dir = RunLayout(cfg.output_dir).round_dir(k)
    best = round_dir / "checkpoints" / f"best_model_{cfg.export.network}.pt"
    if not best.is_file():
        raise InputError(best, f"not found: the export takes round {k} (export.round={cfg.export.round}, uif.rounds="
                               f"{cfg.uif.rounds}); train it first (sh run.sh step=round{k}, or step=all)")
    return round_dir


def _fingerprint(round_dir: Path, export_dir: Path, primary: str, min_volume_mm3: float) -> dict[str, Any]:
    files = {name: path for name, path in best_checkpoint_paths(round_dir).items() if path.is_file()}
    return {
        "round_dir": str(round_dir),
        "export_dir": str(export_dir),
        "primary": primary,
        "min_volume_mm3": float(min_volume_mm3),
        "sources": {name: {"path": str(p), **file_stamp(p)} for name, p in files.items()},
    }


def export_is_current(cfg: FineTrainConfig) -> bool:
    """True when export.dir holds a model written from the current best checkpoints (per export.json)."""
    export_dir = Path(cfg.export.dir)
    if not (export_dir / EXPORT_FILE).is_file():
        return False
    try:
        current = _fingerprint(export_round_dir(cfg), export_dir, cfg.export.network, cfg.postprocess.min_volume_mm3)
    except (OSError, InputError):
        return False
    return marker_matches(RunLayout(cfg.output_dir).export_marker, current)


def export(cfg: FineTrainConfig) -> Path:
    """Write model.pt + config.yaml into cfg.export.dir; returns the model.pt path."""
    round_dir = export_round_dir(cfg)
    primary = cfg.export.network
    path, best = export_best_networks(
        round_dir, cfg.export.dir, stage="fine", primary=primary,
        preprocess=cfg.preprocess_spec)
    export_model_graphs(path.parent, "fine")  # the ONNX Runtime graphs, checked against torch
    write_marker(RunLayout(cfg.output_dir).export_marker, _fingerprint(round_dir, Path(cfg.export.dir), primary,
                                                                    cfg.postprocess.min_volume_mm3))
    logger.info("exported fine network %s of %s (validation mean Dice %s, iteration %s) to %s", primary,
                round_dir.name, best.get("dice"), best.get("iteration"), path.parent)
    return path
