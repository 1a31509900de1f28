"""Label headroom of a synthetic regime: how much could the unlabeled scans give at most?

Two rows per seed, both the fine stage trained supervised (labeled crops only, `data.unlabeled_db=null`, CPS weight
`--cps-weight`, default 0) and predicted by the full two-stage predictor on the same held-out phantoms:
  l0       the L labeled training cases only (the L / 0 row of benchmarks/semi_supervised.py, without CPS)
  ceiling  the L labeled + the U unlabeled cases WITH their hidden truth (trainu_mask_hidden/) as labeled cases:
           the most any use of the unlabeled scans can give
ceiling - l0 is the label headroom: a regime in which it is not clearly positive cannot show a semi-supervised
gain. Both rows validate (best checkpoint) on the same `--labeled-val` labeled cases (pinned by
file_list/fold1_val_series_uids.txt, so every seed has exactly L training and Lv validation cases) and share one
coarse model per seed (`--coarse-data ceiling`: trained supervised on the ceiling dataset, the best organ boxes, so
the rows differ only in the fine model; `labeled`: on the L labeled cases).

Every stage runs through its real entry point as a subprocess (as benchmarks/semi_supervised.py and demo.sh do):
  python -m data_prepare.synthetic ... --fold1-val Lv [generator options of --gen]   -> seed<S>/dataset
  python -m benchmarks.headroom ceiling-dataset --src dataset --dst dataset_ceiling    (symlinks, truth as labels)
  sh data_prepare/run.sh (both)   sh coarse_base_seg/run.sh (+ step=export)   sh fine_efficient_seg/run.sh (rows)
  sh predict.sh dataset/val_images pred_<row> --ensemble    python -m common.evaluate --pred ... --gt val_mask
Scores: FLARE22 DSC per organ (official evaluator), averaged over the evaluation cases; the mean over the 13 organs
and over the organs "with shape" at the fine size (median organ size in the network's fine crop of at least
`SHAPE_MIN_VOXELS` voxels and `SHAPE_MIN_EXTENT` voxels along every axis, measured on the ceiling dataset's
prepared fine masks, listed in the report). Plateau check: the fine validation curve (metrics.jsonl) is reported
(best iteration, Dice at 1/2 and at the end).

    python -m benchmarks.headroom --out /work/runs/regime/base --seeds 0 1 --labeled 4 --labeled-val 2
    python -m benchmarks.headroom ... --gen "--anatomy wide"        # generator options for the regime
    python -m benchmarks.headroom report --out DIR                 # the table of finished seeds
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmarks.pipeline import ROOT, Step, StepFailed, cube, int_list, run_step
from benchmarks.stats import t_interval
from common.core.labels import FLARE22

ROWS = ("l0", "ceiling")
PHASES = ("non_contrast", "arterial", "portal_venous")
SETTINGS_FILE = "headroom_settings.json"
DATA_KEYS = ("labeled", "labeled_val", "unlabeled", "val", "size", "hard_fraction", "scan_profiles", "gen",
             "coarse_size", "fine_size", "coarse_iters", "channels", "coarse_lr", "coarse_data")
SHARED = ("dataset", "dataset_ceiling", "coarse", "weights_coarse")  # what --reuse-data links
RESULT_FILE = "headroom_result.json"
SHAPE_MIN_VOXELS = 100  # an organ "has shape" at a fine size when its median voxel count in the crop is this ...
SHORT_NAMES = tuple(label.short for label in FLARE22)  # the organs' CSV column prefixes
SHAPE_MIN_EXTENT = 4  # ... and its median bounding box spans at least this many voxels along every axis


@dataclass
class Settings:
    seeds: list[int]
    labeled: int = 4
    labeled_val: int = 2
    unlabeled: int = 12
    val: int = 24
    size: str = "demo"
    hard_fraction: float = 0.25
    scan_profiles: str = "shift"
    gen: str = ""  # extra generator options (data_prepare.synthetic), e.g. "--anatomy wide"
    coarse_size: int = 32
    fine_size: int = 32
    coarse_iters: int = 400
    fine_iters: int = 1000
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    coarse_lr: float | None = None
    fine_lr: float = 1.0e-2
    cps_weight: float = 0.0
    coarse_data: str = "ceiling"
    val_points: int = 8  # validations per fine training (the plateau check)
    ensemble: bool = True
    device: str = "cpu"
    threads: int = 1
    workers: int = 1
    out: str = str(ROOT / "runs" / "headroom")
    reuse_data: str | None = None  # another run's folder: take its datasets and coarse model (same data settings)

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("seeds", "device", "threads", "workers", "out", "reuse_data"):
            d.pop(k)
        return d

    def data_fingerprint(self) -> dict[str, Any]:
        """The settings the datasets and the coarse model depend on."""
        d = self.fingerprint()
        return {k: d[k] for k in DATA_KEYS}


def seed_dir(s: Settings, seed: int) -> Path:
    return Path(s.out).resolve() / f"seed{seed}"


def seed_steps(s: Settings, seed: int) -> list[Step]:
    """The subprocess commands of one seed, in order (absolute paths: run.sh changes directory)."""
    py = sys.executable
    sd = seed_dir(s, seed)
    ds, dsc = sd / "dataset", sd / "dataset_ceiling"
    coarse_w = sd / "weights_coarse" / "base_coarse_model"
    common = [f"model.channels={int_list(s.channels)}", "data.num_workers=0", "model.dropout=0.0",
              f"device={s.device}", f"seed={seed}", f"model.seed_a={100 * seed + 1}", f"model.seed_b={100 * seed + 2}",
              "data.unlabeled_db=null", "schedule.checkpoint_interval=100"]
    prepare = [f"coarse_size_zyx={cube(s.coarse_size)}", f"fine_size_zyx={cube(s.fine_size)}",
               f"num_workers={s.workers}"]
    steps = [
        Step("synthetic", [py, "-m", "data_prepare.synthetic", "--out", str(ds), "--labeled",
                           str(s.labeled + s.labeled_val), "--unlabeled", str(s.unlabeled), "--val", str(s.val),
                           "--seed", str(seed), "--size", s.size, "--hard-fraction", str(s.hard_fraction),
                           "--scan-profiles", s.scan_profiles, "--fold1-val", str(s.labeled_val),
                           "--workers", str(s.workers), *shlex.split(s.gen)]),
        Step("ceiling_dataset", [py, "-m", "benchmarks.headroom", "ceiling-dataset", "--src", str(ds), "--dst",
                                 str(dsc)]),
        Step("prepare", ["sh", str(ROOT / "data_prepare" / "run.sh"), f"data_base_dir={ds}", *prepare]),
        Step("prepare_ceiling", ["sh", str(ROOT / "data_prepare" / "run.sh"), f"data_base_dir={dsc}", *prepare]),
    ]
    coarse = ["sh", str(ROOT / "coarse_base_seg" / "run.sh"),
              f"data_base_dir={dsc if s.coarse_data == 'ceiling' else ds}", f"output_dir={sd / 'coarse'}",
              f"data.size_zyx={cube(s.coarse_size)}", *common, "cps.weight=0.0",
              f"schedule.iterations={s.coarse_iters}", f"schedule.val_interval={max(1, s.coarse_iters // 4)}",
              f"export.dir={coarse_w}"]
    if s.coarse_lr is not None:
        coarse.append(f"optim.lr={s.coarse_lr}")
    steps += [Step("coarse_train", coarse), Step("coarse_export", coarse + ["step=export"])]
    for row in ROWS:
        fine = ["sh", str(ROOT / "fine_efficient_seg" / "run.sh"), f"data_base_dir={dsc if row == 'ceiling' else ds}",
                f"output_dir={sd / f'fine_{row}'}", f"data.size_zyx={cube(s.fine_size)}", *common,
                f"cps.weight={s.cps_weight}", f"schedule.iterations={s.fine_iters}",
                f"schedule.val_interval={max(1, s.fine_iters // s.val_points)}", f"optim.lr={s.fine_lr}",
                f"boxes.coarse_model_dir={coarse_w}",
                f"export.dir={sd / f'weights_{row}' / 'efficient_fine_model'}", "step=all"]
        steps.append(Step(f"fine_{row}", fine))
    for row in ROWS:
        flags = ["--weights-dir", str(sd / f"weights_{row}"), "--device", s.device, "--fine-size", str(s.fine_size),
                 "--workers", "1", "--quiet"]
        if s.ensemble:
            flags.append("--ensemble")
        steps.append(Step(f"predict_{row}", ["sh", str(ROOT / "predict.sh"), str(ds / "val_images"),
                                             str(sd / f"pred_{row}"), *flags]))
        steps.append(Step(f"evaluate_{row}", [py, "-m", "common.evaluate", "--pred", str(sd / f"pred_{row}"),
                                              "--gt", str(ds / "val_mask"), "--out", str(sd / f"eval_{row}.csv")],
                          done_marker=sd / f"eval_{row}.csv"))
    return steps


# --------------------------------------------------------------------------------------------- the ceiling dataset


def ceiling_id(case_id: str) -> str:
    """The id of an unlabeled case as a labeled case of the ceiling dataset. Not the id itself: a mask file
    `trainu_0000.nii.gz` would read as the id `trainu` (a trailing _0000 is the image's channel suffix)."""
    return f"{case_id}_u"


def make_ceiling_dataset(src: Path, dst: Path) -> dict[str, int]:
    """A dataset folder whose labeled cases are src's labeled cases + its unlabeled cases with their hidden truth.

    Files are symlinks to src (nothing is copied): train_images/ and train_mask/ hold both kinds, there is no
    trainu_images/; val_images/ and val_mask/ link to src's; file_list/ lists every labeled case and copies src's
    fold-1 validation list (so both datasets validate on the same cases). Returns the case counts."""
    from data_prepare import FOLD1_VAL_LIST
    from data_prepare.synthetic import HIDDEN_MASK_DIR

    src, dst = Path(src).resolve(), Path(dst)
    lists = src / "file_list"
    labeled = (lists / "train_series_uids.txt").read_text(encoding="utf-8").split()
    unlabeled = (lists / "trainu_series_uids.txt").read_text(encoding="utf-8").split()
    (dst / "train_images").mkdir(parents=True, exist_ok=True)
    (dst / "train_mask").mkdir(parents=True, exist_ok=True)
    (dst / "file_list").mkdir(parents=True, exist_ok=True)

    def link(target: Path, name: Path) -> None:
        if not target.exists():
            raise FileNotFoundError(target)
        if name.is_symlink() or name.exists():
            if name.resolve() == target.resolve():
                return
            name.unlink()
        name.symlink_to(target)

    for case in labeled:
        link(src / "train_images" / f"{case}_0000.nii.gz", dst / "train_images" / f"{case}_0000.nii.gz")
        link(src / "train_mask" / f"{case}.nii.gz", dst / "train_mask" / f"{case}.nii.gz")
    for case in unlabeled:
        link(src / "trainu_images" / f"{case}_0000.nii.gz", dst / "train_images" / f"{ceiling_id(case)}_0000.nii.gz")
        link(src / HIDDEN_MASK_DIR / f"{case}.nii.gz", dst / "train_mask" / f"{ceiling_id(case)}.nii.gz")
    for name in ("val_images", "val_mask"):
        if (src / name).is_dir():
            link(src / name, dst / name)
    ids = labeled + [ceiling_id(c) for c in unlabeled]
    (dst / "file_list" / "train_series_uids.txt").write_text("".join(f"{c}\n" for c in ids), encoding="utf-8")
    if (lists / "val_series_uids.txt").is_file():
        link(lists / "val_series_uids.txt", dst / "file_list" / "val_series_uids.txt")
    if (lists / FOLD1_VAL_LIST).is_file():
        link(lists / FOLD1_VAL_LIST, dst / "file_list" / FOLD1_VAL_LIST)
    if (src / "synthetic_meta.json").is_file():
        link(src / "synthetic_meta.json", dst / "synthetic_meta.json")
    return {"labeled": len(labeled), "unlabeled_as_labeled": len(unlabeled)}


# --------------------------------------------------------------------------------------------- measurements


def organ_sizes(dataset: Path, fine_size: int) -> dict[str, dict[str, float]]:
    """Per organ (short name): median voxel count and median of the smallest bounding-box extent (voxels) in the
    prepared fine masks (organ box + 20 mm at fine_size^3) of the dataset's labeled cases."""
    import numpy as np

    ORGAN_LABELS = FLARE22.ids

    folder = dataset / "fine_mask" / f"{fine_size}_{fine_size}_{fine_size}"
    counts: dict[int, list[int]] = {k: [] for k in ORGAN_LABELS}
    extents: dict[int, list[int]] = {k: [] for k in ORGAN_LABELS}
    for path in sorted(folder.glob("*.npy")):
        mask = np.load(path)
        for label in ORGAN_LABELS:
            where = np.nonzero(mask == label)
            counts[label].append(int(where[0].size))
            extents[label].append(min(int(w.max() - w.min() + 1) for w in where) if where[0].size else 0)
    return {name: {"median_voxels": float(statistics.median(counts[k])) if counts[k] else 0.0,
                   "median_min_extent": float(statistics.median(extents[k])) if extents[k] else 0.0,
                   "cases": len(counts[k])}
            for k, name in zip(ORGAN_LABELS, SHORT_NAMES)}


def shaped_organs(sizes: dict[str, dict[str, float]]) -> list[str]:
    return [name for name, v in sizes.items()
            if v["median_voxels"] >= SHAPE_MIN_VOXELS and v["median_min_extent"] >= SHAPE_MIN_EXTENT]


def read_eval(csv_path: Path) -> dict[str, Any]:
    """The official CSV: per-case and per-organ DSC/NSD (NaN skipped in means)."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    organ = {}
    for name in SHORT_NAMES:
        for metric in ("DSC", "NSD"):
            values = [float(r[f"{name}_{metric}"]) for r in rows if not math.isnan(float(r[f"{name}_{metric}"]))]
            organ.setdefault(name, {})[metric] = statistics.fmean(values) if values else float("nan")
    cases = {r["Name"]: {name: float(r[f"{name}_DSC"]) for name in SHORT_NAMES} for r in rows}
    return {"organ": organ, "cases": cases, "n": len(rows)}


def mean_over(organ: dict[str, dict[str, float]], names: Sequence[str], metric: str = "DSC") -> float:
    values = [organ[n][metric] for n in names if not math.isnan(organ[n][metric])]
    return statistics.fmean(values) if values else float("nan")


def curve(run_dir: Path) -> dict[str, Any]:
    """The fine validation curve (mean Dice of A and B per validation) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    points = [(int(x["iteration"]), float(x["mean_dice_a"]), float(x["mean_dice_b"])) for x in lines]
    if not points:
        return {}
    mean = [(it, (a + b) / 2) for it, a, b in points]
    best = max(mean, key=lambda p: p[1])
    half = min(mean, key=lambda p: abs(p[0] - mean[-1][0] / 2))
    return {"points": mean, "best_iteration": best[0], "best": best[1], "half": half[1], "last": mean[-1][1]}


def profile_groups(meta_path: Path, cases: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean DSC (13 organs) of the evaluation cases by contrast phase of their scan profile (the labeled cases are
    portal-venous under every profile mode)."""
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    groups: dict[str, list[float]] = {}
    for name, organs in cases.items():
        case_id = name.removesuffix(".nii.gz")
        key = (meta.get(case_id, {}).get("profile") or {}).get("phase", "portal_venous")
        values = [v for v in organs.values() if not math.isnan(v)]
        groups.setdefault(key, []).append(statistics.fmean(values) if values else float("nan"))
    return {k: statistics.fmean(v) for k, v in sorted(groups.items())}


def seed_result(s: Settings, seed: int, timings: dict[str, float]) -> dict[str, Any]:
    sd = seed_dir(s, seed)
    sizes = organ_sizes(sd / "dataset_ceiling", s.fine_size)
    shaped = shaped_organs(sizes)
    split = json.loads((sd / "dataset" / "db" / "split.json").read_text(encoding="utf-8"))["folds"]["1"]
    rows = {}
    for row in ROWS:
        ev = read_eval(sd / f"eval_{row}.csv")
        rows[row] = {"DSC": mean_over(ev["organ"], SHORT_NAMES), "DSC_shaped": mean_over(ev["organ"], shaped),
                     "NSD": mean_over(ev["organ"], SHORT_NAMES, "NSD"), "cases": ev["n"],
                     "organ_DSC": {k: v["DSC"] for k, v in ev["organ"].items()},
                     "by_profile": profile_groups(sd / "dataset" / "synthetic_meta.json", ev["cases"]),
                     "curve": curve(sd / f"fine_{row}" / "round1"), "train_s": timings.get(f"fine_{row}")}
    return {"seed": seed, "rows": rows, "shaped": shaped, "sizes": sizes, "timings_s": timings,
            "split": {"train": len(split["train"]), "val": len(split["val"])}}


# --------------------------------------------------------------------------------------------- running, report


def link_shared(s: Settings, seed: int) -> None:
    """Link the datasets and the coarse model of the run in --reuse-data (same data settings, checked): the
    synthetic, prepare and coarse steps then find their work done. The prepared records hold absolute paths into
    that run, which must stay in place."""
    src = Path(s.reuse_data).resolve() / f"seed{seed}"
    recorded = json.loads((src / SETTINGS_FILE).read_text(encoding="utf-8"))
    diff = {k: (recorded.get(k), v) for k, v in s.data_fingerprint().items() if recorded.get(k) != v}
    if diff:
        raise SystemExit(f"error: --reuse-data {src} was made with other data settings {diff}")
    sd = seed_dir(s, seed)
    for name in SHARED:
        if not (sd / name).exists():
            (sd / name).symlink_to(src / name)


def run_seed(s: Settings, seed: int, t0: float) -> dict[str, Any]:
    sd = seed_dir(s, seed)
    sd.mkdir(parents=True, exist_ok=True)
    path = sd / SETTINGS_FILE
    current = {**s.fingerprint(), "seed": seed}
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != current:
            diff = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
            raise SystemExit(f"error: {sd} was made with other settings {diff}; use another --out")
    else:
        path.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
    if s.reuse_data:
        link_shared(s, seed)
    timings_path = sd / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    for step in seed_steps(s, seed):
        if step.name.startswith("predict_"):
            row = step.name.split("_", 1)[1]
            link = sd / f"weights_{row}" / "base_coarse_model"
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(sd / "weights_coarse" / "base_coarse_model", link.parent))
        wall = run_step(step, sd / "logs", t0, s.threads, f"seed {seed}: ")
        timings[step.name] = max(wall, timings.get(step.name, 0.0))
        timings_path.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    result = seed_result(s, seed, timings)
    (sd / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def format_report(s: Settings, results: Sequence[dict[str, Any]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Per seed: {s.labeled} labeled training + {s.labeled_val} labeled validation cases, {s.unlabeled} "
             f"unlabeled (as labeled in the ceiling), {s.val} evaluation phantoms; synthetic `{s.size}` "
             f"`{s.scan_profiles}` {s.gen or '(default generator)'}; fine {s.fine_size}^3 x {s.fine_iters} "
             f"iterations, lr {s.fine_lr}, CPS weight {s.cps_weight}, channels {s.channels}; coarse "
             f"{s.coarse_size}^3 x {s.coarse_iters} on the {s.coarse_data} data.", "",
             "| seed | split train/val | L / 0 DSC (13) | ceiling DSC (13) | diff (13) | L / 0 DSC (shaped) | "
             "ceiling DSC (shaped) | diff (shaped) | L / 0 by phase (nc / art / pv) | ceiling by phase | "
             "fine val best@it, half, last (L/0; ceiling) | train s (L/0, ceiling) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, c = r["rows"]["l0"], r["rows"]["ceiling"]

        def cv(x: dict[str, Any]) -> str:
            k = x["curve"]
            return f"{k['best']:.3f}@{k['best_iteration']}, {k['half']:.3f}, {k['last']:.3f}" if k else "-"

        def prof(x: dict[str, Any]) -> str:
            p = x["by_profile"]
            return " / ".join(f"{p[k]:.3f}" if k in p else "-" for k in PHASES)

        lines.append(f"| {r['seed']} | {r['split']['train']}/{r['split']['val']} | {a['DSC']:.4f} | {c['DSC']:.4f} | "
                     f"{c['DSC'] - a['DSC']:+.4f} | {a['DSC_shaped']:.4f} | {c['DSC_shaped']:.4f} | "
                     f"{c['DSC_shaped'] - a['DSC_shaped']:+.4f} | {prof(a)} | {prof(c)} | {cv(a)}; {cv(c)} | "
                     f"{a['train_s'] or 0:.0f}, {c['train_s'] or 0:.0f} |")
    if len(results) > 1:
        for key, label in (("DSC", "13 organs"), ("DSC_shaped", "shaped organs")):
            diffs = [r["rows"]["ceiling"][key] - r["rows"]["l0"][key] for r in results]
            mean, low, high = t_interval(diffs)
            l0 = statistics.fmean(r["rows"]["l0"][key] for r in results)
            ce = statistics.fmean(r["rows"]["ceiling"][key] for r in results)
            lines.append(f"\nMean over seeds, {label}: L / 0 {l0:.4f}, ceiling {ce:.4f}, ceiling - L / 0 "
                         f"{mean:+.4f} [95 % t: {low:+.4f}, {high:+.4f}]")
    shaped = results[0]["shaped"] if results else []
    lines.append(f"\nOrgans with shape at {s.fine_size}^3 (median >= {SHAPE_MIN_VOXELS} voxels and >= "
                 f"{SHAPE_MIN_EXTENT} along every axis in the fine crop; "
                 f"seed {results[0]['seed'] if results else '-'}): "
                 f"{', '.join(shaped)}")
    lines += ["", "| organ | median voxels | median min extent | " + " | ".join(
        f"s{r['seed']} L/0, ceiling" for r in results) + " |", "|---|---|---|" + "---|" * len(results)]
    for name in SHORT_NAMES:
        sz = results[0]["sizes"][name]
        per = " | ".join(f"{r['rows']['l0']['organ_DSC'][name]:.2f}, {r['rows']['ceiling']['organ_DSC'][name]:.2f}"
                         for r in results)
        lines.append(f"| {name} | {sz['median_voxels']:.0f} | {sz['median_min_extent']:.0f} | {per} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Settings:
    d = Settings(seeds=[0, 1])
    p = argparse.ArgumentParser(prog="python -m benchmarks.headroom", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    p.add_argument("--labeled", type=int, default=d.labeled)
    p.add_argument("--labeled-val", type=int, default=d.labeled_val)
    p.add_argument("--unlabeled", type=int, default=d.unlabeled)
    p.add_argument("--val", type=int, default=d.val, help="held-out evaluation phantoms")
    p.add_argument("--size", default=d.size)
    p.add_argument("--hard-fraction", type=float, default=d.hard_fraction)
    p.add_argument("--scan-profiles", default=d.scan_profiles)
    p.add_argument("--gen", default=d.gen, help="extra data_prepare.synthetic options, one string")
    p.add_argument("--coarse-size", type=int, default=d.coarse_size)
    p.add_argument("--fine-size", type=int, default=d.fine_size)
    p.add_argument("--coarse-iters", type=int, default=d.coarse_iters)
    p.add_argument("--fine-iters", type=int, default=d.fine_iters)
    p.add_argument("--channels", default=",".join(map(str, d.channels)))
    p.add_argument("--coarse-lr", type=float, default=d.coarse_lr)
    p.add_argument("--fine-lr", type=float, default=d.fine_lr)
    p.add_argument("--cps-weight", type=float, default=d.cps_weight)
    p.add_argument("--coarse-data", choices=("ceiling", "labeled"), default=d.coarse_data)
    p.add_argument("--val-points", type=int, default=d.val_points)
    p.add_argument("--no-ensemble", action="store_true")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--out", default=d.out)
    p.add_argument("--reuse-data", default=None,
                   help="another run's --out with the same data settings: reuse its datasets and coarse model")
    a = p.parse_args(argv)
    if a.labeled < 1 or a.labeled_val < 1 or a.unlabeled < 1 or a.val < 1:
        p.error("need --labeled, --labeled-val, --unlabeled and --val >= 1")
    return Settings(seeds=list(dict.fromkeys(a.seeds)), labeled=a.labeled, labeled_val=a.labeled_val,
                    unlabeled=a.unlabeled, val=a.val, size=a.size, hard_fraction=a.hard_fraction,
                    scan_profiles=a.scan_profiles, gen=a.gen, coarse_size=a.coarse_size, fine_size=a.fine_size,
                    coarse_iters=a.coarse_iters, fine_iters=a.fine_iters,
                    channels=[int(c) for c in a.channels.split(",")], coarse_lr=a.coarse_lr, fine_lr=a.fine_lr,
                    cps_weight=a.cps_weight, coarse_data=a.coarse_data, val_points=a.val_points,
                    ensemble=not a.no_ensemble, device=a.device, threads=a.threads, workers=a.workers,
                    out=str(Path(a.out).resolve()), reuse_data=a.reuse_data)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ceiling-dataset"]:
        p = argparse.ArgumentParser(prog="python -m benchmarks.headroom ceiling-dataset")
        p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        a = p.parse_args(argv[1:])
        print(make_ceiling_dataset(Path(a.src), Path(a.dst)))
        return 0
    report_only = argv[:1] == ["report"]
    s = parse_args(argv[1:] if report_only else argv)
    command = shlex.join(["python", "-m", "benchmarks.headroom", *argv])
    t0 = time.perf_counter()
    results = []
    for seed in s.seeds:
        try:
            if report_only:  # recomputed from the seed's folders (the evaluation CSVs, metrics.jsonl, timings)
                timings = json.loads((seed_dir(s, seed) / "timings.json").read_text(encoding="utf-8"))
                results.append(seed_result(s, seed, timings))
            else:
                results.append(run_seed(s, seed, t0))
        except (StepFailed, FileNotFoundError) as exc:
            print(f"error: seed {seed}: {exc}", file=sys.stderr)
    if not results:
        return 1
    report = format_report(s, results, command)
    out = Path(s.out)
    (out / "headroom.md").write_text(report, encoding="utf-8")
    (out / "headroom.json").write_text(json.dumps({"command": command, "settings": asdict(s), "results": results,
                                                   "wall_s": time.perf_counter() - t0,
                                                   "machine": platform.node(), "date": time.strftime("%F %T")},
                                                  indent=1) + "\n", encoding="utf-8")
    print(report)
    return 0 if len(results) == len(s.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
