"""Atomic file writes: everything the project writes goes to a temporary file first, then is renamed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from common.core.errors import InputError, WriteError
from common.core.logger import get_logger

logger = get_logger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_failure(path: str | os.PathLike, cause: BaseException | str) -> WriteError:
    """The one message for an output that could not be written completely (`cause`: the writer's error, or what a
    check of the written file found). Python ignores SIGXFSZ, so a file-size limit shows up here too."""
    if isinstance(cause, OSError) and cause.errno is not None:
        reason = os.strerror(cause.errno)
    else:
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return WriteError(path, f"could not be written completely ({reason}); the disk may be full, or a quota or the "
                            "file-size limit (ulimit -f) was reached. The partial file was removed: free space or "
                            "raise the limit and run again")


def _fsync(path: Path) -> None:
    """Flush `path` to the disk: a full disk or quota that the writes did not report shows up here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None,
                verify: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds and the written file
    passes `verify` (which returns what is wrong with it, or None).

    `suffix` keeps the file extension for writers that infer the format from it (".nii.gz", ".npy"). An OSError of
    the block, a failed check or flush becomes a `WriteError` naming `path`; the temporary file is removed.
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
        try:
            yield tmp_path
            problem = verify(tmp_path) if verify is not None else None
            if problem:
                raise write_failure(path, problem)
            _fsync(tmp_path)
            os.replace(tmp_path, path)
        except WriteError:
            raise
        except OSError as e:
            raise write_failure(path, e) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def expect_size(expected: int) -> Callable[[Path], str | None]:
    """A `verify` for `atomic_path`: the written file must hold exactly `expected` bytes."""
    def check(tmp: Path) -> str | None:
        actual = tmp.stat().st_size
        return None if actual == expected else f"the file is incomplete: {actual} of {expected} bytes"
    return check


def _npy_size_problem(tmp: Path, nbytes: int) -> str | None:
    """What is wrong with a written .npy file of an array of `nbytes` (its header says where the data starts)."""
    try:
        with open(tmp, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            read_header(f)
            data_start = f.tell()
    except (ValueError, OSError, EOFError) as e:
        return f"the file is incomplete: its header cannot be read ({e})"
    return expect_size(data_start + nbytes)(tmp)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as a .npy file atomically (the name must end with .npy); the file's size is checked before the
    rename (WriteError naming `path` when it came out short)."""
    with atomic_path(path, suffix=".npy", verify=lambda tmp: _npy_size_problem(tmp, array.nbytes)) as tmp:
        np.save(tmp, array, allow_pickle=False)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically (its size checked before the rename)."""
    with atomic_path(path, verify=expect_size(len(data))) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (its size checked before the rename)."""
    write_bytes_atomic(path, text.encode("utf-8"))


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


def require_folder(folder: str | os.PathLike, what: str = "folder") -> None:
    """InputError naming `folder` unless it is an existing folder: "<what> not found", or that it is a file."""
    folder = Path(folder)
    if folder.is_file():
        raise InputError(folder, f"is a file, not a folder; give the {what} (the folder that holds the files)")
    if not folder.is_dir():
        raise InputError(folder, f"{what} not found")


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


_HELD_LOCKS: set[int] = set()  # descriptors of the folder locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close the lock descriptors inherited from the parent: the lock then
    dies with the parent, not with the last of its workers, and a rerun right after a kill is not refused."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _lock_holder(fd: int) -> str:
    """ "pid N on host H" as the lock's holder wrote it into the lock file, or "" when it wrote nothing."""
    try:
        words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        return ""
    return f"pid {words[0]} on host {words[1]}" if len(words) >= 2 else ""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (file `.lock` in it, created with the folder) for the block; InputError
    naming the holder's pid and host if another process holds it. The holder writes "<pid> <host>" into the file.
    The operating system drops the lock when the process dies, so a kill never leaves it stale.
    Where `fcntl` is missing (Windows) no lock is taken."""
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            holder = f" ({holder})" if holder else ""
            raise InputError(folder, f"another {what}{holder} is writing into this folder "
                                     f"(it holds {folder / '.lock'}); wait for it to finish or use another "
                                     "folder") from None
        _HELD_LOCKS.add(fd)
        with contextlib.suppress(OSError):  # only for the message of a second run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)
