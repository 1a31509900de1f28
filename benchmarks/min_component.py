"""Fine minimum component volume: FLARE22 DSC/NSD of the two-stage predictor at several `fine_min_volume_mm3`.

After the fine network the predictor keeps, per organ, only its largest 26-connected component, and drops even
that when it is smaller than `fine_min_volume_mm3` (mm^3 of the crop grid; `common.infer.postprocess
.keep_largest_component`). Every value is scored here from ONE prediction per model: the predictor runs once with
the minimum at 0 (largest component per organ, nothing dropped for its size), then `keep_largest_component` is
applied to that mask at each value. This equals a prediction with the value as its flag, because the mask pasted
into the zero volume holds exactly one component per organ, the one the predictor's own filter would test, with
the same size (the test compares both). Each value is scored by the project's evaluator (`common.evaluate`) against
the truth; the table gives mean DSC / NSD over organs and cases, the small organs' DSC, the organs dropped and the
per-case paired difference to the value the exported model carries (the predictor's default), with a 95 %
Student-t interval over cases (`benchmarks.stats.t_interval`).

Inputs (each a model folder with base_coarse_model/ + efficient_fine_model/, an image folder, a truth folder):
  --runs DEMO_OUT      a finished `sh demo.sh` output: model_weights/, dataset/val_images/, dataset/val_mask/
  --runs SEED_DIR      a benchmarks/semi_supervised.py seed folder: weights_<--row>/, dataset/val_images/, val_mask/
  --runs BENCH_DIR     the benchmark's run folder: every seed*/ in it, as above
  --case-set W I T     explicit folders (repeatable)
Prediction settings as the demo and the benchmark use them: the fine size the model was exported with (or the
seed's settings.json), both networks averaged when both stages hold A and B (or as settings.json says), CPU,
`--threads` torch threads. Outputs under --out: <run>/pred_min0/ (the prediction, resumable), <run>/min_<v>/
(masks and eval.csv per value); --json writes every number.

    PYTHONPATH=. .venv/bin/python -m benchmarks.min_component --runs /work/main/demo_output --out /tmp/min_component
    PYTHONPATH=. .venv/bin/python -m benchmarks.min_component --runs runs/semi_supervised --row lk --json mc.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VALUES_MM3 = (0.0, 500.0, 1000.0, 2000.0, 4000.0)
SMALL_ORGANS = (7, 8, 9, 10)  # right / left adrenal gland, gallbladder, esophagus (common.core.labels)
PRED_DIR = "pred_min0"
SETTINGS_FILE = "prediction.json"


@dataclass
class CaseSet:
    """One model and the validation cases it is scored on."""

    name: str
    weights: Path   # folder with base_coarse_model/ and efficient_fine_model/
    images: Path    # CTs (<id>_0000.nii.gz)
    truth: Path     # masks (<id>.nii.gz)
    fine_size: int | None = None   # None: the size the fine model was exported with
    ensemble: bool | None = None   # None: A + B when both stages hold both networks


# ------------------------------------------------------------------------------------------------ inputs


def _seed_set(seed_dir: Path, row: str) -> CaseSet:
    """A benchmarks/semi_supervised.py seed folder; its settings.json gives the fine size and the ensemble."""
    from benchmarks.semi_supervised import SETTINGS_FILE as BENCH_SETTINGS

    fine_size, ensemble = None, None
    settings_path = seed_dir / BENCH_SETTINGS
    if settings_path.is_file():
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        fine_size, ensemble = settings.get("fine_size"), settings.get("ensemble")
    ds = seed_dir / "dataset"
    return CaseSet(f"{seed_dir.name}_{row}", seed_dir / f"weights_{row}", ds / "val_images", ds / "val_mask",
                   fine_size, ensemble)


def case_sets_from_path(path: Path, row: str) -> list[CaseSet]:
    """The case sets a --runs folder stands for (demo output, one seed folder, or a benchmark run folder)."""
    from common.core.errors import InputError

    if (path / "model_weights").is_dir():
        ds = path / "dataset"
        return [CaseSet(path.name, path / "model_weights", ds / "val_images", ds / "val_mask")]
    if (path / "dataset").is_dir() and path.name.startswith("seed"):
        return [_seed_set(path, row)]
    seeds = sorted(p for p in path.glob("seed*") if (p / "dataset").is_dir())
    if seeds:
        return [_seed_set(p, row) for p in seeds]
    raise InputError(path, "neither a demo output (model_weights/, dataset/) nor a semi-supervised seed folder "
                           "(seed<S>/ with weights_<row>/, dataset/) nor a folder of seed folders")


def check_case_set(cs: CaseSet) -> None:
    """InputError naming the first missing folder."""
    from common.core.errors import InputError
    from common.storage.model_folder import COARSE_DIR, FINE_DIR

    for folder, what in ((cs.weights / COARSE_DIR, "coarse model"), (cs.weights / FINE_DIR, "fine model"),
                         (cs.images, "image folder"), (cs.truth, "truth folder")):
        if not folder.is_dir():
            hint = (" (benchmarks/semi_supervised.py links it when it predicts that row)" if what == "coarse model"
                    else "")
            raise InputError(folder, f"{what} of {cs.name} not found{hint}")


# ------------------------------------------------------------------------------------------------ predicting


def make_predictor(cs: CaseSet, device: str = "cpu") -> tuple[Any, float]:
    """The predictor of a case set with the fine minimum at 0, and the minimum its exported model carries.

    Ensemble unless said otherwise: whenever both stages hold networks A and B (as demo.sh and the benchmark
    predict with --ensemble)."""
    from common.infer.predictor import PredictOptions, Predictor
    from common.storage.checkpoint import load_checkpoint
    from common.storage.model_folder import COARSE_DIR, FINE_DIR, PreprocessSpec

    # what the exported models hold, read with their tensors memory-mapped: the predictor below loads them once
    stored = {folder: load_checkpoint(cs.weights / folder / "model.pt", mmap=True) for folder in (COARSE_DIR, FINE_DIR)}
    fine_model = cs.weights / FINE_DIR / "model.pt"
    default_mm3 = PreprocessSpec.from_json(stored[FINE_DIR]["preprocess"], "fine", fine_model).min_volume_mm3
    ensemble = cs.ensemble
    if ensemble is None:
        ensemble = all(len(payload["networks"]) >= 2 for payload in stored.values())
    options = PredictOptions(weights_dir=cs.weights, device=device, fine_size=cs.fine_size, ensemble=ensemble,
                             uncertainty="off", fine_min_volume_mm3=0.0, workers=1, progress=False)
    return Predictor(options), default_mm3


def predict_once(cs: CaseSet, out_dir: Path, device: str = "cpu") -> tuple[dict[str, Any], float]:
    """Predict the case set's images into out_dir/pred_min0 (kept cases are reused when the settings match).

    Returns (predict_folder's summary, the exported model's fine minimum in mm^3)."""
    from common.core.errors import InputError
    from common.core.files import write_json_atomic
    from common.infer.folder import predict_folder

    predictor, default_mm3 = make_predictor(cs, device)
    settings = {"weights": str(cs.weights.resolve()), "images": str(cs.images.resolve()),
                "fine_size": list(predictor.fine.size_zyx), "ensemble": predictor.ensemble, "device": device}
    settings_path = out_dir / SETTINGS_FILE
    if settings_path.is_file():
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
        if recorded != settings:
            raise InputError(out_dir, f"holds predictions made with other settings ({recorded} vs {settings}); "
                                      "delete it or give another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, settings)
    summary = predict_folder(cs.images, out_dir / PRED_DIR, predictor.options, predictor=predictor)
    return summary, default_mm3


def apply_min_volume(pred_dir: Path, out_dir: Path, min_volume_mm3: float) -> dict[str, int]:
    """Write every mask of pred_dir, filtered by the predictor's fine rule at `min_volume_mm3`, into out_dir.

    Returns per mask file name the foreground voxels kept."""
    from common.evaluation.evaluate import list_predictions
    from common.infer.postprocess import keep_largest_component
    from common.storage.image_io import read_mask, write_mask

    out_dir.mkdir(parents=True, exist_ok=True)
    kept = {}
    for path in list_predictions(pred_dir):
        mask, meta = read_mask(path)
        filtered = keep_largest_component(mask, meta.spacing_zyx, min_volume_mm3)
        write_mask(filtered, meta, out_dir / path.name)
        kept[path.name] = int(np.count_nonzero(filtered))
    return kept


def value_dir(value_mm3: float) -> str:
    return f"min_{value_mm3:g}"


def original_threshold_mm3(crop_text: str, fine_size_zyx: Sequence[int], rule_mm3: float = 2000.0) -> float:
    """The original release's effective fine threshold on one crop (reference 6.2 step 7, its quirk): it counts
    voxels of the crop-resolution mask against rule_mm3 / (fine-grid voxel volume), i.e. rule_mm3 * prod(network
    input size / crop size) mm^3. crop_text: the predictor's report column ("z0:z1,y0:y1,x0:x1")."""
    sizes = [int(b) - int(a) for a, b in (part.split(":") for part in crop_text.split(","))]
    return rule_mm3 * float(np.prod([n / s for n, s in zip(fine_size_zyx, sizes)]))


# ------------------------------------------------------------------------------------------------ scoring


def score_value(pred_dirs: dict[str, Path], truths: dict[str, Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Official rows of every case set's predictions in pred_dirs[name] against truths[name], case names prefixed
    with the set's name; and the failures (named)."""
    from common.evaluation.evaluate import evaluate_folder

    rows, failed = [], []
    for name, pred_dir in pred_dirs.items():
        failures: list[tuple[str, str]] = []
        scored, _ = evaluate_folder(pred_dir, truths[name], pred_dir / "eval.csv", failures=failures)
        rows += [{**r, "Name": f"{name}/{r['Name']}"} for r in scored]
        failed += [f"{name}/{file}: {message}" for file, message in failures]
    return rows, failed


def summarize(rows_by_value: dict[float, list[dict[str, Any]]], kept_by_value: dict[float, int],
              baseline_mm3: float) -> list[dict[str, Any]]:
    """Per value: means over organs and cases, per-organ means, foreground kept, organs dropped vs value 0, and
    per-case paired differences of mean DSC / NSD to the baseline value with 95 % t-intervals."""
    from benchmarks.stats import t_interval
    from common.core.labels import FLARE22
    from common.evaluation.evaluate import column_means

    def per_case(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        return {str(r["Name"]): column_means([r]) for r in rows}

    cases = {v: per_case(rows) for v, rows in rows_by_value.items()}
    common_cases = sorted(set.intersection(*(set(c) for c in cases.values())))
    base = cases[baseline_mm3]
    lowest = min(rows_by_value)
    out = []
    for value, rows in sorted(rows_by_value.items()):
        means = column_means(rows)
        entry: dict[str, Any] = {
            "min_volume_mm3": value, "cases": len(rows), "mean_DSC": means["mean_DSC"], "mean_NSD": means["mean_NSD"],
            "organ_DSC": {lb.short: means[f"{lb.short}_DSC"] for lb in FLARE22},
            "organ_NSD": {lb.short: means[f"{lb.short}_NSD"] for lb in FLARE22},
            "foreground_voxels": kept_by_value[value],
            "per_case": {c: {"DSC": m["mean_DSC"], "NSD": m["mean_NSD"]} for c, m in cases[value].items()},
        }
        for metric in ("DSC", "NSD"):
            diffs = [cases[value][c][f"mean_{metric}"] - base[c][f"mean_{metric}"] for c in common_cases]
            mean, low, high = t_interval(diffs)
            entry[f"diff_{metric}"] = {"mean": mean, "low": low, "high": high, "n": len(diffs)}
        entry["organs_dropped"] = _dropped(rows_by_value[lowest], rows)
        out.append(entry)
    return out


def _dropped(lowest_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> int:
    """(case, organ) pairs with DSC > 0 at the lowest value and DSC == 0 here: found, then removed for size."""
    from common.core.labels import FLARE22

    here = {r["Name"]: r for r in rows}
    count = 0
    for r in lowest_rows:
        other = here.get(r["Name"])
        if other is None:
            continue
        count += sum(1 for lb in FLARE22 if float(r[f"{lb.short}_DSC"]) > 0 and float(other[f"{lb.short}_DSC"]) == 0)
    return count


def _num(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _diff(d: dict[str, float]) -> str:
    if math.isnan(d["low"]):
        return f"{d['mean']:+.4f}" if not math.isnan(d["mean"]) else "n/a"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def format_table(summary: list[dict[str, Any]], baseline_mm3: float) -> str:
    """The markdown table: one row per value."""
    from common.core.labels import FLARE22

    small = [FLARE22[label].short for label in SMALL_ORGANS]
    n = summary[0]["diff_DSC"]["n"] if summary else 0
    header = (["min volume mm^3", "mean DSC", "mean NSD"] + [f"{s} DSC" for s in small]
              + ["organs dropped", "fg voxels", f"ΔDSC vs {baseline_mm3:g} [95 % t, n={n}]",
                 f"ΔNSD vs {baseline_mm3:g} [95 % t]"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in summary:
        mark = " (default)" if e["min_volume_mm3"] == baseline_mm3 else ""
        cells = ([f"{e['min_volume_mm3']:g}{mark}", _num(e["mean_DSC"]), _num(e["mean_NSD"])]
                 + [_num(e["organ_DSC"][s]) for s in small]
                 + [str(e["organs_dropped"]), str(e["foreground_voxels"]), _diff(e["diff_DSC"]),
                    _diff(e["diff_NSD"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def run(case_sets: Sequence[CaseSet], values_mm3: Sequence[float], out_root: Path, device: str = "cpu"
        ) -> dict[str, Any]:
    """Predict every case set once, score every value; returns everything (see `summarize`), plus failures."""
    from common.core.errors import InputError

    names = [cs.name for cs in case_sets]
    if len(set(names)) != len(names):
        raise InputError(out_root, f"two case sets share a name ({names}); give folders with distinct names")
    for cs in case_sets:
        check_case_set(cs)
    failures: list[str] = []
    baselines: set[float] = set()
    crops: dict[str, dict[str, Any]] = {}
    for cs in case_sets:
        summary, default_mm3 = predict_once(cs, out_root / cs.name, device)
        baselines.add(default_mm3)
        failures += [f"{cs.name}/{r['case_id']}: {r.get('error', '')}" for r in summary["rows"]
                     if r["status"] == "failed"]
        fine_size = json.loads((out_root / cs.name / SETTINGS_FILE).read_text(encoding="utf-8"))["fine_size"]
        for r in summary["rows"]:
            if r["status"] in ("ok", "skipped") and r.get("coarse_box"):
                crops[f"{cs.name}/{r['case_id']}"] = {
                    "crop": r["coarse_box"], "original_rule_mm3": original_threshold_mm3(r["coarse_box"], fine_size)}
    if len(baselines) != 1:
        raise InputError(out_root, f"the models carry different fine minimum volumes {sorted(baselines)}; "
                                   "score them in separate runs")
    baseline = baselines.pop()
    values = sorted({float(v) for v in values_mm3} | {baseline})
    rows_by_value, kept_by_value = {}, {}
    for value in values:
        dirs = {}
        kept = 0
        for cs in case_sets:
            dirs[cs.name] = out_root / cs.name / value_dir(value)
            kept += sum(apply_min_volume(out_root / cs.name / PRED_DIR, dirs[cs.name], value).values())
        rows, failed = score_value(dirs, {cs.name: cs.truth for cs in case_sets})
        rows_by_value[value], kept_by_value[value] = rows, kept
        if value == values[0]:
            failures += failed
    return {"case_sets": [{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cs).items()}
                          for cs in case_sets],
            "baseline_mm3": baseline, "values": summarize(rows_by_value, kept_by_value, baseline),
            "crops": crops, "failures": failures}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.min_component", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", default=[], help="demo output, seed folder(s) or benchmark folder")
    p.add_argument("--case-set", nargs=3, action="append", default=[], metavar=("WEIGHTS", "IMAGES", "TRUTH"),
                   help="an explicit model folder, image folder and truth folder (repeatable)")
    p.add_argument("--row", default="lk", help="row of a semi-supervised seed folder: weights_<row>/ (l0, lu, lk ...)")
    p.add_argument("--values", type=float, nargs="+", default=list(DEFAULT_VALUES_MM3),
                   help="fine minimum component volumes to score, mm^3 (the model's own value is always added)")
    p.add_argument("--out", type=Path, default=Path("runs/min_component"), help="folder for masks and CSVs")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)

    import torch

    from common.core.errors import InputError, WeightsError
    from common.core.files import write_json_atomic
    from common.core.logger import setup_logging

    setup_logging(None)
    torch.set_num_threads(max(1, a.threads))
    try:
        if len(a.values) < 1 or any(v < 0 or math.isnan(v) for v in a.values):
            raise ValueError(f"--values must be volumes >= 0 mm^3, got {a.values}")
        sets = [cs for path in a.runs for cs in case_sets_from_path(path, a.row)]
        sets += [CaseSet(Path(w).resolve().name, Path(w), Path(i), Path(t)) for w, i, t in a.case_set]
        if not sets:
            raise ValueError("give --runs or --case-set")
        result = run(sets, a.values, a.out, a.device)
    except (InputError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(sets)} model(s): {', '.join(cs.name for cs in sets)}; cases pooled over models")
    print(format_table(result["values"], result["baseline_mm3"]))
    if result["crops"]:
        original = sorted(c["original_rule_mm3"] for c in result["crops"].values())
        print(f"original release's effective fine threshold on these crops (2000 mm^3 * prod(input / crop)): "
              f"median {np.median(original):.0f} mm^3, range {original[0]:.0f} .. {original[-1]:.0f}")
    if a.json is not None:
        write_json_atomic(a.json, result)
        print(f"wrote {a.json}")
    for failure in result["failures"]:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
