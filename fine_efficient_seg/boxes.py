"""The boxes step: an organ box for every unlabeled case, stored in its LMDB record (DESIGN 5.5).

The fine stage crops unlabeled cases where prediction will crop them: around the organs the coarse model finds
(reference 6.2 steps 2-5). The exported coarse model runs on each case's prepared coarse array (160^3 npy),
followed by sigmoid, largest component per organ, `coarse_box` (largest region's z-window intersected with the
labelled bbox) and the mapping to raw canonical voxels (index x raw/coarse zoom, as prediction does). Without a
coarse model (null or missing folder), or where the coarse prediction is empty, the body box (HU > -500 on the
coarse array) is used and a warning says so.

Stored in each record: `coarse_box` [[z0, z1], [y0, y1], [x0, x1]] (inclusive, canonical raw voxels) and
`coarse_box_source` ("coarse_model"; "body": no model; "body_fallback": the model found no organ). Records that
already hold a box of the wanted source are skipped, so the step resumes where it stopped; writes go in batches,
one transaction each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.amp import amp_settings, autocast
from common.checkpoint import ExportedModel, load_exported_model
from common.distributed import get_world_size, is_main_process, run_on_every_rank, shard
from common.errors import InputError
from common.lmdb_store import open_store
from common.logger import get_logger
from common.networks.input_layer import prepare_input
from common.postprocess import coarse_box, keep_largest_component, probs_to_labels
from fine_efficient_seg.dataset import COARSE_BOX_KEY, resolve_data_path

logger = get_logger(__name__)

BOX_SOURCE_KEY = "coarse_box_source"
BODY_THRESHOLD_HU = -500.0
COARSE_MIN_VOLUME_MM3 = 1000.0   # reference 6.2 step 3
COARSE_Z_WINDOW_MM = 240.0       # reference 6.2 step 4
WRITE_BATCH = 32

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def box_to_raw(box: Sequence[Sequence[int]], grid_shape_zyx: Sequence[int], raw_shape_zyx: Sequence[int]) -> Box:
    """Map an inclusive box on a resized grid to raw voxels: int(index * raw/grid) per end (reference 6.2
    step 5), clipped to the volume. Returns an inclusive raw box."""
    out = []
    for (lo, hi), n_grid, n_raw in zip(box, grid_shape_zyx, raw_shape_zyx):
        zoom = float(n_raw) / float(n_grid)
        lo_raw = min(max(int(lo * zoom), 0), int(n_raw) - 1)
        hi_raw = min(max(int(hi * zoom), lo_raw), int(n_raw) - 1)
        out.append((lo_raw, hi_raw))
    return tuple(out)  # type: ignore[return-value]


def body_box(image_hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> Box | None:
    """Inclusive bbox of the voxels above `threshold_hu` (the body), or None if there are none."""
    inside = image_hu > threshold_hu
    if not inside.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(inside.any(axis=other))
        box.append((int(hits[0]), int(hits[-1])))
    return tuple(box)  # type: ignore[return-value]


@dataclass
class CoarseBoxFinder:
    """The coarse model's organ box on one prepared coarse array."""

    model: ExportedModel
    device: torch.device
    precision: str = "bf16"

    @torch.no_grad()
    def __call__(self, image_hu: np.ndarray, spacing_zyx: Sequence[float], raw_shape_zyx: Sequence[int]) -> Box | None:
        """image_hu: the case's coarse array (any size; resized to the model's size on the device).
        Returns the inclusive box in raw canonical voxels, or None when the model finds no organ."""
        size = tuple(int(s) for s in self.model.preprocess["size_zyx"])
        window = tuple(float(v) for v in self.model.preprocess.get("hu_window", (-325.0, 325.0)))
        x = torch.from_numpy(np.ascontiguousarray(image_hu)).to(self.device)[None, None]
        x = prepare_input(x, size, window)
        with autocast(amp_settings(self.precision, self.device)):
            logits = self.model.net(x)
        probs = torch.sigmoid(logits.float())[0]
        labels = probs_to_labels(probs)
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        grid_spacing = tuple(float(s) * float(n) / float(m) for s, n, m in zip(spacing_zyx, raw_shape_zyx, size))
        labels = keep_largest_component(labels, grid_spacing, COARSE_MIN_VOLUME_MM3)
        box = coarse_box(labels, grid_spacing, COARSE_Z_WINDOW_MM)
        if box is None:
            return None
        return box_to_raw(box, size, raw_shape_zyx)


def load_coarse_model(model_dir: str | None, device: torch.device) -> ExportedModel | None:
    """The exported coarse model, or None (with a warning) when no folder is configured or it has no model."""
    if model_dir is None:
        logger.warning("boxes.coarse_model_dir is null: unlabeled cases are cropped around the body box "
                       "(HU > %.0f), not around the organs as at prediction time", BODY_THRESHOLD_HU)
        return None
    if not (Path(model_dir) / "model.pt").is_file():
        logger.warning("no coarse model in %s: unlabeled cases are cropped around the body box (HU > %.0f); "
                       "train coarse_base_seg and export it for organ boxes", model_dir, BODY_THRESHOLD_HU)
        return None
    return load_exported_model(model_dir, device, stage="coarse", networks=None)


def compute_boxes(
    unlabeled_db: Path,
    data_base_dir: str | Path,
    coarse_model_dir: str | None,
    device: torch.device,
    precision: str = "bf16",
) -> dict[str, Any]:
    """Store a `coarse_box` in every record of `unlabeled_db` that lacks one of the wanted source.

    Under DDP the ranks share the work: each computes the boxes of its share (`shard`) of WRITE_BATCH cases per
    rank at a time, and rank 0 writes them, so the step resumes where it stopped. A failure on any rank ends every
    rank at once with its message (`run_on_every_rank`). Returns a summary {"cases", "computed", "skipped",
    "body_fallback", "source"} (the same on every rank).
    """
    planned: dict[str, Any] = {}

    def plan() -> None:  # on every rank: the coarse model on its device, the store, the cases that need a box
        model = load_coarse_model(coarse_model_dir, device)
        planned["wanted"] = "coarse_model" if model is not None else "body"
        planned["finder"] = CoarseBoxFinder(model, device, precision) if model is not None else None
        # Rank 0 reads and writes through one writable store (py-lmdb refuses a second open in one process).
        planned["store"] = store = open_store(unlabeled_db, readonly=not is_main_process())
        keys = store.keys()
        planned["cases"] = len(keys)
        planned["todo"] = [k for k in keys if not _has_box(store.get(k), planned["wanted"])]

    try:
        run_on_every_rank(plan, "boxes")
        store = planned["store"]
        finder, wanted, todo = planned["finder"], planned["wanted"], planned["todo"]
        summary = {"cases": planned["cases"], "computed": 0, "skipped": planned["cases"] - len(todo),
                   "body_fallback": 0, "source": wanted}
        if not todo:
            logger.info("boxes: all %d unlabeled cases already have a %s box", summary["cases"], wanted)
            return summary
        logger.info("boxes: %d of %d unlabeled cases need a box (source: %s)", len(todo), summary["cases"], wanted)
        per_round = WRITE_BATCH * get_world_size()
        bar = tqdm(total=len(todo), desc="boxes", unit="case", disable=not is_main_process())
        for start in range(0, len(todo), per_round):
            chunk = todo[start:start + per_round]

            def boxes_here(chunk: list[str] = chunk) -> dict[str, tuple[list[list[int]], str]]:
                out = {}
                for case_id in shard(chunk):
                    box, source = _case_box(case_id, store.get(case_id), data_base_dir, unlabeled_db, finder)
                    out[case_id] = ([list(pair) for pair in box], source)
                return out

            results = {k: v for part in run_on_every_rank(boxes_here, "boxes") for k, v in part.items()}
            pending: dict[str, dict] = {}
            for case_id in chunk:
                box, source = results[case_id]
                summary["computed"] += 1
                summary["body_fallback"] += int(source != wanted)
                if is_main_process():
                    record = store.get(case_id)
                    record[COARSE_BOX_KEY] = box
                    record[BOX_SOURCE_KEY] = source
                    pending[case_id] = record
            # The write runs through run_on_every_rank too, so a failing write on rank 0 stops every rank.
            run_on_every_rank(lambda pending=pending: store.put_many(pending) if pending else None, "boxes")
            bar.update(len(chunk))
        bar.close()
    finally:
        if "store" in planned:
            planned["store"].close()
    if summary["body_fallback"]:
        logger.warning("boxes: %d case(s) fell back to the body box (empty coarse prediction)",
                       summary["body_fallback"])
    return summary


def _has_box(record: dict | None, wanted: str) -> bool:
    if record is None or record.get(COARSE_BOX_KEY) is None:
        return False
    source = record.get(BOX_SOURCE_KEY)
    # A model box (or the body box the model fell back to) is kept; a no-model body box is redone once a model
    # exists. Delete `coarse_box` from the records to recompute them with another coarse model.
    return source in ("coarse_model", "body_fallback") or source == wanted


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
        box = finder(image, record["spacing_zyx"], raw_shape)
        if box is not None:
            return box, "coarse_model"
        logger.warning("boxes: the coarse model finds no organ in %s; using its body box", case_id)
    source = "body" if finder is None else "body_fallback"
    grid_box = body_box(image)
    if grid_box is None:
        logger.warning("boxes: %s has no voxel above %.0f HU; using the whole volume", case_id, BODY_THRESHOLD_HU)
        return tuple((0, n - 1) for n in raw_shape), source  # type: ignore[return-value]
    return box_to_raw(grid_box, image.shape, raw_shape), source
