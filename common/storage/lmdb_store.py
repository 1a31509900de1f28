"""LMDB key-value store of case records (reference 1.8): key = case id (UTF-8), value = UTF-8 JSON of a dict.

A store is safe to pickle and to use after fork: the LMDB environment is opened lazily in each process
(never shared across a fork), so a `Dataset` holding a store works in DataLoader worker processes.
Every write is one transaction (all or nothing).

Failures say what they are, and only real damage advises deleting: a data.mdb shorter than its last page (a read
there would kill the process with SIGBUS) or not an LMDB file is damaged; a record that is not UTF-8 JSON is named
by its key; a map that does not fit the address-space limit (`ulimit -v`) names the limit; a full disk is a
WriteError. The map of a writable store fits the address space left under such a limit (and grows when full).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import lmdb
import numpy as np

from common.core.errors import InputError
from common.core.files import write_failure
from common.core.logger import get_logger

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX: no address-space limit to fit
    resource = None  # type: ignore[assignment]

logger = get_logger(__name__)

DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space; grown automatically when full
MISSING_DB_PROBLEM = "database not found; run data_prepare first"
EMPTY_UNLABELED_PROBLEM = ("database is empty: no unlabeled case was prepared; add scans to the unlabeled folder and "
                           "rerun data_prepare, or train on the labeled cases alone with data.unlabeled_db=null")


def _json_default(obj: Any) -> Any:
    """JSON encoding of numpy scalars/arrays and paths (the reference wrote a custom encoder for the same)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a record")


def encode_record(record: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON bytes of a record dict."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a record must be a dict, got {type(record).__name__}")
    return json.dumps(dict(record), default=_json_default, sort_keys=True).encode("utf-8")


def decode_record(value: bytes) -> dict:
    """Inverse of `encode_record` (ValueError when `value` is not UTF-8 JSON)."""
    return json.loads(bytes(value).decode("utf-8"))


def _decoded(path: Path, key: bytes | str, value: bytes) -> dict:
    """`decode_record(value)`, or InputError naming the database and the key of a value that is not a record."""
    try:
        return decode_record(value)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        key = key if isinstance(key, str) else bytes(key).decode("utf-8", "replace")
        raise InputError(path, f"the record of key {key!r} is not UTF-8 JSON ({type(e).__name__}); the database "
                               "is damaged or was not written by this project: run the step that writes it "
                               "again") from None


class _SharedEnv:
    """One LMDB environment per database file per process (LMDB forbids opening it twice in a process)."""

    def __init__(self, env: lmdb.Environment, writable: bool) -> None:
        self.env = env
        self.writable = writable
        self.users: set[int] = set()


_SHARED: dict[str, _SharedEnv] = {}
_SHARED_PID = os.getpid()


def _forget_inherited_envs() -> None:
    """In a forked child, close the environments inherited from the parent before opening new ones.

    Closing them in the child is safe (LMDB only clears reader slots owned by the closing pid, and the
    child holds no file locks yet) and required: py-lmdb refuses a second open of a file still open.
    """
    global _SHARED_PID
    pid = os.getpid()
    if pid == _SHARED_PID:
        return
    for shared in _SHARED.values():
        try:
            shared.env.close()
        except lmdb.Error:  # pragma: no cover - best effort
            pass
    _SHARED.clear()
    _SHARED_PID = pid


def _missing_problem(path: Path) -> str:
    """Why a database is missing: the dataset folder itself is gone (say so), or data_prepare has not made it."""
    base = path.parent.parent  # <data_base_dir>/db/<name>
    if not base.is_dir():
        return f"database not found: the dataset folder {base} is missing (check data_base_dir)"
    return MISSING_DB_PROBLEM


def _corrupt_problem(error: Exception) -> str:
    detail = str(error).split(": ", 1)[-1]
    return (f"database is damaged or not an LMDB database ({detail}); delete this folder and run data_prepare "
            "again")


# LMDB errors that mean the file itself is bad; any other is the machine's (memory, disk) or unknown.
_DAMAGE = (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError, lmdb.VersionMismatchError,
           lmdb.IncompatibleError, lmdb.BadChecksumError, lmdb.PanicError)
_DISK_WORDS = ("No space left", "File too large", "Disk quota", "Input/output error")


def address_space_left() -> int | None:
    """Bytes of address space this process may still map under its limit (`ulimit -v`, RLIMIT_AS), or None when
    there is no limit."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = soft // 2  # unknown: assume half of it is taken
    return max(int(soft) - used, 0)


def _address_space_problem() -> str:
    left = address_space_left()
    limit = f"; the limit leaves {left >> 20} MB" if left is not None else ""
    return (f"not enough address space to map the database under the memory limit (ulimit -v{limit}); this does "
            "not mean it is damaged: raise the limit (e.g. ulimit -v unlimited) and run again")


def _lmdb_failure(path: Path, error: Exception) -> Exception:
    """The error to raise for an LMDB error on `path`: damage (delete and rebuild), a memory limit, a full disk, or
    the library's message (never the advice to delete for anything but damage). Out of memory is the limit's when
    one is set; without one, mapping never runs out, and it comes from garbage sizes in a damaged file."""
    text = str(error)
    if isinstance(error, lmdb.MemoryError) or "Cannot allocate memory" in text:
        if address_space_left() is not None:
            return InputError(path, _address_space_problem())
        return InputError(path, _corrupt_problem(error))
    if isinstance(error, lmdb.DiskError) or any(word in text for word in _DISK_WORDS):
        return write_failure(path / "data.mdb", text.split(": ", 1)[-1])
    if isinstance(error, _DAMAGE):
        return InputError(path, _corrupt_problem(error))
    return InputError(path, f"cannot use the database ({text.split(': ', 1)[-1]})")


def _check_complete(path: Path, env: lmdb.Environment) -> None:
    """InputError when data.mdb is shorter than its last committed page: a read there would be a bus error."""
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    actual = (path / "data.mdb").stat().st_size
    if actual < needed:
        env.close()
        raise InputError(path, f"database is truncated (data.mdb holds {actual} bytes, its last page ends at "
                               f"{needed}); it is damaged: delete this folder and run data_prepare again")


def _writable_map_size(path: Path, wanted: int) -> int:
    """The map size to open a writable database with: `wanted` (grown when full), at least twice its data, and
    under an address-space limit no more than an eighth of what is left (so many open stores fit)."""
    try:
        used = (path / "data.mdb").stat().st_size
    except OSError:
        used = 0
    size = max(int(wanted), 2 * used)
    left = address_space_left()
    if left is not None:
        size = min(size, max(left // 8, used + (1 << 20)))
    page = 1 << 16
    return max(page, -(-size // page) * page)


class LmdbStore:
    """Dict-like LMDB environment (a folder holding data.mdb/lock.mdb) of JSON records keyed by case id.

    readonly=True needs an existing database (InputError otherwise); readonly=False creates it.
    Several stores on the same database in one process share one environment.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.map_size = int(map_size)
        if readonly and not (self.path / "data.mdb").is_file():
            raise InputError(self.path, _missing_problem(self.path))

    # -- process-local environment --------------------------------------------------------------------------
    def _key(self) -> str:
        return os.path.realpath(self.path)

    def _open(self, writable: bool) -> lmdb.Environment:
        if not writable:
            try:
                env = lmdb.open(str(self.path), readonly=True, lock=True, readahead=False, max_readers=512,
                                subdir=True, create=False)
            except lmdb.MemoryError:
                raise
            except lmdb.Error:
                # a read-only file system or folder: lock.mdb cannot be opened for writing
                env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, subdir=True,
                                create=False)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(str(self.path), map_size=_writable_map_size(self.path, self.map_size), subdir=True,
                            readahead=False, max_readers=512)
        _check_complete(self.path, env)
        return env

    @property
    def env(self) -> lmdb.Environment:
        """This process's environment of the database (opened on first use, reopened after fork)."""
        _forget_inherited_envs()
        key = self._key()
        shared = _SHARED.get(key)
        if shared is None or (not self.readonly and not shared.writable):
            users = shared.users if shared is not None else set()
            if shared is not None:
                shared.env.close()  # upgrade a read-only environment to a writable one
                del _SHARED[key]
            try:
                env = self._open(writable=not self.readonly)
            except lmdb.Error as e:
                if not (self.path / "data.mdb").is_file():
                    raise InputError(self.path, _missing_problem(self.path)) from None
                raise _lmdb_failure(self.path, e) from None
            shared = _SHARED[self._key()] = _SharedEnv(env, writable=not self.readonly)
            shared.users |= users
        shared.users.add(id(self))
        return shared.env

    def __getstate__(self) -> dict:
        return self.__dict__.copy()  # no environment in the instance: the receiving process opens its own

    def _read(self, fn) -> Any:
        """Run fn(txn) in a read transaction, adopting a map grown by a writer in another process."""
        env = self.env
        try:
            try:
                with env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                env.set_mapsize(0)
                with env.begin() as txn:
                    return fn(txn)
        except lmdb.Error as e:  # a damaged file that still opened
            raise _lmdb_failure(self.path, e) from None

    # -- writes ----------------------------------------------------------------------------------------------
    def _write(self, fn) -> Any:
        """Run fn(txn) in one write transaction, growing the map when it is full."""
        if self.readonly:
            raise PermissionError(f"{self.path}: store opened read-only")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                new_size = _writable_map_size(self.path, 2 * size)
                if new_size <= size:
                    raise InputError(self.path, _address_space_problem()) from None
                logger.info("%s: LMDB map full, growing to %d bytes", self.path, new_size)
                try:
                    self.env.set_mapsize(new_size)
                except lmdb.Error as e:
                    raise _lmdb_failure(self.path, e) from None
            except lmdb.Error as e:
                raise _lmdb_failure(self.path, e) from None

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        """Store one record (one transaction)."""
        value = encode_record(record)
        self._write(lambda txn: txn.put(key.encode("utf-8"), value))

    def put_many(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Store several records in one transaction (all or none)."""
        items = [(k.encode("utf-8"), encode_record(v)) for k, v in records.items()]

        def fn(txn: lmdb.Transaction) -> None:
            for k, v in items:
                txn.put(k, v)

        self._write(fn)

    def replace_all(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Make the store hold exactly `records` (drop everything else), in one transaction."""
        items = [(k.encode("utf-8"), encode_record(v)) for k, v in records.items()]

        def fn(txn: lmdb.Transaction) -> None:
            txn.drop(self.env.open_db(txn=txn), delete=False)  # the main (unnamed) database
            for k, v in items:
                txn.put(k, v)

        self._write(fn)

    def delete(self, key: str) -> bool:
        """Remove a record; True if it existed."""
        return bool(self._write(lambda txn: txn.delete(key.encode("utf-8"))))

    # -- reads -----------------------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        """The record of `key`, or None."""
        value = self._read(lambda txn: txn.get(key.encode("utf-8")))
        return None if value is None else _decoded(self.path, key, value)

    def keys(self) -> list[str]:
        """All keys, sorted (LMDB's bytewise order equals code-point order for UTF-8)."""
        return self._read(
            lambda txn: [bytes(k).decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)]
        )

    def items(self) -> list[tuple[str, dict]]:
        """All (key, record) pairs in key order."""
        return self._read(lambda txn: [(bytes(k).decode("utf-8"), _decoded(self.path, k, v))
                                       for k, v in txn.cursor()])

    def to_dict(self) -> dict[str, dict]:
        """All records as {key: record}."""
        return dict(self.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return int(self._read(lambda txn: self.env.stat()["entries"]))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self._read(lambda txn: txn.get(key.encode("utf-8")) is not None)

    def __getitem__(self, key: str) -> dict:
        record = self.get(key)
        if record is None:
            raise KeyError(key)
        return record

    # -- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop using the environment; it is closed when no other store of this process uses it."""
        _forget_inherited_envs()
        key = self._key()
        shared = _SHARED.get(key)
        if shared is None:
            return
        shared.users.discard(id(self))
        if not shared.users:
            shared.env.close()
            del _SHARED[key]

    def __enter__(self) -> "LmdbStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LmdbStore({str(self.path)!r}, readonly={self.readonly})"


def open_store(path: str | os.PathLike, readonly: bool = True) -> LmdbStore:
    """Open a store; a missing database in read-only mode raises InputError("... run data_prepare first")."""
    store = LmdbStore(path, readonly=readonly)
    if readonly:
        store.env  # noqa: B018 -- open now so a broken database is reported here, not at first read
    return store
