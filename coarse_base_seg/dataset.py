"""Coarse-stage data: endless labeled / unlabeled streams and validation cases from the prepared 160^3 npy files.

The databases (LMDB, written by data_prepare) list the cases; each record holds `coarse_image_path` (int16 HU,
(D, H, W) = data.size_zyx) and, for labeled cases, `coarse_mask_path` (uint8 labels 0..13). Relative record
paths resolve against data_base_dir. Volumes are memory-mapped and copied in DataLoader worker processes;
int16 HU travels to the device, where `normalize` clips to the HU window and z-scores (reference 1.4). The coarse
stage has no augmentation (reference 4.5), so sample n of a stream is item `InfiniteSampler(...).item_at(n)` and
depends only on (seed, stream name, n): a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.core.errors import InputError
from common.core.logger import get_logger
from common.storage.data_paths import db_path, resolve_data_path  # noqa: F401 - also this module's API
from common.storage.lmdb_store import EMPTY_UNLABELED_PROBLEM, open_store
from common.storage.records import PreparedCase
from common.train.distributed import DistInfo, InfiniteSampler, derive_seed, shard
from common.volume.intensity import window_and_zscore_torch

logger = get_logger(__name__)

IMAGE_KEY = "coarse_image_path"
MASK_KEY = "coarse_mask_path"


@dataclass(frozen=True)
class CoarseCase:
    """One prepared case: int16 image (D, H, W) and, when labeled, its uint8 label map."""

    case_id: str
    image_path: Path
    mask_path: Path | None


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read prepared array ({exc}); rerun data_prepare") from exc


def read_cases(db: Path, data_base_dir: str | os.PathLike, labeled: bool,
               size_zyx: Sequence[int] | None = None) -> list[CoarseCase]:
    """Cases of database `db`, checked: records name their npy files, the files exist and have shape size_zyx.

    Raises InputError naming the database or file (missing database -> "run data_prepare first").
    """
    store = open_store(db)
    try:
        items = store.items()
    finally:
        store.close()
    if not items:
        if not labeled:
            raise InputError(db, EMPTY_UNLABELED_PROBLEM)
        raise InputError(db, "database is empty; run data_prepare first (or check the fold and the database names)")
    cases = []
    for case_id, record in items:
        case = PreparedCase.from_json(case_id, record, db)
        keys = (IMAGE_KEY, MASK_KEY) if labeled else (IMAGE_KEY,)
        paths: list[Path] = []
        for key in keys:
            value = getattr(case, key)
            if not value:
                raise InputError(db, f"record {case_id!r} has no {key}; rerun data_prepare")
            path = resolve_data_path(value, data_base_dir)
            if not path.is_file():
                raise InputError(path, f"listed for case {case_id!r} in {db} but missing; rerun data_prepare")
            if size_zyx is not None:
                shape = _npy_shape(path)
                if shape != tuple(size_zyx):
                    raise InputError(path, f"shape {list(shape)} differs from data.size_zyx {list(size_zyx)}: "
                                           "prepare the data at that size (data_prepare coarse_size_zyx) or set "
                                           f"data.size_zyx={list(shape)}")
            paths.append(path)
        cases.append(CoarseCase(case_id, paths[0], paths[1] if labeled else None))
    return cases


def _load(path: Path) -> np.ndarray:
    return np.array(np.load(path, mmap_mode="r"), copy=True)  # read the pages now; a writable array


class CoarseVolumes(Dataset):
    """Map-style dataset: item i -> int16 image (1, D, H, W) [+ uint8 labels (D, H, W) when labeled]."""

    def __init__(self, cases: Sequence[CoarseCase], labeled: bool) -> None:
        self.cases = list(cases)
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Any:
        case = self.cases[index]
        image = torch.from_numpy(_load(case.image_path))[None]
        if not self.labeled:
            return image
        assert case.mask_path is not None
        return image, torch.from_numpy(_load(case.mask_path))


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers only copy arrays; leave the cores to the training process


def make_stream(dataset: CoarseVolumes, seed: int, name: str, batch_size: int, start: int, num_workers: int,
                dist: DistInfo, prefetch_factor: int = 2) -> Iterator[Any]:
    """Endless iterator of this rank's batches from iteration `start` on (DataLoader over an InfiniteSampler)."""
    sampler = InfiniteSampler(len(dataset), derive_seed(seed, name), shuffle=True, rank=dist.rank,
                              world_size=dist.world_size, batch_size=batch_size, start=start)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=dist.device.type == "cuda", drop_last=True, worker_init_fn=_worker_init,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None)
    return iter(loader)


class CoarseData:
    """The coarse stage's data sources, built from the config; its methods are the engine's stream callables."""

    def __init__(self, cfg: Any, dist: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist
        base = cfg.data_base_dir
        size = list(cfg.data.size_zyx)
        self.labeled_db = db_path(cfg.data.labeled_db, base, cfg.fold)
        self.val_db = db_path(cfg.data.val_db, base, cfg.fold)
        self.unlabeled_db = db_path(cfg.data.unlabeled_db, base, cfg.fold) if cfg.data.unlabeled_db else None
        self.labeled_cases = read_cases(self.labeled_db, base, labeled=True, size_zyx=size)
        self.val_cases_list = read_cases(self.val_db, base, labeled=True, size_zyx=size)
        self.unlabeled_cases = (read_cases(self.unlabeled_db, base, labeled=False, size_zyx=size)
                                if self.unlabeled_db is not None else None)
        logger.info("coarse data: %d labeled (%s), %s unlabeled (%s), %d validation (%s)",
                    len(self.labeled_cases), self.labeled_db,
                    len(self.unlabeled_cases) if self.unlabeled_cases is not None else "no",
                    self.unlabeled_db, len(self.val_cases_list), self.val_db)

    def labeled_stream(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches (int16 image (B, 1, D, H, W), uint8 labels (B, D, H, W)) from iteration `start` on."""
        return make_stream(CoarseVolumes(self.labeled_cases, labeled=True), self.cfg.seed, "labeled",
                           self.cfg.data.labeled_batch_size, start, self.cfg.data.num_workers, self.dist)

    def unlabeled_stream(self, start: int) -> Iterator[torch.Tensor]:
        """Batches of int16 images (B, 1, D, H, W) from iteration `start` on."""
        assert self.unlabeled_cases is not None
        return make_stream(CoarseVolumes(self.unlabeled_cases, labeled=False), self.cfg.seed, "unlabeled",
                           self.cfg.data.unlabeled_batch_size, start, self.cfg.data.num_workers, self.dist)

    def val_cases(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(case id, int16 image (1, 1, D, H, W), uint8 labels (1, D, H, W)) of this rank's validation cases
        (`shard`: chosen before loading)."""
        for case in shard(self.val_cases_list, rank, world_size):
            assert case.mask_path is not None
            yield (case.case_id, torch.from_numpy(_load(case.image_path))[None, None],
                   torch.from_numpy(_load(case.mask_path))[None])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """On the device: raw HU (B, 1, D, H, W) -> float32 clipped to data.hu_window and z-scored per sample."""
        return window_and_zscore_torch(x.float(), self.cfg.data.hu_window)
