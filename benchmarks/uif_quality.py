"""Does UIF rank unlabeled scans by how good their pseudo labels really are? Scores against hidden truth.

Per unlabeled case and per UIF score (disagreement, entropy, stability, change; common.evaluation.uncertainty): the
score from
round 1's networks on the case's fixed fine crop (fine_efficient_seg.uif.score_pool), the TRUE quality of its pseudo
label (FLARE22 DSC, by common.evaluate, of the round-1 A+B ensemble's hard labels predicted by the full two-stage
predictor, against the hidden truth `trainu_mask_hidden/` that data_prepare.synthetic writes and no stage reads),
and the hard flag (synthetic_meta.json). Printed per score:
  - Spearman correlation of the score with the true pseudo-label error (1 - DSC): > 0 = the score ranks well;
  - AUROC of the score for the worse half of the pool (true DSC below the pool median) vs the better half, and for
    hard vs normal scans (0.5 = chance, 1 = every worse / hard scan less certain);
  - mean true pseudo-label DSC of the K kept (lowest scores) vs the dropped vs K random (mean over many draws),
    and the oracle's K (the best true DSC, the ceiling of any filter).

`ranking` prints the uif step's ranking beside the truth (demo.sh). The rest works on the folders of
benchmarks/semi_supervised.py, which runs `seed` below after round 1 of every seed
(and uses its random and oracle selections as the control rows). Stand-alone:
    PYTHONPATH=. .venv/bin/python -m benchmarks.uif_quality report runs/semi_supervised   # table of a run
    PYTHONPATH=. .venv/bin/python -m benchmarks.semi_supervised --seeds 0 1 --stop-after quality  # round 1 only
    PYTHONPATH=. .venv/bin/python -m benchmarks.uif_quality seed --seed-dir runs/semi_supervised/seed0 --keep 8
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.pipeline import exit_code_of
from benchmarks.stats import auroc, spearman, t_interval

SCORES = ("disagreement", "entropy", "stability", "change")
QUALITY_FILE = "uif_quality.json"
RANDOM_DRAWS = 2000
# Control selections written by `seed` for round 2: row name -> (output folder, unlabeled DB copy) of the seed.
CONTROLS = {"lr": "fine_random", "lo": "fine_oracle"}  # row -> output_dir of its round 2 (beside fine_cps)


def kept_cases(scores: Mapping[str, float], keep: int) -> list[str]:
    """The `keep` most certain cases by common.evaluation.uncertainty.select_certain (lowest score, ties by id)."""
    from common.evaluation.uncertainty import select_certain

    return [r.case for r in select_certain(scores, keep_count=keep) if r.kept]


def score_quality(scores: Mapping[str, float], dsc: Mapping[str, float], hard: set[str], keep: int,
                  seed: int = 0, draws: int = RANDOM_DRAWS) -> dict[str, Any]:
    """How well one score ranks the pool: Spearman(score, 1 - DSC), AUROC worse half vs better half (true DSC below
    vs at or above the pool median) and hard vs normal, mean true DSC of the kept K, the dropped, K random (mean over
    `draws` draws) and the oracle K."""
    cases = sorted(c for c in scores if c in dsc and not math.isnan(dsc[c]))
    kept = [c for c in kept_cases({c: scores[c] for c in cases}, keep)]
    dropped = [c for c in cases if c not in kept]
    rng = random.Random(seed)
    random_means = [statistics.fmean(dsc[c] for c in rng.sample(cases, len(kept))) for _ in range(draws)]
    oracle = sorted(cases, key=lambda c: (-dsc[c], c))[:len(kept)]
    median = statistics.median(dsc[c] for c in cases) if cases else float("nan")

    def mean(ids: Sequence[str]) -> float:
        return statistics.fmean(dsc[c] for c in ids) if ids else float("nan")

    return {
        "n": len(cases), "keep": len(kept),
        "spearman_vs_error": spearman([scores[c] for c in cases], [1.0 - dsc[c] for c in cases]),
        "auroc_worse": auroc([scores[c] for c in cases if dsc[c] < median], [scores[c] for c in cases
                                                                             if dsc[c] >= median]),
        "auroc_hard": auroc([scores[c] for c in cases if c in hard], [scores[c] for c in cases if c not in hard]),
        "kept_dsc": mean(kept), "dropped_dsc": mean(dropped), "random_dsc": statistics.fmean(random_means),
        "oracle_dsc": mean(oracle), "kept": kept,
    }


# --------------------------------------------------------------------------------------------- one seed


def pool_truth(pred_dir: Path, dataset: Path, out_csv: Path) -> dict[str, float]:
    """{case: FLARE22 mean DSC} of the pool predictions against the hidden truth (common.evaluate)."""
    from benchmarks.stats import evaluate_row
    from data_prepare.synthetic import HIDDEN_MASK_DIR

    per_case = evaluate_row(pred_dir, dataset / HIDDEN_MASK_DIR, out_csv)["per_case"]
    return {case.removesuffix(".nii.gz"): v["DSC"] for case, v in per_case.items()}


def round1_scores(fine_dir: Path, device: str = "cpu", methods: Sequence[str] = SCORES) -> dict[str, dict[str, float]]:
    """{score: {case: value}} of the unlabeled pool from `fine_dir/round1` (its saved config gives the crop)."""
    import torch

    from common.config import FineTrainConfig
    from common.core.typed_config import load_config
    from fine_efficient_seg.dataset import db_path, load_cases
    from fine_efficient_seg.layout import RunLayout
    from fine_efficient_seg.train import uif_options
    from fine_efficient_seg.uif import earlier_networks, load_round_networks, score_pool

    round_dir = fine_dir / "round1"
    cfg = load_config(FineTrainConfig, round_dir / "config.yaml")
    dev = torch.device(device)
    pool = db_path(cfg.data.unlabeled_db, cfg.data_base_dir, cfg.fold)
    cases = load_cases(pool, cfg.data_base_dir, labeled=False, boxes_db=RunLayout(fine_dir).boxes_db)
    net_a, net_b = load_round_networks(round_dir, dev)
    snapshots = earlier_networks(RunLayout(fine_dir), 1, dev) if {"stability", "change"} & set(methods) else []
    return score_pool(cases, net_a, net_b, uif_options(cfg), dev, methods=methods, snapshots=snapshots)


def write_control(seed_dir: Path, out_name: str, order: Mapping[str, float], keep: int) -> None:
    """Store a control selection (the `keep` lowest values of `order`) as the round-2 pool of the experiment folder
    `seed_dir/<out_name>`: it gets the pool (with fine_cps's coarse boxes) and uif_scores.csv, written by
    fine_efficient_seg.uif.write_selection as the uif step writes its own, and fine_cps's round 1 (a link), which a
    warm round 2 starts from."""
    import os

    from common.evaluation.uncertainty import select_certain
    from fine_efficient_seg.layout import RunLayout
    from fine_efficient_seg.uif import write_selection

    out = RunLayout(seed_dir / out_name)
    out.output_dir.mkdir(parents=True, exist_ok=True)
    round1 = out.round_dir(1)
    if not round1.is_symlink():
        round1.symlink_to(os.path.relpath(RunLayout(seed_dir / "fine_cps").round_dir(1), out.output_dir))
    write_selection(select_certain(order, keep_count=keep), unlabeled_db=seed_dir / "dataset" / "db" / "seg_trainu",
                    boxes_db=RunLayout(seed_dir / "fine_cps").boxes_db, pool_db=out.pool_db(1),
                    output_dir=out.uif_dir(1))


def seed_main(seed_dir: Path, keep: int, seed: int, device: str = "cpu",
              other_start: str | None = None) -> dict[str, Any]:
    """Score the pool of one benchmark seed with every UIF score, compare with the truth, write QUALITY_FILE and
    the random and oracle selections (and, with `other_start`, UIF's own selection for the row that starts round
    2 the other way, in fine_uif_<other_start>)."""
    dataset = seed_dir / "dataset"
    dsc = pool_truth(seed_dir / "pred_pool", dataset, seed_dir / "eval_pool.csv")
    scores = round1_scores(seed_dir / "fine_cps", device)
    meta = json.loads((dataset / "synthetic_meta.json").read_text(encoding="utf-8"))
    hard = {c for c, e in meta.items() if e.get("split") == "trainu" and e.get("hard")}
    result = {
        "seed": seed, "keep": keep,
        "cases": {c: {"dsc": dsc.get(c, float("nan")), "hard": c in hard,
                      "hard_kinds": meta.get(c, {}).get("hard_kinds", []), "profile": meta.get(c, {}).get("profile"),
                      **{m: scores[m][c] for m in scores}} for c in sorted(scores["disagreement"])},
        "scores": {m: score_quality(scores[m], dsc, hard, keep, seed=seed) for m in scores},
    }
    rng = random.Random(1000 + seed)
    cases = sorted(dsc)
    write_control(seed_dir, CONTROLS["lr"], {c: rng.random() for c in cases}, keep)
    write_control(seed_dir, CONTROLS["lo"], {c: 1.0 - dsc[c] for c in cases}, keep)
    if other_start is not None:
        from fine_efficient_seg.uif import read_scores_csv

        uif_rows = read_scores_csv(seed_dir / "fine_cps" / "uif_scores.csv")
        write_control(seed_dir, f"fine_uif_{other_start}", {r.case: float(r.rank) for r in uif_rows}, keep)
    from common.core.files import write_json_atomic

    write_json_atomic(seed_dir / QUALITY_FILE, result)
    return result


# --------------------------------------------------------------------------------------------- report


def format_quality(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: per score, the mean over seeds (and the per-seed values) of every quality figure."""
    lines = ["| score | Spearman(score, true error) | AUROC worse half | AUROC hard vs normal | true DSC kept K | "
             "dropped | random K | oracle K | Spearman per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for m in SCORES:
        per = [r["scores"][m] for r in results if m in r["scores"]]
        if not per:
            continue

        def avg(key: str) -> str:
            mean, low, high = t_interval([p[key] for p in per])
            return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"

        seeds = ", ".join(f"{p['spearman_vs_error']:+.2f}" for p in per)
        lines.append(f"| {m} | {avg('spearman_vs_error')} | {avg('auroc_worse')} | {avg('auroc_hard')} | "
                     f"{avg('kept_dsc')} | "
                     f"{avg('dropped_dsc')} | {avg('random_dsc')} | {avg('oracle_dsc')} | {seeds} |")
    return "\n".join(lines)


def format_cases(result: Mapping[str, Any]) -> str:
    """Per case of one seed: every score, true pseudo-label DSC, hard flag, kept by disagreement."""
    kept = set(result["scores"]["disagreement"]["kept"])
    names = [m for m in SCORES if m in result["scores"]]
    lines = [f"{'case':<12} " + " ".join(f"{m[:9]:>9}" for m in names) + f" {'true DSC':>8} {'hard':<16} kept"]
    for case, e in sorted(result["cases"].items(), key=lambda kv: kv[1]["disagreement"]):
        hard = "+".join(e["hard_kinds"]) if e["hard"] else "-"
        lines.append(f"{case:<12} " + " ".join(f"{e[m]:9.4f}" for m in names) +
                     f" {e['dsc']:8.4f} {hard:<16} {'yes' if case in kept else ''}")
    return "\n".join(lines)


def format_ranking(scores_csv: Path, dataset: Path, pred_dir: Path) -> str:
    """The uif step's ranking (uif_scores.csv) beside the truth: rank, case, score, true pseudo-label DSC of the
    round-1 ensemble (predictions in `pred_dir` vs the hidden masks), hard flag, kept; then the Spearman line."""
    from fine_efficient_seg.uif import read_scores_csv

    rows = read_scores_csv(scores_csv)
    dsc = pool_truth(pred_dir, dataset, pred_dir / "eval_hidden_truth.csv")
    meta = json.loads((dataset / "synthetic_meta.json").read_text(encoding="utf-8"))
    lines = [f"{'rank':>4} {'case':<12} {'score':>7} {'true DSC':>8} {'hard':<16} kept"]
    for r in rows:
        entry = meta.get(r.case, {})
        hard = "+".join(entry.get("hard_kinds", [])) if entry.get("hard") else "-"
        lines.append(f"{r.rank:>4} {r.case:<12} {r.score:7.4f} {dsc.get(r.case, float('nan')):8.4f} {hard:<16} "
                     f"{'yes' if r.kept else ''}")
    cases = [r.case for r in rows if r.case in dsc]
    rho = spearman([next(x.score for x in rows if x.case == c) for c in cases], [1.0 - dsc[c] for c in cases])
    kept = [dsc[r.case] for r in rows if r.kept and r.case in dsc]
    lines.append(f"Spearman(score, true error) {rho:+.3f}; mean true DSC kept {statistics.fmean(kept):.4f} vs pool "
                 f"{statistics.fmean(dsc[c] for c in cases):.4f}" if kept and cases else "no scored cases")
    return "\n".join(lines)


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(run_dir.glob(f"seed*/{QUALITY_FILE}"))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.uif_quality", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seed", help="score one benchmark seed folder (after round 1 and the pool prediction)")
    s.add_argument("--seed-dir", type=Path, required=True)
    s.add_argument("--keep", type=int, required=True, help="K: cases kept")
    s.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    s.add_argument("--device", default="cpu")
    s.add_argument("--other-start", choices=("warm", "fresh"), default=None,
                   help="also store UIF's selection for a round 2 started this way (fine_uif_<start>)")
    k = sub.add_parser("ranking", help="print a uif_scores.csv beside the true pseudo-label DSC (demo.sh)")
    k.add_argument("--scores", type=Path, required=True, help="uif_scores.csv of the uif step")
    k.add_argument("--dataset", type=Path, required=True, help="synthetic dataset root (hidden truth, meta)")
    k.add_argument("--pred", type=Path, required=True, help="round-1 ensemble predictions of the pool")
    r = sub.add_parser("report", help="print the quality table of a benchmarks/semi_supervised.py run folder")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--cases", action="store_true", help="also print every case of every seed")
    a = p.parse_args(argv)
    return exit_code_of(lambda: _run_command(a))


def _run_command(a: argparse.Namespace) -> int:
    if a.command == "seed":
        result = seed_main(a.seed_dir.resolve(), a.keep, a.seed, a.device, a.other_start)
        print(format_quality([result]))
        print(format_cases(result))
        return 0
    if a.command == "ranking":
        print(format_ranking(a.scores, a.dataset, a.pred))
        return 0
    results = load_results(a.run_dir)
    if not results:
        print(f"error: no seed*/{QUALITY_FILE} in {a.run_dir}; run benchmarks/semi_supervised.py first",
              file=sys.stderr)
        return 2
    print(format_quality(results))
    if a.cases:
        for result in results:
            print(f"\nseed {result['seed']}")
            print(format_cases(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
