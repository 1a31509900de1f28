"""Prediction of a folder of CTs: which cases to run, reading ahead, writing behind, the per-case report.

`predict_folder(IN_DIR, OUT_DIR, PredictOptions(...))` is the Python API behind `predict.sh`: every CT in IN_DIR
gets `<id>.nii.gz` in OUT_DIR (a `Predictor` does the networks), `predictions.csv` reports every case, and a rerun
skips the cases that are done.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.core import gpu_memory
from common.core.errors import InputError, WeightsError, WriteError
from common.core.files import (
    check_writable,
    folder_lock,
    remove_stale_temps,
    require_folder,
    write_json_atomic,
    write_text_atomic,
)
from common.core.labels import LabelSet
from common.core.logger import get_logger, progress
from common.infer.predictor import CaseResult, PredictOptions, Predictor, free_cuda_memory, is_cuda_oom, pinned_copy
from common.storage.image_io import ImageMeta, canonical_flips, check_ct, list_images, read_image, write_mask
from common.storage.labelsets import read_label_set
from common.storage.model_folder import FINE_DIR
from common.volume.boxes import format_box

logger = get_logger(__name__)

CSV_COLUMNS = (
    "case_id", "input_path", "output_path", "status", "error", "read_s", "coarse_s", "fine_s", "post_s",
    "write_s", "total_s", *gpu_memory.MEMORY_FIELDS, "device", "coarse_box", "fallback", "uncertainty", "flagged",
)



def _read_case(path: Path, pin: bool = False) -> tuple[np.ndarray, ImageMeta, float]:
    t0 = time.perf_counter()
    array, meta = read_image(path)
    check_ct(array, meta, path)
    if pin:
        array = pinned_copy(array)
    return array, meta, time.perf_counter() - t0



def _write_case(mask: np.ndarray, meta: ImageMeta, out_path: Path, overlay_path: Path | None,
                raw: np.ndarray | None, case_id: str, labels: LabelSet) -> float:
    t0 = time.perf_counter()
    write_mask(mask, meta, out_path)
    if overlay_path is not None and raw is not None:
        from common.infer.overlay import write_overlay  # only needed with --overlays
        write_overlay(overlay_path, raw, mask, meta.spacing_zyx, canonical_flips(meta), title=case_id, labels=labels)
    return time.perf_counter() - t0


def output_name(case_id: str, file_ending: str = ".nii.gz") -> str:
    """Output file name of a case: `<id><file_ending>`, the ending of the model's dataset (as nnU-Net names them)."""
    return f"{case_id}{file_ending}"


def output_ending(options: PredictOptions) -> str:
    """The file ending of the masks: the one the fine model's dataset uses (`.nii.gz` for FLARE22 and for models
    without a label set, the original release's included). Read from the model file with its tensors memory-mapped,
    not read, so a rerun with nothing left to do loads no network."""
    model = Path(options.weights_dir) / FINE_DIR / "model.pt"
    if not model.is_file():
        return ".nii.gz"  # the original release's folder, or missing weights (the predictor says so, if it runs)
    try:
        return read_label_set(model).file_ending
    except InputError as exc:
        raise WeightsError(str(exc)) from None


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (InputError, WeightsError, WriteError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip()


def write_report(path: Path, rows: list[dict[str, Any]]) -> None:
    """predictions.csv (atomic): one row per case and per skipped entry, columns CSV_COLUMNS."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, bool):
        return int(value)
    return value


@dataclass
class FolderCase:
    """One case of an input folder: its id, the CT it is read from and the mask it is written to."""

    case_id: str
    input_path: Path
    output_path: Path


ROWS_DIR = ".predictions"  # per-case report rows beside the masks: out_dir/.predictions/<id>.json


def row_path(out_dir: Path, case_id: str) -> Path:
    """Where a case's report row is kept (written atomically once its mask is written or it failed)."""
    return out_dir / ROWS_DIR / f"{case_id}.json"


def _stored_row(out_dir: Path, case_id: str) -> dict[str, Any] | None:
    """The report row an earlier run kept for `case_id`, or None (missing or unreadable)."""
    try:
        row = json.loads(row_path(out_dir, case_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def check_folders(in_dir: Path, out_dir: Path) -> None:
    """Setup errors (InputError) before any work: the output folder must not be the input folder (masks would
    land among the CTs, and a CT named without _0000 would be overwritten) nor an existing file, and must be
    writable."""
    require_folder(in_dir, "image folder")
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve():
        raise InputError(out_dir, "the output folder is the input folder: masks would be written beside (or over) "
                                  "the CTs; give another output folder")
    check_writable(out_dir, "output folder")


def plan_cases(in_dir: Path, out_dir: Path, overwrite: bool,
               file_ending: str = ".nii.gz") -> tuple[list[FolderCase], list[dict[str, Any]]]:
    """The cases of `in_dir` to predict, and report rows for the rest: entries that are not images (skipped),
    ids given by two files and outputs that would overwrite an input (failed), cases done in an earlier run
    (skipped, with the row that run kept: box, fallback, uncertainty and flag stay in the report)."""
    cases, skipped_entries, conflicts = list_images(in_dir)
    if not cases and not conflicts:
        raise InputError(in_dir, f"no CT images in the folder ({len(skipped_entries)} other entries); expected "
                                 "<id>_0000.nii.gz files (or .nii, .mha, .mhd, .nrrd, DICOM series sub-folders)")
    rows: list[dict[str, Any]] = []
    for entry, reason in skipped_entries:
        if entry.resolve() == out_dir.resolve():
            continue
        logger.info("skipping %s: %s", entry, reason)
        rows.append({"case_id": entry.name, "input_path": str(entry), "status": "skipped", "error": reason})
    for case_id, message in conflicts.items():
        logger.error("%s failed: %s", case_id, message)
        rows.append({"case_id": case_id, "input_path": str(in_dir), "status": "failed", "error": message})
    inputs = {p.resolve() for p in cases.values()} | {e.resolve() for e, _ in skipped_entries}
    todo: list[FolderCase] = []
    for case_id, path in cases.items():
        out_path = out_dir / output_name(case_id, file_ending)
        if out_path.resolve() in inputs:
            message = f"{out_path}: the output would overwrite an input file; use another output folder"
            logger.error("%s failed: %s", case_id, message)
            rows.append({"case_id": case_id, "input_path": str(path), "output_path": str(out_path),
                         "status": "failed", "error": message})
            continue
        exists = out_path.is_file() and out_path.stat().st_size > 0
        if out_path.is_file() and not exists:
            logger.warning("%s: %s is empty (an interrupted write?); predicting it again", case_id, out_path)
        row = _stored_row(out_dir, case_id) if exists and not overwrite else None
        if exists and not overwrite and row is None:  # a kill between the mask and its row: redone, row and all
            logger.warning("%s: %s has no report row (its run was interrupted?); predicting it again", case_id,
                           out_path)
            exists = False
        if exists and not overwrite:
            logger.info("skipping %s: %s exists (use --overwrite to redo it)", case_id, out_path)
            row = row or {}
            earlier = row.get("error")
            row.update({"case_id": case_id, "input_path": str(path), "output_path": str(out_path),
                        "status": "skipped", "error": "output exists (use --overwrite to redo it)"
                        + (f"; earlier run: {earlier}" if earlier else "")})
            rows.append(row)
        else:
            todo.append(FolderCase(case_id, path, out_path))
    return todo, rows


class ReadAhead:
    """Reads and checks the CTs of `cases` in order, up to `workers` + 1 of them ahead, in background threads."""

    def __init__(self, cases: Sequence[FolderCase], workers: int, pin: bool = False) -> None:
        self.paths = [c.input_path for c in cases]
        self.pin = pin  # page-locked arrays (for a CUDA predictor): the upload is then asynchronous
        self.workers = max(1, int(workers))
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="predict-read")
        self.pending: collections.deque[Future] = collections.deque()
        self.next_index = 0

    def next(self) -> Future:
        """The read of the next case: its result() is (array, meta, read_s) or raises the read/check error."""
        while self.next_index < len(self.paths) and len(self.pending) <= self.workers:
            self.pending.append(self.pool.submit(_read_case, self.paths[self.next_index], self.pin))
            self.next_index += 1
        return self.pending.popleft()

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


class CaseRunner:
    """Predicts one case at a time (after CUDA out of memory: once more on the GPU, then on the CPU) and writes its
    mask in a background thread while the next case computes; fills each case's report row."""

    def __init__(self, predictor: Predictor, options: PredictOptions, out_dir: Path,
                 on_row_done: Callable[[dict[str, Any]], None]) -> None:
        self.predictor = predictor
        self.cpu_predictor: Predictor | None = None
        self.options = options
        self.out_dir = out_dir
        self.on_row_done = on_row_done
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-write")
        self.writes: collections.deque[tuple[dict[str, Any], Future]] = collections.deque()

    def run(self, case: FolderCase, read: Future, row: dict[str, Any]) -> None:
        """Predict `case` (read by `read`) into `row`; its mask is queued for writing, failures land in the row."""
        case_id = case.case_id
        try:
            raw, meta, row["read_s"] = read.result()
        except Exception as exc:  # noqa: BLE001 - any failure is reported per case
            row["status"], row["error"] = "failed", _error_text(exc)
            logger.error("%s failed: %s", case_id, row["error"])
            self.on_row_done(row)
            return
        try:
            result, note = self._predict(raw, meta, case_id)
            if note:
                row["error"] = note
        except Exception as exc:  # noqa: BLE001
            row["status"], row["error"] = "failed", _error_text(exc)
            logger.exception("%s failed: %s", case_id, row["error"])
            self.on_row_done(row)
            return
        row.update(result.times)
        row.update(result.gpu.as_row())
        row.update({"device": result.device,
                    "coarse_box": format_box(result.crop), "fallback": result.fallback,
                    "uncertainty": result.uncertainty,
                    "flagged": (result.uncertainty is not None
                                and result.uncertainty > self.options.uncertainty_threshold)})
        if result.fallback:
            row["error"] = (row.get("error", "") + "; " if row.get("error") else "") + \
                "coarse mask empty: whole-volume fallback"
        if not result.mask.any():  # nothing found is never a result to trust unseen (e.g. 0.1 x 0.1 x 10 mm voxels)
            row["flagged"] = True
            row["error"] = (row.get("error", "") + "; " if row.get("error") else "") + \
                "empty mask: no organ found (check the scan's field of view, spacing and orientation)"
        overlays = self.options.overlays
        overlay_path = self.out_dir / f"{case_id}_overlay.png" if overlays else None
        self.writes.append((row, self.writer.submit(_write_case, result.mask, meta, case.output_path, overlay_path,
                                                    raw if overlays else None, case_id, self.predictor.labels)))
        del raw, result
        while len(self.writes) > 1:  # bounded queue: at most one finished mask waits besides the one writing
            self._finish_write(*self.writes.popleft())

    @staticmethod
    def _attempt(predictor: Predictor, raw: np.ndarray, meta: ImageMeta, case_id: str) -> CaseResult | None:
        """`predictor.predict`, or None after a CUDA out-of-memory error (other errors propagate). Returning from
        here drops the exception and its traceback, whose frames hold the failed attempt's GPU tensors."""
        try:
            return predictor.predict(raw, meta, case_id)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are caught, the rest re-raised
            if not is_cuda_oom(exc):
                raise
            logger.warning("%s: CUDA out of memory: %s", case_id, str(exc).splitlines()[0] if str(exc) else "")
        return None

    def _predict(self, raw: np.ndarray, meta: ImageMeta, case_id: str) -> tuple[CaseResult, str | None]:
        """The case's result and a note for its row: after CUDA out of memory, free what the failed attempt held
        (outside its except block), retry once on the GPU, then on the CPU."""
        result = self._attempt(self.predictor, raw, meta, case_id)
        if result is not None:
            return result, None
        free_cuda_memory()
        result = self._attempt(self.predictor, raw, meta, case_id)
        if result is not None:
            return result, "CUDA out of memory; the retry on the GPU succeeded"
        free_cuda_memory()
        logger.warning("%s: CUDA out of memory twice; predicting this case on the CPU", case_id)
        if self.cpu_predictor is None:
            self.cpu_predictor = self.predictor.on_cpu()
        return self.cpu_predictor.predict(raw, meta, case_id), "CUDA out of memory twice; predicted on the CPU"

    def drain(self) -> None:
        """Wait for the queued writes and complete their rows."""
        while self.writes:
            self._finish_write(*self.writes.popleft())

    def close(self) -> None:
        self.writer.shutdown(wait=True)

    def _finish_write(self, row: dict[str, Any], future: Future) -> None:
        try:
            row["write_s"] = future.result()
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is reported per case
            row["status"], row["error"] = "failed", _error_text(exc)
            logger.error("%s: writing failed: %s", row["case_id"], row["error"])
        row["total_s"] = sum(row.get(k) or 0.0 for k in ("read_s", "coarse_s", "fine_s", "post_s", "write_s"))
        self.on_row_done(row)


def summarize(rows: list[dict[str, Any]], csv_path: Path, wall_s: float) -> dict[str, Any]:
    """The run's summary (see `predict_folder`), logged in one line."""
    counts = collections.Counter(r["status"] for r in rows)
    summary = {
        "ok": counts.get("ok", 0), "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
        "flagged": sum(1 for r in rows if r.get("flagged")), "rows": rows, "csv": str(csv_path),
        "wall_s": wall_s,
    }
    logger.info("predicted %d case(s), %d failed, %d skipped in %.1f s; report %s", summary["ok"],
                summary["failed"], summary["skipped"], summary["wall_s"], csv_path)
    return summary


def predict_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PredictOptions | None = None,
                   predictor: Predictor | None = None) -> dict[str, Any]:
    """Segment every CT in `in_dir` into `out_dir/<id><file ending>` (`.nii.gz` unless the model's dataset uses
    another); write `out_dir/predictions.csv`.

    `options` (default PredictOptions()) gives the folder options and, unless `predictor` is given, the
    networks'. Cases are read `options.workers` ahead in background threads (`ReadAhead`) and written by a
    background thread while the next case computes (`CaseRunner`). A bad case is named with its reason and the
    others go on. Raises InputError for a missing input folder and WeightsError for missing/corrupt weights
    (nothing is predicted then).

    Returns {"ok", "failed", "skipped", "flagged": counts, "rows": per-entry dicts (CSV_COLUMNS), "csv": path,
    "wall_s": seconds}.
    """
    options = options if options is not None else PredictOptions()
    t_start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_folders(in_dir, out_dir)
    csv_path = out_dir / "predictions.csv"
    with folder_lock(out_dir, "predict run"):
        for folder in (out_dir, out_dir / ROWS_DIR):
            remove_stale_temps(folder)
        ending = predictor.labels.file_ending if predictor is not None else output_ending(options)
        todo, rows = plan_cases(in_dir, out_dir, options.overwrite, ending)
        if todo and predictor is None:
            predictor = Predictor(options)

        def row_done(row: dict[str, Any]) -> None:
            write_json_atomic(row_path(out_dir, row["case_id"]), {k: row.get(k) for k in CSV_COLUMNS})
            write_report(csv_path, rows)

        pin = predictor is not None and getattr(predictor, "device", torch.device("cpu")).type == "cuda"
        reads = ReadAhead(todo, options.workers, pin=pin)
        runner = CaseRunner(predictor, options, out_dir, row_done)  # type: ignore[arg-type]
        try:
            bar = progress(todo, desc="predict", unit="case", disable=not options.progress)
            for case in bar:
                bar.set_postfix_str(case.case_id)
                row: dict[str, Any] = {"case_id": case.case_id, "input_path": str(case.input_path),
                                       "output_path": str(case.output_path), "status": "running"}
                rows.append(row)
                runner.run(case, reads.next(), row)
            runner.drain()
        finally:
            reads.close()
            runner.close()
        write_report(csv_path, rows)
    return summarize(rows, csv_path, time.perf_counter() - t_start)
