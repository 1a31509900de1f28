"""FLARE22 DSC/NSD of a folder of predictions against a folder of ground truths, as the official script.

The command line is `python -m common.evaluate --pred DIR --gt DIR --out results.csv` (common/evaluate.py).
Writes the official CSV (Name, <Organ>_DSC x13, <Organ>_NSD x13 for FLARE22's labels, <short>_DSC / <short>_NSD of
another label set; the official script's value formatting) and prints per-organ means. Unlike the official script,
it reads every file through the project's checked reader (truncation, labels outside the set), checks that each
prediction lies on its ground truth's grid, and a missing,
unreadable or bad file fails only that case (named, exit code 1; a ground truth without a prediction fails too).
Exit code 2: setup error (a folder missing, no predictions, --out a folder or not writable).
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from common.core.errors import InputError
from common.core.files import require_folder, write_text_atomic
from common.core.labels import FLARE22, LabelSet
from common.core.logger import get_logger
from common.evaluation.metrics import Score, flare_case_scores
from common.storage.image_io import IMAGE_SUFFIXES, read_mask, same_grid

logger = get_logger(__name__)



def csv_columns(labels: LabelSet = FLARE22) -> tuple[str, ...]:
    """Name, <short>_DSC of every label, <short>_NSD of every label (the official column order)."""
    return ("Name",) + tuple(f"{lb.short}_DSC" for lb in labels) + tuple(f"{lb.short}_NSD" for lb in labels)


CSV_COLUMNS = csv_columns(FLARE22)

Row = dict[str, object]


def _case_id(name: str) -> str | None:
    """File name without its image suffix, or None for a file that is not an image."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_predictions(pred_dir: Path) -> list[Path]:
    """Image files of the prediction folder, sorted by name (hidden files are skipped)."""
    return sorted(p for p in pred_dir.iterdir() if p.is_file() and not p.name.startswith(".") and _case_id(p.name))


def find_ground_truth(pred_path: Path, gt_dir: Path) -> Path:
    """Ground truth of a prediction: same file name, else the same case id with another image suffix."""
    same = gt_dir / pred_path.name
    if same.is_file():
        return same
    case_id = _case_id(pred_path.name)
    for suffix in IMAGE_SUFFIXES:
        candidate = gt_dir / f"{case_id}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(same, f"ground truth missing for prediction {pred_path.name}")


def evaluate_case(pred_path: Path, gt_path: Path, labels: LabelSet = FLARE22) -> dict[int, tuple[Score, Score]]:
    """Official scores of one prediction file against its ground-truth file (spacing from the ground truth).

    Both are read by the project's checked reader (`read_mask`: complete file, integer labels of the set, plausible
    spacing) and must lie on the same grid (`same_grid`); InputError names the file otherwise.
    """
    gt_array, gt_meta = read_mask(gt_path, num_labels=labels.num_organs)
    pred_array, pred_meta = read_mask(pred_path, num_labels=labels.num_organs)
    diff = same_grid(pred_meta, gt_meta)
    if diff is not None:
        raise InputError(pred_path, f"not on the grid of ground truth {gt_path.name}: {diff} (prediction vs "
                                    "ground truth)")
    # the official script's (i, j, k) = (x, y, z) array order (nibabel) and spacing
    return flare_case_scores(pred_array.transpose(2, 1, 0), gt_array.transpose(2, 1, 0), gt_meta.spacing_xyz, labels)


def missing_predictions(predictions: Sequence[Path], pred_dir: Path, gt_dir: Path) -> list[tuple[str, str]]:
    """(ground-truth file name, message) for every ground truth without a prediction (of `predictions`, the files
    of `pred_dir`) of the same case id."""
    predicted = {_case_id(p.name) for p in predictions}
    return [(gt.name, str(InputError(pred_dir / gt.name, f"prediction missing for ground truth {gt}")))
            for gt in list_predictions(gt_dir) if _case_id(gt.name) not in predicted]


def scores_to_row(name: str, scores: dict[int, tuple[Score, Score]], labels: LabelSet = FLARE22) -> Row:
    """One CSV row: Name, then <short>_DSC of every label, <short>_NSD of every label."""
    row: Row = {"Name": name}
    for label in labels:
        row[f"{label.short}_DSC"] = scores[label.id][0]
    for label in labels:
        row[f"{label.short}_NSD"] = scores[label.id][1]
    return row


def format_csv(rows: Sequence[Row], columns: Sequence[str] = CSV_COLUMNS) -> str:
    """The CSV text exactly as the official script's pandas writer formats it.

    A column whose values are all ints (the empty-organ branches) is written as ints ("1", "0"); any other
    column is a float column: shortest repr ("0.914", "1.0", "0.0"), NaN as an empty field. Fields are written by
    the csv module (quoted where needed, as pandas does: a case name with a comma keeps its columns).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    int_columns = {c for c in columns[1:] if rows and all(isinstance(r[c], (int, np.integer)) for r in rows)}
    for row in rows:
        fields = [str(row["Name"])]
        for column in columns[1:]:
            value = row[column]
            if column in int_columns:
                fields.append(str(int(value)))
            else:
                fields.append("" if math.isnan(float(value)) else repr(float(value)))
        writer.writerow(fields)
    return buffer.getvalue()


def column_means(rows: Sequence[Row], labels: LabelSet = FLARE22) -> dict[str, float]:
    """Mean of every metric column over cases, plus mean_DSC / mean_NSD over all organs and cases (NaN skipped)."""
    means: dict[str, float] = {}
    for column in csv_columns(labels)[1:]:
        values = np.array([float(r[column]) for r in rows], dtype=np.float64)
        means[column] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    for metric in ("DSC", "NSD"):
        values = np.array([float(r[f"{lb.short}_{metric}"]) for r in rows for lb in labels], dtype=np.float64)
        means[f"mean_{metric}"] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    return means


def evaluate_folder(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_csv: str | Path | None = None,
    failures: list[tuple[str, str]] | None = None,
    labels: LabelSet = FLARE22,
) -> tuple[list[Row], dict[str, float]]:
    """Score every prediction in pred_dir against gt_dir, write the official CSV, return (rows, means).

    rows: one dict per scored case (keys = CSV_COLUMNS); means: `column_means(rows)`.
    A case that fails (missing prediction or ground truth, unreadable file, labels outside the set, grid mismatch)
    is logged and skipped; its
    (file name, message) is appended to `failures` when a list is given, otherwise an InputError naming the
    failed files is raised after the CSV of the other cases is written.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (pred_dir, gt_dir):
        require_folder(folder)
    if pred_dir.resolve() == gt_dir.resolve():
        logger.warning("--pred and --gt are the same folder (%s): every case scores 1.0 against itself", pred_dir)
    predictions = list_predictions(pred_dir)
    if not predictions:
        raise InputError(pred_dir, f"no prediction files ({', '.join(IMAGE_SUFFIXES)})")
    rows: list[Row] = []
    failed: list[tuple[str, str]] = missing_predictions(predictions, pred_dir, gt_dir)
    for name, message in failed:
        logger.error("%s", message)
    for pred_path in predictions:
        try:
            gt_path = find_ground_truth(pred_path, gt_dir)
            start = time.perf_counter()
            scores = evaluate_case(pred_path, gt_path, labels)
            logger.info("%s scored in %.2f s", pred_path.name, time.perf_counter() - start)
        except InputError as err:
            logger.error("%s", err)
            failed.append((pred_path.name, str(err)))
            continue
        rows.append(scores_to_row(pred_path.name, scores, labels))
    if out_csv is not None and rows:
        write_text_atomic(out_csv, format_csv(rows, csv_columns(labels)))
    means = column_means(rows, labels) if rows else {}
    if failures is not None:
        failures.extend(failed)
    elif failed:
        raise InputError(pred_dir, f"{len(failed)} case(s) failed: {', '.join(name for name, _ in failed)}")
    return rows, means


def format_means_table(means: dict[str, float], num_cases: int, labels: LabelSet = FLARE22) -> str:
    """Per-organ mean DSC and NSD with the NSD tolerance each label used, then the overall means, as a text
    table."""
    width = max(12, *(len(lb.short) + 1 for lb in labels))
    lines = [f"{'organ':<{width}} {'DSC':>7} {'NSD':>7}  {'NSD tol.':>8}   ({num_cases} case(s), {labels.name})"]
    for lb in labels:
        lines.append(f"{lb.short:<{width}} {means[f'{lb.short}_DSC']:7.4f} {means[f'{lb.short}_NSD']:7.4f}  "
                     f"{lb.nsd_tolerance_mm:6.1f} mm")
    lines.append(f"{'mean':<{width}} {means['mean_DSC']:7.4f} {means['mean_NSD']:7.4f}")
    return "\n".join(lines)
