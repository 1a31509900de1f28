"""Where a stage finds the dataset's files: paths in records and configs are relative to the dataset folder."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_data_path(value: str | os.PathLike, data_base_dir: str | os.PathLike) -> Path:
    """A path from a record or the config: absolute as given, relative ones against the dataset folder."""
    path = Path(value)
    return path if path.is_absolute() else Path(data_base_dir) / path


def db_path(cfg_value: str, data_base_dir: str | os.PathLike, fold: int) -> Path:
    """A config database path (`{fold}` filled in, e.g. db/seg_train_fold_{fold}) resolved against the dataset."""
    return resolve_data_path(cfg_value.format(fold=fold), data_base_dir)
