"""Does the semi-supervised method help, and does UIF choose better than chance? Rows that differ in one thing.

Rows (fine stage; DSC and NSD by the official FLARE22 rules on held-out synthetic evaluation cases, predicted by
the full two-stage predictor; one coarse model per seed shared by every row):
  l0      L / 0            labeled only (data.unlabeled_db=null)
  lu      L / U            CPS round 1 on labeled + the whole unlabeled pool
  lu_<v>  L / U, variant   as lu with other CPS settings (`--lu-variant NAME=key=value,...`: confidence, weight)
  lk      UIF-K            round 2 on the K cases UIF keeps after round 1
  lk_fresh / lk_warm       as lk, started the other way (fresh from the warm-up, or from round 1's end)
  lr      random-K         the control: round 2 on K random cases (same K, same start, same seeds)
  lo      oracle-K         round 2 on the K cases with the best TRUE pseudo-label DSC (the ceiling of any filter)
  ln      N rounds         `uif.rounds=N`: filter and retrain N times (round N + 1)
  lc      ceiling          as l0, with the unlabeled cases added as labeled cases with their hidden truth
Variance is reduced by design: every row of a seed starts from one shared supervised warm-up (`--warmup-iters`,
exported once and passed as model.init_from), L / 0 and L / U give a labeled crop the same weight
(`--cps-parts separate`, common.train.cps.CPSSettings), and the K rows start from the end of round 1
(`--round2-init warm`; the lk_fresh row measures the other start). Each seed is a different synthetic dataset and
different network, data-order and augmentation seeds; the report gives per row the mean with its 95 % Student-t
interval over seeds, the paired differences (by seed) with intervals, and the smallest difference the design
resolves (80 % power, two-sided 5 %) from the spread of those differences. DSC is the mean over all 13 organs and
over the organs that have shape at the fine size (benchmarks.headroom.shaped_organs).

After round 1 the pool is predicted by round 1's ensemble and scored against the hidden truth (trainu_mask_hidden/)
by benchmarks/uif_quality.py, which compares the UIF scores (disagreement, entropy, stability, change) and writes
the random, oracle and other-start selections. With N rounds, each filter's kept cases are scored the same way
(their true pseudo-label DSC per round).

The labeled cases: `--labeled` L train the networks; `--labeled-val` more labeled cases form the fold-1 validation
set that picks the best checkpoint (pinned: exactly these counts per seed); the `--val` held-out cases are used for
nothing but the final evaluation.

Every stage runs through its real entry point as a subprocess (`sh <stage>/run.sh key=value ...`, `sh predict.sh`),
exactly as demo.sh does. Everything goes to `--out` (default runs/semi_supervised, git-ignored): per seed
seed<S>/{dataset, dataset_ceiling, coarse, fine_warm, fine_l0, fine_lc, fine_cps, fine_lu_<v>, fine_random,
fine_oracle, fine_uif_<start>, weights_<row>, pred_<row>, eval_<row>.csv, pred_pool*, logs, settings.json,
timings.json}; semi_supervised.md (the tables) and semi_supervised.json (every number, the settings, the command,
timings). A rerun with the same settings reuses everything finished; one with other settings into the same folder
is refused (pick another --out).

Cost: every subprocess runs with `--threads` (default 1) OMP/MKL threads and `--jobs` (default 2) seeds run in
parallel; the report gives the CPU minutes of each row's own steps.

    python -m benchmarks.semi_supervised --regime headroom --seeds 0 1 2 3 4 5   # the BENCHMARKS.md table
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
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from benchmarks.pipeline import ROOT, Step, StepFailed, cube, int_list, run_step
from benchmarks.stats import evaluate_row, resolvable
from benchmarks.uif_quality import QUALITY_FILE

SETTINGS_FILE = "settings.json"
# Keys of the settings that change the trained models (a rerun with other values would mix results).
_RESULT_KEYS = ("labeled", "labeled_val", "unlabeled", "val", "hard_fraction", "keep_ratio", "size",
                "coarse_size", "fine_size", "coarse_iters", "fine_iters", "round2_iters", "channels",
                "ensemble", "coarse_lr", "fine_lr", "dropout", "rampup_fraction", "scan_profiles", "snapshots",
                "cps_weight", "anatomy", "ceiling", "warmup_iters", "cps_parts", "cps_confidence", "round2_init",
                "rounds", "keep_schedule", "lu_variants", "start_control")
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
    cps_parts: str = "separate"  # the same labeled weight in L / 0 and L / U (the stage's default is joint)
    cps_confidence: float = 0.0
    # Labeled cases from one narrow scan profile, unlabeled and evaluation cases from all (data_prepare.synthetic).
    scan_profiles: str = "shift"
    anatomy: str = "standard"  # data_prepare.synthetic --anatomy (varied: organs far less alike between cases)
    ceiling: bool = True  # the ceiling row: the unlabeled cases trained WITH their hidden truth (labeled-only)
    warmup_iters: int = 0  # shared supervised warm-up every row starts from (0: every row starts fresh)
    round2_init: str = "warm"  # how the K rows start: warm (round 1's end) or fresh (where round 1 started)
    start_control: bool = True  # the UIF-K row started the other way too (lk_fresh or lk_warm)
    rounds: int = 1  # uif.rounds of the N-rounds row (1: no such row)
    keep_schedule: str = "fixed"
    lu_variants: list[str] = field(default_factory=list)  # "NAME=key=value,key=value": extra L / U rows
    regime: str | None = None  # the --regime preset the defaults came from (recorded for the report)
    snapshots: int = 3  # round-1 checkpoints for UIF's stability and change scores
    stop_after: str = "all"  # "quality": stop after round 1 and the UIF quality step; "lu": rows l0 and lu only
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

    @property
    def other_start(self) -> str:
        return "fresh" if self.round2_init == "warm" else "warm"

    def variants(self) -> dict[str, list[str]]:
        """{row: its extra fine overrides} of the L / U variants."""
        out = {}
        for text in self.lu_variants:
            name, _, overrides = text.partition("=")
            out[f"lu_{name}"] = [o for o in overrides.split(",") if o]
        return out


def uif_keep(s: Settings) -> int:
    """K: how many unlabeled cases UIF keeps (the uif step's own rule)."""
    from common.evaluation.uncertainty import keep_size

    return keep_size(s.unlabeled, keep_ratio=s.keep_ratio)


def rows_of(s: Settings) -> tuple[str, ...]:
    """The rows a run makes, in table order."""
    if s.stop_after == "lu":
        return ("l0", "lu", *s.variants()) + (("lc",) if s.ceiling else ())
    rows = ["l0", "lu", *s.variants(), "lk"]
    if s.start_control:
        rows.append(f"lk_{s.other_start}")
    rows += ["lr", "lo"] + (["ln"] if s.rounds > 1 else []) + (["lc"] if s.ceiling else [])
    return tuple(rows)


def row_label(row: str, s: Settings) -> str:
    k, lab, unl = uif_keep(s), s.labeled, s.unlabeled
    labels = {"l0": f"{lab} / 0", "lu": f"{lab} / {unl}",
              "lk": f"{lab} / {unl} -> {k} (UIF)", "lr": f"{lab} / {unl} -> {k} (random)",
              "lo": f"{lab} / {unl} -> {k} (oracle)", f"lk_{s.other_start}": f"{lab} / {unl} -> {k} (UIF, "
              f"{s.other_start} start)",
              "ln": f"{lab} / {unl} -> {s.rounds} x {k}{' growing' if s.keep_schedule == 'growing' else ''} (UIF)",
              "lc": f"{lab} + {unl} with truth / 0 (ceiling)"}
    for variant, overrides in s.variants().items():
        labels[variant] = f"{lab} / {unl}, {' '.join(overrides)}"
    return labels[row]


# --------------------------------------------------------------------------------------------- commands


def seed_dir(settings: Settings, seed: int) -> Path:
    return Path(settings.out).resolve() / f"seed{seed}"


@dataclass(frozen=True)
class SeedPaths:
    """The folders of one seed and the argument lists every fine run shares."""

    settings: Settings
    seed: int

    @property
    def sd(self) -> Path:
        return seed_dir(self.settings, self.seed)

    @property
    def ds(self) -> Path:
        return self.sd / "dataset"

    @property
    def coarse_weights(self) -> Path:
        return self.sd / "weights_coarse" / "base_coarse_model"

    def weights(self, row: str) -> Path:
        return self.sd / f"weights_{row}" / "efficient_fine_model"

    def small(self) -> list[str]:
        s, seed = self.settings, self.seed
        return [f"model.channels={int_list(s.channels)}", "data.num_workers=0", f"model.dropout={s.dropout}",
                f"device={s.device}", f"seed={seed}", f"model.seed_a={100 * seed + 1}",
                f"model.seed_b={100 * seed + 2}"]

    def fine(self, out_name: str, dataset: Path | None = None) -> list[str]:
        """`sh fine_efficient_seg/run.sh` with every shared override, into `<seed>/<out_name>`."""
        s = self.settings
        args = ["sh", str(ROOT / "fine_efficient_seg" / "run.sh"), f"data_base_dir={dataset or self.ds}",
                f"output_dir={self.sd / out_name}", f"data.size_zyx={cube(s.fine_size)}", *self.small(),
                f"schedule.iterations={s.fine_iters}",
                f"cps.rampup_iterations={int(s.rampup_fraction * s.fine_iters)}",
                f"schedule.val_interval={max(1, s.fine_iters // 4)}", "schedule.checkpoint_interval=50",
                f"boxes.coarse_model_dir={self.coarse_weights}", f"uif.keep_ratio={s.keep_ratio}",
                "uif.keep_count=null", f"round2.init={s.round2_init}", f"uif.rounds={s.rounds}",
                f"uif.keep_schedule={s.keep_schedule}", f"round2.iterations={s.round2_iters or s.fine_iters}",
                f"uif.snapshots={s.snapshots}", f"cps.weight={s.cps_weight}", f"cps.parts={s.cps_parts}",
                f"cps.confidence={s.cps_confidence}"]
        if s.fine_lr is not None:
            args.append(f"optim.lr={s.fine_lr}")
        if s.warmup_iters and out_name != "fine_warm":
            args.append(f"model.init_from={self.weights('warm')}")
        return args

    def export(self, fine_args: list[str], row: str, k: int) -> Step:
        """Export round k of a fine run as row `row`'s model (skipped once its model.pt exists)."""
        return Step(f"fine_{row}_export", fine_args + [f"export.dir={self.weights(row)}", f"export.round={k}",
                                                       "step=export"], done_marker=self.weights(row) / "model.pt",
                    row=row)


def seed_steps(settings: Settings, seed: int) -> list[Step]:
    """The ordered subprocess commands of one seed (absolute paths everywhere: run.sh cds into its stage)."""
    paths = SeedPaths(settings, seed)
    steps = data_steps(paths) + coarse_steps(paths) + labeled_row_steps(paths) + round1_steps(paths)
    if settings.stop_after == "lu":
        return steps + predict_steps(paths)
    steps += quality_steps(paths)
    if settings.stop_after == "quality":
        return steps
    return steps + round2_steps(paths) + more_round_steps(paths) + predict_steps(paths)


def data_steps(paths: SeedPaths) -> list[Step]:
    """The synthetic dataset and its preparation, and the ceiling dataset (the same cases, the unlabeled ones as
    labeled cases with their hidden truth: symlinks, the same fold-1 validation list)."""
    s, py = paths.settings, sys.executable
    steps = [
        Step("synthetic", [py, "-m", "data_prepare.synthetic", "--out", str(paths.ds), "--labeled",
                           str(s.labeled + s.labeled_val), "--unlabeled", str(s.unlabeled), "--val", str(s.val),
                           "--seed", str(paths.seed), "--size", s.size, "--hard-fraction", str(s.hard_fraction),
                           "--scan-profiles", s.scan_profiles, "--anatomy", s.anatomy,
                           # exactly labeled_val validation cases (the last ones), the rest train: the rows'
                           # counts, not data_prepare's per-case val_ratio draw
                           "--fold1-val", str(s.labeled_val), "--workers", str(s.workers)]),
        Step("prepare", prepare_argv(s, paths.ds, paths.seed)),
    ]
    if s.ceiling:
        ceiling = paths.sd / "dataset_ceiling"
        steps += [Step("ceiling_dataset", [py, "-m", "benchmarks.headroom", "ceiling-dataset", "--src",
                                           str(paths.ds), "--dst", str(ceiling)], row="lc"),
                  Step("prepare_ceiling", prepare_argv(s, ceiling, paths.seed), row="lc")]
    return steps


def coarse_steps(paths: SeedPaths) -> list[Step]:
    """One coarse model per seed (CPS on labeled + all unlabeled), shared by every row."""
    s = paths.settings
    args = ["sh", str(ROOT / "coarse_base_seg" / "run.sh"), f"data_base_dir={paths.ds}",
            f"output_dir={paths.sd / 'coarse'}", f"data.size_zyx={cube(s.coarse_size)}", *paths.small(),
            f"schedule.iterations={s.coarse_iters}", f"cps.rampup_iterations={int(s.rampup_fraction * s.coarse_iters)}",
            f"schedule.val_interval={max(1, s.coarse_iters // 4)}", "schedule.checkpoint_interval=50",
            f"export.dir={paths.coarse_weights}"]
    if s.coarse_lr is not None:
        args.append(f"optim.lr={s.coarse_lr}")
    return [Step("coarse_train", args), Step("coarse_export", args + ["step=export"])]


def labeled_row_steps(paths: SeedPaths) -> list[Step]:
    """The shared warm-up, L / 0 and the ceiling: labeled-only runs (boxes, uif and later rounds are no-ops
    without a pool; the export takes round 1)."""
    s = paths.settings
    steps = []
    if s.warmup_iters:
        warm = paths.fine("fine_warm") + ["data.unlabeled_db=null", f"schedule.iterations={s.warmup_iters}",
                                          f"schedule.val_interval={max(1, s.warmup_iters // 4)}",
                                          f"export.dir={paths.weights('warm')}"]
        steps.append(Step("fine_warm", warm + ["step=all"], done_marker=paths.weights("warm") / "model.pt"))
    steps.append(Step("fine_l0", paths.fine("fine_l0") + ["data.unlabeled_db=null", f"export.dir={paths.weights('l0')}",
                                                           "step=all"], row="l0"))
    if s.ceiling:
        ceiling = paths.fine("fine_lc", paths.sd / "dataset_ceiling")
        steps.append(Step("fine_lc", ceiling + ["data.unlabeled_db=null", f"export.dir={paths.weights('lc')}",
                                                "step=all"], row="lc"))
    return steps


def round1_steps(paths: SeedPaths) -> list[Step]:
    """Round 1 of L / U (shared by the K and N-round rows) and of every L / U variant, each exported."""
    cps = paths.fine("fine_cps")
    steps = [Step("fine_cps_boxes", cps + ["step=boxes"]), Step("fine_cps_round1", cps + ["step=round1"], row="lu"),
             paths.export(cps, "lu", 1)]
    for row, overrides in paths.settings.variants().items():
        args = paths.fine(f"fine_{row}") + overrides
        steps += [Step(f"fine_{row}_boxes", args + ["step=boxes"], row=row),
                  Step(f"fine_{row}_round1", args + ["step=round1"], row=row), paths.export(args, row, 1)]
    return steps


def quality_steps(paths: SeedPaths) -> list[Step]:
    """The true pseudo-label quality of round 1 (its ensemble on the pool vs the hidden truth), the uif step, and
    the UIF scores compared (benchmarks.uif_quality, which also writes the control selections)."""
    s = paths.settings
    return [
        Step("predict_pool", predict_argv(s, paths.ds / "trainu_images", paths.sd / "pred_pool", paths.sd /
                                          "weights_lu")),
        Step("fine_cps_uif", paths.fine("fine_cps") + ["step=uif"]),
        Step("uif_quality", [sys.executable, "-m", "benchmarks.uif_quality", "seed", "--seed-dir", str(paths.sd),
                             "--keep", str(uif_keep(s)), "--seed", str(paths.seed), "--device", s.device,
                             *(["--other-start", s.other_start] if s.start_control else [])],
             done_marker=paths.sd / QUALITY_FILE),
    ]


def round2_steps(paths: SeedPaths) -> list[Step]:
    """Round 2 of UIF-K (in fine_cps) and of its controls (each in the folder uif_quality wrote its selection to,
    with the same round 1), each exported."""
    from benchmarks.uif_quality import CONTROLS

    s = paths.settings
    cps = paths.fine("fine_cps")
    steps = [Step("fine_cps_round2", cps + ["step=round2"], row="lk"), paths.export(cps, "lk", 2)]
    controls = dict(CONTROLS)
    if s.start_control:
        controls[f"lk_{s.other_start}"] = f"fine_uif_{s.other_start}"
    for row, out_name in controls.items():
        args = paths.fine(out_name) + ([f"round2.init={s.other_start}"] if row.startswith("lk_") else [])
        steps += [Step(f"{out_name}_round2", args + ["step=round2"], row=row), paths.export(args, row, 2)]
    return steps


def more_round_steps(paths: SeedPaths) -> list[Step]:
    """The N-rounds row: filters 2..N and rounds 3..N+1 in fine_cps; after each round k <= N its networks predict
    the pool, so that filter k's kept cases get their true pseudo-label DSC."""
    s = paths.settings
    if s.rounds < 2:
        return []
    cps = paths.fine("fine_cps")
    steps = [Step("predict_pool_round2", predict_argv(s, paths.ds / "trainu_images", paths.sd / "pred_pool_round2",
                                                      paths.sd / "weights_lk"), row="ln")]
    for k in range(2, s.rounds + 1):
        steps += [Step(f"fine_cps_uif{k}", cps + [f"step=uif{k}"], row="ln"),
                  Step(f"fine_cps_round{k + 1}", cps + [f"step=round{k + 1}"], row="ln")]
        if k < s.rounds:
            row = f"round{k + 1}"
            steps += [replace(paths.export(cps, row, k + 1), row="ln"),
                      Step(f"predict_pool_round{k + 1}", predict_argv(s, paths.ds / "trainu_images",
                                                                      paths.sd / f"pred_pool_round{k + 1}",
                                                                      paths.sd / f"weights_{row}"), row="ln")]
    return steps + [paths.export(cps, "ln", s.rounds + 1)]


def predict_steps(paths: SeedPaths) -> list[Step]:
    s = paths.settings
    return [Step(f"predict_{row}", predict_argv(s, paths.ds / "val_images", paths.sd / f"pred_{row}",
                                                paths.sd / f"weights_{row}"), row=row) for row in rows_of(s)]


def prepare_argv(settings: Settings, dataset: Path, seed: int) -> list[str]:
    """data_prepare of one dataset folder (its fold-1 split comes from file_list/fold1_val_series_uids.txt)."""
    return ["sh", str(ROOT / "data_prepare" / "run.sh"), f"data_base_dir={dataset}",
            f"coarse_size_zyx={cube(settings.coarse_size)}", f"fine_size_zyx={cube(settings.fine_size)}",
            f"split_seed={seed}", f"num_workers={settings.workers}"]


def predict_argv(settings: Settings, in_dir: Path, out_dir: Path, weights_dir: Path) -> list[str]:
    """predict.sh on `in_dir` with the weights of `weights_dir` (their coarse model linked in by `_link_coarse`)."""
    flags = ["--weights-dir", str(weights_dir), "--device", settings.device, "--fine-size", str(settings.fine_size),
             "--workers", "1"]
    if settings.ensemble:
        flags.append("--ensemble")
    return ["sh", str(ROOT / "predict.sh"), str(in_dir), str(out_dir), *flags]


# --------------------------------------------------------------------------------------------- running


def check_settings(settings: Settings, seed: int) -> None:
    """Refuse to mix results of different settings in one seed folder; record them for the next run."""
    path = seed_dir(settings, seed) / SETTINGS_FILE
    current = {**settings.result_fingerprint(), "seed": seed}
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded == current:
            return
        if not _adds_variants_only(recorded, current):
            diff = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
            raise SystemExit(f"error: {path} was made with other settings {diff} (recorded, now); "
                             "use another --out or delete that folder (more --lu-variant rows may be added)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")


def _adds_variants_only(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """True when `current` only adds L / U variant rows to `recorded`: each variant trains its own folder from the
    shared warm-up, so the rows already trained stay valid."""
    others = {k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k)}
    return others == {"lu_variants"} and set(recorded["lu_variants"]) <= set(current["lu_variants"])


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


def _link_coarse(step: Step, coarse_weights: Path) -> None:
    """A predict step's weights folder gets the seed's coarse model beside its fine one (a relative link)."""
    if "--weights-dir" not in step.argv:
        return
    link = Path(step.argv[step.argv.index("--weights-dir") + 1]) / "base_coarse_model"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(coarse_weights, link.parent))


def run_seed(settings: Settings, seed: int, t0: float) -> dict[str, Any]:
    paths = SeedPaths(settings, seed)
    sd = paths.sd
    if settings.report_only and not (sd / SETTINGS_FILE).is_file():
        raise StepFailed(f"{sd} holds no finished run (no {SETTINGS_FILE}); --report-only runs nothing")
    if settings.report_only and settings.stop_after != "lu" and not (sd / QUALITY_FILE).is_file():
        raise StepFailed(f"{sd} has not finished (no {QUALITY_FILE}); --report-only runs nothing")
    check_settings(settings, seed)
    timings: dict[str, float] = {}
    steps = [] if settings.report_only else seed_steps(settings, seed)
    for step in steps:
        _link_coarse(step, paths.coarse_weights)
        timings[step.name] = run_step(step, sd / "logs", t0, settings.threads, f"seed {seed}: ")
    # A rerun reuses finished steps (which then take seconds): keep the longest time seen per step, so the
    # record holds what each step cost when it really ran, whichever invocation that was.
    timings_path = sd / "timings.json"
    recorded = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    steps_s = {**recorded, **{name: max(t, recorded.get(name, 0.0)) for name, t in timings.items()}}
    timings_path.write_text(json.dumps(steps_s, indent=1) + "\n", encoding="utf-8")
    quality = json.loads((sd / QUALITY_FILE).read_text(encoding="utf-8")) if settings.stop_after != "lu" else None
    if settings.stop_after == "quality":
        return {"seed": seed, "rows": {}, "quality": quality, "timings_s": timings}
    from benchmarks.headroom import organ_sizes, shaped_organs

    shaped = shaped_organs(organ_sizes(paths.ds, settings.fine_size))
    rows = {}
    for row in rows_of(settings):
        rows[row] = evaluate_row(sd / f"pred_{row}", paths.ds / "val_mask", sd / f"eval_{row}.csv")
        rows[row]["DSC_shaped"] = statistics.fmean(rows[row]["per_organ"][o]["DSC"] for o in shaped)
        rows[row]["fine_val_dice"] = _exported_dice(paths.weights(row))
    cost = row_cpu_s(seed_steps(settings, seed), steps_s)
    uif = uif_hard_share(sd / "fine_cps" / "uif_scores.csv", paths.ds / "synthetic_meta.json") if quality else None
    return {"seed": seed, "rows": rows, "shaped": shaped, "uif": uif, "timings_s": timings,
            "steps_s_all_runs": steps_s, "row_cpu_s": cost, "coarse_val_dice": _exported_dice(paths.coarse_weights),
            "quality": quality, "rounds": round_quality(settings, sd, quality) if settings.rounds > 1 else None}


def row_cpu_s(steps: Sequence[Step], steps_s: dict[str, float]) -> dict[str, float]:
    """CPU seconds (one thread) of each row's own steps, and of the steps several rows share ("shared")."""
    out: dict[str, float] = {}
    for step in steps:
        key = step.row or "shared"
        out[key] = out.get(key, 0.0) + steps_s.get(step.name, 0.0)
    return out


def round_quality(settings: Settings, sd: Path, quality: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per filter k of the N-rounds row: the true pseudo-label DSC (round k's ensemble vs the hidden truth) of the
    cases it kept, of the whole pool, and how many it kept. Round 1's pool was scored by uif_quality (`quality`,
    its uif_quality.json): taken from there, not scored again."""
    from benchmarks.uif_quality import pool_truth
    from fine_efficient_seg.layout import RunLayout
    from fine_efficient_seg.uif import read_scores_csv

    layout = RunLayout(sd / "fine_cps")
    out = []
    for k in range(1, settings.rounds + 1):
        if k == 1 and quality is not None:
            dsc = {case: entry["dsc"] for case, entry in quality["cases"].items()}
        else:
            pred = sd / ("pred_pool" if k == 1 else f"pred_pool_round{k}")
            dsc = pool_truth(pred, sd / "dataset", sd / f"eval_pool_round{k}.csv")
        kept = [r.case for r in read_scores_csv(layout.scores_csv(k)) if r.kept]
        out.append({"filter": k, "kept": len(kept), "kept_dsc": statistics.fmean(dsc[c] for c in kept),
                    "pool_dsc": statistics.fmean(dsc.values()), "kept_cases": kept})
    return out


def _exported_dice(model_dir: Path) -> dict[str, float] | None:
    """Best validation Dice (fold-1 labeled validation set) recorded in an exported model, or None."""
    try:
        import torch

        payload = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
        return {k: float(v) for k, v in payload.get("best_dice", {}).items()}
    except Exception:  # noqa: BLE001 - informative only
        return None


# --------------------------------------------------------------------------------------------- report


METRICS = ("DSC", "DSC_shaped", "NSD")


def _rows_in(results: Sequence[dict[str, Any]], settings: Settings) -> tuple[str, ...]:
    return tuple(row for row in rows_of(settings) if all(row in r["rows"] for r in results))


def paired(results: Sequence[dict[str, Any]], row: str, base: str, metric: str) -> list[float]:
    """Per-seed differences row - base of one metric (paired by seed)."""
    return [r["rows"][row][metric] - r["rows"][base][metric] for r in results]


def _ci(values: Sequence[float], sign: str = "") -> str:
    from benchmarks.stats import t_interval

    mean, low, high = t_interval(values)
    if math.isnan(low):
        return f"{mean:{sign}.4f}"
    return f"{mean:{sign}.4f} [{low:{sign}.4f}, {high:{sign}.4f}]"


def summarize(results: Sequence[dict[str, Any]], settings: Settings) -> dict[str, dict[str, Any]]:
    """Per row and metric: per-seed values, mean, 95 % interval, and the paired differences to row l0."""
    from benchmarks.stats import t_interval

    out: dict[str, dict[str, Any]] = {}
    for row in _rows_in(results, settings):
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in results]}
        for metric in METRICS:
            values = [r["rows"][row][metric] for r in results]
            entry[metric] = dict(zip(("mean", "low", "high"), t_interval(values)), per_seed=values)
            if row != "l0":
                diffs = paired(results, row, "l0", metric)
                entry[metric]["diff_vs_l0"] = dict(zip(("mean", "low", "high"), t_interval(diffs)), per_seed=diffs)
        out[row] = entry
    return out


def format_table(results: Sequence[dict[str, Any]], settings: Settings) -> str:
    lines = ["| row | DSC, 13 organs [95 % CI] | DSC, shaped organs [95 % CI] | NSD, 13 organs [95 % CI] | "
             "DSC per seed | CPU min (own steps, mean per seed) |", "|---|---|---|---|---|---|"]
    for row in _rows_in(results, settings):
        values = {m: [r["rows"][row][m] for r in results] for m in METRICS}
        cost = statistics.fmean(r.get("row_cpu_s", {}).get(row, float("nan")) for r in results) / 60
        lines.append(f"| {row_label(row, settings)} | {_ci(values['DSC'])} | {_ci(values['DSC_shaped'])} | "
                     f"{_ci(values['NSD'])} | {', '.join(f'{v:.4f}' for v in values['DSC'])} | {cost:.1f} |")
    shared = statistics.fmean(r.get("row_cpu_s", {}).get("shared", float("nan")) for r in results) / 60
    lines.append(f"\nSteps shared by several rows (data, coarse model, warm-up, boxes, UIF, pool predictions): "
                 f"{shared:.1f} CPU min per seed.")
    return "\n".join(lines)


def comparisons(settings: Settings) -> list[tuple[str, str]]:
    """The paired differences the report gives: (row, base)."""
    pairs = [("lc", "l0"), ("lu", "l0")] + [(row, "lu") for row in settings.variants()]
    pairs += [("lk", "lr"), ("lo", "lr"), ("lk", "lu"), ("lr", "lu"), (f"lk_{settings.other_start}", "lk"),
              ("ln", "lk"), ("ln", "lr"), ("lk", "l0")]
    return pairs


def format_diffs(results: Sequence[dict[str, Any]], settings: Settings) -> str:
    lines = ["| paired difference (by seed) | ΔDSC 13 [95 % CI] | ΔDSC shaped [95 % CI] | ΔNSD [95 % CI] | "
             "smallest resolvable ΔDSC 13 (80 % power) | ΔDSC 13 per seed |", "|---|---|---|---|---|---|"]
    rows = _rows_in(results, settings)
    for row, base in comparisons(settings):
        if row not in rows or base not in rows:
            continue
        d = {m: paired(results, row, base, m) for m in METRICS}
        lines.append(f"| {row_label(row, settings)} minus {row_label(base, settings)} | {_ci(d['DSC'], '+')} | "
                     f"{_ci(d['DSC_shaped'], '+')} | {_ci(d['NSD'], '+')} | {resolvable(d['DSC']):.4f} | "
                     f"{', '.join(f'{v:+.4f}' for v in d['DSC'])} |")
    return "\n".join(lines)


def format_uif(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| seed | pool | kept: hard / n | dropped: hard / n | ranks of the hard cases (1 = most certain) |",
             "|---|---|---|---|---|"]
    for r in results:
        u = r["uif"]
        lines.append(f"| {r['seed']} | {u['pool']} | {u['kept']['hard']} / {u['kept']['n']} | "
                     f"{u['dropped']['hard']} / {u['dropped']['n']} | {', '.join(map(str, u['hard_ranks']))} |")
    return "\n".join(lines)


def format_rounds(results: Sequence[dict[str, Any]]) -> str:
    """Per filter of the N-rounds row: true pseudo-label DSC of the kept cases vs the pool, over seeds."""
    lines = ["| filter (networks of round k) | kept | true DSC of the kept cases [95 % CI] | true DSC of the pool "
             "[95 % CI] | kept minus pool [95 % CI] |", "|---|---|---|---|---|"]
    for k in range(len(results[0]["rounds"])):
        per = [r["rounds"][k] for r in results]
        gain = [p["kept_dsc"] - p["pool_dsc"] for p in per]
        lines.append(f"| {k + 1} | {per[0]['kept']} | {_ci([p['kept_dsc'] for p in per])} | "
                     f"{_ci([p['pool_dsc'] for p in per])} | {_ci(gain, '+')} |")
    return "\n".join(lines)


def quality_table(results: Sequence[dict[str, Any]]) -> str:
    from benchmarks.uif_quality import format_quality

    return format_quality([r["quality"] for r in results if r.get("quality")])


def _describe(settings: Settings) -> str:
    s, k = settings, uif_keep(settings)
    warm = (f"every row starts from one shared supervised warm-up of {s.warmup_iters} iterations (model.init_from)"
            if s.warmup_iters else "every row starts from fresh networks")
    return (
        f"Synthetic `{s.size}` data (anatomy `{s.anatomy}`, scan profiles `{s.scan_profiles}`"
        f"{f', regime `{s.regime}`' if s.regime else ''}); per seed exactly {s.labeled} labeled training + "
        f"{s.labeled_val} labeled validation (checkpoint choice) cases, {s.unlabeled} unlabeled "
        f"({s.hard_fraction:.0%} hard), {s.val} held-out evaluation cases. Networks with channels {s.channels}; "
        f"coarse {s.coarse_size}^3 ({s.coarse_iters} iterations, CPS on labeled + unlabeled, one model per seed "
        f"shared by all rows); fine {s.fine_size}^3, {s.fine_iters} iterations for round 1 and the labeled-only "
        f"rows, {s.round2_iters or s.fine_iters} for each later round; {warm}. CPS weight {s.cps_weight} "
        f"(ramped up over the first {s.rampup_fraction:.0%} of each training), parts `{s.cps_parts}`, confidence "
        f"{s.cps_confidence}; fine lr {s.fine_lr or 'of config.yaml'}. UIF keeps {k} of {s.unlabeled} (disagreement "
        f"of nets A/B); random and oracle keep {k}; the K rows start `{s.round2_init}`"
        + (f"; N rounds: uif.rounds={s.rounds}, keep `{s.keep_schedule}`" if s.rounds > 1 else "")
        + ". Prediction: the full two-stage predictor"
        f"{' (ensemble of A and B)' if s.ensemble else ''}; DSC/NSD by the FLARE22 rules, mean over the organs and "
        "the evaluation cases; [..] is the 95 % Student-t interval over seeds.")


def describe_shaped(results: Sequence[dict[str, Any]]) -> str:
    """The shaped organs of the seeds: those of every seed, then the others with the seeds they are shaped in."""
    sets = {r["seed"]: list(r.get("shaped") or []) for r in results}
    order = list(dict.fromkeys(o for organs in sets.values() for o in organs))
    always = [o for o in order if all(o in organs for organs in sets.values())]
    some = []
    for organ in (o for o in order if o not in always):
        seeds = [str(seed) for seed, organs in sets.items() if organ in organs]
        some.append(f"{organ} (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})")
    return f"{', '.join(always) or 'none'} in every seed" + (f"; {', '.join(some)}" if some else "")


def build_report(results: Sequence[dict[str, Any]], settings: Settings, command: str, wall_s: float) -> str:
    text = ["## Semi-supervised table on synthetic data", "", f"Command: `{command}`", "", _describe(settings),
            "Shaped organs (median >= 100 voxels and >= 4 along every axis in the fine crop of the seed's "
            f"dataset): {describe_shaped(results)}.",
            "", format_table(results, settings), "", format_diffs(results, settings)]
    if all(r.get("quality") for r in results):
        text += ["", "UIF scores side by side (benchmarks/uif_quality.py) on the round-1 pool: per score, the mean "
                 "over seeds [95 % CI] of the Spearman correlation with the true pseudo-label error (1 - DSC of "
                 "the round-1 ensemble vs the hidden truth), the AUROC for the worse half of the pool (true DSC "
                 "below the pool median) and for hard vs normal scans, and the mean true pseudo-label DSC of the "
                 f"kept {uif_keep(settings)}, the dropped, {uif_keep(settings)} random (mean of many draws) and the "
                 "oracle's:", "", quality_table(results)]
    if all(r.get("uif") for r in results):
        text += ["", "Hard unlabeled cases (noise / metal / truncated field of view) among the cases UIF kept vs "
                 "dropped:", "", format_uif(results)]
    if settings.rounds > 1 and all(r.get("rounds") for r in results):
        text += ["", "N rounds: the true pseudo-label DSC of each filter's kept cases:", "", format_rounds(results)]
    text += ["", f"Wall time of this invocation: {wall_s:.0f} s on {platform.node()} ({os.cpu_count()} CPUs, device "
             f"{settings.device}, {settings.jobs} seed(s) in parallel, {settings.threads or 'default'} thread(s) per "
             f"process), {time.strftime('%Y-%m-%d')}. Sum of the step times per seed, counting each step when it "
             "really ran (reruns reuse finished steps): " + ", ".join(
                 f"seed {r['seed']} {sum(r.get('steps_s_all_runs', r.get('timings_s', {})).values()):.0f} s"
                 for r in results) + "."]
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------------------------- CLI


# `--regime NAME`: data and training settings found by benchmarks/headroom.py to leave the unlabeled scans room
# to matter (defaults only; explicit options win). See BENCHMARKS.md, "Label headroom".
REGIMES: dict[str, dict[str, Any]] = {
    # ceiling - L/0 about +0.09 (13 organs) / +0.11 (shaped) in benchmarks/headroom.py's setting F: organs far
    # less alike between cases, 2 labeled training cases, fine 32^3 trained to its plateau
    "headroom": {"anatomy": "varied", "labeled": 2, "labeled_val": 2, "unlabeled": 12, "val": 24,
                 "coarse_iters": 400, "warmup_iters": 400, "fine_iters": 500, "round2_iters": 250, "rounds": 3,
                 "lu_variants": ["conf09=cps.confidence=0.9", "w03=cps.weight=0.3", "joint=cps.parts=joint"]},
}

# `--preset cuda`: the full-size run for one GPU (defaults only; explicit options win).
CUDA_PRESET = {"device": "cuda", "size": "full", "coarse_size": 160, "fine_size": 192, "channels": "16,32,64,128,256",
               "coarse_iters": 4000, "fine_iters": 4000, "unlabeled": 40, "labeled": 8, "val": 10, "jobs": 1,
               "threads": 0, "dropout": 0.2, "fine_lr": 1.0e-3, "workers": 8}


def _add_data_options(p: argparse.ArgumentParser, d: Settings) -> None:
    """The seeds, the case counts and shares, and the synthetic case size."""
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="one run per seed (data + networks)")
    p.add_argument("--labeled", type=int, default=d.labeled, help="L: labeled cases that train the networks")
    p.add_argument("--labeled-val", type=int, default=d.labeled_val,
                   help="extra labeled cases validating (best checkpoint)")
    p.add_argument("--unlabeled", type=int, default=d.unlabeled, help="U: unlabeled pool")
    p.add_argument("--val", type=int, default=d.val, help="held-out evaluation cases (val_images + val_mask)")
    p.add_argument("--hard-fraction", type=float, default=d.hard_fraction, help="share of hard unlabeled cases")
    p.add_argument("--keep-ratio", type=float, default=d.keep_ratio, help="share of the pool UIF keeps (K)")
    p.add_argument("--size", choices=("tiny", "demo", "full"), default=d.size, help="synthetic case size")


def _add_training_options(p: argparse.ArgumentParser, d: Settings) -> None:
    """Network sizes, iterations and the optimiser and CPS settings."""
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
    p.add_argument("--cps-parts", choices=("joint", "separate"), default=d.cps_parts,
                   help="separate: a labeled crop weighs the same in L / 0 and L / U (cps.parts)")
    p.add_argument("--cps-confidence", type=float, default=d.cps_confidence, help="cps.confidence of every row")


def _add_design_options(p: argparse.ArgumentParser, d: Settings) -> None:
    """The rows, how they start, the data's scan profiles and anatomy, and the regime preset."""
    p.add_argument("--lu-variant", dest="lu_variants", action="append", default=None,
                   help="an extra L / U row with other fine overrides: NAME=key=value[,key=value] (repeatable)")
    p.add_argument("--warmup-iters", type=int, default=d.warmup_iters,
                   help="shared supervised warm-up every row starts from (0: none)")
    p.add_argument("--round2-init", choices=("warm", "fresh"), default=d.round2_init,
                   help="how the K rows start: warm (round 1's end) or fresh (where round 1 started)")
    p.add_argument("--no-start-control", action="store_true",
                   help="skip the UIF-K row started the other way (--round2-init's alternative)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="uif.rounds of the N-rounds row (1: no such row)")
    p.add_argument("--keep-schedule", choices=("fixed", "growing"), default=d.keep_schedule,
                   help="uif.keep_schedule of the N-rounds row")
    p.add_argument("--scan-profiles", choices=("fixed", "shift", "strong_shift"), default=d.scan_profiles,
                   help="shift: labeled cases from one narrow scan profile, unlabeled + evaluation from all")
    p.add_argument("--anatomy", choices=("standard", "varied"), default=d.anatomy,
                   help="synthetic anatomy: varied = organ placement, size and shape far less alike between cases")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the ceiling row (the unlabeled cases trained with their hidden truth)")
    p.add_argument("--regime", choices=sorted(REGIMES), default=None,
                   help="a preset of the data and training settings (REGIMES; explicit options still win)")


def _add_run_options(p: argparse.ArgumentParser, d: Settings) -> None:
    """What is run, on which device, how parallel, and where it goes."""
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


def _build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults taken from Settings."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.semi_supervised",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Settings(seeds=[0, 1, 2, 3, 4])  # the defaults live in Settings only
    _add_data_options(p, d)
    _add_training_options(p, d)
    _add_design_options(p, d)
    _add_run_options(p, d)
    return p


def _apply_presets(p: argparse.ArgumentParser, argv: list[str]) -> list[str] | None:
    """Make `--preset cuda` and `--regime NAME` settings the defaults; the regime's L / U variants, if any."""
    if "--preset" in argv and argv[argv.index("--preset") + 1:argv.index("--preset") + 2] == ["cuda"]:
        p.set_defaults(**CUDA_PRESET)
    regime_variants = None
    for i, arg in enumerate(argv):  # --regime NAME or --regime=NAME: its settings become the defaults
        name = argv[i + 1] if arg == "--regime" and i + 1 < len(argv) else arg.partition("--regime=")[2]
        if name in REGIMES:
            preset = dict(REGIMES[name])
            regime_variants = preset.pop("lu_variants", None)  # an appending option: applied after parsing
            p.set_defaults(**preset)
    return regime_variants


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Exit with a usage error for values the benchmark cannot run with."""
    for name, edge in (("--coarse-size", a.coarse_size), ("--fine-size", a.fine_size)):
        if edge % 16:
            p.error(f"{name} must be a multiple of 16, got {edge}")
    if a.labeled < 1 or a.labeled_val < 1 or a.unlabeled < 2 or a.val < 1:
        p.error("need --labeled >= 1, --labeled-val >= 1, --unlabeled >= 2 and --val >= 1")
    if not 0.0 < a.keep_ratio < 1.0:
        p.error("--keep-ratio must be within (0, 1)")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    for text in a.lu_variants or []:
        name, _, overrides = text.partition("=")
        if not name.isidentifier() or "=" not in overrides:
            p.error(f"--lu-variant {text!r}: expected NAME=key=value[,key=value]")


def _settings_from(a: argparse.Namespace, channels: list[int]) -> Settings:
    """The Settings of the parsed options."""
    return Settings(seeds=list(dict.fromkeys(a.seeds)), labeled=a.labeled, labeled_val=a.labeled_val,
                    unlabeled=a.unlabeled, val=a.val, hard_fraction=a.hard_fraction, keep_ratio=a.keep_ratio,
                    size=a.size, coarse_size=a.coarse_size, fine_size=a.fine_size, coarse_iters=a.coarse_iters,
                    fine_iters=a.fine_iters, round2_iters=a.round2_iters, channels=channels,
                    ensemble=not a.no_ensemble, coarse_lr=a.coarse_lr, fine_lr=a.fine_lr, dropout=a.dropout,
                    rampup_fraction=a.rampup_fraction, device=a.device, cps_weight=a.cps_weight,
                    scan_profiles=a.scan_profiles, anatomy=a.anatomy, ceiling=not a.no_ceiling, regime=a.regime,
                    cps_parts=a.cps_parts, cps_confidence=a.cps_confidence, lu_variants=list(a.lu_variants or []),
                    warmup_iters=a.warmup_iters, round2_init=a.round2_init, start_control=not a.no_start_control,
                    rounds=a.rounds, keep_schedule=a.keep_schedule,
                    snapshots=a.snapshots, stop_after=a.stop_after,
                    report_only=a.report_only,
                    workers=a.workers, jobs=a.jobs, threads=a.threads or None, dry_run=a.dry_run,
                    out=str(Path(a.out).resolve()))


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    regime_variants = _apply_presets(p, argv)
    a = p.parse_args(argv)
    if a.lu_variants is None:
        a.lu_variants = regime_variants
    try:
        channels = [int(c) for c in a.channels.replace("[", "").replace("]", "").split(",") if c.strip()]
    except ValueError:
        p.error(f"--channels {a.channels!r}: expected integers, e.g. 8,16,32,64,128")
    _check_args(p, a)
    return _settings_from(a, channels)


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
               "summary": summarize(results, settings), "seeds": results}
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
