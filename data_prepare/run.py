"""data_prepare stage: read, validate, canonicalise and resize the dataset; write npy arrays and LMDB records.

`sh run.sh [key=value ...]` (or `python -m data_prepare.run`) with the keys of config.yaml. Per case
(DESIGN 3-4, reference 1):
- read the image (and the mask of a labeled case), check it (InputError -> the case fails with its message),
  flip to the canonical orientation, store HU as int16;
- coarse: the whole volume resized to coarse_size_zyx (image int16 HU, mask per-label uint8);
- fine (labeled only): organ box + extend_size_mm resized to fine_size_zyx;
- region (labeled only): a canonical int16 copy (and uint8 mask copy) of organ box + max_extend_size_mm
  (`common.volume.boxes.region_slices`: every random box extension fits) the fine stage crops from at training
  time. Unlabeled cases get none: their box is only known after the coarse stage, and the fine stage's boxes step
  cuts box + the same margin from the raw image (`common.storage.image_io.read_canonical_ct`, as here) into its own
  output_dir; a whole-volume region an earlier version wrote for an unlabeled case is deleted on its rerun.
Then the deterministic train/val split (fold 1, and folds 2..5 when split_5fold).

Outputs under data_base_dir (the original README's tree, plus region_image/ and region_mask/):
  coarse_image/<Z>_<Y>_<X>/<id>.npy (every case)  coarse_mask/...  fine_image/<Z>_<Y>_<X>/<id>.npy  fine_mask/...
  region_image/<id>.npy  region_mask/<id>.npy                 (fine and region arrays: labeled cases only)
  db/seg_raw_train, db/seg_raw_trainu, db/seg_raw_test        {image_path, mask_path}
  db/seg_pre-process_database (labeled), db/segu_pre-process_database (unlabeled)   full records
  db/seg_train_fold_k, db/seg_val_fold_k (k = 1, or 1..5), db/seg_trainu   copies of the records
  db/split.json (the split as lists of ids), db/failed_cases.txt (only when something failed),
  db/data_prepare.log
Record paths are absolute and keep the `.npy` suffix (the reference stored them without it). Unlabeled
cases have `mask_path`, `coarse_mask_path`, `fine_image_path`, `fine_mask_path`, `region_path`,
`region_mask_path`, `region_offset_zyx`, `region_shape_zyx`, `region_margin_mm` and `organ_bbox` = null (the
reference wrote the string 'None' and all-zero dummy masks, and a resized whole-volume fine_image that nothing
reads). The dataset's databases are written by this stage only: the fine stage keeps its boxes, unlabeled
regions and UIF pool under its own output_dir.

Record of a prepared case (UTF-8 JSON; canonical = after the flips; boxes in canonical raw voxels):
  case_id, labeled (bool)
  image_path, mask_path, smooth_mask_path (always null), coarse_image_path, coarse_mask_path,
  fine_image_path, fine_mask_path                          the reference's seven keys
  spacing_zyx (mm), shape_zyx (canonical raw shape), direction (9, SimpleITK row-major), origin (x, y, z mm),
  flips ([z, y, x] bools; the same flips undo themselves)
  organ_bbox      [[z0, z1], [y0, y1], [x0, x1]] inclusive union of all organs (null: unlabeled)
  fine_crop_zyx   [[start, stop), ...] the crop resized into fine_image (organ_bbox + extend_size_mm; null: unlabeled)
  region_path, region_mask_path      canonical int16 / uint8 copies of the region (null: unlabeled)
  region_offset_zyx, region_shape_zyx  where the region lies in the canonical raw volume (null: unlabeled)
  region_margin_mm  max_extend_size_mm the labeled region was cut with (null: unlabeled)
  labels_present  sorted organ labels in the mask ([] unlabeled); hu_range [min, max] HU
  source {image, mask: {size, mtime_ns}}, settings {sizes, margins, record_version}   (rerun bookkeeping)

Split: each labeled case's fold follows from its id and split_seed alone (`fold_draw`, a SHA-256 number in
[0, 1)): fold-1 validation when it is < val_ratio (about val_ratio of the cases), folds 2..5 by quarters of the
rest. Unlike the reference's permutation of all ids, a case failing or being fixed never moves another case
between train and val. An optional file_list/fold1_val_series_uids.txt (FOLD1_VAL_LIST) names the fold-1
validation cases instead (exact counts; val_ratio is then not used for fold 1, folds 2..5 quarter the rest by
their draw). The ids also go to db/split.json.

Failures never vanish: each failed case is logged with the file and the reason, listed in
db/failed_cases.txt, the other cases finish, and the exit code is 1 (2: bad config or no dataset folder).
Files in the input folders that are not images are skipped with a warning (also listed in that file) but
do not fail the run. A rerun skips finished cases (record present, same input files by size and mtime,
same settings, every output file present) unless overwrite=true.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.config import PrepareConfig
from common.core.errors import InputError, WriteError
from common.core.files import (
    check_writable,
    folder_lock,
    remove_stale_temps,
    require_folder,
    save_npy_atomic,
    write_json_atomic,
    write_text_atomic,
)
from common.core.labels import FLARE22
from common.core.logger import WarningCollector, collect_warnings, get_logger, progress, setup_logging
from common.core.typed_config import ConfigError, HelpRequested, config_to_dict, parse_cli
from common.storage.image_io import case_id_from_name, list_images, read_canonical_ct, read_mask, to_canonical
from common.storage.labelsets import write_dataset_labels
from common.storage.lmdb_store import LmdbStore
from common.storage.records import RECORD_VERSION, PreparedCase, Region
from common.storage.step_marker import file_stamp
from common.volume.boxes import crop_box_with_margin, label_bboxes, region_slices
from common.volume.resize import resize_hu_int16, resize_mask
from data_prepare import FOLD1_VAL_LIST
from data_prepare.layouts import DatasetLayout, dataset_layout, verify_nnunet

logger = get_logger("data_prepare.run")  # a fixed name also when run as __main__

STAGE_DIR = Path(__file__).resolve().parent
DB_RAW = {"labeled": "seg_raw_train", "unlabeled": "seg_raw_trainu", "test": "seg_raw_test"}
DB_PRE = {"labeled": "seg_pre-process_database", "unlabeled": "segu_pre-process_database"}
FILE_LISTS = {"labeled": "train_series_uids.txt", "unlabeled": "trainu_series_uids.txt", "test": "val_series_uids.txt"}
FAILED_FILE = "failed_cases.txt"
NPY_KEYS = ("coarse_image_path", "coarse_mask_path", "fine_image_path", "fine_mask_path", "region_path",
            "region_mask_path")


# ---------------------------------------------------------------------------------------------------- case work


@dataclass(frozen=True)
class CaseTask:
    """One case to prepare (picklable: sent to worker processes)."""

    case_id: str
    kind: str  # "labeled" | "unlabeled"
    image_path: str
    mask_path: str | None
    base_dir: str
    coarse_size_zyx: tuple[int, int, int]
    fine_size_zyx: tuple[int, int, int]
    extend_size_mm: float
    max_extend_size_mm: float
    num_labels: int = FLARE22.num_organs  # the label set's: a mask holds labels 0..num_labels

    def settings(self) -> dict[str, Any]:
        """What the outputs depend on besides the input files (a rerun with other settings redoes the case)."""
        return {"coarse_size_zyx": list(self.coarse_size_zyx), "fine_size_zyx": list(self.fine_size_zyx),
                "extend_size_mm": float(self.extend_size_mm), "max_extend_size_mm": float(self.max_extend_size_mm),
                "record_version": RECORD_VERSION}

    def out_path(self, kind: str) -> Path:
        """Absolute output path of one array: kind in coarse_image, coarse_mask, fine_image, fine_mask,
        region_image, region_mask."""
        base = Path(self.base_dir)
        if kind.startswith("coarse"):
            return base / kind / _size_dir(self.coarse_size_zyx) / f"{self.case_id}.npy"
        if kind.startswith("fine"):
            return base / kind / _size_dir(self.fine_size_zyx) / f"{self.case_id}.npy"
        return base / kind / f"{self.case_id}.npy"


@dataclass
class CaseResult:
    case_id: str
    kind: str
    record: dict | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _size_dir(size_zyx: Sequence[int]) -> str:
    return "_".join(str(int(v)) for v in size_zyx)


def _source_stamps(task: CaseTask) -> dict[str, Any]:
    """Size and modification time of the inputs (a changed input file is prepared again)."""
    return {"image": file_stamp(task.image_path), "mask": file_stamp(task.mask_path) if task.mask_path else None}


def prepare_case(task: CaseTask) -> dict:
    """Prepare one case and return its record (`PreparedCase.to_json`; raises InputError for bad input).

    All arrays are canonical (flipped) and (z, y, x); boxes are in canonical raw voxels.
    """
    # the one CT rule and canonical int16 volume, the same as predict's checks and the fine boxes step's regions
    image, meta, flips = read_canonical_ct(task.image_path)
    image_f = torch.from_numpy(image).float()  # converted once for every resize of this case
    case = PreparedCase(
        case_id=task.case_id, labeled=task.kind == "labeled", image_path=task.image_path, mask_path=task.mask_path,
        coarse_image_path=_save(task, "coarse_image", resize_hu_int16(image_f, task.coarse_size_zyx)),
        spacing_zyx=tuple(float(v) for v in meta.spacing_zyx), shape_zyx=tuple(int(v) for v in image.shape),
        direction=tuple(float(v) for v in meta.direction), origin=tuple(float(v) for v in meta.origin_xyz),
        flips=tuple(bool(f) for f in flips), hu_range=(int(image.min()), int(image.max())),
        source=_source_stamps(task), settings=task.settings())
    if case.labeled:
        assert task.mask_path is not None
        mask_raw, _ = read_mask(task.mask_path, meta, task.num_labels)
        case = _prepare_labeled(task, case, image, image_f, np.ascontiguousarray(to_canonical(mask_raw, flips)))
    else:
        # Nothing of an unlabeled case but its coarse array is needed here: the fine stage's boxes step cuts the
        # unlabeled region (coarse box + max_extend_size_mm) from the raw image into its own output_dir once the
        # box is known (DESIGN 5.5), and no unlabeled fine_image is written (nothing reads it).
        _remove_unlabeled_region(task)
    return case.to_json()


def _prepare_labeled(task: CaseTask, case: PreparedCase, image: np.ndarray, image_f: torch.Tensor,
                     mask: np.ndarray) -> PreparedCase:
    """The labeled arrays of a case (coarse mask, fine image and mask, region copies) and its boxes."""
    boxes = label_bboxes(mask)
    if not boxes:
        raise InputError(task.mask_path, f"mask is empty (no organ labels 1..{task.num_labels})")
    shape, spacing = case.shape_zyx, case.spacing_zyx
    organ_box = tuple((min(b[a][0] for b in boxes.values()), max(b[a][1] for b in boxes.values())) for a in range(3))
    fine_crop = crop_box_with_margin(organ_box, spacing, task.extend_size_mm, shape)
    region = region_slices(organ_box, spacing, task.max_extend_size_mm, shape)
    # the fine crop holds every organ box: shift the boxes instead of searching the crop again
    crop_boxes = {label: tuple((lo - s.start, hi - s.start) for (lo, hi), s in zip(box, fine_crop))
                  for label, box in boxes.items()}
    return replace(
        case,
        coarse_mask_path=_save(task, "coarse_mask", resize_mask(mask, task.coarse_size_zyx, label_boxes=boxes)),
        fine_image_path=_save(task, "fine_image", resize_hu_int16(image_f[fine_crop], task.fine_size_zyx)),
        fine_mask_path=_save(task, "fine_mask", resize_mask(mask[fine_crop], task.fine_size_zyx,
                                                            label_boxes=crop_boxes)),
        organ_box=organ_box, fine_crop=tuple((s.start, s.stop - 1) for s in fine_crop),
        region=Region.from_slices(_save(task, "region_image", image[region]),
                                  _save(task, "region_mask", mask[region]), region, task.max_extend_size_mm),
        labels_present=tuple(sorted(boxes)))


def _save(task: CaseTask, kind: str, array: np.ndarray) -> str:
    """Write one output array of the case (atomically) and return its path."""
    path = task.out_path(kind)
    save_npy_atomic(path, np.ascontiguousarray(array))  # np.save of a strided view is very slow
    return str(path)


def _remove_unlabeled_region(task: CaseTask) -> None:
    """Delete the whole-volume region an earlier version wrote for this unlabeled case (about 130 MB per FLARE22
    scan); the fine stage's boxes step keeps its own box-sized copy under its output_dir."""
    path = task.out_path("region_image")
    if path.is_file():
        path.unlink()
        logger.info("%s: removed the whole-volume region of unlabeled case %s (no longer used)", path, task.case_id)


_WORKER_HANDLER: WarningCollector | None = None


PARENT_CHECK_S = 0.5  # how often a worker checks that the process that started it is alive


def _exit_with_parent(parent_pid: int) -> None:
    """Worker side: exit as soon as the parent process is gone. A `kill -9` of the parent runs none of its
    clean-up, so nothing else would stop the workers (they would finish every queued case, writing on)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(PARENT_CHECK_S)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(parent_pid: int | None = None) -> None:
    """Worker process setup: exit with the parent, one torch thread per process (the pool is the parallelism),
    capture warnings."""
    global _WORKER_HANDLER
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    torch.set_num_threads(1)
    _WORKER_HANDLER = collect_warnings()


def run_case(task: CaseTask) -> CaseResult:
    """prepare_case with every failure turned into a message naming the file (never raises)."""
    start = time.perf_counter()
    result = CaseResult(task.case_id, task.kind)
    try:
        result.record = prepare_case(task)
    except (InputError, WriteError) as e:  # a bad input, or an output a full disk cut short (nothing left of it)
        result.error = str(e)
    except Exception as e:  # noqa: BLE001 - a case must never take the run down or vanish silently
        result.error = (f"{task.image_path}: unexpected error {type(e).__name__}: {e}\n"
                        + traceback.format_exc())
    if _WORKER_HANDLER is not None:
        result.warnings, _WORKER_HANDLER.messages = _WORKER_HANDLER.messages, []
    result.seconds = time.perf_counter() - start
    return result


def _is_finished(task: CaseTask, record: dict | None) -> bool:
    """True if `record` was made from the same input files with the same settings and its files exist."""
    if not record:
        return False
    try:
        case = PreparedCase.from_json(task.case_id, record, DB_PRE[task.kind])
        stamps = _source_stamps(task)
    except (InputError, OSError):
        return False
    if (case.image_path, case.mask_path) != (task.image_path, task.mask_path) or case.settings != task.settings():
        return False
    if case.source != stamps or case.coarse_image_path != str(task.out_path("coarse_image")):
        return False
    if case.labeled:  # an unlabeled record of an earlier version may still name its unused fine_image
        if case.fine_image_path != str(task.out_path("fine_image")) or case.region is None \
                or case.region.image_path != str(task.out_path("region_image")):
            return False
    elif case.region is not None:  # an earlier version's whole-volume region: prepared again, region removed
        return False
    return all(record.get(k) is None or Path(record[k]).is_file() for k in NPY_KEYS)


def run_tasks(tasks: Sequence[CaseTask], num_workers: int,
              on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Run cases in `num_workers` spawned processes (<= 1: in this process), with a progress bar.

    `on_result` is called in this process as each case finishes (so records are stored as they come).
    """
    results: list[CaseResult] = []
    if not tasks:
        return results

    def finish(result: CaseResult) -> None:
        for message in result.warnings:
            logger.warning("%s", message)
        results.append(result)
        if on_result is not None:
            on_result(result)
        bar.update()

    bar = progress(total=len(tasks), desc="prepare", unit="case", file=sys.stdout)
    try:
        if num_workers <= 1 or len(tasks) == 1:
            for task in tasks:
                finish(run_case(task))
            return results
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch threads or LMDB handles
        workers = min(num_workers, len(tasks))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(run_case, task): task for task in tasks}
            try:
                for future in concurrent.futures.as_completed(futures):
                    task = futures[future]
                    try:
                        result = future.result()
                    except concurrent.futures.process.BrokenProcessPool:
                        result = CaseResult(task.case_id, task.kind, error=(
                            f"{task.image_path}: a worker process died while this case was pending "
                            "(out of memory?); rerun to retry"))
                    finish(result)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()
    return results


# ---------------------------------------------------------------------------------------------------- discovery


@dataclass
class Discovery:
    """The cases of one run: tasks per kind, raw-DB entries, failures found before any case ran, skipped files."""

    raw: dict[str, dict[str, dict]] = field(default_factory=lambda: {k: {} for k in DB_RAW})
    cases: dict[str, dict[str, tuple[str, str | None]]] = field(default_factory=lambda: {"labeled": {},
                                                                                           "unlabeled": {}})
    failures: dict[str, str] = field(default_factory=dict)  # case id -> message
    refused: set[str] = field(default_factory=set)  # ids given by two files (their failure is in `failures`)
    skipped: list[str] = field(default_factory=list)  # "path: reason"


def _read_id_list(path: Path) -> list[str]:
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line)
    return list(dict.fromkeys(ids))


def _images_of(folder: Path, kind: str, found: Discovery, required: bool) -> dict[str, Path] | None:
    if not folder.is_dir():
        if required or folder.is_file():
            require_folder(folder, f"{kind} image folder")
        logger.info("%s: no folder, no %s cases", folder, kind)
        return None
    images, skipped, conflicts = list_images(folder, masks="mask" in kind)
    for path, reason in skipped:
        found.skipped.append(f"{path}: {reason}")
        logger.warning("skipped %s: %s", path, reason)
    for case_id, message in conflicts.items():  # refused: the case fails, naming both files
        key = case_id if kind in ("labeled", "unlabeled", "labeled mask") else f"{case_id} ({kind})"
        found.failures.setdefault(key, message)
        found.refused.add(key)
    return images


def _unlisted_problem(entry: str, image_dir: Path, list_path: Path) -> str:
    """Why the file list's `entry` has no image: a file name written for an id, or a missing image."""
    case_id = case_id_from_name(entry)
    if case_id is not None and case_id != entry:
        return (f"{list_path}: entry {entry!r} is a file name; list case ids, not file names (write {case_id!r}, "
                f"the image is {case_id}_0000.nii.gz or another image format)")
    return (f"{image_dir}: no image for case {entry!r} listed in {list_path} (expected {entry}_0000.nii.gz or "
            "another image format)")


def discover(cfg: PrepareConfig, base: Path, layout: DatasetLayout) -> Discovery:
    """List labeled, unlabeled and test cases of the layout's folders (file lists if the layout has them and they
    are present, else every image of the folders)."""
    found = Discovery()
    for kind, (image_dir, mask_dir) in layout.folders.items():
        images = _images_of(base / image_dir, kind, found, required=(kind == "labeled"))
        if images is None:
            continue
        masks: dict[str, Path] = {}
        if mask_dir is not None:
            masks = _images_of(base / mask_dir, f"{kind} mask", found, required=(kind == "labeled")) or {}
        list_path = base / cfg.file_list_dir / FILE_LISTS[kind]
        if layout.file_lists and list_path.is_file():
            ids = _read_id_list(list_path)
            unlisted = sorted(set(images) - set(ids))
            if unlisted:
                logger.info("%s: %d %s images not listed in %s are ignored", base / image_dir, len(unlisted), kind,
                            list_path)
        else:
            ids = sorted(images)
        for case_id in ids:
            if case_id in found.refused and kind != "test":
                continue
            if case_id not in images:
                found.failures[case_id] = _unlisted_problem(case_id, base / image_dir, list_path)
                continue
            image_path = os.path.abspath(images[case_id])
            mask_path = None
            if mask_dir is not None:
                if case_id in masks:
                    mask_path = os.path.abspath(masks[case_id])
                elif kind == "labeled":
                    found.failures[case_id] = (f"{base / mask_dir}: no mask for case {case_id!r} "
                                               f"(expected {case_id}.nii.gz); image {image_path}")
                    continue
            found.raw[kind][case_id] = {"image_path": image_path, "mask_path": mask_path}
            if kind == "test":
                continue
            if kind == "unlabeled" and case_id in found.cases["labeled"]:
                found.failures[f"{case_id} (unlabeled)"] = (f"{image_path}: case id {case_id!r} is also a labeled "
                                                            "case; rename one of them")
                del found.raw[kind][case_id]
                continue
            found.cases[kind][case_id] = (image_path, mask_path)
        if kind == "labeled":
            orphans = sorted(set(masks) - set(images) - found.refused)  # a refused id's failure names its files
            for case_id in orphans:
                logger.warning("%s: mask without an image in %s", masks[case_id], base / image_dir)
    return found


# ---------------------------------------------------------------------------------------------------- split


def fold_draw(case_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the case id and the seed alone (SHA-256): where the case falls in the split."""
    digest = hashlib.sha256(f"{int(seed)}:{case_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_fold1(ids: Sequence[str], val_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """Train/val split of fold 1 in which a case's side depends on its id (and the seed) alone.

    A case validates when `fold_draw(id, seed) < val_ratio`, so about val_ratio of the cases validate, and a
    case failing, being fixed, added or removed never moves another case between train and val (training on a
    resumed run sees the same validation cases). Only in the degenerate case of an empty side with n >= 2 the
    case nearest the threshold is moved over (with a warning). One labeled case: it is both the training and
    the validation case.
    """
    ids = sorted(ids)
    n = len(ids)
    if n == 0:
        return [], []
    if n == 1:
        return list(ids), list(ids) if val_ratio > 0 else []
    draws = {case_id: fold_draw(case_id, seed) for case_id in ids}
    val = [i for i in ids if draws[i] < val_ratio]
    train = [i for i in ids if draws[i] >= val_ratio]
    if val_ratio > 0 and not val:
        moved = min(train, key=draws.__getitem__)
        logger.warning("no case drew validation at val_ratio=%s; %s validates (this depends on the other ids)",
                       val_ratio, moved)
        train.remove(moved)
        val = [moved]
    elif not train:
        moved = max(val, key=draws.__getitem__)
        logger.warning("every case drew validation at val_ratio=%s; %s trains (this depends on the other ids)",
                       val_ratio, moved)
        val.remove(moved)
        train = [moved]
    return train, val


def split_fold1_pinned(ids: Sequence[str], val_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Fold-1 split given by a list of validation ids (FOLD1_VAL_LIST): exactly the listed labeled cases validate,
    every other labeled case trains. Listed ids that are not (prepared) labeled cases are named and left out; one
    labeled case in all is both the training and the validation case, as in `split_fold1`."""
    ids = sorted(ids)
    wanted = set(val_ids)
    unknown = sorted(wanted - set(ids))
    if unknown:
        logger.warning("%d id(s) of %s are not prepared labeled cases and are left out: %s", len(unknown),
                       FOLD1_VAL_LIST, ", ".join(unknown))
    if len(ids) == 1:
        return list(ids), list(ids)
    val = [i for i in ids if i in wanted]
    train = [i for i in ids if i not in wanted]
    if not train:
        logger.warning("%s lists every labeled case: fold 1 has no training case", FOLD1_VAL_LIST)
    return train, val


def split_5fold(train1: Sequence[str], val1: Sequence[str], val_ratio: float = 0.2,
                seed: int = 0) -> dict[int, tuple[list[str], list[str]]]:
    """Folds 2..5: the fold-1 training cases in four quarters by their own draw (`fold_draw`, rescaled from
    [val_ratio, 1) to [0, 4)), so membership again depends on the id alone; fold k validates on quarter k-2 and
    trains on the other quarters + the fold-1 validation cases."""
    quarters: list[list[str]] = [[], [], [], []]
    span = max(1.0 - val_ratio, 1e-12)
    for case_id in sorted(train1):
        position = (fold_draw(case_id, seed) - val_ratio) / span
        quarters[min(3, max(0, int(position * 4)))].append(case_id)
    folds = {}
    for k in range(2, 6):
        val = quarters[k - 2]
        train = sorted([c for i, q in enumerate(quarters) if i != k - 2 for c in q] + list(val1))
        folds[k] = (train, list(val))
    return folds


def _replace(path: Path, records: dict[str, dict]) -> None:
    """Make the database at `path` hold exactly `records`. No other stage writes into the dataset's databases
    (the fine stage's boxes and UIF pool live under its own output_dir), so there is nothing to keep."""
    store = LmdbStore(path, readonly=False)
    try:
        store.replace_all(records)
    finally:
        store.close()


def write_splits(db_dir: Path, cfg: PrepareConfig, labeled: dict[str, dict], unlabeled: dict[str, dict]) -> dict:
    """Write the fold and seg_trainu databases (values copied from the pre-process records); returns the split."""
    pin_path = db_dir.parent / cfg.file_list_dir / FOLD1_VAL_LIST
    pinned = pin_path.is_file()
    if pinned:
        train1, val1 = split_fold1_pinned(list(labeled), _read_id_list(pin_path))
        logger.info("fold 1 validation from %s: %d train / %d val", pin_path, len(train1), len(val1))
    else:
        train1, val1 = split_fold1(list(labeled), cfg.val_ratio, cfg.split_seed)
    if len(labeled) == 1:
        logger.warning("only one labeled case: it is used for both training and validation")
    elif not val1:
        logger.warning("val_ratio=%s leaves the validation fold empty", cfg.val_ratio)
    folds = {1: (train1, val1)}
    if cfg.split_5fold:  # pinned: the training cases' draws span all of [0, 1), not [val_ratio, 1)
        folds.update(split_5fold(train1, val1, 0.0 if pinned else cfg.val_ratio, cfg.split_seed))
    for k in range(1, 6):
        for part in ("train", "val"):
            path = db_dir / f"seg_{part}_fold_{k}"
            if k not in folds:
                if path.exists():  # a stale fold from an earlier 5-fold run would silently train on old data
                    logger.info("removing %s (split_5fold is off)", path)
                    shutil.rmtree(path)
                continue
            ids = folds[k][0] if part == "train" else folds[k][1]
            _replace(path, {i: labeled[i] for i in ids})
    _replace(db_dir / "seg_trainu", unlabeled)
    split = {"split_seed": cfg.split_seed, "val_ratio": cfg.val_ratio, "split_5fold": cfg.split_5fold,
             "folds": {str(k): {"train": tr, "val": va} for k, (tr, va) in folds.items()},
             "trainu": sorted(unlabeled)}
    if pinned:
        split["fold1_val_list"] = str(pin_path)
    write_json_atomic(db_dir / "split.json", split)
    return split


# ---------------------------------------------------------------------------------------------------- main


OUTPUT_KINDS = ("coarse_image", "coarse_mask", "fine_image", "fine_mask", "region_image", "region_mask")


def _output_dirs(cfg: PrepareConfig, base: Path) -> list[Path]:
    """The folders the case arrays are written into (as `CaseTask.out_path` names them)."""
    task = CaseTask("x", "labeled", "", None, str(base), tuple(cfg.coarse_size_zyx), tuple(cfg.fine_size_zyx),
                    cfg.extend_size_mm, cfg.max_extend_size_mm)
    return [task.out_path(kind).parent for kind in OUTPUT_KINDS]


def main(cfg: PrepareConfig) -> int:
    """Prepare the dataset at cfg.data_base_dir; returns the exit code (0 all good, 1 something failed,
    2 setup error: no dataset folder, an unwritable one, a damaged database, another run on the same folder)."""
    base = Path(cfg.data_base_dir).absolute()
    if not base.is_dir():
        setup_logging(None)
        logger.error("%s: dataset folder not found (set data_base_dir in config.yaml or data_base_dir=PATH)", base)
        return 2
    db_dir = base / "db"
    try:
        layout = dataset_layout(cfg, base)  # a bad dataset.json: one message, nothing written
        problems = verify_nnunet(layout, base) if layout.name == "nnunet" else []
        if not problems:
            check_writable(db_dir, "dataset's db folder")
    except InputError as e:
        setup_logging(None)
        logger.error("%s", e)
        return 2
    if problems:
        setup_logging(None)
        for problem in problems:
            logger.error("%s", problem)
        logger.error("%s: %d problem(s) with the nnU-Net raw dataset; nothing was prepared", base, len(problems))
        return 2
    setup_logging(db_dir / "data_prepare.log")
    try:
        with folder_lock(db_dir, "data_prepare run"):
            for folder in (*_output_dirs(cfg, base), db_dir):
                if folder.exists():  # a read-only output folder fails now, not after a prepared case
                    check_writable(folder, "output folder")
                remove_stale_temps(folder)  # left by a killed run (full volumes in size)
            return _prepare(cfg, base, db_dir, layout)
    except InputError as e:
        logger.error("%s", e)
        return 2
    except WriteError as e:  # a database or list a full disk cut short: finished cases are kept, a rerun goes on
        logger.error("%s", e)
        return 1


def _prepare(cfg: PrepareConfig, base: Path, db_dir: Path, layout: DatasetLayout) -> int:
    start = time.perf_counter()
    logger.info("data_prepare: %s (workers %d, overwrite %s)", base, cfg.num_workers, cfg.overwrite)
    logger.info("%s layout, labels %s: %s", layout.name, layout.labels.name,
                ", ".join(f"{label.id} {label.name}" for label in layout.labels))
    found = discover(cfg, base, layout)

    for kind, name in DB_RAW.items():
        _replace(db_dir / name, found.raw[kind])

    stores = {kind: LmdbStore(db_dir / DB_PRE[kind], readonly=False) for kind in DB_PRE}
    try:
        return _prepare_cases(cfg, base, db_dir, layout, found, stores, start)
    finally:
        for store in stores.values():  # a later run in this process opens them anew (and checks them again)
            store.close()


def _prepare_cases(cfg: PrepareConfig, base: Path, db_dir: Path, layout: DatasetLayout, found: Discovery,
                   stores: dict[str, LmdbStore], start: float) -> int:
    tasks: list[CaseTask] = []
    done = 0
    for kind in ("labeled", "unlabeled"):
        existing = stores[kind].to_dict()
        for stale in sorted(set(existing) - set(found.cases[kind])):
            logger.info("removing record %s from %s (no longer among the %s cases)", stale, DB_PRE[kind], kind)
            stores[kind].delete(stale)
        for case_id, (image_path, mask_path) in found.cases[kind].items():
            task = CaseTask(case_id, kind, image_path, mask_path, str(base), tuple(cfg.coarse_size_zyx),
                            tuple(cfg.fine_size_zyx), cfg.extend_size_mm, cfg.max_extend_size_mm,
                            layout.labels.num_organs)
            if not cfg.overwrite and _is_finished(task, existing.get(case_id)):
                done += 1
                continue
            tasks.append(task)
    n_cases = done + len(tasks)
    logger.info("%d cases (%d labeled, %d unlabeled): %d already prepared, %d to prepare; %d test images listed",
                n_cases, len(found.cases["labeled"]), len(found.cases["unlabeled"]), done, len(tasks),
                len(found.raw["test"]))

    failures = dict(found.failures)

    def store_result(result: CaseResult) -> None:
        if result.record is not None:
            stores[result.kind].put(result.case_id, result.record)
        else:
            failures[result.case_id] = result.error or "unknown error"
            stores[result.kind].delete(result.case_id)  # an older record no longer matches the input
            logger.error("FAILED %s", result.error)

    work_start = time.perf_counter()
    results = run_tasks(tasks, cfg.num_workers, store_result)
    work_seconds = time.perf_counter() - work_start

    write_dataset_labels(db_dir, layout.labels)
    labeled = stores["labeled"].to_dict()
    unlabeled = stores["unlabeled"].to_dict()
    split = write_splits(db_dir, cfg, labeled, unlabeled)
    write_json_atomic(db_dir / "data_prepare_config.json", config_to_dict(cfg))

    failed_path = write_failures(db_dir, failures, found.skipped)

    n_new = len(results) - sum(r.record is None for r in results)
    rate = f" ({len(results) / work_seconds * 60.0:.1f} cases/min)" if results and work_seconds > 0 else ""
    fold1 = split["folds"]["1"]
    logger.info("prepared %d cases%s, %d already done, %d failed; fold 1: %d train / %d val, %d unlabeled; %.1f s",
                n_new, rate, done, len(failures), len(fold1["train"]), len(fold1["val"]), len(unlabeled),
                time.perf_counter() - start)
    if failures:
        logger.error("%d cases failed (listed in %s):", len(failures), failed_path)
        for case_id, message in sorted(failures.items()):
            logger.error("  %s: %s", case_id, message.splitlines()[0])
        return 1
    return 0


def write_failures(db_dir: Path, failures: dict[str, str], skipped: list[str]) -> Path:
    """db/failed_cases.txt: every failed case with its reason and every skipped file (removed when there are none);
    returns its path."""
    failed_path = db_dir / FAILED_FILE
    if failures or skipped:
        lines = [f"# data_prepare {time.strftime('%Y-%m-%d %H:%M:%S')}: {len(failures)} failed cases "
                 "(fix the input and rerun: finished cases are skipped)"]
        lines += [f"{case_id}\t{message.splitlines()[0]}" for case_id, message in sorted(failures.items())]
        if skipped:
            lines.append(f"# {len(skipped)} files skipped (not cases)")
            lines += [f"# skipped\t{entry}" for entry in skipped]
        write_text_atomic(failed_path, "\n".join(lines) + "\n")
    elif failed_path.exists():
        failed_path.unlink()
    return failed_path


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m data_prepare.run [config=PATH] [key=value ...]`."""
    try:
        cfg = parse_cli(PrepareConfig, STAGE_DIR / "config.yaml", list(sys.argv[1:] if argv is None else argv))
    except HelpRequested as help_text:
        print(help_text.text)
        return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return main(cfg)


if __name__ == "__main__":
    sys.exit(cli())
