"""Two folds on one dataset: each fold's run folder holds its own boxes, UIF pool and checkpoints, and a fold
pointed at another fold's folder is refused (common.storage.step_marker.claim_run_folder)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_fine_train import _threshold_pair, fine_config
from tiny_models import prepared_tiny_dataset

from coarse_base_seg.train import cli as coarse_cli
from common.config import FineTrainConfig
from common.core.errors import InputError
from common.storage.lmdb_store import open_store
from fine_efficient_seg import uif as fine_uif
from fine_efficient_seg.train import main as fine_main

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
TINY = "[2,4,4,8,8]"


@pytest.fixture(scope="module")
def five_fold_dataset(tmp_path_factory) -> Path:
    """Tiny synthetic dataset prepared with all five folds, and a tiny exported coarse model beside it."""
    return prepared_tiny_dataset(tmp_path_factory.mktemp("folds"), labeled=5, unlabeled=3, seed=5, hard_fraction=0.0,
                                 prepare_overrides=("split_5fold=true",))


def _fine(data: Path, out: Path, fold: int, keep: int) -> FineTrainConfig:
    """The fine-stage test config of test_fine_train for `fold`, its run folder out/output."""
    return fine_config(data, out, f"fold={fold}", f"uif.keep_count={keep}")


def _bytes(db: Path) -> bytes:
    return (db / "data.mdb").read_bytes()


def test_two_fine_folds_keep_their_own_boxes_and_pool(five_fold_dataset, tmp_path, monkeypatch):
    data = five_fold_dataset
    train_1 = set(open_store(data / "db" / "seg_train_fold_1").keys())
    train_2 = set(open_store(data / "db" / "seg_train_fold_2").keys())
    assert train_1 != train_2  # the folds really differ
    dataset_db = {name: _bytes(data / "db" / name) for name in ("seg_trainu", "seg_train_fold_1", "seg_train_fold_2")}
    monkeypatch.setattr(fine_uif, "load_round_networks", _threshold_pair)
    cfgs = {fold: _fine(data, tmp_path / f"fold_{fold}", fold, keep) for fold, keep in ((1, 1), (2, 2))}
    for cfg in cfgs.values():  # round 1 stands in as finished: the test is about the boxes and the pool
        (Path(cfg.output_dir) / "round1").mkdir(parents=True)
        (Path(cfg.output_dir) / "round1" / "DONE").write_text('{"iteration": 3}')

    out_1 = Path(cfgs[1].output_dir)
    fine_main(replace(cfgs[1], step="boxes"))
    fine_main(replace(cfgs[1], step="uif"))
    fold_1 = (_bytes(out_1 / "db" / "unlabeled_boxes"), _bytes(out_1 / "db" / "uif_pool"),
              (out_1 / "uif_scores.csv").read_text())
    out_2 = Path(cfgs[2].output_dir)
    fine_main(replace(cfgs[2], step="boxes"))
    fine_main(replace(cfgs[2], step="uif"))

    assert (_bytes(out_1 / "db" / "unlabeled_boxes"), _bytes(out_1 / "db" / "uif_pool"),
            (out_1 / "uif_scores.csv").read_text()) == fold_1
    assert len(open_store(out_1 / "db" / "uif_pool").keys()) == 1
    assert len(open_store(out_2 / "db" / "uif_pool").keys()) == 2
    assert {name: _bytes(data / "db" / name) for name in dataset_db} == dataset_db  # the dataset is only read

    # fold 2 pointed at fold 1's folder: refused before any step runs, naming the fold
    with pytest.raises(InputError, match=r"run\.json.*fold 1 \(this command: 2\)"):
        fine_main(replace(cfgs[2], output_dir=str(out_1), step="uif"))
    assert (out_1 / "uif_scores.csv").read_text() == fold_1[2]
    # a wrong data_base_dir fails on the dataset and claims no folder: the corrected command then runs
    fresh = tmp_path / "fresh"
    with pytest.raises(InputError, match="check data_base_dir"):
        fine_main(replace(cfgs[2], data_base_dir=str(tmp_path / "no_dataset"), output_dir=str(fresh), step="boxes"))
    assert not (fresh / "run.json").exists()
    fine_main(replace(cfgs[2], output_dir=str(fresh), step="boxes"))
    assert (fresh / "run.json").is_file()


def test_coarse_fold_into_another_folds_folder_exits_2(five_fold_dataset, tmp_path, capsys):
    data, out = five_fold_dataset, tmp_path / "coarse"
    args = [f"data_base_dir={data}", f"output_dir={out}", "device=cpu", f"data.size_zyx=[{SIZE},{SIZE},{SIZE}]",
            f"model.channels={TINY}", "data.num_workers=0", "schedule.iterations=1", "schedule.val_interval=100"]
    assert coarse_cli(args + ["fold=1"]) == 0
    last = (out / "checkpoints" / "last.pt").read_bytes()
    assert coarse_cli(args + ["fold=2"]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "fold 1 (this command: 2)" in err and "output_dir=output/fold_2" in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == last
    assert coarse_cli(args + ["fold=1"]) == 0  # the same run again: done, nothing refused
