"""Fine-stage data: organ-box crops of the memory-mapped canonical regions, made into samples on the device.

Sources (LMDB records written by data_prepare, merged with the boxes step's records under output_dir):
- labeled cases: box = `organ_bbox` (ground truth), image and mask regions (data_prepare's);
- unlabeled cases: box = `coarse_box` (the coarse model's prediction, or the body box), image region only (the
  boxes step's: box + the largest extension, under output_dir; the dataset keeps no unlabeled image copy);
- validation: the fixed 192^3 `fine_image_path` / `fine_mask_path` arrays (GT box + 20 mm, as data_prepare made
  them), resized on the device when the network size differs.

Only the int16 crop is read on the CPU (in background threads, so reading overlaps the training step); resize,
HU shift, window and z-score run on the training device (fine_efficient_seg.augment). Sample n of a stream depends
only on (seed, stream name, n), so a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from common.core.errors import InputError
from common.core.labels import FLARE22
from common.core.logger import get_logger
from common.storage.data_paths import db_path, resolve_data_path  # noqa: F401 - also this module's API
from common.storage.lmdb_store import EMPTY_UNLABELED_PROBLEM, open_store
from common.storage.records import CaseBox, PreparedCase
from common.train.distributed import InfiniteSampler, derive_seed, shard
from common.volume.intensity import window_and_zscore_torch
from common.volume.resize import resize_volume_torch
from fine_efficient_seg.augment import (
    Box,
    FineAugmentation,
    FineAugmentSettings,
    fine_crop_slices,
    make_fine_sample,
    resize_labels,
    sample_fine_augmentation,
    sample_rng,
)

logger = get_logger(__name__)

@dataclass(frozen=True)
class FineCase:
    """What the fine stage needs of one case. Boxes and offsets are canonical raw voxels (z, y, x)."""

    case_id: str
    spacing_zyx: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    box: Box | None                      # inclusive organ box (labeled: GT; unlabeled: coarse_box)
    region_path: Path                    # int16 .npy of the region, memory-mappable
    region_mask_path: Path | None        # uint8 .npy of the region's labels (labeled cases)
    region_offset_zyx: tuple[int, int, int]
    region_shape_zyx: tuple[int, int, int]
    region_margin_mm: float | None = None  # the margin the region was cut around the box with (None: not recorded)

    @property
    def labeled(self) -> bool:
        return self.region_mask_path is not None


def fine_case(case: PreparedCase, data_base_dir: str | os.PathLike, db: Path) -> FineCase:
    """The fine stage's view of a prepared case (with its box when unlabeled); InputError naming the database and
    the case when what the stage needs is missing."""
    region = case.region
    missing = [key for key, value in (("spacing_zyx", case.spacing_zyx), ("shape_zyx", case.shape_zyx),
                                      ("region_path", region)) if value is None]
    if case.labeled:
        missing += [key for key, value in (("organ_bbox", case.organ_box),
                                           ("region_mask_path", region and region.mask_path)) if value is None]
    if missing:
        # an unlabeled case's region comes from the boxes step (data_prepare keeps no unlabeled image copy)
        todo = ("re-run data_prepare" if case.labeled or "shape_zyx" in missing
                else "run the boxes step: sh run.sh step=boxes")
        raise InputError(db, f"record {case.case_id!r} lacks {', '.join(missing)} ({todo})")
    assert region is not None and case.spacing_zyx is not None and case.shape_zyx is not None
    return FineCase(
        case_id=case.case_id, spacing_zyx=case.spacing_zyx, shape_zyx=case.shape_zyx, box=case.crop_box,
        region_path=resolve_data_path(region.image_path, data_base_dir),
        region_mask_path=resolve_data_path(region.mask_path, data_base_dir) if case.labeled else None,
        region_offset_zyx=region.offset_zyx, region_shape_zyx=region.shape_zyx, region_margin_mm=region.margin_mm)


def read_boxes(boxes_db: Path | None) -> dict[str, CaseBox]:
    """The boxes of a boxes database ({} when it is None or does not exist yet)."""
    if boxes_db is None or not (Path(boxes_db) / "data.mdb").is_file():
        return {}
    store = open_store(boxes_db, readonly=True)
    try:
        return {key: box for key, record in store.items() if (box := CaseBox.from_json(record)) is not None}
    finally:
        store.close()


def read_prepared(db: Path, boxes_db: Path | None = None) -> list[PreparedCase]:
    """Every case of a database, sorted by id, with its box from `boxes_db` when given (else the record's own, as
    in a UIF pool)."""
    boxes = read_boxes(boxes_db)
    store = open_store(db, readonly=True)
    try:
        return [PreparedCase.from_json(key, record, db).with_box(boxes.get(key)) for key, record in store.items()]
    finally:
        store.close()


def load_cases(db: Path, data_base_dir: str | os.PathLike, labeled: bool, need_box: bool = True,
               boxes_db: Path | None = None) -> list[FineCase]:
    """All cases of a database, sorted by id; unlabeled cases take their box from `boxes_db` when given (else
    from the record itself, as in a UIF pool). With `need_box`, an unlabeled case without a box is an
    InputError telling to run the boxes step."""
    cases = [fine_case(case, data_base_dir, db) for case in read_prepared(db, boxes_db)]
    if labeled and any(c.region_mask_path is None for c in cases):
        raise InputError(db, "holds unlabeled cases, expected labeled ones (check data.labeled_db)")
    if not cases and not labeled:
        raise InputError(db, EMPTY_UNLABELED_PROBLEM)
    if need_box:
        missing = [c.case_id for c in cases if c.box is None]
        if missing:
            raise InputError(boxes_db or db, f"{len(missing)} case(s) have no coarse_box (first: {missing[0]}); "
                                             "run the boxes step first (sh run.sh step=boxes)")
    return cases


# ----------------------------------------------------------------------------------------------- CPU side


def read_crop(case: FineCase, slices: Sequence[slice]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the crop `slices` (canonical raw voxels) from the case's memory-mapped region files.

    The crop is clipped to the stored region (the organ box plus the largest random extension, `region_slices`:
    data_prepare's for labeled cases, the boxes step's for unlabeled ones, so clipping only trims what lies
    outside the volume anyway).
    Returns contiguous int16 image and uint8 labels (None for unlabeled cases).
    """
    local = []
    for sl, off, size in zip(slices, case.region_offset_zyx, case.region_shape_zyx):
        start = min(max(sl.start - off, 0), size - 1)
        stop = max(min(sl.stop - off, size), start + 1)
        local.append(slice(start, stop))
    local_t = tuple(local)
    try:
        # np.array copies the crop out of the memory map (only these pages are read from disk)
        image = np.array(np.load(case.region_path, mmap_mode="r")[local_t], copy=True)
        labels = None
        if case.region_mask_path is not None:
            labels = np.array(np.load(case.region_mask_path, mmap_mode="r")[local_t], dtype=np.uint8, copy=True)
    except (OSError, ValueError) as exc:
        raise InputError(case.region_path, f"cannot read the region of case {case.case_id}: {exc}") from exc
    return image, labels


@dataclass
class _Pending:
    """One sample whose crop is being read on the CPU."""

    case: FineCase
    aug: FineAugmentation
    crop: Future


def read_crop_tensors(case: FineCase, slices: Sequence[slice], pin: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`read_crop` as CPU tensors, page-locked when `pin` (for an asynchronous copy to the GPU)."""
    image, labels = read_crop(case, slices)
    image_t = torch.from_numpy(image)
    labels_t = torch.from_numpy(labels) if labels is not None else None
    if pin:
        image_t = image_t.pin_memory()
        labels_t = labels_t.pin_memory() if labels_t is not None else None
    return image_t, labels_t


@dataclass(frozen=True)
class SampleSpec:
    """How a fine sample is made from a case's crop: network input size, HU window, augmentation settings, and
    the number of labels of the dataset's label set (one HU shift each; labels 1..num_organs are resized)."""

    size_zyx: tuple[int, int, int]
    hu_window: tuple[float, float]
    augment: FineAugmentSettings
    num_organs: int = FLARE22.num_organs


@dataclass(frozen=True)
class StreamSpec:
    """One stream of samples: its name (it seeds the case order and the augmentation with `seed`), batch size,
    whether its cases are labeled, and how many crops are read ahead in how many threads."""

    name: str
    seed: int
    batch_size: int
    labeled: bool
    read_threads: int = 2
    prefetch: int = 4


class FineStream:
    """Endless batches of fine training samples, built on `device`; `stream(start)` starts at iteration `start`.

    Labeled: yields (x float (B, 1, D, H, W) normalized, labels int64 (B, D, H, W)).
    Unlabeled: yields x only. Cases are visited in the order of an `InfiniteSampler` (seeded by the seed and the
    stream name), and each sample's augmentation is drawn from (seed, name, global position). `rank`/`world_size`
    default to the process group's.
    """

    def __init__(self, cases: Sequence[FineCase], stream: StreamSpec, sample: SampleSpec,
                 device: torch.device | str, rank: int | None = None, world_size: int | None = None) -> None:
        if not cases:
            raise ValueError(f"stream {stream.name!r} has no cases")
        if stream.labeled and any(not c.labeled for c in cases):
            raise ValueError(f"stream {stream.name!r} is labeled but some cases have no mask")
        if any(c.box is None for c in cases):
            raise ValueError(f"stream {stream.name!r}: every case needs a box")
        self.cases = list(cases)
        self.name = stream.name
        self.seed = int(stream.seed)
        self.batch_size = int(stream.batch_size)
        self.labeled = stream.labeled
        self.read_threads = max(1, int(stream.read_threads))
        self.prefetch = max(1, int(stream.prefetch))
        self.size_zyx = tuple(int(s) for s in sample.size_zyx)
        self.hu_window = tuple(float(v) for v in sample.hu_window)
        self.settings = sample.augment
        self.num_organs = int(sample.num_organs)
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size

    def sampler(self, start: int) -> InfiniteSampler:
        sampler_seed = derive_seed(self.seed, self.name, "order")
        return InfiniteSampler(len(self.cases), seed=sampler_seed, rank=self.rank, world_size=self.world_size,
                               batch_size=self.batch_size, start=start)

    def plan(self, position: int, item: int) -> tuple[FineCase, FineAugmentation, tuple[slice, slice, slice]]:
        """The case, random decisions and crop of global stream position `position`."""
        case = self.cases[item]
        aug = sample_fine_augmentation(sample_rng(self.seed, self.name, position), case.spacing_zyx,
                                       self.settings, self.labeled, self.num_organs)
        slices = fine_crop_slices(case.box, case.spacing_zyx, case.shape_zyx, aug, self.settings)  # type: ignore
        return case, aug, slices

    def build(self, pending: _Pending) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Device half of one sample: x (1, D, H, W), labels (D, H, W) or None."""
        image, labels = pending.crop.result()
        image_t = image.to(self.device, non_blocking=True)
        labels_t = labels.to(self.device, non_blocking=True) if self.labeled and labels is not None else None
        return make_fine_sample(image_t, labels_t, self.size_zyx, self.hu_window,
                                pending.aug.hu_shift if self.labeled else None, self.num_organs)

    def __call__(self, start: int = 0) -> Iterator[Any]:
        positions = self.sampler(start).positions()
        pool = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix=f"fine-{self.name}")
        queue: deque[_Pending] = deque()
        try:
            while True:
                while len(queue) < self.prefetch + self.batch_size:
                    position, item = next(positions)
                    case, aug, slices = self.plan(position, item)
                    crop = pool.submit(read_crop_tensors, case, slices, self.device.type == "cuda")
                    queue.append(_Pending(case, aug, crop))
                samples = [self.build(queue.popleft()) for _ in range(self.batch_size)]
                x = torch.stack([s[0] for s in samples])
                if self.labeled:
                    yield x, torch.stack([s[1] for s in samples])  # type: ignore[misc]
                else:
                    yield x
        finally:
            for pending in queue:
                pending.crop.cancel()
            pool.shutdown(wait=False, cancel_futures=True)


def fixed_crop_input(case: FineCase, size_zyx: Sequence[int], hu_window: Sequence[float], extend_size_mm: float,
                     device: torch.device | str) -> torch.Tensor:
    """The deterministic fine input of a case (box + `extend_size_mm`, as at test time): x (1, 1, D, H, W)."""
    settings = FineAugmentSettings(extend_size_mm=extend_size_mm, random_extend_prob=0.0, hu_shift_prob=0.0)
    aug = FineAugmentation(None, None)
    slices = fine_crop_slices(case.box, case.spacing_zyx, case.shape_zyx, aug, settings)  # type: ignore[arg-type]
    image, _ = read_crop(case, slices)
    x, _ = make_fine_sample(torch.from_numpy(image).to(device), None, size_zyx, hu_window)
    return x.unsqueeze(0)


def validation_cases(db: Path, data_base_dir: str | os.PathLike, sample: SampleSpec, device: torch.device | str,
                     rank: int = 0, world_size: int = 1) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """(case id, x (1, 1, D, H, W), labels int64 (1, D, H, W)) of the fixed 20 mm GT-box crops made by
    data_prepare, resized on the device when `sample.size_zyx` differs from the stored size. Only the cases of `rank`
    (`shard`, case i on rank i % world_size) are loaded."""
    device = torch.device(device)
    size = tuple(int(s) for s in sample.size_zyx)
    store = open_store(db, readonly=True)
    try:
        records = [(key, store.get(key)) for key in shard(store.keys(), rank, world_size)]
    finally:
        store.close()
    for case_id, record in records:
        case = PreparedCase.from_json(case_id, record, db)
        if case.fine_image_path is None or case.fine_mask_path is None:
            raise InputError(db, f"record {case_id!r} lacks fine_image_path/fine_mask_path (re-run data_prepare)")
        image = np.load(resolve_data_path(case.fine_image_path, data_base_dir))
        labels = np.load(resolve_data_path(case.fine_mask_path, data_base_dir))
        image_t = torch.from_numpy(image).to(device).float()
        labels_t = torch.from_numpy(labels.astype(np.uint8)).to(device)
        if tuple(image_t.shape) != size:
            image_t = resize_volume_torch(image_t, size)
            labels_t = resize_labels(labels_t, size, sample.num_organs)
        x = window_and_zscore_torch(image_t, sample.hu_window)
        yield case_id, x.reshape(1, 1, *size), labels_t.long().reshape(1, *size)
