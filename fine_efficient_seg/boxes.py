"""The boxes step: an organ box for every unlabeled case, stored under the experiment's output_dir (DESIGN 5.5).

The fine stage crops unlabeled cases where prediction will crop them: around the organs the coarse model finds
(reference 6.2 steps 2-5). The exported coarse model runs on each case's prepared coarse array (160^3 npy), and
the predictor's rule `common.infer.postprocess.coarse_organ_box` gives the box in raw canonical voxels (largest
component per organ, the largest region's z-window, index x raw/coarse zoom), or, where the coarse prediction is
empty, the whole volume, as prediction does. Without a coarse model (null or missing folder) the body box (HU >
AIR_HU on the coarse array) is used and a warning says so.

Stored in `<output_dir>/db/unlabeled_boxes` (LMDB, key = case id; the dataset's databases are only read):
`coarse_box` [[z0, z1], [y0, y1], [x0, x1]] (inclusive, canonical raw voxels), `coarse_box_source`
("coarse_model"; "whole_volume": the model found no organ; "body": no model) and the case's region: the only
copy of an unlabeled image that fine training and UIF crop from, box + `region_margin_mm`
(`common.volume.boxes.region_slices`, the rule of the labeled regions; the fine stage passes
crop.max_extend_size_mm, >= crop.extend_size_mm, so every crop it draws lies inside), cut from the raw image as
data_prepare reads it (`common.storage.image_io.read_canonical_ct`) and written atomically to
`<output_dir>/db/unlabeled_regions/<id>.npy` (int16): `region_path`, `region_offset_zyx`, `region_shape_zyx`,
`region_margin_mm`. The dataset keeps no whole-volume copy of an unlabeled case.

Resume: a case is done when its record has a box of the wanted source and a region file of the wanted margin; a
case with a box but no such region gets only its region (no model run), the others both. Records are written in
batches, one transaction each, after their region files, so a killed step redoes at most one batch and a rerun
with the same inputs writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.core.amp import amp_settings, autocast
from common.core.errors import InputError
from common.core.files import remove_stale_temps, save_npy_atomic
from common.core.labelmaps import LOGIT_THRESHOLD, probs_to_labels
from common.core.logger import get_logger, progress
from common.infer.postprocess import coarse_organ_box
from common.storage.data_paths import resolve_data_path
from common.storage.image_io import read_canonical_ct
from common.storage.lmdb_store import open_store
from common.storage.model_folder import ExportedModel
from common.storage.records import CaseBox, PreparedCase, Region
from common.storage.step_marker import file_stamp
from common.storage.weights import load_model
from common.train.distributed import get_world_size, is_main_process, run_on_every_rank, shard
from common.volume.boxes import Box, body_box, grid_box_to_raw, region_slices
from common.volume.intensity import AIR_HU
from common.volume.network_input import prepare_input

logger = get_logger(__name__)

# Where a stored box came from: the coarse model's organ box; the whole volume where that model found no organ (the
# predictor's fallback; "body_fallback" in records of earlier versions); the body box when no coarse model is given.
COARSE_MODEL, WHOLE_VOLUME, BODY = "coarse_model", "whole_volume", "body"
MODEL_SOURCES = (COARSE_MODEL, WHOLE_VOLUME, "body_fallback")
WRITE_BATCH = 32


@dataclass
class CoarseBoxFinder:
    """The coarse model's organ box on one prepared coarse array."""

    model: ExportedModel
    device: torch.device
    precision: str = "bf16"

    @torch.no_grad()
    def __call__(self, image_hu: np.ndarray, spacing_zyx: Sequence[float],
                 raw_shape_zyx: Sequence[int]) -> tuple[Box, bool]:
        """image_hu: the case's coarse array (any size; resized to the model's size on the device).
        Returns the inclusive box in raw canonical voxels and whether it is the whole-volume fallback
        (`common.infer.postprocess.coarse_organ_box`, the predictor's rule, with the coarse model's settings)."""
        pre = self.model.preprocess
        x = torch.from_numpy(np.ascontiguousarray(image_hu)).to(self.device)[None, None]
        x = prepare_input(x, pre.size_zyx, pre.hu_window)
        with autocast(amp_settings(self.precision, self.device)):
            logits = self.model.net(x)
        labels = probs_to_labels(logits[0].float(), LOGIT_THRESHOLD).cpu().numpy()
        return coarse_organ_box(labels, raw_shape_zyx, spacing_zyx, pre)


def load_coarse_model(model_dir: str | None, device: torch.device) -> ExportedModel | None:
    """The exported coarse model, or None (with a warning) when no folder is configured or it has no model."""
    if model_dir is None:
        logger.warning("boxes.coarse_model_dir is null: unlabeled cases are cropped around the body box "
                       "(HU > %.0f), not around the organs as at prediction time", AIR_HU)
        return None
    if not (Path(model_dir) / "model.pt").is_file():
        logger.warning("no coarse model in %s: unlabeled cases are cropped around the body box (HU > %.0f); "
                       "train coarse_base_seg and export it for organ boxes", model_dir, AIR_HU)
        return None
    return load_model(model_dir, "coarse", device)


def compute_boxes(
    unlabeled_db: Path,
    boxes_db: Path,
    data_base_dir: str | Path,
    coarse_model_dir: str | None,
    device: torch.device,
    precision: str = "bf16",
    *,
    regions_dir: Path,
    region_margin_mm: float,
) -> dict[str, Any]:
    """Store a `coarse_box` and its region in `boxes_db` (under the experiment's output_dir) for every case of
    `unlabeled_db` (read only) that lacks one of the wanted source, and a region (box + `region_margin_mm`, an
    int16 .npy in `regions_dir`) for every case that lacks one of that margin.

    Under DDP the ranks share the work: each computes the boxes and writes the region files of its share (`shard`)
    of WRITE_BATCH cases per rank at a time, and rank 0 writes the records, so the step resumes where it stopped.
    A failure on any rank ends every rank at once with its message (`run_on_every_rank`). Returns a summary
    {"cases", "computed" (boxes), "regions" (region files written), "skipped", "fallback", "source"} (the same
    on every rank).
    """
    step = _BoxesStep(unlabeled_db, boxes_db, Path(data_base_dir), Path(regions_dir).absolute(),
                      float(region_margin_mm))
    try:
        todo = run_on_every_rank(lambda: step.plan(coarse_model_dir, device, precision), "boxes")[0]
        summary = {"cases": step.cases, "computed": 0, "regions": 0, "skipped": step.cases - len(todo),
                   "fallback": 0, "source": step.wanted}
        if not todo:
            logger.info("boxes: all %d unlabeled cases already have a %s box and a %g mm region in %s",
                        step.cases, step.wanted, step.margin_mm, boxes_db)
            return summary
        logger.info("boxes: %d of %d unlabeled cases need a box or region (source: %s, margin %g mm) -> %s, %s",
                    len(todo), step.cases, step.wanted, step.margin_mm, boxes_db, step.regions_dir)
        per_round = WRITE_BATCH * get_world_size()
        bar = progress(total=len(todo), desc="boxes", unit="case", disable=not is_main_process())
        for start in range(0, len(todo), per_round):
            chunk = todo[start:start + per_round]
            results = {k: v for part in run_on_every_rank(lambda chunk=chunk: step.boxes(chunk), "boxes")
                       for k, v in part.items()}
            for case_id, stored in chunk:
                computed = stored is None
                summary["computed"] += int(computed)
                summary["regions"] += 1
                summary["fallback"] += int(computed and results[case_id].source != step.wanted)
            # The write runs through run_on_every_rank too, so a failing write on rank 0 stops every rank.
            run_on_every_rank(lambda results=results: step.store_boxes(results), "boxes")
            bar.update(len(chunk))
        bar.close()
    finally:
        step.close()
    if summary["fallback"]:
        logger.warning("boxes: %d case(s) fell back to the whole volume (empty coarse prediction)",
                       summary["fallback"])
    return summary


class _BoxesStep:
    """The boxes step's state on one rank: the model's box finder, the (read-only) unlabeled database and, on rank 0,
    the boxes database."""

    def __init__(self, unlabeled_db: Path, boxes_db: Path, data_base_dir: Path, regions_dir: Path,
                 margin_mm: float) -> None:
        self.unlabeled_db, self.boxes_db, self.data_base_dir = unlabeled_db, boxes_db, data_base_dir
        self.regions_dir, self.margin_mm = regions_dir, margin_mm
        self.finder: CoarseBoxFinder | None = None
        self.wanted = BODY
        self.cases = 0
        self.source: Any = None
        self.store: Any = None

    def plan(self, coarse_model_dir: str | None, device: torch.device,
             precision: str) -> list[tuple[str, CaseBox | None]] | None:
        """Every rank: load the model, open the source. Rank 0: the cases to do, with the stored box of a case that
        needs only its region (None: box and region)."""
        model = load_coarse_model(coarse_model_dir, device)
        self.wanted = COARSE_MODEL if model is not None else BODY
        self.finder = CoarseBoxFinder(model, device, precision) if model is not None else None
        self.source = open_store(self.unlabeled_db, readonly=True)
        self.cases = len(self.source.keys())
        if not is_main_process():
            return None
        self.store = open_store(self.boxes_db, readonly=False)  # only rank 0 opens (and writes) it
        remove_stale_temps(self.regions_dir)  # left by a killed run; no rank writes a region before plan returns
        todo: list[tuple[str, CaseBox | None]] = []
        for key in self.source.keys():
            stored = self.store.get(key)
            box = CaseBox.from_json(stored) if stored is not None else None
            if box is None or not _keeps_box(box, self.wanted):
                todo.append((key, None))
            elif not _has_region(box, self.margin_mm):
                todo.append((key, box))
        return todo

    def boxes(self, chunk: Sequence[tuple[str, CaseBox | None]]) -> dict[str, CaseBox]:
        """This rank's share of `chunk`: each case's box (computed, or the stored one) with its region written."""
        out = {}
        for case_id, stored in shard(chunk):
            case = PreparedCase.from_json(case_id, self.source.get(case_id), self.unlabeled_db)
            box, kind = (stored.coarse_box, stored.source) if stored is not None else \
                _case_box(case, self.data_base_dir, self.unlabeled_db, self.finder)
            region = write_region(case, box, self.regions_dir, self.margin_mm, self.data_base_dir, self.unlabeled_db)
            out[case_id] = CaseBox(box, kind, region)
        return out

    def store_boxes(self, boxes: dict[str, CaseBox]) -> None:
        if is_main_process():
            self.store.put_many({case_id: box.to_json() for case_id, box in boxes.items()})

    def close(self) -> None:
        for store in (self.store, self.source):
            if store is not None:
                store.close()


def _keeps_box(box: CaseBox, wanted: str) -> bool:
    # A model box (or the fallback the model led to) is kept; a no-model body box is redone once a model exists.
    # Delete `coarse_box` from the records to recompute them with another coarse model.
    return box.source in MODEL_SOURCES or box.source == wanted


def _has_region(box: CaseBox, margin_mm: float) -> bool:
    """The stored box's region is there, cut with `margin_mm` (region files are written atomically: present means
    complete)."""
    region = box.region
    return region is not None and region.margin_mm == margin_mm and Path(region.image_path).is_file()


def _needs(case: PreparedCase, db: Path, *keys: str) -> None:
    missing = [key for key in keys if getattr(case, key) is None]
    if missing:
        raise InputError(db, f"record {case.case_id!r} lacks {', '.join(missing)} (re-run data_prepare)")


def write_region(case: PreparedCase, box: Box, regions_dir: Path, margin_mm: float, data_base_dir: str | Path,
                 db: Path) -> Region:
    """Cut box + `margin_mm` (`region_slices`) from the case's raw image, canonical int16 as data_prepare reads it
    (`read_canonical_ct`), and write it atomically to `regions_dir/<id>.npy`; returns the region.

    InputError when the raw image changed since data_prepare prepared the case (its box would not fit it)."""
    _needs(case, db, "image_path", "shape_zyx", "spacing_zyx")
    path = resolve_data_path(case.image_path, data_base_dir)
    stamp = (case.source or {}).get("image")
    try:
        changed = stamp is not None and file_stamp(path) != stamp
    except OSError as exc:
        raise InputError(path, f"cannot read the image of unlabeled case {case.case_id}: {exc}") from exc
    if changed:
        raise InputError(path, f"changed since data_prepare prepared case {case.case_id} (size or mtime differ); "
                               "re-run data_prepare, then the boxes step")
    image, _, _ = read_canonical_ct(path)
    if tuple(image.shape) != case.shape_zyx:
        raise InputError(path, f"canonical shape {tuple(image.shape)} differs from the prepared {case.shape_zyx} of "
                               f"case {case.case_id}; re-run data_prepare, then the boxes step")
    region = region_slices(box, case.spacing_zyx, margin_mm, case.shape_zyx)  # type: ignore[arg-type]
    out = regions_dir / f"{case.case_id}.npy"
    save_npy_atomic(out, np.ascontiguousarray(image[region]))  # np.save of a strided view is very slow
    return Region.from_slices(str(out), None, region, margin_mm)


def _case_box(case: PreparedCase, data_base_dir: str | Path, db: Path,
              finder: CoarseBoxFinder | None) -> tuple[Box, str]:
    _needs(case, db, "coarse_image_path", "shape_zyx", "spacing_zyx")
    path = resolve_data_path(case.coarse_image_path, data_base_dir)  # type: ignore[arg-type]
    try:
        image = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the coarse image of case {case.case_id}: {exc}") from exc
    raw_shape = case.shape_zyx
    assert raw_shape is not None and case.spacing_zyx is not None
    if finder is not None:
        box, fallback = finder(image, case.spacing_zyx, raw_shape)
        if fallback:
            logger.warning("boxes: the coarse model finds no organ in %s; using the whole volume", case.case_id)
        return box, WHOLE_VOLUME if fallback else COARSE_MODEL
    grid_box = body_box(image)
    if grid_box is None:
        logger.warning("boxes: %s has no voxel above %.0f HU; using the whole volume", case.case_id, AIR_HU)
        return tuple((0, n - 1) for n in raw_shape), BODY  # type: ignore[return-value]
    return grid_box_to_raw(grid_box, image.shape, raw_shape), BODY
