"""The unlabeled cases' truth (trainu_mask_hidden/) is for benchmarks only: data_prepare and training never list
or open anything in it. An audit hook records every path that Python lists, globs or opens while the real stages
run in this process; the test fails if one of them is inside the hidden folder."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from common.config import CoarseTrainConfig, FineTrainConfig, PrepareConfig
from common.core.typed_config import load_config
from data_prepare import run as prepare_run
from data_prepare.synthetic import HIDDEN_MASK_DIR, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
_EVENTS = ("open", "os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "os.stat", "shutil.copyfile")
_seen: list[str] | None = None  # while a list: the audit hook appends every path it sees


def _hook(event: str, args: tuple) -> None:
    if _seen is None or event not in _EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        _seen.append(os.fsdecode(os.fspath(path)))


sys.addaudithook(_hook)  # hooks cannot be removed; it does nothing while _seen is None


def _watch() -> list[str]:
    global _seen
    _seen = []
    return _seen


def _stop() -> None:
    global _seen
    _seen = None


def test_stages_never_list_the_hidden_truth(tmp_path):
    data = tmp_path / "dataset"
    write_dataset(data, labeled=3, unlabeled=2, val=0, size="tiny", seed=5)
    hidden = data / HIDDEN_MASK_DIR
    assert len(list(hidden.glob("*.nii.gz"))) == 2

    seen = _watch()
    try:
        os.listdir(hidden)  # the hook works: a listing of the folder is seen
        assert any(HIDDEN_MASK_DIR in p for p in seen)
        seen.clear()

        cfg = load_config(PrepareConfig, ROOT / "data_prepare" / "config.yaml", [
            f"data_base_dir={data}", f"coarse_size_zyx=[{SIZE},{SIZE},{SIZE}]",
            f"fine_size_zyx=[{SIZE},{SIZE},{SIZE}]", "num_workers=0"])
        assert prepare_run.main(cfg) == 0
        from coarse_base_seg.train import main as coarse_main
        from fine_efficient_seg.train import main as fine_main

        small = ["device=cpu", "model.channels=[2,4,4,8,8]", f"data.size_zyx=[{SIZE},{SIZE},{SIZE}]",
                 "schedule.iterations=1", "schedule.val_interval=1", "schedule.log_interval=1", "data.num_workers=0",
                 "amp.precision=fp32"]
        coarse_main(load_config(CoarseTrainConfig, ROOT / "coarse_base_seg" / "config.yaml", [
            f"data_base_dir={data}", f"output_dir={tmp_path / 'coarse'}", *small]))
        fine_cfg = load_config(FineTrainConfig, ROOT / "fine_efficient_seg" / "config.yaml", [
            f"data_base_dir={data}", f"output_dir={tmp_path / 'fine'}", *small, "boxes.coarse_model_dir=null",
            "uif.keep_count=1", "uif.snapshots=0", f"export.dir={tmp_path / 'export'}"])
        for step in ("boxes", "round1", "uif", "round2"):
            fine_main(replace(fine_cfg, step=step))
    finally:
        _stop()
    assert any("trainu_images" in p for p in seen), "the stages read the unlabeled images (hook sanity)"
    touched = sorted({p for p in seen if HIDDEN_MASK_DIR in p})
    assert not touched, f"a stage touched the hidden truth: {touched[:5]}"
