"""The uif step: score every unlabeled case with the two round-1 networks and keep the most certain ones.

Each case is scored on the crop the fine stage trains and predicts on (its stored coarse box + extend_size_mm,
resized to the network size) by `common.uif.uncertainty_score` (disagreement of networks A and B by default,
entropy of their mean sigmoid as an option). Outputs:
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
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from common.amp import amp_settings, autocast
from common.checkpoint import load_checkpoint, load_model_state
from common.distributed import is_main_process, run_on_every_rank, shard
from common.errors import InputError
from common.fileutil import write_text_atomic
from common.lmdb_store import open_store
from common.logger import get_logger
from common.networks import build_network
from common.uif import UifRow, select_certain, uncertainty_score
from fine_efficient_seg.dataset import FineCase, fixed_crop_input, load_cases, read_boxes

logger = get_logger(__name__)

SCORES_FILE = "uif_scores.csv"
CSV_HEADER = ("case", "score", "kept", "rank")


def load_round_networks(round_dir: Path, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Networks A and B of a finished CPS round: its best checkpoints, else the nets of `last.pt`; eval mode."""
    ckpt_dir = round_dir / "checkpoints"
    nets = []
    last = None
    for name in ("a", "b"):
        best = ckpt_dir / f"best_model_{name}.pt"
        if best.is_file():
            state = load_checkpoint(best)
            spec, weights, source = state["model"], state["net"], best
        else:
            if last is None:
                last = load_checkpoint(ckpt_dir / "last.pt")
            logger.warning("uif: no %s; using network %s of %s", best.name, name, ckpt_dir / "last.pt")
            spec, weights, source = last["model"], last[f"net_{name}"], ckpt_dir / "last.pt"
        net = build_network(spec["name"], **spec.get("kwargs", {}))
        load_model_state(net, weights, source=source)
        nets.append(net.to(device).eval())
    return nets[0], nets[1]


@torch.no_grad()
def score_cases(
    cases: Sequence[FineCase],
    net_a: nn.Module,
    net_b: nn.Module,
    *,
    method: str,
    size_zyx: Sequence[int],
    hu_window: Sequence[float],
    extend_size_mm: float,
    device: torch.device,
    precision: str = "bf16",
) -> dict[str, float]:
    """Uncertainty score of every case (lower = more certain), on its fixed fine crop."""
    amp = amp_settings(precision, device)
    scores: dict[str, float] = {}
    for case in tqdm(cases, desc="uif", unit="case", disable=not is_main_process()):
        x = fixed_crop_input(case, size_zyx, hu_window, extend_size_mm, device)
        with autocast(amp):
            logits_a = net_a(x)
            logits_b = net_b(x)
        probs_a = torch.sigmoid(logits_a.float())[0]
        probs_b = torch.sigmoid(logits_b.float())[0]
        scores[case.case_id] = uncertainty_score(method, probs_a, probs_b)
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
    """Rows of a `uif_scores.csv` (for reports and tests)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [UifRow(r["case"], float(r["score"]), r["kept"] == "1", int(r["rank"])) for r in csv.DictReader(handle)]


def write_filtered_db(unlabeled_db: Path, out_db: Path, rows: Sequence[UifRow],
                      boxes_db: Path | None = None) -> int:
    """Make `out_db` hold exactly the kept records of `unlabeled_db` with their box from `boxes_db` (one
    transaction); returns their number."""
    boxes = read_boxes(boxes_db)
    source = open_store(unlabeled_db, readonly=True)
    try:
        kept = {}
        for row in rows:
            if not row.kept:
                continue
            record = source.get(row.case)
            if record is None:
                raise InputError(unlabeled_db, f"case {row.case!r} vanished from the database during uif")
            record.update(boxes.get(row.case, {}))
            record["uif_score"] = row.score
            record["uif_rank"] = row.rank
            kept[row.case] = record
    finally:
        source.close()
    target = open_store(out_db, readonly=False)
    try:
        target.replace_all(kept)
    finally:
        target.close()
    return len(kept)


def run_uif(
    *,
    round_dir: Path,
    unlabeled_db: Path,
    boxes_db: Path | None,
    pool_db: Path,
    data_base_dir: str | Path,
    output_dir: Path,
    method: str,
    keep_count: int | None,
    keep_ratio: float,
    size_zyx: Sequence[int],
    hu_window: Sequence[float],
    extend_size_mm: float,
    device: torch.device,
    precision: str = "bf16",
) -> list[UifRow]:
    """Score the pool, write the filtered database `pool_db` and then `uif_scores.csv`; returns the rows in rank
    order. Boxes come from `boxes_db` (None: from the unlabeled records themselves).

    Under DDP every rank scores its share of the cases (`shard`) and rank 0 writes; a failure on any rank ends
    every rank at once with its message (`run_on_every_rank`).
    """
    def score_here() -> dict[str, float]:
        cases = load_cases(unlabeled_db, data_base_dir, labeled=False, boxes_db=boxes_db)
        if not cases:
            raise InputError(unlabeled_db, "no unlabeled cases to filter")
        net_a, net_b = load_round_networks(round_dir, device)
        return score_cases(shard(cases), net_a, net_b, method=method, size_zyx=size_zyx, hu_window=hu_window,
                           extend_size_mm=extend_size_mm, device=device, precision=precision)

    scores = {k: v for part in run_on_every_rank(score_here, "uif") for k, v in part.items()}
    rows = select_certain(scores, keep_count, keep_ratio)
    out_db = pool_db

    def write_here() -> int:
        if not is_main_process():
            return 0
        kept = write_filtered_db(unlabeled_db, out_db, rows, boxes_db)
        write_text_atomic(output_dir / SCORES_FILE, rows_to_csv(rows))
        return kept

    kept = run_on_every_rank(write_here, "uif")[0]
    kept_scores = [r.score for r in rows if r.kept]
    logger.info("uif (%s): kept %d of %d unlabeled cases in %s (scores %.4f..%.4f; pool median %.4f)",
                method, kept, len(rows), out_db, min(kept_scores), max(kept_scores),
                sorted(scores.values())[len(scores) // 2])
    return rows
