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
