"""The original README's semi-supervised table, with the controls that let it answer "does UIF help?".

Rows (fine stage; DSC and NSD by the official FLARE22 rules on held-out synthetic validation cases, predicted by
the full two-stage predictor):
  1. L / 0             fine round 1 with data.unlabeled_db=null (the two networks see labeled crops only)
  2. L / U             fine round 1: CPS with the whole unlabeled pool (hard cases included)
  3. L / U -> K UIF    fine round 2 (fresh networks) on the K unlabeled cases UIF keeps after round 1
  4. L / U -> K random the control: round 2 on K random cases (same K, same network seeds)
  5. L / U -> K oracle round 2 on the K cases with the best TRUE pseudo-label DSC (the ceiling of any filter)
The distribution shift of FLARE22 (labeled scans from few centres, unlabeled and test scans from many) is modelled
by `data_prepare.synthetic --scan-profiles shift`: labeled cases from one narrow scan profile, unlabeled and
evaluation cases from all (contrast phase, noise, slice thickness, HU offset). After round 1 the pool is
predicted by round 1's ensemble and scored against the hidden truth (trainu_mask_hidden/) by
benchmarks/uif_quality.py, which also ranks the pool by the three UIF scores and writes the random and oracle
selections. Each seed is a different synthetic dataset and different network, data-order and augmentation seeds;
the report gives per row the mean and standard deviation over seeds, and paired deltas (each row minus L / 0, UIF
minus random, oracle minus random) with 95 % Student-t intervals over seeds. ONE coarse model per seed (CPS on
labeled + all unlabeled) is shared by all rows: the rows differ only in the fine model.

The labeled cases: `--labeled` L train the networks; `--labeled-val` more labeled cases form the fold-1
validation set that picks the best checkpoint (as the original's 5-fold split does); the held-out `--val` cases
(val_images + val_mask) are used for nothing but the final evaluation. A fraction `--hard-fraction` of the
unlabeled pool is "hard" (heavy noise, metal streaks, truncated field of view; recorded in synthetic_meta.json).

Every stage runs through its real entry point as a subprocess (`sh <stage>/run.sh key=value ...`, `sh predict.sh`),
exactly as demo.sh does. Everything goes to `--out` (default runs/semi_supervised, git-ignored):
  seed<S>/dataset/  seed<S>/coarse/  seed<S>/fine_l0/  seed<S>/fine_cps/ (round1, uif_scores.csv, round2)
  seed<S>/fine_random/ seed<S>/fine_oracle/ (the control selections and their round 2)
  seed<S>/pred_pool/ + eval_pool.csv + uif_quality.json (true pseudo-label quality and the three UIF scores)
  seed<S>/weights_<row>/{base_coarse_model -> ../weights_coarse/..., efficient_fine_model}
  seed<S>/pred_<row>/ + eval_<row>.csv   seed<S>/logs/<step>.log   seed<S>/settings.json, timings.json
  semi_supervised.md (the tables) and semi_supervised.json (every number, the settings, the command, timings).
A rerun with the same settings reuses everything finished (each stage skips what is done); a rerun with
different settings into the same folder is refused (pick another --out).

Cost: every subprocess runs with `--threads` (default 1) OMP/MKL threads and `--jobs` (default 2) seeds run in
parallel. The CPU defaults (5 seeds; channels 8..128; coarse 32^3 x 300, fine 32^3 x 250 iterations per training;
six trainings a seed) took 6079 s on two loaded cores (about 2200 s of steps per seed; BENCHMARKS.md), and the
networks reach DSC 0.24-0.39. Below about 150 iterations of channels 4..64 they learn nothing (validation Dice
< 0.1) and the table says nothing.

    python -m benchmarks.semi_supervised                      # CPU defaults: 5 seeds, L=4, U=12 -> K=6
    python -m benchmarks.semi_supervised --stop-after lu --seeds 0 1 --cps-weight 0.5   # probe L/U vs L/0 only
    python -m benchmarks.semi_supervised --preset cuda        # full size on one GPU (160^3 / 192^3, 16..256)
    python -m benchmarks.semi_supervised --dry-run            # print the commands only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmarks.stats import evaluate_row

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("l0", "lu", "lk", "lr", "lo", "lc")
SETTINGS_FILE = "settings.json"
# Keys of the settings that change the trained models (a rerun with other values would mix results).
_RESULT_KEYS = ("labeled", "labeled_val", "unlabeled", "val", "hard_fraction", "keep_ratio", "size",
                "coarse_size", "fine_size", "coarse_iters", "fine_iters", "round2_iters", "channels",
                "ensemble", "coarse_lr", "fine_lr", "dropout", "rampup_fraction", "scan_profiles", "snapshots",
                "cps_weight", "anatomy", "ceiling")
# How fold 1 is split: "pinned" = exactly --labeled training and --labeled-val validation cases per seed
# (file_list/fold1_val_series_uids.txt). Runs made before (data_prepare's per-case hash draw) are refused.
SPLIT_RULE = "pinned"


@dataclass
class Settings:
    """Everything that defines one benchmark run (per seed, the seed is added)."""

    seeds: list[int]
    labeled: int = 4
    labeled_val: int = 1
    unlabeled: int = 12
    val: int = 3
    hard_fraction: float = 0.25
    keep_ratio: float = 0.5
    size: str = "demo"
    coarse_size: int = 32
    fine_size: int = 32
    coarse_iters: int = 300
    fine_iters: int = 250
    round2_iters: int | None = None
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    ensemble: bool = True
    coarse_lr: float | None = None
    fine_lr: float | None = 1.0e-2
    # Small networks trained for a few hundred steps learn far faster without dropout and with the CPS weight
    # ramped up over the first part of training (pseudo labels of untrained networks are noise).
    dropout: float = 0.0
    rampup_fraction: float = 0.4
    cps_weight: float = 1.0
    # Labeled cases from one narrow scan profile, unlabeled and evaluation cases from all (data_prepare.synthetic).
    scan_profiles: str = "shift"
    anatomy: str = "standard"  # data_prepare.synthetic --anatomy (varied: organs far less alike between cases)
    ceiling: bool = True  # the ceiling row: the unlabeled cases trained WITH their hidden truth (labeled-only)
    regime: str | None = None  # the --regime preset the defaults came from (recorded for the report)
    snapshots: int = 3  # round-1 checkpoints for UIF's stability score
    stop_after: str = "all"  # "quality": stop after round 1 and the UIF quality step
    report_only: bool = False  # build the report from finished seed folders, run nothing
    device: str = "cpu"
    workers: int = 2
    jobs: int = 2
    threads: int | None = 1
    dry_run: bool = False
    out: str = str(ROOT / "runs" / "semi_supervised")

    def result_fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        return {**{k: d[k] for k in _RESULT_KEYS}, "split": SPLIT_RULE}


# --------------------------------------------------------------------------------------------- commands


def _cube(n: int) -> str:
    return f"[{n},{n},{n}]"


def _list(values: Sequence[int]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


@dataclass(frozen=True)
class Step:
    """One subprocess of the pipeline: `name` (its log file), argv, and a marker that says it is done."""

    name: str
    argv: list[str]
    done_marker: Path | None = None  # skip the step when this file exists (stages skip themselves otherwise)


def seed_dir(settings: Settings, seed: int) -> Path:
    return Path(settings.out).resolve() / f"seed{seed}"


def seed_steps(settings: Settings, seed: int) -> list[Step]:
    """The ordered subprocess commands of one seed (absolute paths everywhere: run.sh cds into its stage)."""
    py = sys.executable
    sd = seed_dir(settings, seed)
    ds = sd / "dataset"
    ds_ceiling = sd / "dataset_ceiling"
    coarse_w = sd / "weights_coarse" / "base_coarse_model"
    n_lab = settings.labeled + settings.labeled_val
    small = [f"model.channels={_list(settings.channels)}", "data.num_workers=0", f"model.dropout={settings.dropout}",
             f"device={settings.device}", f"seed={seed}",
             f"model.seed_a={100 * seed + 1}", f"model.seed_b={100 * seed + 2}"]
    steps = [
        Step("synthetic", [py, "-m", "data_prepare.synthetic", "--out", str(ds), "--labeled", str(n_lab),
                           "--unlabeled", str(settings.unlabeled), "--val", str(settings.val), "--seed", str(seed),
                           "--size", settings.size, "--hard-fraction", str(settings.hard_fraction),
                           "--scan-profiles", settings.scan_profiles, "--anatomy", settings.anatomy,
                           # exactly labeled_val validation cases (the last ones), the rest train: the rows'
                           # counts, not data_prepare's per-case val_ratio draw
                           "--fold1-val", str(settings.labeled_val), "--workers", str(settings.workers)]),
        Step("prepare", prepare_argv(settings, ds, seed)),
    ]
    if settings.ceiling:
        # The same cases, the unlabeled ones as labeled cases with their hidden truth (symlinks; same fold-1
        # validation list), prepared like the dataset.
        steps += [Step("ceiling_dataset", [py, "-m", "benchmarks.headroom", "ceiling-dataset", "--src", str(ds),
                                           "--dst", str(ds_ceiling)]),
                  Step("prepare_ceiling", prepare_argv(settings, ds_ceiling, seed))]
    coarse_common = [f"data_base_dir={ds}", f"output_dir={sd / 'coarse'}",
                     f"data.size_zyx={_cube(settings.coarse_size)}", *small,
                     f"schedule.iterations={settings.coarse_iters}",
                     f"cps.rampup_iterations={int(settings.rampup_fraction * settings.coarse_iters)}",
                     f"schedule.val_interval={max(1, settings.coarse_iters // 4)}",
                     "schedule.checkpoint_interval=50", f"export.dir={coarse_w}"]
    if settings.coarse_lr is not None:
        coarse_common.append(f"optim.lr={settings.coarse_lr}")
    coarse_sh = ["sh", str(ROOT / "coarse_base_seg" / "run.sh")]
    steps += [Step("coarse_train", coarse_sh + coarse_common),
              Step("coarse_export", coarse_sh + coarse_common + ["step=export"])]

    fine_sh = ["sh", str(ROOT / "fine_efficient_seg" / "run.sh"), f"data_base_dir={ds}"]
    fine_common = [f"data.size_zyx={_cube(settings.fine_size)}", *small,
                   f"schedule.iterations={settings.fine_iters}",
                   f"cps.rampup_iterations={int(settings.rampup_fraction * settings.fine_iters)}",
                   f"schedule.val_interval={max(1, settings.fine_iters // 4)}",
                   "schedule.checkpoint_interval=50", f"boxes.coarse_model_dir={coarse_w}",
                   f"uif.keep_ratio={settings.keep_ratio}", "uif.keep_count=null", "round2.init=fresh",
                   f"round2.iterations={settings.round2_iters or settings.fine_iters}",
                   f"uif.snapshots={settings.snapshots}", f"cps.weight={settings.cps_weight}"]
    if settings.fine_lr is not None:
        fine_common.append(f"optim.lr={settings.fine_lr}")
    fine_w = {row: sd / f"weights_{row}" / "efficient_fine_model" for row in ROWS}
    l0 = fine_sh + fine_common + [f"output_dir={sd / 'fine_l0'}", "data.unlabeled_db=null",
                                  f"export.dir={fine_w['l0']}"]
    cps = fine_sh + fine_common + [f"output_dir={sd / 'fine_cps'}"]
    # The ceiling: row 1's training on the ceiling dataset (labeled + unlabeled cases with their truth).
    lc = ["sh", str(ROOT / "fine_efficient_seg" / "run.sh"), f"data_base_dir={ds_ceiling}", *fine_common,
          f"output_dir={sd / 'fine_lc'}", "data.unlabeled_db=null", f"export.dir={fine_w['lc']}"]
    from benchmarks.uif_quality import CONTROLS, QUALITY_FILE

    steps += [
        # Row 1: labeled only (boxes, uif and round2 are no-ops without a pool; export takes round 1).
        Step("fine_l0", l0 + ["step=all"]),
        *([Step("fine_lc", lc + ["step=all"])] if settings.ceiling else []),
        # Rows 2-5 share round 1; round 1's networks are exported BEFORE round 2 exists (the export step
        # takes round 2 when it has a checkpoint), so this step is skipped once its model.pt is there.
        Step("fine_cps_boxes", cps + ["step=boxes"]),
        Step("fine_cps_round1", cps + ["step=round1"]),
        Step("fine_lu_export", cps + [f"export.dir={fine_w['lu']}", "step=export"],
             done_marker=fine_w["lu"] / "model.pt"),
    ]
    if settings.stop_after == "lu":
        return steps + [Step(f"predict_{row}", predict_argv(settings, ds / "val_images", sd / f"pred_{row}",
                                                            sd / f"weights_{row}")) for row in active_rows(settings)]
    steps += [
        # True pseudo-label quality: the round-1 ensemble on the pool, scored against the hidden truth.
        Step("predict_pool", predict_argv(settings, ds / "trainu_images", sd / "pred_pool", sd / "weights_lu")),
        Step("fine_cps_uif", cps + ["step=uif"]),
        Step("uif_quality", [py, "-m", "benchmarks.uif_quality", "seed", "--seed-dir", str(sd), "--keep",
                             str(uif_keep(settings)), "--seed", str(seed), "--device", settings.device],
             done_marker=sd / QUALITY_FILE),
    ]
    if settings.stop_after == "quality":
        return steps
    steps += [Step("fine_cps_round2", cps + ["step=round2"]),
              Step("fine_lk_export", cps + [f"export.dir={fine_w['lk']}", "step=export"])]
    for row, out_name in CONTROLS.items():
        control = fine_sh + fine_common + [f"output_dir={sd / out_name}"]
        steps += [Step(f"{out_name}_round2", control + ["step=round2"]),
                  Step(f"fine_{row}_export", control + [f"export.dir={fine_w[row]}", "step=export"])]
    for row in active_rows(settings):
        steps.append(Step(f"predict_{row}", predict_argv(settings, ds / "val_images", sd / f"pred_{row}",
                                                         sd / f"weights_{row}")))
    return steps


def prepare_argv(settings: Settings, dataset: Path, seed: int) -> list[str]:
    """data_prepare of one dataset folder (its fold-1 split comes from file_list/fold1_val_series_uids.txt)."""
    return ["sh", str(ROOT / "data_prepare" / "run.sh"), f"data_base_dir={dataset}",
            f"coarse_size_zyx={_cube(settings.coarse_size)}", f"fine_size_zyx={_cube(settings.fine_size)}",
            f"split_seed={seed}", f"num_workers={settings.workers}"]


def predict_argv(settings: Settings, in_dir: Path, out_dir: Path, weights_dir: Path) -> list[str]:
    """predict.sh when it exists, else the same API (common.infer.folder.predict_folder) from a subprocess."""
    flags = ["--weights-dir", str(weights_dir), "--device", settings.device, "--fine-size", str(settings.fine_size),
             "--workers", "1"]
    if settings.ensemble:
        flags.append("--ensemble")
    if (ROOT / "predict.sh").is_file():
        return ["sh", str(ROOT / "predict.sh"), str(in_dir), str(out_dir), *flags]
    code = ("import sys; from common.infer.predictor import PredictOptions, predict_folder; "
            f"r = predict_folder({str(in_dir)!r}, {str(out_dir)!r}, "
            f"PredictOptions(weights_dir={str(weights_dir)!r}, device={settings.device!r}, "
            f"fine_size={settings.fine_size}, ensemble={settings.ensemble}, workers=1)); "
            "sys.exit(1 if r['failed'] else 0)")
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------------------------- running


class StepFailed(RuntimeError):
    pass


def _env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_step(step: Step, log_dir: Path, t0: float, threads: int | None = None, tag: str = "") -> float:
    """Run one step with its output in `log_dir/<name>.log`; returns its wall time (0 when skipped)."""
    if step.done_marker is not None and step.done_marker.is_file():
        print(f"  [{time.perf_counter() - t0:7.0f} s] {tag}{step.name}: done before ({step.done_marker.name} "
              "exists)", flush=True)
        return 0.0
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{step.name}.log"
    print(f"  [{time.perf_counter() - t0:7.0f} s] {tag}{step.name} ...", flush=True)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(step.argv)}\n")
        handle.flush()
        proc = subprocess.run(step.argv, cwd=ROOT, env=_env(threads), stdout=handle, stderr=subprocess.STDOUT,
                              check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise StepFailed(f"step {step.name} failed with exit code {proc.returncode} after {wall:.0f} s\n"
                         f"command: {shlex.join(step.argv)}\nlog: {log}\n--- last lines ---\n{tail}")
    return wall


def check_settings(settings: Settings, seed: int) -> None:
    """Refuse to mix results of different settings in one seed folder; record them for the next run."""
    path = seed_dir(settings, seed) / SETTINGS_FILE
    current = {**settings.result_fingerprint(), "seed": seed}
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != current:
            diff = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
            raise SystemExit(f"error: {path} was made with other settings {diff} (recorded, now); "
                             "use another --out or delete that folder")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")


def uif_hard_share(scores_csv: Path, meta_json: Path) -> dict[str, Any]:
    """Share of hard cases among the unlabeled cases UIF kept vs. dropped (from uif_scores.csv + the meta)."""
    meta = json.loads(meta_json.read_text(encoding="utf-8"))
    with open(scores_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r["case"] for r in rows if r["kept"] == "1"]
    dropped = [r["case"] for r in rows if r["kept"] != "1"]

    def share(ids: list[str]) -> dict[str, Any]:
        hard = [c for c in ids if meta.get(c, {}).get("hard", False)]
        return {"n": len(ids), "hard": len(hard), "share": (len(hard) / len(ids)) if ids else float("nan"),
                "hard_ids": hard}

    ranked_hard = [int(r["rank"]) for r in rows if meta.get(r["case"], {}).get("hard", False)]
    return {"kept": share(kept), "dropped": share(dropped), "hard_ranks": sorted(ranked_hard),
            "pool": len(rows),
            "scores": {r["case"]: {"score": float(r["score"]), "kept": r["kept"] == "1", "rank": int(r["rank"]),
                                   "hard": bool(meta.get(r["case"], {}).get("hard", False)),
                                   "hard_kinds": meta.get(r["case"], {}).get("hard_kinds", [])} for r in rows}}


def run_seed(settings: Settings, seed: int, t0: float) -> dict[str, Any]:
    sd = seed_dir(settings, seed)
    if settings.report_only and not (sd / SETTINGS_FILE).is_file():
        raise StepFailed(f"{sd} holds no finished run (no {SETTINGS_FILE}); --report-only runs nothing")
    check_settings(settings, seed)
    coarse_w = sd / "weights_coarse" / "base_coarse_model"
    timings: dict[str, float] = {}
    for step in [] if settings.report_only else seed_steps(settings, seed):
        if step.name.startswith("fine_lk_export") or step.name == "fine_cps_round2":
            if not (sd / "weights_lu" / "efficient_fine_model" / "model.pt").is_file():
                raise StepFailed(f"{sd / 'weights_lu'} has no round-1 export; delete {sd / 'fine_cps' / 'round2'} "
                                 "and rerun (round 1 must be exported before round 2 exists)")
        if step.name.startswith("predict_"):
            row = "lu" if step.name == "predict_pool" else step.name.split("_", 1)[1]
            link = sd / f"weights_{row}" / "base_coarse_model"
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(coarse_w, link.parent))
        timings[step.name] = run_step(step, sd / "logs", t0, settings.threads, f"seed {seed}: ")
    from benchmarks.uif_quality import QUALITY_FILE

    quality = json.loads((sd / QUALITY_FILE).read_text(encoding="utf-8")) if settings.stop_after != "lu" else None
    if settings.stop_after == "quality":
        return {"seed": seed, "rows": {}, "quality": quality, "timings_s": timings}
    rows = {}
    for row in active_rows(settings):
        rows[row] = evaluate_row(sd / f"pred_{row}", sd / "dataset" / "val_mask", sd / f"eval_{row}.csv")
        rows[row]["fine_val_dice"] = _exported_dice(sd / f"weights_{row}" / "efficient_fine_model")
    uif = (uif_hard_share(sd / "fine_cps" / "uif_scores.csv", sd / "dataset" / "synthetic_meta.json")
           if quality is not None else None)
    coarse_dice = _exported_dice(coarse_w)
    # A rerun reuses finished steps (which then take seconds): keep the longest time seen per step, so the
    # record holds what each step cost when it really ran, whichever invocation that was.
    timings_path = sd / "timings.json"
    recorded = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    steps_s = {**recorded, **{name: max(t, recorded.get(name, 0.0)) for name, t in timings.items()}}
    timings_path.write_text(json.dumps(steps_s, indent=1) + "\n", encoding="utf-8")
    return {"seed": seed, "rows": rows, "uif": uif, "timings_s": timings, "steps_s_all_runs": steps_s,
            "coarse_val_dice": coarse_dice, "quality": quality}


def _exported_dice(model_dir: Path) -> dict[str, float] | None:
    """Best validation Dice (fold-1 labeled validation set) recorded in an exported model, or None."""
    try:
        import torch

        payload = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
        return {k: float(v) for k, v in payload.get("best_dice", {}).items()}
    except Exception:  # noqa: BLE001 - informative only
        return None


# --------------------------------------------------------------------------------------------- report


def uif_keep(s: Settings) -> int:
    """K: how many unlabeled cases UIF keeps (common.evaluation.uncertainty.keep_size's rule: round half up, at least
    1)."""
    return max(1, min(s.unlabeled, math.floor(s.keep_ratio * s.unlabeled + 0.5)))


def row_label(row: str, s: Settings) -> str:
    k = uif_keep(s)
    return {"l0": f"{s.labeled} / 0",
            "lu": f"{s.labeled} / {s.unlabeled}",
            "lk": f"{s.labeled} / {s.unlabeled} -> {k} (UIF)",
            "lr": f"{s.labeled} / {s.unlabeled} -> {k} (random)",
            "lo": f"{s.labeled} / {s.unlabeled} -> {k} (oracle)",
            "lc": f"{s.labeled} + {s.unlabeled} with truth / 0 (ceiling)"}[row]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return float("nan"), float("nan")
    return statistics.fmean(ok), (statistics.stdev(ok) if len(ok) > 1 else float("nan"))


def active_rows(settings: Settings) -> tuple[str, ...]:
    """The rows a run makes: all five, or L / 0 and L / U only (`--stop-after lu`, for probing CPS settings); plus
    the ceiling row unless --no-ceiling."""
    rows = ("l0", "lu") if settings.stop_after == "lu" else ROWS[:-1]
    return rows + (("lc",) if settings.ceiling else ())


def _rows_of(results: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(row for row in ROWS if all(row in r["rows"] for r in results))


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: mean, std and per-seed values of DSC and NSD, and the per-seed paired differences to row l0."""
    out: dict[str, dict[str, Any]] = {}
    for row in _rows_of(results):
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in results]}
        for metric in ("DSC", "NSD"):
            values = [r["rows"][row][metric] for r in results]
            mean, std = _mean_std(values)
            entry[metric] = {"mean": mean, "std": std, "per_seed": values}
            if row != "l0":
                diffs = [r["rows"][row][metric] - r["rows"]["l0"][metric] for r in results]
                dmean, dstd = _mean_std(diffs)
                entry[metric]["diff_vs_l0"] = {"mean": dmean, "std": dstd, "per_seed": diffs}
        out[row] = entry
    return out


def _fmt(mean: float, std: float) -> str:
    if math.isnan(std):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def format_table(summary: dict[str, dict[str, Any]], settings: Settings) -> str:
    lines = ["| L / U | DSC mean ± std | NSD mean ± std | n seeds | DSC per seed | NSD per seed |",
             "|---|---|---|---|---|---|"]
    for row in summary:
        e = summary[row]
        per_dsc = ", ".join(f"{v:.4f}" for v in e["DSC"]["per_seed"])
        per_nsd = ", ".join(f"{v:.4f}" for v in e["NSD"]["per_seed"])
        lines.append(f"| {row_label(row, settings)} | {_fmt(e['DSC']['mean'], e['DSC']['std'])} | "
                     f"{_fmt(e['NSD']['mean'], e['NSD']['std'])} | {len(e['seeds'])} | {per_dsc} | {per_nsd} |")
    return "\n".join(lines)


def paired(results: Sequence[dict[str, Any]], row: str, base: str, metric: str) -> list[float]:
    """Per-seed differences row - base of one metric (paired by seed)."""
    return [r["rows"][row][metric] - r["rows"][base][metric] for r in results]


def format_diffs(results: Sequence[dict[str, Any]], settings: Settings) -> str:
    from benchmarks.stats import t_interval

    lines = ["| paired difference (by seed) | ΔDSC mean [95 % t-interval] | ΔNSD mean [95 % t-interval] "
             "| ΔDSC per seed |", "|---|---|---|---|"]
    rows = _rows_of(results)
    pairs = [(row, base) for row, base in [(row, "l0") for row in ROWS[1:]] + [("lk", "lr"), ("lo", "lr")]
             if row in rows and base in rows]

    def fmt(values: Sequence[float]) -> str:
        mean, low, high = t_interval(values)
        return f"{mean:+.4f}" if math.isnan(low) else f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"

    for row, base in pairs:
        d, n = paired(results, row, base, "DSC"), paired(results, row, base, "NSD")
        label = f"{row_label(row, settings)} minus {row_label(base, settings)}"
        lines.append(f"| {label} | {fmt(d)} | {fmt(n)} | {', '.join(f'{v:+.4f}' for v in d)} |")
    return "\n".join(lines)


def format_uif(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| seed | pool | kept: hard / n | dropped: hard / n | ranks of the hard cases (1 = most certain) |",
             "|---|---|---|---|---|"]
    for r in results:
        u = r["uif"]
        lines.append(f"| {r['seed']} | {u['pool']} | {u['kept']['hard']} / {u['kept']['n']} | "
                     f"{u['dropped']['hard']} / {u['dropped']['n']} | {', '.join(map(str, u['hard_ranks']))} |")
    return "\n".join(lines)


def quality_table(results: Sequence[dict[str, Any]]) -> str:
    from benchmarks.uif_quality import format_quality

    return format_quality([r["quality"] for r in results if "quality" in r])


def build_report(results: Sequence[dict[str, Any]], settings: Settings, command: str, wall_s: float) -> str:
    summary = summarize(results)
    k = uif_keep(settings)
    text = [
        "## Semi-supervised table on synthetic data",
        "",
        f"Command: `{command}`",
        "",
        f"Synthetic `{settings.size}` data (anatomy `{settings.anatomy}`"
        f"{f', regime `{settings.regime}`' if settings.regime else ''}); per seed exactly {settings.labeled} labeled "
        f"training + {settings.labeled_val} "
        f"labeled validation (checkpoint choice) cases, {settings.unlabeled} unlabeled ({settings.hard_fraction:.0%}"
        f" hard), {settings.val} held-out evaluation cases. Networks with channels {settings.channels}; coarse "
        f"{settings.coarse_size}^3 ({settings.coarse_iters} iterations, CPS on labeled + unlabeled, one model per "
        f"seed shared by all rows); fine {settings.fine_size}^3, {settings.fine_iters} iterations a round; UIF "
        f"keeps {k} of {settings.unlabeled} (keep_ratio {settings.keep_ratio}, disagreement of nets A/B); the "
        f"random row keeps {k} random cases, the oracle row the {k} with the best true pseudo-label DSC; round 2 "
        f"from fresh networks ({settings.round2_iters or settings.fine_iters} iterations). Scan profiles "
        f"`{settings.scan_profiles}` (shift: labeled cases from one narrow profile, unlabeled and evaluation cases "
        f"from all); CPS weight {settings.cps_weight}, ramped up over the first {settings.rampup_fraction:.0%} of "
        f"each training; fine lr {settings.fine_lr or 'of config.yaml'}."
        + (f" Ceiling row: row 1's training with the {settings.unlabeled} unlabeled cases added as labeled cases "
           "with their hidden truth (the most any use of them can give)." if settings.ceiling else "")
        + " Prediction: full "
        f"two-stage predictor{' (ensemble of A and B)' if settings.ensemble else ''}; DSC/NSD by the FLARE22 rules, "
        "mean over the 13 organs and the evaluation cases; ± is the standard deviation over seeds.",
        "",
        format_table(summary, settings),
        "",
        format_diffs(results, settings),
    ]
    if all(r.get("uif") for r in results):
        text += [
        "",
        "UIF: hard unlabeled cases (noise / metal / truncated field of view, from synthetic_meta.json) among the "
        "cases kept vs. dropped:",
        "",
        format_uif(results),
        "",
        "UIF quality (benchmarks/uif_quality.py): per score, the mean over seeds [95 % t-interval] of the Spearman "
        "correlation of the score with the true pseudo-label error (1 - DSC of the round-1 ensemble vs the hidden "
        f"truth), the AUROC for hard vs normal scans, and the mean true pseudo-label DSC of the kept {k}, the "
        f"dropped, {k} random (mean of many draws) and the oracle's {k}:",
        "",
        quality_table(results),
        ]
    text += [
        "",
        f"Wall time of this invocation: {wall_s:.0f} s on {platform.node()} ({os.cpu_count()} CPUs, device "
        f"{settings.device}, {settings.jobs} seed(s) in parallel, {settings.threads or 'default'} thread(s) per "
        f"process), {time.strftime('%Y-%m-%d')}. Sum of the step times per seed, counting each step when it really "
        "ran (reruns reuse finished steps): "
        + ", ".join(f"seed {r['seed']} {sum(r.get('steps_s_all_runs', r.get('timings_s', {})).values()):.0f} s"
                    for r in results) + ".",
    ]
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------------------------- CLI


# `--regime NAME`: data and training settings found by benchmarks/headroom.py to leave the unlabeled scans room
# to matter (defaults only; explicit options win). See BENCHMARKS.md, "Label headroom".
REGIMES: dict[str, dict[str, Any]] = {}

# `--preset cuda`: the full-size run for one GPU (defaults only; explicit options win).
CUDA_PRESET = {"device": "cuda", "size": "full", "coarse_size": 160, "fine_size": 192, "channels": "16,32,64,128,256",
               "coarse_iters": 4000, "fine_iters": 4000, "unlabeled": 40, "labeled": 8, "val": 10, "jobs": 1,
               "threads": 0, "dropout": 0.2, "fine_lr": 1.0e-3, "workers": 8}


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.semi_supervised",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Settings(seeds=[0, 1, 2, 3, 4])  # the defaults live in Settings only
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="one run per seed (data + networks)")
    p.add_argument("--labeled", type=int, default=d.labeled, help="L: labeled cases that train the networks")
    p.add_argument("--labeled-val", type=int, default=d.labeled_val,
                   help="extra labeled cases validating (best checkpoint)")
    p.add_argument("--unlabeled", type=int, default=d.unlabeled, help="U: unlabeled pool")
    p.add_argument("--val", type=int, default=d.val, help="held-out evaluation cases (val_images + val_mask)")
    p.add_argument("--hard-fraction", type=float, default=d.hard_fraction, help="share of hard unlabeled cases")
    p.add_argument("--keep-ratio", type=float, default=d.keep_ratio, help="share of the pool UIF keeps (K)")
    p.add_argument("--size", choices=("tiny", "demo", "full"), default=d.size, help="synthetic case size")
    p.add_argument("--coarse-size", type=int, default=d.coarse_size, help="coarse network cube edge (multiple of 16)")
    p.add_argument("--fine-size", type=int, default=d.fine_size, help="fine network cube edge (multiple of 16)")
    p.add_argument("--coarse-iters", type=int, default=d.coarse_iters, help="coarse CPS iterations")
    p.add_argument("--fine-iters", type=int, default=d.fine_iters, help="fine iterations per round")
    p.add_argument("--round2-iters", type=int, default=None, help="round-2 iterations (default: --fine-iters)")
    p.add_argument("--channels", type=str, default=",".join(map(str, d.channels)), help="channels of both networks")
    p.add_argument("--coarse-lr", type=float, default=d.coarse_lr, help="coarse Adam lr (default: config.yaml's)")
    p.add_argument("--fine-lr", type=float, default=d.fine_lr, help="fine Adam lr (None: config.yaml's)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout of both stages' networks")
    p.add_argument("--rampup-fraction", type=float, default=d.rampup_fraction,
                   help="CPS weight ramp-up over this share of each training's iterations (0: none)")
    p.add_argument("--cps-weight", type=float, default=d.cps_weight, help="weight of the CPS loss")
    p.add_argument("--scan-profiles", choices=("fixed", "shift", "strong_shift"), default=d.scan_profiles,
                   help="shift: labeled cases from one narrow scan profile, unlabeled + evaluation from all")
    p.add_argument("--anatomy", choices=("standard", "varied"), default=d.anatomy,
                   help="synthetic anatomy: varied = organ placement, size and shape far less alike between cases")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the ceiling row (the unlabeled cases trained with their hidden truth)")
    p.add_argument("--regime", choices=sorted(REGIMES), default=None,
                   help="a preset of the data and training settings (REGIMES; explicit options still win)")
    p.add_argument("--snapshots", type=int, default=d.snapshots, help="round-1 snapshots (UIF stability score)")
    p.add_argument("--stop-after", choices=("all", "quality", "lu"), default="all",
                   help="quality: stop after round 1 and the UIF quality step (no round 2, no rows); lu: rows "
                        "L / 0 and L / U only (to probe CPS settings)")
    p.add_argument("--preset", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: full-size settings for one GPU (full cases, coarse 160^3, fine 192^3, channels "
                        "16..256, 4000 iterations, U=40); explicit options still win")
    p.add_argument("--no-ensemble", action="store_true", help="predict with network A only (default: A+B mean)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--workers", type=int, default=2, help="processes for synthesis and preparation")
    p.add_argument("--jobs", type=int, default=d.jobs, help="seeds run in parallel (each a chain of subprocesses)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads per subprocess (0: torch's default). One thread per process and several seeds "
                        "in parallel use a small CPU best (several multi-threaded processes on 2 cores spin-wait)")
    p.add_argument("--out", default=str(ROOT / "runs" / "semi_supervised"), help="output folder")
    p.add_argument("--dry-run", action="store_true", help="print the commands of every seed and exit")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the report from the finished seed folders (e.g. seeds run by several "
                        "invocations)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--preset" in argv and argv[argv.index("--preset") + 1:argv.index("--preset") + 2] == ["cuda"]:
        p.set_defaults(**CUDA_PRESET)
    for i, arg in enumerate(argv):  # --regime NAME or --regime=NAME: its settings become the defaults
        name = argv[i + 1] if arg == "--regime" and i + 1 < len(argv) else arg.partition("--regime=")[2]
        if name in REGIMES:
            p.set_defaults(**REGIMES[name])
    a = p.parse_args(argv)
    channels = [int(c) for c in a.channels.replace("[", "").replace("]", "").split(",") if c.strip()]
    for name, edge in (("--coarse-size", a.coarse_size), ("--fine-size", a.fine_size)):
        if edge % 16:
            p.error(f"{name} must be a multiple of 16, got {edge}")
    if a.labeled < 1 or a.labeled_val < 1 or a.unlabeled < 2 or a.val < 1:
        p.error("need --labeled >= 1, --labeled-val >= 1, --unlabeled >= 2 and --val >= 1")
    if not 0.0 < a.keep_ratio < 1.0:
        p.error("--keep-ratio must be within (0, 1)")
    s = Settings(seeds=list(dict.fromkeys(a.seeds)), labeled=a.labeled, labeled_val=a.labeled_val,
                 unlabeled=a.unlabeled, val=a.val, hard_fraction=a.hard_fraction, keep_ratio=a.keep_ratio,
                 size=a.size, coarse_size=a.coarse_size, fine_size=a.fine_size, coarse_iters=a.coarse_iters,
                 fine_iters=a.fine_iters, round2_iters=a.round2_iters, channels=channels,
                 ensemble=not a.no_ensemble, coarse_lr=a.coarse_lr, fine_lr=a.fine_lr, dropout=a.dropout,
                 rampup_fraction=a.rampup_fraction, device=a.device, cps_weight=a.cps_weight,
                 scan_profiles=a.scan_profiles, anatomy=a.anatomy, ceiling=not a.no_ceiling, regime=a.regime,
                 snapshots=a.snapshots, stop_after=a.stop_after,
                 report_only=a.report_only,
                 workers=a.workers, jobs=a.jobs, threads=a.threads or None, dry_run=a.dry_run,
                 out=str(Path(a.out).resolve()))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.semi_supervised",
                          *(sys.argv[1:] if argv is None else argv)])
    if settings.dry_run:
        for seed in settings.seeds:
            print(f"# seed {seed}")
            for step in seed_steps(settings, seed):
                print(f"{step.name}: {shlex.join(step.argv)}")
        return 0
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"semi-supervised benchmark: seeds {settings.seeds}, L={settings.labeled} (+{settings.labeled_val} "
          f"validation), U={settings.unlabeled} ({settings.hard_fraction:.0%} hard), {settings.val} evaluation "
          f"cases; outputs in {out}", flush=True)
    def one_seed(seed: int) -> dict[str, Any]:
        start = time.perf_counter()
        result = run_seed(settings, seed, t0)
        result["wall_s"] = time.perf_counter() - start
        print(f"  seed {seed} done: " + ", ".join(
            f"{row} DSC {v['DSC']:.4f} NSD {v['NSD']:.4f}" for row, v in result["rows"].items())
              + f" ({result['wall_s']:.0f} s)", flush=True)
        return result

    results, failed = [], []
    with ThreadPoolExecutor(max_workers=max(1, settings.jobs)) as pool:  # threads only wait on subprocesses
        futures = {seed: pool.submit(one_seed, seed) for seed in settings.seeds}
        for seed, future in futures.items():
            try:
                results.append(future.result())
            except StepFailed as exc:
                print(f"error: seed {seed}: {exc}", file=sys.stderr)
                failed.append(seed)
    if not results:
        return 1
    wall = time.perf_counter() - t0
    if settings.stop_after == "quality":
        print(quality_table(results))
        return 1 if failed else 0
    report = build_report(results, settings, command, wall)
    payload = {"command": command, "settings": asdict(settings), "wall_s": wall, "date": time.strftime("%F %T"),
               "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "summary": summarize(results), "seeds": results}
    from common.core.files import write_json_atomic, write_text_atomic

    write_text_atomic(out / "semi_supervised.md", report)
    write_json_atomic(out / "semi_supervised.json", payload)
    print()
    print(report)
    print(f"wrote {out / 'semi_supervised.md'} and {out / 'semi_supervised.json'}")
    print(f"command: {command}")
    if failed:
        print(f"error: seeds {failed} failed (see above); the table holds the other seeds", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
