"""Tests of common.storage.lmdb_store: records, transactions, read-only use, pickling and multi-process reads."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common.core.errors import InputError
from common.storage.lmdb_store import LmdbStore, decode_record, encode_record, open_store


def record(i: int) -> dict:
    return {"image_path": f"/data/case_{i:03d}.nii.gz", "mask_path": None, "spacing_zyx": [2.5, 0.8, 0.8],
            "index": i}


@pytest.fixture()
def filled(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "seg_test"
    store = LmdbStore(path, readonly=False)
    store.put_many({f"case_{i:03d}": record(i) for i in range(20)})
    store.close()
    return path


def test_put_get_keys_items(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db", readonly=False)
    assert len(store) == 0 and store.keys() == [] and store.get("x") is None
    store.put("b", {"v": np.int64(3), "a": np.arange(3), "p": Path("/x/y.npy"), "t": (1, 2), "f": np.float32(0.5)})
    store.put("a", record(1))
    store.put("é", {"unicode": "ok"})
    assert store.keys() == sorted(["a", "b", "é"])
    assert store.get("b") == {"v": 3, "a": [0, 1, 2], "p": "/x/y.npy", "t": [1, 2], "f": 0.5}
    assert "a" in store and "zz" not in store and 3 not in store
    assert [k for k, _ in store.items()] == store.keys() == list(store)
    assert store["a"] == record(1)
    with pytest.raises(KeyError):
        store["missing"]
    store.put("a", {"new": True})  # overwrite
    assert store.get("a") == {"new": True}
    assert store.delete("a") is True and store.delete("a") is False
    assert len(store) == 2
    store.close()
    assert LmdbStore(tmp_path / "db").keys() == sorted(["b", "é"])  # persisted, readable read-only


def test_values_are_utf8_json(tmp_path: Path) -> None:
    raw = encode_record({"k": [1, 2], "s": "x"})
    assert raw.decode("utf-8") == '{"k": [1, 2], "s": "x"}'
    assert decode_record(raw) == {"k": [1, 2], "s": "x"}
    with pytest.raises(TypeError):
        encode_record([1, 2])  # type: ignore[arg-type]


def test_put_many_is_all_or_nothing(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db", readonly=False)
    store.put("keep", {"v": 1})
    with pytest.raises(TypeError):
        store.put_many({"a": {"v": 1}, "b": {"v": object()}})
    assert store.keys() == ["keep"]

    class Boom(Exception):
        pass

    def failing(txn):
        txn.put(b"half", b"{}")
        raise Boom

    with pytest.raises(Boom):
        store._write(failing)
    assert store.keys() == ["keep"]  # the aborted transaction left nothing


def test_replace_all(filled: Path) -> None:
    store = LmdbStore(filled, readonly=False)
    store.replace_all({"case_005": {"x": 1}, "new": {"y": 2}})
    assert store.keys() == ["case_005", "new"] and store.get("case_005") == {"x": 1}
    store.replace_all({})
    assert len(store) == 0


def test_map_grows_when_full(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db", readonly=False, map_size=64 * 1024)
    big = {f"k{i:04d}": {"payload": "x" * 2000} for i in range(200)}  # ~400 KB > 64 KB map
    store.put_many(big)
    assert len(store) == 200


def test_missing_database_message(tmp_path: Path) -> None:
    missing = tmp_path / "db" / "seg_train_fold_1"
    with pytest.raises(InputError) as info:
        open_store(missing)
    assert str(info.value) == f"{missing}: database not found; run data_prepare first"
    with pytest.raises(InputError, match="run data_prepare first"):
        LmdbStore(missing)
    assert not missing.exists()  # a read-only open never creates anything
    gone = tmp_path / "no_dataset" / "db" / "seg_train_fold_1"
    with pytest.raises(InputError, match=r"the dataset folder .*no_dataset is missing \(check data_base_dir\)"):
        open_store(gone)


def test_corrupt_database_message(tmp_path: Path) -> None:
    path = tmp_path / "db" / "seg_train_fold_1"
    store = LmdbStore(path, readonly=False)
    store.put("a", {"x": 1})
    store.close()
    (path / "data.mdb").write_bytes(np.random.default_rng(0).integers(0, 256, 70000, dtype=np.uint8).tobytes())
    for readonly in (True, False):
        with pytest.raises(InputError, match=r"seg_train_fold_1: database is damaged or not an LMDB database .*"
                                             "delete this folder and run data_prepare again"):
            LmdbStore(path, readonly=readonly).keys()


def test_readonly_store_refuses_writes(filled: Path) -> None:
    store = open_store(filled)
    with pytest.raises(PermissionError):
        store.put("x", {})
    assert len(store) == 20


def test_pickle_round_trip_reopens(filled: Path) -> None:
    store = open_store(filled)
    assert len(store) == 20  # environment open in this process
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("case_007") == record(7)
    clone.close()
    assert store.get("case_008") == record(8)  # closing one store leaves the shared environment to the other


def test_reader_and_writer_on_one_database_in_one_process(filled: Path) -> None:
    reader = open_store(filled)
    assert len(reader) == 20
    writer = LmdbStore(filled, readonly=False)  # upgrades the shared environment to writable
    writer.put("new", {"index": 20})
    assert reader.get("new") == {"index": 20}
    reader.close()
    writer.put("newer", {"index": 21})
    writer.close()
    assert len(open_store(filled)) == 22


class _StoreDataset(Dataset):
    def __init__(self, store: LmdbStore) -> None:
        self.store = store
        self.keys = store.keys()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        rec = self.store.get(self.keys[i])
        return torch.tensor([rec["index"], torch.utils.data.get_worker_info().id])


@pytest.mark.parametrize("context", ["fork"])
def test_dataloader_workers_read_concurrently(filled: Path, context: str) -> None:
    store = open_store(filled)
    store.get("case_000")  # open in the parent before the workers start (the case fork-safety is about)
    loader = DataLoader(_StoreDataset(store), batch_size=1, num_workers=2, multiprocessing_context=context)
    rows = torch.cat([b for b in loader]).numpy()
    assert sorted(rows[:, 0].tolist()) == list(range(20))
    assert set(rows[:, 1].tolist()) == {0, 1}  # both workers served records
    assert store.get("case_019") == record(19)  # the parent's environment still works


def _child_reads(store: LmdbStore, queue) -> None:
    queue.put([store.get(k)["index"] for k in store.keys()])


def test_forked_child_and_parent_writer(filled: Path) -> None:
    writer = LmdbStore(filled, readonly=False)
    writer.put("extra", {"index": 99})
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(writer, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert sorted(got) == list(range(20)) + [99]
    writer.put("after_fork", {"index": 100})  # the parent keeps writing normally
    assert open_store(filled).get("after_fork") == {"index": 100}


# ------------------------------------------------------------------------------------------------ issue 21


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter (a SIGBUS or an address-space limit must not reach the test process)."""
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})


_READ_ALL = """
import sys
from common.core.errors import InputError
from common.storage.lmdb_store import open_store
try:
    print(len(open_store(sys.argv[1]).items()), "records")
except InputError as e:
    print("InputError", e)
"""


def test_a_truncated_database_is_a_clear_error_not_a_bus_error(tmp_path: Path) -> None:
    """Reading a page beyond the end of a truncated data.mdb killed the trainer with SIGBUS and no message."""
    path = tmp_path / "db" / "seg_train_fold_1"
    store = LmdbStore(path, readonly=False)
    store.put_many({f"case_{i:04d}": {"payload": "x" * 500} for i in range(2000)})
    store.close()
    data = path / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    result = _run(_READ_ALL, str(path))
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-500:]}"
    assert result.stdout.startswith(f"InputError {path}: database is truncated"), result.stdout
    assert "delete this folder" in result.stdout


def test_a_value_that_is_not_json_names_the_database_and_key(filled: Path) -> None:
    import lmdb

    env = lmdb.open(str(filled))
    with env.begin(write=True) as txn:
        txn.put(b"case_007", b"\xff\xfe not json")
    env.close()
    store = open_store(filled)
    for read in (lambda: store.get("case_007"), store.items, store.to_dict):
        with pytest.raises(InputError, match=f"{filled}: the record of key 'case_007' is not UTF-8 JSON"):
            read()
    assert store.get("case_001") == record(1)


_MANY_WRITERS = """
import os, resource, sys
from pathlib import Path
from common.core.errors import InputError
from common.storage.lmdb_store import LmdbStore
vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
headroom = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.RLIM_INFINITY))
try:
    for i in range(14):  # as many databases as data_prepare writes, each kept open
        LmdbStore(f"{sys.argv[1]}/db{i}", readonly=False).put_many({f"k{j}": {"x": "y" * 200} for j in range(50)})
    print("ok")
except InputError as e:
    print("InputError", e)
"""


def test_an_address_space_limit_never_reads_as_damage(tmp_path: Path) -> None:
    """Under `ulimit -v` (as clusters set) the 1 GiB maps of many open databases did not fit: a good database was
    called damaged with the advice to delete it. The maps now fit the limit; where even the data cannot, the message
    names the limit and never asks to delete anything."""
    result = _run(_MANY_WRITERS, str(tmp_path / "a"), "1536")
    assert result.stdout.strip() == "ok", result.stdout + result.stderr[-500:]
    big = tmp_path / "big"
    store = LmdbStore(big, readonly=False)
    store.put_many({f"case_{i:05d}": {"payload": "x" * 4000} for i in range(20000)})  # about 100 MB
    store.close()
    result = _run(_MANY_WRITERS.replace("db{i}", "../big"), str(tmp_path / "a"), "16")
    assert "address space" in result.stdout and "ulimit -v" in result.stdout, result.stdout + result.stderr[-500:]
    assert "damaged or not an LMDB" not in result.stdout and "delete" not in result.stdout
