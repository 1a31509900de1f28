"""Atomic file writes: everything the project writes goes to a temporary file first, then is renamed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.core.errors import InputError
from common.core.logger import get_logger

logger = get_logger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `suffix` keeps the file extension for writers that infer the format from it (".nii.gz", ".npy").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions an ordinary open() would (0666 minus umask).
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as a .npy file atomically (the name must end with .npy)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# Name of a temporary file made by `atomic_path`: "." + final name + "." + mkstemp's 8 random characters + ".tmp"
# + the suffix kept for the writer.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\..*)?$")


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file left by `atomic_path` (a kill between write and rename)."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` left in `folder` (not recursive) after a kill; returns them.

    Call it only where no other process is writing into `folder` (at the start of a run that owns it).
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if is_temp_name(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    if removed:
        logger.info("%s: removed %d temporary file(s) left by an interrupted run", folder, len(removed))
    return removed


def check_writable(folder: str | os.PathLike, what: str = "folder") -> None:
    """Raise InputError naming `folder` unless a file can be created in it (created if missing): checked before
    any work, so a read-only output fails at once instead of after a computed case."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise InputError(folder, f"the {what} path is an existing file, not a folder; give a folder")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except InputError:
        raise
    except OSError as e:
        raise InputError(folder, f"cannot write into the {what} ({type(e).__name__}: {e.strerror or e}); "
                                 "check its permissions and free space, or choose another") from None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (file `.lock` in it) for the block; InputError if another process
    holds it. The operating system drops the lock when the process dies, so a kill never leaves it stale.
    Where `fcntl` is missing (Windows) no lock is taken."""
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(folder, f"another {what} is writing into this folder (it holds {folder / '.lock'}); "
                                     "wait for it to finish or use another folder") from None
        yield
    finally:
        os.close(fd)
