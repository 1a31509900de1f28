import numpy as np
import pytest

from common.core.files import atomic_path, save_npy_atomic, write_json_atomic


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_save_npy_atomic_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    save_npy_atomic(tmp_path / "a" / "x.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "x.npy"), arr)
    write_json_atomic(tmp_path / "j.json", {"b": 1})
    assert (tmp_path / "j.json").read_text().strip().startswith("{")


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    umask = os.umask(0)
    os.umask(umask)
    write_json_atomic(tmp_path / "p.json", {})
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o666 & ~umask


# A full disk, a quota or `ulimit -f`: Python ignores SIGXFSZ, so a write beyond the limit raises (numpy, torch) or
# comes out short without a word (SimpleITK). Each writer must report the file and leave nothing behind.
_FILE_SIZE_LIMIT_SCRIPT = """
import resource, sys
import numpy as np, torch
from common.core.files import save_npy_atomic
from common.storage.checkpoint import save_checkpoint
from common.storage.image_io import ImageMeta, write_mask
out = sys.argv[1]
labels = np.random.default_rng(0).integers(0, 14, (30, 40, 50)).astype(np.uint8)  # ~30 KB compressed
meta = ImageMeta((50, 40, 30), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for name, write in (("m.nii.gz", lambda p: write_mask(labels, meta, p)),
                    ("a.npy", lambda p: save_npy_atomic(p, labels)),
                    ("c.pt", lambda p: save_checkpoint(p, {"w": torch.zeros(10000)}))):
    try:
        write(f"{out}/{name}")
        print(name, "WRITTEN")
    except Exception as e:
        print(name, type(e).__name__, str(e).replace(chr(10), " "))
"""


def test_writes_beyond_a_file_size_limit_fail_clearly_and_leave_no_file(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT_SCRIPT, str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = {line.split(" ", 1)[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"m.nii.gz", "a.npy", "c.pt"}, result.stdout + result.stderr
    for name, line in lines.items():
        assert line.startswith(f"{name} WriteError {out / name}:"), line
        assert "file-size limit" in line and "Traceback" not in line, line
    assert list(out.iterdir()) == [], "a partial file was left behind"


def test_a_short_write_is_caught_before_the_rename(tmp_path, monkeypatch):
    """A writer that returns without error but wrote less than it should (what SimpleITK does on a full disk)."""
    import os

    from common.core import files
    from common.core.errors import WriteError

    real_save = np.save

    def short_save(path, array, **kwargs):
        real_save(path, array, **kwargs)
        os.truncate(path, os.path.getsize(path) - 10)

    monkeypatch.setattr(files.np, "save", short_save)
    target = tmp_path / "x.npy"
    with pytest.raises(WriteError, match="x.npy: .*incomplete"):
        save_npy_atomic(target, np.zeros((20, 20), np.int16))
    assert list(tmp_path.iterdir()) == []


def test_a_folder_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    """DataLoader workers are forked: had they kept the lock, a rerun right after `kill -9` of a trainer would be
    refused until the last worker noticed its parent was gone."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from common.core.errors import InputError
    from common.core.files import folder_lock

    # The child reports its pid itself: by then fork has returned in it, after the at-fork handler that drops the
    # inherited lock (the parent printing the pid raced with that handler on a loaded machine).
    script = ("import os, sys, time\nfrom common.core.files import folder_lock\nwith folder_lock(sys.argv[1]):\n"
              "    child = os.fork()\n    if child == 0:\n        print(os.getpid(), flush=True)\n"
              "        time.sleep(60)\n        os._exit(0)\n    time.sleep(60)\n")
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(InputError, match=f"pid {holder.pid} on host"):
            with folder_lock(tmp_path):
                pass
        holder.kill()
        holder.wait()
        with folder_lock(tmp_path):  # the forked child still lives, the lock is free
            os.kill(child, 0)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
