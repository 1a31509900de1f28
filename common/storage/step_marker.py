"""Step markers: how every resumable step records that it is done and what it was done from.

A marker is a small JSON file written atomically as the step's last act (so its presence means "complete").
It holds what the step's result depends on -- settings and `file_stamp`s of its inputs -- so a step is
skipped exactly while `marker_matches` its current inputs, and redone when one of them changed:
- the training engine's `DONE` ({"iteration", "best", ...}; a larger schedule continues the run),
- the fine stage's `uif.json` (round-1 checkpoints, boxes, UIF settings) and `export.json` (checkpoints, export
  settings),
- data_prepare's per-case `source` stamps inside each record (a changed input file is prepared again),
- a training stage's `run.json` in its output_dir (`claim_run_folder`): which fold of which dataset the folder
  belongs to, so that a second fold or dataset pointed at the same folder is refused instead of resuming the
  first one's checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from common.core.errors import InputError
from common.core.files import write_json_atomic

RUN_FILE = "run.json"


def file_stamp(path: str | os.PathLike) -> dict[str, int]:
    """{"size", "mtime_ns"} of a file: what tells a step that an input changed (OSError if it is missing)."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def write_marker(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write the marker (atomically: a reader sees the old marker, the new one or none)."""
    write_json_atomic(path, dict(record))


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker's record, or None when it is missing or unreadable (a broken marker means "not done")."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def marker_matches(path: str | os.PathLike, expected: Mapping[str, Any]) -> bool:
    """True when the marker exists and records exactly `expected` (compared as JSON values)."""
    record = read_marker(path)
    return record is not None and record == json.loads(json.dumps(dict(expected)))


def claim_run_folder(output_dir: str | os.PathLike, identity: Mapping[str, Any], write: bool = True) -> None:
    """Make `output_dir` the folder of the run `identity` (e.g. {"stage", "fold", "data_base_dir", ...}).

    The first start writes `run.json` (when `write`: the main rank); a later start with another identity raises
    InputError naming the differing keys, so fold 2 never resumes fold 1's checkpoints or reuses its boxes and
    UIF pool. A missing or unreadable run.json (a folder of an earlier version) is claimed anew.
    """
    path = Path(output_dir) / RUN_FILE
    current = read_marker(path)
    wanted = json.loads(json.dumps(dict(identity)))  # the JSON form, as it is read back
    if current is None:
        if write:
            write_marker(path, wanted)
        return
    differs = [f"{key} {current.get(key)!r} (this command: {wanted.get(key)!r})"
               for key in sorted(set(current) | set(wanted)) if current.get(key) != wanted.get(key)]
    if differs:
        raise InputError(path, "this output_dir belongs to another run: " + "; ".join(differs)
                         + ". Give each fold and dataset its own output_dir (e.g. output_dir=output/fold_2), "
                         "or delete the folder to start over.")
