"""Fine stage entry point: `python -m fine_efficient_seg.train [config=PATH] [key=value ...]` (run.sh wraps it).

Steps (`step=all` runs them in this order; each is skipped when its output is already there):
  boxes   organ box of every unlabeled case from the exported coarse model     -> <output_dir>/db/unlabeled_boxes,
          and the only copy of its image the stage reads: box + largest extension -> <output_dir>/db/unlabeled_regions
  round1  CPS training of two EfficientSegNets on labeled + all unlabeled crops   -> <output_dir>/round1/
  uif     uncertainty of every unlabeled case, keep the most certain  -> uif_scores.csv, <output_dir>/db/uif_pool
  round2  CPS training on labeled + the kept cases (warm from round 1, or fresh)   -> <output_dir>/round2/
  uif2, round3, ...  with uif.rounds > 1: filter k scores the whole pool with round k's networks and keeps the most
          certain (keep_schedule growing: k times as many) -> <output_dir>/uif_round<k>/; round k + 1 trains on them
  export  best networks of the last round (1 + uif.rounds; 1 without an unlabeled pool) or export.round -> export.dir
The rounds use the shared engine (common.train.engine: checkpoints of both networks, resume, DDP, AMP, TensorBoard,
metrics.jsonl); the crops are made on the training device by fine_efficient_seg.dataset. Tests call `main`.
Under torchrun, boxes and uif share their cases across the ranks (rank 0 writes) and export runs on rank 0; an
error on any rank in these steps ends every rank at once with its message.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from common.config import FineTrainConfig, uif_step
from common.core.errors import InputError
from common.core.labels import FLARE22, LabelSet
from common.core.logger import get_logger, setup_logging
from common.core.typed_config import config_to_dict
from common.stage_cli import stage_cli
from common.storage.data_paths import db_path
from common.storage.labelsets import dataset_labels
from common.storage.lmdb_store import open_store
from common.storage.model_folder import best_checkpoint_paths
from common.storage.step_marker import claim_run_folder, file_stamp, marker_matches, read_marker, write_marker
from common.train.distributed import DistInfo, init_distributed, run_on_every_rank
from common.train.engine import DONE_FILE, INPUTS_FILE, CPSJob, run_cps_training, run_folder_lock
from fine_efficient_seg.augment import FineAugmentSettings
from fine_efficient_seg.boxes import compute_boxes
from fine_efficient_seg.dataset import (
    FineCase,
    FineStream,
    SampleSpec,
    StreamSpec,
    load_cases,
    read_boxes,
    validation_cases,
)
from fine_efficient_seg.export import export, export_is_current, export_round, export_round_dir
from fine_efficient_seg.layout import RunLayout
from fine_efficient_seg.uif import UifOptions, run_uif, snapshot_iterations

logger = get_logger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().with_name("config.yaml")


def sample_spec(cfg: FineTrainConfig, labels: LabelSet = FLARE22) -> SampleSpec:
    """How the training samples are made: network input size, HU window, the crop section's augmentation, and the
    dataset's label count."""
    crop = dataclasses.asdict(cfg.crop)  # the crop section's fields are the augmentation's
    augment = FineAugmentSettings(**{**crop, "hu_shift_max": int(crop["hu_shift_max"])})
    return SampleSpec(tuple(cfg.data.size_zyx), tuple(cfg.data.hu_window), augment,  # type: ignore[arg-type]
                      labels.num_organs)


def uif_options(cfg: FineTrainConfig, k: int = 1) -> UifOptions:
    """The uif section for filter k (its keep under uif.keep_schedule), with the fixed fine crop (box +
    crop.extend_size_mm at data.size_zyx) it scores on."""
    keep_count, keep_ratio = cfg.uif.keep(k)
    return UifOptions(method=cfg.uif.score, keep_count=keep_count, keep_ratio=keep_ratio,
                      weighting=cfg.uif.weighting, size_zyx=tuple(cfg.data.size_zyx),  # type: ignore[arg-type]
                      hu_window=tuple(cfg.data.hu_window), extend_size_mm=cfg.crop.extend_size_mm,  # type: ignore
                      precision=cfg.amp.precision)


def unlabeled_db(cfg: FineTrainConfig) -> Path | None:
    """The round-1 unlabeled pool, or None when data.unlabeled_db is null (labeled-only training)."""
    if cfg.data.unlabeled_db is None:
        return None
    return db_path(cfg.data.unlabeled_db, cfg.data_base_dir, cfg.fold)


def _round_done(layout: RunLayout, k: int) -> bool:
    return (layout.round_dir(k) / DONE_FILE).is_file()


# ----------------------------------------------------------------------------------------------------- steps


def step_boxes(cfg: FineTrainConfig, info: DistInfo) -> dict[str, Any]:
    pool = unlabeled_db(cfg)
    if pool is None:
        logger.info("boxes: data.unlabeled_db is null; nothing to do")
        return {"skipped": True}
    layout = RunLayout(cfg.output_dir)
    return compute_boxes(pool, layout.boxes_db, cfg.data_base_dir, cfg.boxes.coarse_model_dir, info.device,
                         cfg.amp.precision, regions_dir=layout.regions_dir,
                         # every crop the stage draws lies inside box + max_extend_size_mm: random extensions are
                         # smaller, and the config requires extend_size_mm (training and UIF crop) <= it
                         region_margin_mm=cfg.crop.max_extend_size_mm)


def _round_inputs(cfg: FineTrainConfig, k: int) -> tuple[Path | None, Path | None, Any, int, tuple[int, ...]]:
    """(unlabeled pool, boxes database, start weights, iterations, snapshot iterations) of round k."""
    layout = RunLayout(cfg.output_dir)
    if k == 1:
        pool = unlabeled_db(cfg)
        snapshots = snapshot_iterations(cfg.schedule.iterations, cfg.uif.snapshots) if pool is not None else ()
        return pool, layout.boxes_db, cfg.model.init_from, cfg.schedule.iterations, snapshots
    # round k trains on filter k - 1's pool, whose records carry their boxes
    pool = layout.pool_db(k - 1) if unlabeled_db(cfg) is not None else None
    if pool is not None and not layout.scores_csv(k - 1).is_file():
        raise InputError(layout.scores_csv(k - 1), "not found: run the uif step first (sh run.sh step=uif)")
    init_weights: Any = cfg.model.init_from  # fresh: where round 1 started from
    if cfg.round2.init == "warm":
        init_weights = best_checkpoint_paths(layout.round_dir(k - 1))
        for path in init_weights.values():
            if not path.is_file():
                raise InputError(path, f"not found: round2.init=warm needs a finished round {k - 1}")
    return pool, None, init_weights, cfg.round2.iterations or cfg.schedule.iterations, ()


def _records_digest(db: Path | None) -> str | None:
    """A hash of every record of an LMDB database (None for none, or one not written yet): what a round learns from
    changes it."""
    if db is None or not (Path(db) / "data.mdb").is_file():
        return None
    store = open_store(db, readonly=True)
    try:
        return hashlib.sha256(json.dumps(store.to_dict(), sort_keys=True).encode()).hexdigest()
    finally:
        store.close()


def round_inputs(cfg: FineTrainConfig, k: int) -> dict[str, Any]:
    """What round k's networks depend on besides the iteration count: its unlabeled pool (round 1: the unlabeled
    database and the boxes; round k > 1: filter k - 1's pool), its start weights and the config keys training reads.
    The engine redoes a round whose folder was trained from other inputs, and the export refuses one."""
    pool, boxes, init_weights, _, _ = _round_inputs(cfg, k)
    if isinstance(init_weights, dict):  # warm: round k - 1's best networks
        init_weights = {name: file_stamp(path) for name, path in init_weights.items()}
    settings = config_to_dict(cfg)
    return {
        "pool": {"records": _records_digest(pool), "boxes": _records_digest(boxes if pool is not None else None)},
        "init": init_weights,
        "settings": {"seed": settings["seed"], "data": {key: settings["data"][key] for key in (
            "labeled_db", "unlabeled_db", "val_db", "size_zyx", "hu_window", "labeled_batch_size",
            "unlabeled_batch_size")}, "model": settings["model"], "optim": settings["optim"],
            "schedule": {key: settings["schedule"][key] for key in ("lr_drop_at", "lr_drop_factor")},
            "loss": settings["loss"], "cps": settings["cps"], "amp": {"precision": settings["amp"]["precision"]},
            "crop": settings["crop"]},
    }


def run_round(cfg: FineTrainConfig, info: DistInfo, k: int) -> dict[str, Any]:
    """CPS round k through the engine (which resumes from last.pt, returns at once when DONE, and starts anew when
    the round's inputs changed)."""
    pool, boxes, init_weights, iterations, snapshots = _round_inputs(cfg, k)
    data_base = cfg.data_base_dir
    labels = dataset_labels(data_base)
    sample = sample_spec(cfg, labels)

    def stream(cases: Sequence[FineCase], name: str, labeled: bool, batch_size: int) -> FineStream:
        spec = StreamSpec(name, cfg.seed, batch_size, labeled, read_threads=cfg.data.num_workers)
        return FineStream(cases, spec, sample, info.device, rank=info.rank, world_size=info.world_size)

    labeled_cases = load_cases(db_path(cfg.data.labeled_db, data_base, cfg.fold), data_base, labeled=True)
    labeled_stream = stream(labeled_cases, "labeled", True, cfg.data.labeled_batch_size)
    unlabeled_stream = None
    if pool is not None:
        unlabeled_cases = load_cases(pool, data_base, labeled=False, boxes_db=boxes)
        _check_unlabeled_regions(unlabeled_cases, cfg, boxes or pool)
        unlabeled_stream = stream(unlabeled_cases, "unlabeled", False, cfg.data.unlabeled_batch_size)
        logger.info("round%d: %d labeled + %d unlabeled cases (%s)", k, len(labeled_cases), len(unlabeled_cases),
                    pool)
    else:
        logger.info("round%d: %d labeled cases, no unlabeled pool", k, len(labeled_cases))
    val_db = db_path(cfg.data.val_db, data_base, cfg.fold)
    job = CPSJob(
        cfg=cfg, out_dir=RunLayout(cfg.output_dir).round_dir(k),
        labeled_stream=labeled_stream, unlabeled_stream=unlabeled_stream,
        val_cases=lambda rank, world: validation_cases(val_db, data_base, sample, info.device, rank, world),
        iterations=iterations, init_weights=init_weights, dist=info, stage="fine", labels=labels,
        extra_checkpoint={"round": f"round{k}"}, snapshot_iterations=snapshots, inputs=round_inputs(cfg, k))
    return run_cps_training(job)


def _check_unlabeled_regions(cases: Sequence[FineCase], cfg: FineTrainConfig, db: Path) -> None:
    """InputError unless every unlabeled region holds the crops of this config (cut with a margin >=
    crop.max_extend_size_mm): a smaller one would clip the random extensions silently."""
    narrow = [c for c in cases if c.region_margin_mm is None or c.region_margin_mm < cfg.crop.max_extend_size_mm]
    if narrow:
        raise InputError(db, f"{len(narrow)} unlabeled region(s) (first: {narrow[0].case_id}, "
                             f"{narrow[0].region_margin_mm} mm) were cut with less than crop.max_extend_size_mm="
                             f"{cfg.crop.max_extend_size_mm}; run the boxes step (sh run.sh step=boxes)"
                             " and, for round 2, the uif step again")


def _uif_inputs(cfg: FineTrainConfig, k: int) -> dict[str, Any]:
    """What filter k's pool depends on: the networks of round k (and of round k - 1, which the change score compares
    with), the boxes, and the UIF and crop settings."""
    layout = RunLayout(cfg.output_dir)
    options = uif_options(cfg, k)

    def networks(j: int) -> dict[str, Any]:
        ckpts = layout.round_dir(j) / "checkpoints"
        files = {name: ckpts / name for name in ("best_model_a.pt", "best_model_b.pt", "last.pt")}
        return {name: file_stamp(p) for name, p in files.items() if p.is_file()}

    # the boxes by content: opening an LMDB for writing may touch data.mdb without changing a record
    boxes = {key: box.to_json() for key, box in read_boxes(layout.boxes_db).items()}
    inputs = {
        f"round{k}": networks(k),
        "boxes": hashlib.sha256(json.dumps(boxes, sort_keys=True).encode()).hexdigest(),
        "uif": {"score": cfg.uif.score, "keep_count": options.keep_count, "keep_ratio": options.keep_ratio,
                "weighting": cfg.uif.weighting, "snapshots": cfg.uif.snapshots},
        "crop": {"extend_size_mm": cfg.crop.extend_size_mm, "size_zyx": list(cfg.data.size_zyx),
                 "hu_window": list(cfg.data.hu_window)},
    }
    if k > 1 and cfg.uif.score == "change":
        inputs[f"round{k - 1}"] = networks(k - 1)
    return inputs


def step_uif(cfg: FineTrainConfig, info: DistInfo, k: int = 1) -> dict[str, Any]:
    """Filter k: score the unlabeled pool with round k's networks and keep the most certain (skipped while current)."""
    name = uif_step(k)
    pool = unlabeled_db(cfg)
    if pool is None:
        logger.info("%s: data.unlabeled_db is null; nothing to filter", name)
        return {"skipped": True}
    layout = RunLayout(cfg.output_dir)
    if not _round_done(layout, k):
        raise InputError(layout.round_dir(k) / DONE_FILE, f"not found: finish round {k} first "
                                                          f"(sh run.sh step=round{k})")
    inputs = _uif_inputs(cfg, k)
    if marker_matches(layout.uif_marker(k), inputs) and (layout.pool_db(k) / "data.mdb").is_file():
        logger.info("%s: %s is current (%s); skipping", name, layout.pool_db(k), layout.uif_marker(k))
        return {"skipped": True}
    rows = run_uif(layout, k, pool, cfg.data_base_dir, uif_options(cfg, k), info.device)
    if info.is_main:
        write_marker(layout.uif_marker(k), inputs)
    return {"cases": len(rows), "kept": sum(r.kept for r in rows)}


def step_round(cfg: FineTrainConfig, info: DistInfo, k: int) -> dict[str, Any]:
    """Round k: round 1 on labeled + every unlabeled case; round k > 1 on labeled + filter k - 1's pool."""
    if k > 1 and unlabeled_db(cfg) is None:
        logger.info("round%d: data.unlabeled_db is null, so there is no filtered pool; round 1 is final", k)
        return {"skipped": True}
    return run_round(cfg, info, k)


def _check_round_current(cfg: FineTrainConfig) -> None:
    """InputError unless the round the export takes its networks from was trained from the current inputs (its
    inputs.json; a folder of an earlier version, without one, is taken as it is)."""
    round_dir = export_round_dir(cfg)
    marker = round_dir / INPUTS_FILE
    if read_marker(marker) is not None and not marker_matches(marker, round_inputs(cfg, export_round(cfg))):
        raise InputError(marker, f"{round_dir.name} was trained from other inputs than the current ones (its pool or "
                                 f"settings changed); train it again first (sh run.sh step={round_dir.name}, or "
                                 "step=all)")


def step_export(cfg: FineTrainConfig, info: DistInfo) -> dict[str, Any]:
    _check_round_current(cfg)
    if export_is_current(cfg):
        logger.info("export: %s is current; skipping", cfg.export.dir)
        return {"skipped": True, "export_dir": cfg.export.dir}
    return {"export_dir": str(export(cfg).parent)}


def _step_number(step: str, prefix: str) -> int:
    """k of a step named <prefix><k> (uif alone is filter 1)."""
    return int(step.removeprefix(prefix) or 1)


def run_step(cfg: FineTrainConfig, info: DistInfo, step: str) -> dict[str, Any]:
    """One step. The rounds run on every rank through the engine; the work of boxes and uif is shared across the
    ranks and export is done by rank 0, each ending in one exchange of results and errors (run_on_every_rank)."""
    if step.startswith("round"):
        return step_round(cfg, info, _step_number(step, "round"))
    if step == "boxes":
        work = functools.partial(step_boxes, cfg, info)
    elif step.startswith("uif"):
        work = functools.partial(step_uif, cfg, info, _step_number(step, "uif"))
    elif step == "export":
        work = functools.partial(step_export, cfg, info) if info.is_main else dict
    else:
        raise ValueError(f"unknown fine step {step!r}")
    return run_on_every_rank(work, f"step {step}")[0]


def main(cfg: FineTrainConfig) -> dict[str, Any]:
    """Run `cfg.step` ("all": every step of `cfg.steps()` in order); returns {step: its summary}."""
    info = init_distributed(cfg.device)
    steps = cfg.steps() if cfg.step == "all" else (cfg.step,)
    results: dict[str, Any] = {}
    layout = RunLayout(cfg.output_dir)
    log = layout.steps_log if info.is_main else layout.steps_log.with_name(f"steps.rank{info.rank}.log")
    setup_logging(log, rank=info.rank)
    # the dataset first (a wrong data_base_dir must not claim the folder for the wrong run), then the folder
    open_store(db_path(cfg.data.labeled_db, cfg.data_base_dir, cfg.fold)).close()
    with run_folder_lock(cfg.output_dir, info):
        claim_run_folder(cfg.output_dir, cfg.run_identity("fine"), write=info.is_main)
        for step in steps:
            logger.info("fine stage: step %s", step)
            results[step] = run_step(cfg, info, step)
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line (common.stage_cli)."""
    return stage_cli(FineTrainConfig, DEFAULT_CONFIG, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
