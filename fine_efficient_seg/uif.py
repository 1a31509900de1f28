"""The uif step: score every unlabeled case with the two round-1 networks and keep the most certain ones.

Each case is scored on the crop the fine stage trains and predicts on (its stored coarse box + extend_size_mm,
resized to the network size) by `common.evaluation.uncertainty.uncertainty_score` (disagreement of networks A and B
by default; entropy of their mean sigmoid, ST++ stability of the final A+B mean against the round-1 snapshots
`checkpoints/snapshot_<it>.pt`, or the change of its pseudo label since the earlier networks, as options). Outputs:
- `<output_dir>/uif_scores.csv`: case, score, kept, rank (rank 1 = most certain), in rank order;
- `<output_dir>/db/uif_pool` (LMDB): the kept records, copied from the unlabeled DB with their box (from the
  boxes step's database), `uif_score` and `uif_rank` added, written in one transaction. Like the boxes, the
  pool belongs to the experiment, never to the dataset folder.
The CSV is written last and marks the step as done.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from common.core.amp import amp_settings, autocast
from common.core.defaults import EXTEND_SIZE_MM, FINE_SIZE_ZYX, HU_WINDOW
from common.core.errors import InputError
from common.core.files import write_text_atomic
from common.core.logger import get_logger, progress
from common.evaluation.uncertainty import UifRow, select_certain, uncertainty_score
from common.storage.lmdb_store import open_store
from common.storage.model_folder import best_checkpoint_paths
from common.storage.step_marker import read_marker
from common.storage.weights import load_network, read_network_pair
from common.train.distributed import is_main_process, run_on_every_rank, shard
from common.train.engine import DONE_FILE
from fine_efficient_seg.dataset import FineCase, fixed_crop_input, load_cases, read_prepared
from fine_efficient_seg.layout import SCORES_FILE, RunLayout

logger = get_logger(__name__)

CSV_HEADER = ("case", "score", "kept", "rank")


def load_round_networks(round_dir: Path, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Networks A and B of a finished CPS round: its best checkpoints, else the nets of `last.pt`; eval mode."""
    sources = {}
    for name, source in best_checkpoint_paths(round_dir).items():
        if not source.is_file():
            source = round_dir / "checkpoints" / "last.pt"
            logger.warning("uif: no best_model_%s.pt; using network %s of %s", name, name, source)
        sources[name] = source
    return _load_pair(sources, device)


def _load_pair(source: Path | dict[str, Path], device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Networks A and B of one checkpoint (read once) or of {"a": file, "b": file}; eval mode."""
    weights = read_network_pair(source)
    return load_network(weights["a"], device=device), load_network(weights["b"], device=device)


def snapshot_iterations(iterations: int, count: int) -> tuple[int, ...]:
    """`count` iterations evenly spaced strictly inside (0, iterations) at which round 1 keeps a snapshot."""
    points = {round(iterations * i / (count + 1)) for i in range(1, count + 1)}
    return tuple(sorted(p for p in points if 0 < p < iterations))


def snapshot_files(round_dir: Path, before: int | None = None) -> list[Path]:
    """The `checkpoints/snapshot_<it>.pt` of a round (only those with it < `before` when given), oldest first."""
    paths = sorted((round_dir / "checkpoints").glob("snapshot_*.pt"), key=_snapshot_iteration)
    return paths if before is None else [path for path in paths if _snapshot_iteration(path) < before]


def load_snapshots(round_dir: Path, device: torch.device,
                   before: int | None = None) -> list[tuple[nn.Module, nn.Module]]:
    """Networks A and B of the round's snapshots (`snapshot_files`), oldest first; eval mode."""
    return [_load_pair(path, device) for path in snapshot_files(round_dir, before)]


def _snapshot_iteration(path: Path) -> int:
    return int(path.stem.split("_")[1])


def best_iteration(round_dir: Path) -> int | None:
    """The earlier of the iterations of a finished round's best networks A and B, as its DONE marker records them
    (None for a round not finished: its networks are then those of last.pt, after every snapshot)."""
    done = read_marker(round_dir / DONE_FILE)
    found = [int(it) for it in (done or {}).get("best_iteration", {}).values() if int(it) >= 0]
    return min(found) if found else None


@dataclass(frozen=True)
class UifOptions:
    """How the uif step scores and selects: the score and its organ weighting, how many cases to keep
    (`keep_count` wins over `keep_ratio`), the fixed fine crop the networks see, and the networks' precision."""

    method: str = "disagreement"
    keep_count: int | None = None
    keep_ratio: float = 0.1
    weighting: str = "organ"
    size_zyx: tuple[int, int, int] = FINE_SIZE_ZYX
    hu_window: tuple[float, float] = HU_WINDOW
    extend_size_mm: float = EXTEND_SIZE_MM
    precision: str = "bf16"


def earlier_networks(layout: RunLayout, k: int, device: torch.device,
                     last_only: bool = False) -> list[tuple[nn.Module, nn.Module]]:
    """The earlier network pairs filter k compares round k's with (oldest first): for filter 1 round 1's snapshots
    taken before its best networks (stability uses them all; change only the last, so `last_only` loads just that
    one), the previous round's networks after that. A snapshot at the best networks' iteration holds those very
    networks, and one after it later ones: with them the change score is 0 for every case and the selection falls
    to the case order."""
    if k > 1:
        return [load_round_networks(layout.round_dir(k - 1), device)]
    round_dir = layout.round_dir(1)
    best = best_iteration(round_dir)
    files = snapshot_files(round_dir, before=best)
    if not files and best is not None:
        logger.warning("uif: no snapshot of %s precedes its best networks (iteration %d); the stability and change "
                       "scores compare with the later snapshots (set uif.snapshots higher to avoid this)",
                       round_dir, best)
        files = snapshot_files(round_dir)
    return [_load_pair(path, device) for path in (files[-1:] if last_only else files)]


@torch.no_grad()
def score_pool(cases: Sequence[FineCase], net_a: nn.Module, net_b: nn.Module, options: UifOptions,
               device: torch.device, methods: Sequence[str] | None = None,
               snapshots: Sequence[tuple[nn.Module, nn.Module]] = ()) -> dict[str, dict[str, float]]:
    """{method: {case: uncertainty score}} (lower = more certain) of every case on its fixed fine crop, for
    several UIF scores in one pass over the pool (default: `options.method`); "stability" and "change" need
    `snapshots` (earlier network pairs, oldest first: `earlier_networks`)."""
    methods = (options.method,) if methods is None else tuple(methods)
    amp = amp_settings(options.precision, device)
    if {"stability", "change"} & set(methods) and not snapshots:
        raise InputError(Path("checkpoints/snapshot_*.pt"), "the stability and change scores need round-1 snapshots "
                                                             "(uif.snapshots >= 1 before round 1 runs)")

    def probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(amp):
            logits = net(x)
        return torch.sigmoid(logits.float())[0]

    scores: dict[str, dict[str, float]] = {m: {} for m in methods}
    for case in progress(cases, desc="uif", unit="case", disable=not is_main_process()):
        x = fixed_crop_input(case, options.size_zyx, options.hu_window, options.extend_size_mm, device)
        probs_a, probs_b = probs(net_a, x), probs(net_b, x)
        snaps = ([0.5 * (probs(a, x) + probs(b, x)) for a, b in snapshots]
                 if {"stability", "change"} & set(methods) else [])
        for method in methods:
            scores[method][case.case_id] = uncertainty_score(method, probs_a, probs_b, snapshots=snaps,
                                                             weighting=options.weighting)
    return scores


def rows_to_csv(rows: Sequence[UifRow]) -> str:
    """CSV text of the scored pool (header + one line per case in rank order)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        score = "nan" if math.isnan(row.score) else f"{row.score:.6f}"
        writer.writerow((row.case, score, int(row.kept), row.rank))
    return buffer.getvalue()


def read_scores_csv(path: Path) -> list[UifRow]:
    """Rows of a `uif_scores.csv` (for reports and tests); InputError naming a missing file."""
    if not Path(path).is_file():
        raise InputError(Path(path), "UIF scores not found (run the fine stage's uif step first)")
    with open(path, newline="", encoding="utf-8") as handle:
        return [UifRow(r["case"], float(r["score"]), r["kept"] == "1", int(r["rank"])) for r in csv.DictReader(handle)]


def write_filtered_db(unlabeled_db: Path, out_db: Path, rows: Sequence[UifRow],
                      boxes_db: Path | None = None) -> int:
    """Make `out_db` hold exactly the kept records of `unlabeled_db` with their box from `boxes_db` (one
    transaction); returns their number."""
    cases = {case.case_id: case for case in read_prepared(unlabeled_db, boxes_db)}
    kept = {}
    for row in rows:
        if not row.kept:
            continue
        if row.case not in cases:
            raise InputError(unlabeled_db, f"case {row.case!r} vanished from the database during uif")
        kept[row.case] = replace(cases[row.case], uif_score=row.score, uif_rank=row.rank).to_json()
    target = open_store(out_db, readonly=False)
    try:
        target.replace_all(kept)
    finally:
        target.close()
    return len(kept)


def write_selection(rows: Sequence[UifRow], *, unlabeled_db: Path, boxes_db: Path | None, pool_db: Path,
                    output_dir: Path) -> int:
    """Make `pool_db` hold the kept rows (with their boxes from `boxes_db`) and write `output_dir/uif_scores.csv`
    (last: it marks the selection stored); returns the number kept.

    The one place that stores a selection, whoever made it (the uif step, or a benchmark's control).
    """
    kept = write_filtered_db(unlabeled_db, pool_db, rows, boxes_db)
    write_text_atomic(Path(output_dir) / SCORES_FILE, rows_to_csv(rows))
    return kept


def run_uif(layout: RunLayout, k: int, unlabeled_db: Path, data_base_dir: str | Path, options: UifOptions,
            device: torch.device) -> list[UifRow]:
    """Filter k: score every case of `unlabeled_db` (boxes from the layout's boxes database, else the records' own)
    with the networks of round k, write the pool `layout.pool_db(k)` and then `layout.scores_csv(k)`; returns the
    rows in rank order.

    Under DDP every rank scores its share of the cases (`shard`) and rank 0 writes; a failure on any rank ends
    every rank at once with its message (`run_on_every_rank`).
    """
    round_dir = layout.round_dir(k)

    def score_here() -> dict[str, float]:
        cases = load_cases(unlabeled_db, data_base_dir, labeled=False, boxes_db=layout.boxes_db)
        if not cases:
            raise InputError(unlabeled_db, "no unlabeled cases to filter")
        net_a, net_b = load_round_networks(round_dir, device)
        snapshots = (earlier_networks(layout, k, device, last_only=options.method == "change")
                     if options.method in ("stability", "change") else [])
        return score_pool(shard(cases), net_a, net_b, options, device, snapshots=snapshots)[options.method]

    scores = {key: v for part in run_on_every_rank(score_here, "uif") for key, v in part.items()}
    rows = select_certain(scores, options.keep_count, options.keep_ratio)

    def write_here() -> int:
        if is_main_process():
            write_selection(rows, unlabeled_db=unlabeled_db, boxes_db=layout.boxes_db, pool_db=layout.pool_db(k),
                            output_dir=layout.uif_dir(k))
        return 0

    run_on_every_rank(write_here, "uif")
    kept_scores = [r.score for r in rows if r.kept]
    logger.info("uif (%s): kept %d of %d unlabeled cases in %s (scores %.4f..%.4f; pool median %.4f)",
                options.method, len(kept_scores), len(rows), layout.pool_db(k), min(kept_scores), max(kept_scores),
                sorted(scores.values())[len(scores) // 2])
    return rows
