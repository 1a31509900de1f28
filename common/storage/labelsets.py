"""Where a label set is stored: a prepared dataset's `db/labels.json`, an exported model's `model.pt`, an nnU-Net v2
`dataset.json`; and the one reader that takes any of them (`read_label_set`).

A dataset prepared before label sets existed, and a model exported before, hold FLARE22's organs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.core.errors import InputError
from common.core.files import write_json_atomic
from common.core.labels import DEFAULT_NSD_TOLERANCE_MM, FLARE22, LabelSet
from common.storage.checkpoint import load_checkpoint

LABELS_FILE = "labels.json"     # in a prepared dataset's db/
DATASET_JSON = "dataset.json"   # an nnU-Net v2 raw dataset's description


def write_dataset_labels(db_dir: str | os.PathLike, labels: LabelSet) -> Path:
    """Store the label set of a prepared dataset (atomically) in `db_dir/labels.json`."""
    path = Path(db_dir) / LABELS_FILE
    write_json_atomic(path, labels.to_json())
    return path


def dataset_labels(data_base_dir: str | os.PathLike) -> LabelSet:
    """The label set of a prepared dataset (FLARE22 for one prepared before label sets were stored)."""
    path = Path(data_base_dir) / "db" / LABELS_FILE
    if not path.is_file():
        return FLARE22
    return _read_labels_json(path)


def _read_labels_json(path: Path) -> LabelSet:
    try:
        return LabelSet.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a readable label set ({type(exc).__name__}: {exc}); re-run data_prepare") from None


def read_dataset_json(path: str | os.PathLike, default_nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> LabelSet:
    """The label set of an nnU-Net v2 dataset.json (see `LabelSet.from_dataset_json`); InputError naming the file
    and the rule it breaks."""
    path = Path(path)
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read it as JSON: {exc}") from None
    if not isinstance(dataset, dict):
        raise InputError(path, "expected a JSON object (nnU-Net v2 dataset.json)")
    try:
        return LabelSet.from_dataset_json(dataset, name=path.parent.name,
                                          default_nsd_tolerance_mm=default_nsd_tolerance_mm)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None


def model_labels(payload: dict) -> LabelSet:
    """The label set an exported model's payload (model.pt) carries; FLARE22 for a model exported before."""
    record = payload.get("labels")
    return FLARE22 if record is None else LabelSet.from_json(record)


def read_label_set(path: str | os.PathLike, default_nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> LabelSet:
    """The label set of `path`: an exported model folder or its model.pt, an nnU-Net v2 dataset.json (or its folder),
    a prepared dataset folder, or a labels.json. InputError naming the path when it holds none."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "model.pt", path / DATASET_JSON, path / "db" / LABELS_FILE, path / LABELS_FILE):
            if candidate.is_file():
                return read_label_set(candidate, default_nsd_tolerance_mm)
        raise InputError(path, "holds no label set (expected model.pt, dataset.json or db/labels.json)")
    if not path.is_file():
        raise InputError(path, "label set not found")
    if path.suffix == ".pt":
        try:
            return model_labels(load_checkpoint(path, mmap=True))  # the label record only: tensors stay on disk
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(path, f"its label set is unreadable ({exc}); re-export the model") from None
    if path.name == LABELS_FILE:
        return _read_labels_json(path)
    return read_dataset_json(path, default_nsd_tolerance_mm)
