"""Does UIF drop the hard unlabeled cases? Share of hard cases among those it keeps vs among those it drops.

On a synthetic dataset where a known fraction of the unlabeled cases are hard (heavy noise, metal streaks,
truncated field of view; listed in synthetic_meta.json), run the fine stage's boxes, a short round 1 and the uif
step, then compare the selection with the hard flags. Also prints the mean score of hard and easy cases and the
AUC of the score as a hard-case detector (0.5 = chance, 1 = every hard case is less certain than every easy one).

CPU-sized defaults (about 10 minutes on 2 idle cores). UIF can only separate hard cases once the round-1
networks segment something (see the printed validation Dice): a short CPU run mostly measures noise. Scale
--iterations, --fine-size, --channels and --unlabeled up on a GPU:
    PYTHONPATH=. .venv/bin/python benchmarks/uif_selection.py [--out DIR] [--iterations 300] [--score entropy]
    PYTHONPATH=. .venv/bin/python benchmarks/uif_selection.py --size full --unlabeled 40 --fine-size 192 \\
        --channels 16,32,64,128,256 --iterations 3000 --lr 1.0e-3 \\
        --coarse-model model_weights/base_coarse_model    # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common.config import FineTrainConfig, PrepareConfig, load_config
from data_prepare.run import STAGE_DIR as PREPARE_DIR
from data_prepare.run import main as prepare_main
from data_prepare.synthetic import META_NAME, write_dataset
from fine_efficient_seg.train import DEFAULT_CONFIG, main as fine_main
from fine_efficient_seg.uif import SCORES_FILE, read_scores_csv


def auc(hard_scores: list[float], easy_scores: list[float]) -> float:
    """P(score of a random hard case > score of a random easy case), ties counting half."""
    if not hard_scores or not easy_scores:
        return float("nan")
    wins = sum((h > e) + 0.5 * (h == e) for h in hard_scores for e in easy_scores)
    return wins / (len(hard_scores) * len(easy_scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary folder)")
    parser.add_argument("--size", default="demo", choices=("tiny", "demo", "full"), help="synthetic case size")
    parser.add_argument("--labeled", type=int, default=5, help="labeled cases (one goes to validation)")
    parser.add_argument("--unlabeled", type=int, default=24, help="unlabeled cases")
    parser.add_argument("--hard-fraction", type=float, default=0.25, help="share of hard unlabeled cases")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--coarse-size", type=int, default=64, help="coarse array size (cube) made by data_prepare")
    parser.add_argument("--fine-size", type=int, default=32, help="fine network input size (cube)")
    parser.add_argument("--channels", default="4,8,8,16,16", help="network channels per level")
    parser.add_argument("--iterations", type=int, default=300, help="round-1 CPS iterations")
    parser.add_argument("--lr", type=float, default=3.0e-3, help="Adam learning rate (the stage's is 1.0e-3; "
                                                                  "a short run needs a larger one)")
    parser.add_argument("--score", default="disagreement", choices=("disagreement", "entropy"))
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="share of the pool UIF keeps")
    parser.add_argument("--coarse-model", default=None, help="exported coarse model folder (default: body boxes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", help="bf16 | fp16 | fp32 (CPU always runs fp32)")
    args = parser.parse_args()

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="uif_selection_")
        args.out = Path(tmp.name)
    data = args.out / "dataset"
    start = time.perf_counter()
    meta = write_dataset(data, labeled=args.labeled, unlabeled=args.unlabeled, val=0, seed=args.seed,
                         size=args.size, hard_fraction=args.hard_fraction, workers=2)
    c, f = args.coarse_size, args.fine_size
    prepare_cfg = load_config(PrepareConfig, PREPARE_DIR / "config.yaml",
                              [f"data_base_dir={data}", f"coarse_size_zyx=[{c},{c},{c}]",
                               f"fine_size_zyx=[{f},{f},{f}]", "num_workers=2"])
    if prepare_main(prepare_cfg) != 0:
        raise SystemExit("data_prepare failed")
    prepared_s = time.perf_counter() - start
    overrides = [
        f"data_base_dir={data}", f"output_dir={args.out / 'fine'}", f"device={args.device}",
        f"data.size_zyx=[{f},{f},{f}]", f"model.channels=[{args.channels}]", f"amp.precision={args.precision}",
        f"schedule.iterations={args.iterations}", f"optim.lr={args.lr}", f"schedule.val_interval={args.iterations}",
        f"schedule.checkpoint_interval={max(args.iterations // 4, 1)}", "schedule.log_interval=25",
        f"uif.score={args.score}", f"uif.keep_ratio={args.keep_ratio}", "uif.keep_count=null",
        f"boxes.coarse_model_dir={args.coarse_model if args.coarse_model else 'null'}",
        f"export.dir={args.out / 'export'}",
    ]
    results = {}
    for step in ("boxes", "round1", "uif"):
        results.update(fine_main(load_config(FineTrainConfig, DEFAULT_CONFIG, [*overrides, f"step={step}"])))
    round1 = results["round1"]
    total_s = time.perf_counter() - start

    meta = json.loads((data / META_NAME).read_text(encoding="utf-8"))
    rows = read_scores_csv(args.out / "fine" / SCORES_FILE)
    hard = {case for case, entry in meta.items() if entry.get("split") == "trainu" and entry.get("hard")}
    kept = [r for r in rows if r.kept]
    dropped = [r for r in rows if not r.kept]
    share_kept = sum(r.case in hard for r in kept) / max(len(kept), 1)
    share_dropped = sum(r.case in hard for r in dropped) / max(len(dropped), 1)
    hard_scores = [r.score for r in rows if r.case in hard]
    easy_scores = [r.score for r in rows if r.case not in hard]
    result = {
        "pool": len(rows), "hard": len(hard_scores), "kept": len(kept), "dropped": len(dropped),
        "hard_share_kept": share_kept, "hard_share_dropped": share_dropped,
        "mean_score_hard": sum(hard_scores) / max(len(hard_scores), 1),
        "mean_score_easy": sum(easy_scores) / max(len(easy_scores), 1),
        "auc_hard_vs_easy": auc(hard_scores, easy_scores),
        "round1_best_dice": {"a": round1["best_a"], "b": round1["best_b"]},
        "settings": vars(args) | {"out": str(args.out)}, "seconds": total_s, "prepare_seconds": prepared_s,
    }
    print(f"UIF ({args.score}) after {args.iterations} round-1 iterations, {args.size} cases, fine {f}^3, "
          f"channels {args.channels}; {total_s:.0f} s in all ({prepared_s:.0f} s data)")
    print(f"{'':<10} {'cases':>6} {'hard':>6} {'hard share':>11}")
    print(f"{'kept':<10} {len(kept):>6} {sum(r.case in hard for r in kept):>6} {100 * share_kept:>10.1f}%")
    print(f"{'dropped':<10} {len(dropped):>6} {sum(r.case in hard for r in dropped):>6} {100 * share_dropped:>10.1f}%")
    print(f"random selection would keep {100 * len(hard_scores) / max(len(rows), 1):.1f}% hard cases; "
          f"round-1 validation mean Dice A {round1['best_a']:.3f}, B {round1['best_b']:.3f}")
    print(f"mean score: hard {result['mean_score_hard']:.4f}, easy {result['mean_score_easy']:.4f}; "
          f"AUC (hard less certain than easy) {result['auc_hard_vs_easy']:.3f}")
    (args.out / "uif_selection.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
