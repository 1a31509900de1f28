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
from tqdm import tqdm

from common.core.amp import amp_settings, autocast
from common.core.errors import InputError
from common.core.files import remove_stale_temps, save_npy_atomic
from common.core.labelmaps import LOGIT_THRESHOLD, probs_to_labels
from common.core.logger import get_logger
from common.infer.postprocess import coarse_organ_box
from common.storage.data_paths import resolve_data_path
from common.storage.image_io import read_canonical_ct
from common.storage.lmdb_store import open_store
from common.storage.model_folder import ExportedModel
from common.storage.step_marker import file_stamp
from common.storage.weights import load_model
from common.train.distributed import get_world_size, is_main_process, run_on_every_rank, shard
from common.volume.boxes import Box, body_box, grid_box_to_raw, region_slices
from common.volume.intensity import AIR_HU
from common.volume.network_input import prepare_input
from fine_efficient_seg.dataset import COARSE_BOX_KEY, as_box

logger = get_logger(__name__)

BOX_SOURCE_KEY = "coarse_box_source"
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
    planned: dict[str, Any] = {}
    regions_dir = Path(regions_dir).absolute()
    margin_mm = float(region_margin_mm)

    def plan() -> list[tuple[str, dict | None]] | None:  # every rank: model, (read-only) source; rank 0: the store
        model = load_coarse_model(coarse_model_dir, device)
        planned["wanted"] = COARSE_MODEL if model is not None else BODY
        planned["finder"] = CoarseBoxFinder(model, device, precision) if model is not None else None
        planned["source"] = source = open_store(unlabeled_db, readonly=True)
        planned["cases"] = len(source.keys())
        if not is_main_process():
            return None
        planned["store"] = store = open_store(boxes_db, readonly=False)  # only rank 0 opens (and writes) it
        remove_stale_temps(regions_dir)  # left by a killed run; no rank writes a region before this plan returns
        todo: list[tuple[str, dict | None]] = []
        for key in source.keys():
            record = store.get(key)
            if not _has_box(record, planned["wanted"]):
                todo.append((key, None))      # box and region
            elif not _has_region(record, margin_mm):
                todo.append((key, record))    # the region of the stored box only
        return todo

    try:
        todo = run_on_every_rank(plan, "boxes")[0]  # rank 0's list: the boxes store is read there only
        source = planned["source"]
        finder, wanted = planned["finder"], planned["wanted"]
        summary = {"cases": planned["cases"], "computed": 0, "regions": 0, "skipped": planned["cases"] - len(todo),
                   "fallback": 0, "source": wanted}
        if not todo:
            logger.info("boxes: all %d unlabeled cases already have a %s box and a %g mm region in %s",
                        summary["cases"], wanted, margin_mm, boxes_db)
            return summary
        logger.info("boxes: %d of %d unlabeled cases need a box or region (source: %s, margin %g mm) -> %s, %s",
                    len(todo), summary["cases"], wanted, margin_mm, boxes_db, regions_dir)
        per_round = WRITE_BATCH * get_world_size()
        bar = tqdm(total=len(todo), desc="boxes", unit="case", disable=not is_main_process())
        for start in range(0, len(todo), per_round):
            chunk = todo[start:start + per_round]

            def boxes_here(chunk: list[tuple[str, dict | None]] = chunk) -> dict[str, dict[str, Any]]:
                out = {}
                for case_id, stored in shard(chunk):
                    record = source.get(case_id)
                    if stored is None:
                        box, kind = _case_box(case_id, record, data_base_dir, unlabeled_db, finder)
                    else:
                        box, kind = as_box(stored[COARSE_BOX_KEY]), stored[BOX_SOURCE_KEY]
                    region = write_region(case_id, record, box, regions_dir, margin_mm, data_base_dir, unlabeled_db)
                    out[case_id] = {COARSE_BOX_KEY: [list(pair) for pair in box], BOX_SOURCE_KEY: kind, **region,
                                    "_computed": stored is None}
                return out

            results = {k: v for part in run_on_every_rank(boxes_here, "boxes") for k, v in part.items()}
            pending: dict[str, dict] = {}
            for case_id, _ in chunk:
                entry = results[case_id]
                computed = entry.pop("_computed")
                summary["computed"] += int(computed)
                summary["regions"] += 1
                summary["fallback"] += int(computed and entry[BOX_SOURCE_KEY] != wanted)
                pending[case_id] = entry
            # The write runs through run_on_every_rank too, so a failing write on rank 0 stops every rank.
            run_on_every_rank(lambda pending=pending: planned["store"].put_many(pending)
                              if is_main_process() else None, "boxes")
            bar.update(len(chunk))
        bar.close()
    finally:
        for name in ("store", "source"):
            if name in planned:
                planned[name].close()
    if summary["fallback"]:
        logger.warning("boxes: %d case(s) fell back to the whole volume (empty coarse prediction)",
                       summary["fallback"])
    return summary


def _has_box(record: dict | None, wanted: str) -> bool:
    if record is None or record.get(COARSE_BOX_KEY) is None:
        return False
    source = record.get(BOX_SOURCE_KEY)
    # A model box (or the body box the model fell back to) is kept; a no-model body box is redone once a model
    # exists. Delete `coarse_box` from the records to recompute them with another coarse model.
    return source in MODEL_SOURCES or source == wanted


def _has_region(record: dict, margin_mm: float) -> bool:
    """The stored box's region is there, cut with `margin_mm` (region files are written atomically: present means
    complete)."""
    path = record.get("region_path")
    return (path is not None and record.get("region_margin_mm") == margin_mm
            and record.get("region_offset_zyx") is not None and record.get("region_shape_zyx") is not None
            and Path(path).is_file())


def write_region(case_id: str, record: dict, box: Box, regions_dir: Path, margin_mm: float,
                 data_base_dir: str | Path, db: Path) -> dict[str, Any]:
    """Cut box + `margin_mm` (`region_slices`) from the case's raw image, canonical int16 as data_prepare reads it
    (`read_canonical_ct`), and write it atomically to `regions_dir/<id>.npy`; returns the record's region fields.

    InputError when the raw image changed since data_prepare prepared the case (its box would not fit it)."""
    for key in ("image_path", "shape_zyx", "spacing_zyx"):
        if record.get(key) is None:
            raise InputError(db, f"record {case_id!r} lacks {key} (re-run data_prepare)")
    path = resolve_data_path(record["image_path"], data_base_dir)
    stamp = (record.get("source") or {}).get("image")
    try:
        changed = stamp is not None and file_stamp(path) != stamp
    except OSError as exc:
        raise InputError(path, f"cannot read the image of unlabeled case {case_id}: {exc}") from exc
    if changed:
        raise InputError(path, f"changed since data_prepare prepared case {case_id} (size or mtime differ); "
                               "re-run data_prepare, then the boxes step")
    image, _, _ = read_canonical_ct(path)
    shape = tuple(int(v) for v in record["shape_zyx"])
    if tuple(image.shape) != shape:
        raise InputError(path, f"canonical shape {tuple(image.shape)} differs from the prepared {shape} of case "
                               f"{case_id}; re-run data_prepare, then the boxes step")
    region = region_slices(box, record["spacing_zyx"], margin_mm, shape)
    out = regions_dir / f"{case_id}.npy"
    save_npy_atomic(out, np.ascontiguousarray(image[region]))  # np.save of a strided view is very slow
    return {"region_path": str(out), "region_offset_zyx": [int(s.start) for s in region],
            "region_shape_zyx": [int(s.stop - s.start) for s in region], "region_margin_mm": float(margin_mm)}


def _case_box(case_id: str, record: dict, data_base_dir: str | Path, db: Path,
              finder: CoarseBoxFinder | None) -> tuple[Box, str]:
    for key in ("coarse_image_path", "shape_zyx", "spacing_zyx"):
        if record.get(key) is None:
            raise InputError(db, f"record {case_id!r} lacks {key} (re-run data_prepare)")
    path = resolve_data_path(record["coarse_image_path"], data_base_dir)
    try:
        image = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the coarse image of case {case_id}: {exc}") from exc
    raw_shape = tuple(int(s) for s in record["shape_zyx"])
    if finder is not None:
        box, fallback = finder(image, record["spacing_zyx"], raw_shape)
        if fallback:
            logger.warning("boxes: the coarse model finds no organ in %s; using the whole volume", case_id)
        return box, WHOLE_VOLUME if fallback else COARSE_MODEL
    grid_box = body_box(image)
    if grid_box is None:
        logger.warning("boxes: %s has no voxel above %.0f HU; using the whole volume", case_id, AIR_HU)
        return tuple((0, n - 1) for n in raw_shape), BODY  # type: ignore[return-value]
    return grid_box_to_raw(grid_box, image.shape, raw_shape), BODY
