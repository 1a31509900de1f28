"""Where does the CPS confidence mask (`cps.confidence`) act? A probe of round 1's networks on the labeled
validation crops of a fine run.

Each network's hard pseudo label (the project's rule, common.core.labelmaps.probs_to_labels) teaches its partner;
with `cps.confidence` c only the voxels common.train.cps.confident_voxels keeps count. Per true class (organ
voxels, background voxels) of the validation crops, for each of A and B as the teacher, this prints the share of
voxels the mask keeps, and the share of right pseudo labels among all voxels and among the kept ones: a mask that
cleans the pseudo labels raises the second share over the first.

    PYTHONPATH=. .venv/bin/python -m benchmarks.cps_confidence runs/ssl_headroom/seed*/fine_cps --confidence 0.9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.pipeline import exit_code_of
from common.config import CPSSection, FineTrainConfig
from common.core.labelmaps import LOGIT_THRESHOLD, probs_to_labels
from common.core.typed_config import config_from_dict, load_config
from common.storage.data_paths import db_path
from common.storage.labelsets import dataset_labels
from common.train.cps import confident_voxels
from fine_efficient_seg.dataset import validation_cases
from fine_efficient_seg.train import sample_spec
from fine_efficient_seg.uif import load_round_networks

CLASSES = ("organ", "background")


def confidence_counts(fine_dir: Path, confidence: float) -> dict[str, dict[str, int]]:
    """{class: {"voxels", "kept", "right", "right_kept"}} summed over the validation crops of `fine_dir` and over
    both teachers (A teaching B and B teaching A)."""
    round_dir = Path(fine_dir) / "round1"
    cfg = load_config(FineTrainConfig, round_dir / "config.yaml")
    device = torch.device("cpu")
    nets = load_round_networks(round_dir, device)
    sample = sample_spec(cfg, dataset_labels(cfg.data_base_dir))
    val_db = db_path(cfg.data.val_db, cfg.data_base_dir, cfg.fold)
    counts = _zero_counts()
    with torch.no_grad():
        for _, x, truth in validation_cases(val_db, cfg.data_base_dir, sample, device):
            for teacher in nets:
                logits = teacher(x).float()
                labels = probs_to_labels(logits, LOGIT_THRESHOLD, dim=1)
                kept = confident_voxels(logits, confidence)
                kept = torch.ones_like(labels, dtype=torch.bool) if kept is None else kept[:, 0]
                right = labels == truth
                for name, where in zip(CLASSES, (truth > 0, truth == 0)):
                    c = counts[name]
                    c["voxels"] += int(where.sum())
                    c["kept"] += int((where & kept).sum())
                    c["right"] += int((where & right).sum())
                    c["right_kept"] += int((where & right & kept).sum())
    return counts


def _zero_counts() -> dict[str, dict[str, int]]:
    return {name: dict.fromkeys(("voxels", "kept", "right", "right_kept"), 0) for name in CLASSES}


def shares(counts: dict[str, int]) -> tuple[float, float, float]:
    """(kept share, right share of all voxels, right share of the kept voxels)."""
    return (counts["kept"] / max(counts["voxels"], 1), counts["right"] / max(counts["voxels"], 1),
            counts["right_kept"] / max(counts["kept"], 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fine_dirs", nargs="+", help="fine run folders (output_dir of the fine stage) with round1/")
    parser.add_argument("--confidence", type=float, default=0.9, help="the cps.confidence to probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return exit_code_of(lambda: _print_table(args.fine_dirs, args.confidence))


def _print_table(fine_dirs: Sequence[str], confidence: float) -> int:
    config_from_dict(CPSSection, {"confidence": confidence})  # the stage's range, checked before any loading
    total = _zero_counts()
    for fine_dir in fine_dirs:
        for name, c in confidence_counts(Path(fine_dir), confidence).items():
            for key, value in c.items():
                total[name][key] += value
    print(f"cps.confidence {confidence}: {len(fine_dirs)} run(s), teachers A and B")
    print("| true class | voxels | kept by the mask | right pseudo labels, all | right pseudo labels, kept |")
    print("|---|---|---|---|---|")
    for name in CLASSES:
        kept, right, right_kept = shares(total[name])
        print(f"| {name} | {total[name]['voxels']} | {kept:.3f} | {right:.3f} | {right_kept:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
