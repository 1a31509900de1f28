"""Fine stage (fine_efficient_seg): boxes, streams, the uif step, and `sh run.sh` end to end on a tiny dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import prepared_tiny_dataset
from torch import nn

from benchmarks import cps_confidence
from common.config import FineTrainConfig
from common.core.defaults import FINE_MIN_VOLUME_MM3, HU_WINDOW
from common.core.errors import InputError
from common.core.typed_config import ConfigError, load_config
from common.networks import build_network
from common.storage.checkpoint import load_checkpoint
from common.storage.data_paths import db_path
from common.storage.lmdb_store import open_store
from common.storage.step_marker import read_marker, write_marker
from common.storage.weights import load_model
from common.train.engine import DONE_FILE
from common.volume.boxes import body_box, grid_box_to_raw
from fine_efficient_seg import uif as fine_uif
from fine_efficient_seg.augment import FineAugmentSettings
from fine_efficient_seg.boxes import compute_boxes
from fine_efficient_seg.dataset import (
    FineStream,
    SampleSpec,
    StreamSpec,
    fixed_crop_input,
    load_cases,
    validation_cases,
)
from fine_efficient_seg.layout import RunLayout
from fine_efficient_seg.train import main, sample_spec
from fine_efficient_seg.uif import UifOptions, read_scores_csv, run_uif, snapshot_iterations

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "fine_efficient_seg"
SIZE = 32
TINY = "[2,4,4,8,8]"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Tiny synthetic dataset (4 labeled, 4 unlabeled), prepared at 32^3, plus a tiny exported coarse model."""
    return prepared_tiny_dataset(tmp_path_factory.mktemp("fine"), labeled=4, unlabeled=4, seed=3, hard_fraction=0.5)


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data_base_dir={data}", f"output_dir={out / 'output'}", "device=cpu", f"data.size_zyx=[{SIZE},{SIZE},{SIZE}]",
        f"model.channels={TINY}", "amp.precision=fp32", "data.num_workers=1", "schedule.iterations=3",
        "schedule.val_interval=100", "schedule.checkpoint_interval=1", "schedule.log_interval=1", "round2.iterations=1",
        "uif.keep_count=2", f"boxes.coarse_model_dir={data.parent / 'coarse_model'}", f"export.dir={out / 'export'}",
        *extra,
    ]


def fine_config(data: Path, out: Path, *extra: str) -> FineTrainConfig:
    return load_config(FineTrainConfig, STAGE / "config.yaml", overrides(data, out, *extra))


# ----------------------------------------------------------------------------------------------------- boxes


def test_box_helpers():
    image = np.full((8, 10, 12), -1000, dtype=np.int16)
    image[2:6, 3:9, 1:11] = 40
    assert body_box(image) == ((2, 5), (3, 8), (1, 10))
    assert body_box(np.full((3, 3, 3), -1000)) is None
    # coarse 16^3 -> raw (40, 80, 100): int(index * zoom), clipped
    assert grid_box_to_raw(((0, 15), (4, 8), (2, 2)), (16, 16, 16), (40, 80, 100)) == ((0, 37), (20, 40), (12, 12))


def run_boxes(db: Path, boxes_db: Path, dataset: Path, model_dir: str | None) -> dict:
    """The boxes step on the CPU, its regions beside `boxes_db`, with the stage's default margin (40 mm)."""
    return compute_boxes(db, boxes_db, dataset, model_dir, torch.device("cpu"), "fp32",
                         regions_dir=boxes_db.parent / "regions", region_margin_mm=40.0)


def _db_bytes(db: Path) -> bytes:
    return (db / "data.mdb").read_bytes()


def test_boxes_step_model_and_body_fallback(dataset, tmp_path, caplog):
    db = dataset / "db" / "seg_trainu"
    before = open_store(db).to_dict()
    boxes_db = tmp_path / "with_model" / "db" / "unlabeled_boxes"
    model_dir = str(dataset.parent / "coarse_model")
    summary = run_boxes(db, boxes_db, dataset, model_dir)
    assert summary["cases"] == 4 and summary["computed"] == 4 and summary["source"] == "coarse_model"
    boxes = open_store(boxes_db).to_dict()
    assert sorted(boxes) == sorted(before)
    for key, record in boxes.items():
        assert record["coarse_box_source"] in ("coarse_model", "whole_volume")
        for (lo, hi), n in zip(record["coarse_box"], before[key]["shape_zyx"]):
            assert 0 <= lo <= hi < n
    # the dataset's database is only read
    assert open_store(db).to_dict() == before
    # Done: a second run computes nothing.
    again = run_boxes(db, boxes_db, dataset, model_dir)
    assert again["computed"] == 0 and again["skipped"] == 4
    # No coarse model: body box with a warning.
    body_db = tmp_path / "no_model" / "db" / "unlabeled_boxes"
    caplog.set_level("WARNING")
    body = run_boxes(db, body_db, dataset, None)
    assert body["source"] == "body" and body["computed"] == 4
    assert any("body box" in r.getMessage() for r in caplog.records)
    for key, record in open_store(body_db).to_dict().items():
        assert record["coarse_box_source"] == "body"
        image = np.load(before[key]["coarse_image_path"])
        assert record["coarse_box"] == [list(p) for p in grid_box_to_raw(body_box(image), image.shape,
                                                                             before[key]["shape_zyx"])]
    # A folder without model.pt also falls back to the body box.
    assert run_boxes(db, tmp_path / "empty_dir" / "boxes", dataset, str(tmp_path))["source"] == "body"


def test_two_experiments_on_one_dataset_keep_their_own_boxes_and_uif_pool(dataset, tmp_path, monkeypatch):
    """Boxes and UIF pool live under each run's output_dir: a second experiment on the same dataset (another
    coarse model, another keep_count) leaves the first one's untouched, and the dataset's db/ is only read."""
    seg_trainu = dataset / "db" / "seg_trainu"
    dataset_before = open_store(seg_trainu).to_dict()
    monkeypatch.setattr(fine_uif, "load_round_networks", _threshold_pair)
    cfg_a = fine_config(dataset, tmp_path / "a", "uif.keep_count=1")
    cfg_b = fine_config(dataset, tmp_path / "b", "uif.keep_count=3", "boxes.coarse_model_dir=null")
    for cfg in (cfg_a, cfg_b):
        (Path(cfg.output_dir) / "round1").mkdir(parents=True)
        (Path(cfg.output_dir) / "round1" / "DONE").write_text('{"iteration": 3}')
    main(replace(cfg_a, step="boxes"))
    main(replace(cfg_a, step="uif"))
    out_a = Path(cfg_a.output_dir)
    boxes_a, pool_a = out_a / "db" / "unlabeled_boxes", out_a / "db" / "uif_pool"
    snapshot = (_db_bytes(boxes_a), _db_bytes(pool_a))
    main(replace(cfg_b, step="boxes"))
    main(replace(cfg_b, step="uif"))
    out_b = Path(cfg_b.output_dir)
    assert (_db_bytes(boxes_a), _db_bytes(pool_a)) == snapshot
    sources_a = {r["coarse_box_source"] for r in open_store(boxes_a).to_dict().values()}
    sources_b = {r["coarse_box_source"] for r in open_store(out_b / "db" / "unlabeled_boxes").to_dict().values()}
    assert sources_b == {"body"} and "body" not in sources_a
    assert len(open_store(pool_a).keys()) == 1 and len(open_store(out_b / "db" / "uif_pool").keys()) == 3
    assert all(r.get("coarse_box") for r in open_store(out_b / "db" / "uif_pool").to_dict().values())
    assert open_store(seg_trainu).to_dict() == dataset_before
    assert not (dataset / "db" / "seg_trainu_uif").exists()
    # the uif step's marker: unchanged inputs skip it, another keep_count redoes it
    assert main(replace(cfg_a, step="uif"))["uif"]["skipped"]
    assert main(replace(cfg_a, step="uif", uif=replace(cfg_a.uif, keep_count=2)))["uif"]["kept"] == 2
    assert len(open_store(pool_a).keys()) == 2


# ----------------------------------------------------------------------------------------------------- streams


def test_streams_are_deterministic_and_resume_exactly(dataset, tmp_path):
    cfg = fine_config(dataset, tmp_path)
    labeled = load_cases(dataset / "db" / "seg_train_fold_1", dataset, labeled=True)
    kwargs = dict(sample=sample_spec(cfg), device="cpu", rank=0, world_size=1)
    spec = StreamSpec("labeled", seed=5, batch_size=2, labeled=True)
    stream = FineStream(labeled, spec, **kwargs)
    first = stream(0)
    batches = [next(first) for _ in range(3)]
    first.close()
    x, y = batches[0]
    assert x.shape == (2, 1, SIZE, SIZE, SIZE) and x.dtype == torch.float32
    assert y.shape == (2, SIZE, SIZE, SIZE) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 13 and int(y.max()) > 0
    assert torch.allclose(x.mean(dim=(1, 2, 3, 4)), torch.zeros(2), atol=1e-4)     # per-sample z-score
    resumed = FineStream(labeled, spec, **kwargs)(2)
    x2, y2 = next(resumed)
    resumed.close()
    assert torch.equal(x2, batches[2][0]) and torch.equal(y2, batches[2][1])
    assert not torch.equal(batches[0][0], batches[1][0])
    boxes_db = tmp_path / "db" / "unlabeled_boxes"
    run_boxes(dataset / "db" / "seg_trainu", boxes_db, dataset, None)
    unlabeled = load_cases(dataset / "db" / "seg_trainu", dataset, labeled=False, boxes_db=boxes_db)
    u_stream = FineStream(unlabeled, StreamSpec("unlabeled", seed=5, batch_size=2, labeled=False), **kwargs)(0)
    xu = next(u_stream)
    u_stream.close()
    assert isinstance(xu, torch.Tensor) and xu.shape == (2, 1, SIZE, SIZE, SIZE)


def test_fixed_crop_matches_prepared_fine_array(dataset):
    """The crop read from the region (with its offset) is the GT box + 20 mm crop data_prepare made."""
    labeled = load_cases(dataset / "db" / "seg_train_fold_1", dataset, labeled=True)
    sample = SampleSpec((SIZE,) * 3, HU_WINDOW, FineAugmentSettings())
    val = {case_id: x for case_id, x, _ in validation_cases(dataset / "db" / "seg_train_fold_1", dataset, sample,
                                                                 "cpu")}
    assert any(case.region_offset_zyx != (0, 0, 0) for case in labeled)    # regions are sub-volumes
    for case in labeled:
        x = fixed_crop_input(case, [SIZE] * 3, list(HU_WINDOW), 20.0, "cpu")
        # data_prepare rounds the resized HU to int16; our crop is resized in float: tiny differences only
        assert torch.allclose(x, val[case.case_id], atol=0.02)


def test_validation_cases_load_only_this_ranks_share(dataset, monkeypatch):
    import fine_efficient_seg.dataset as fine_dataset

    db = dataset / "db" / "seg_pre-process_database"  # the 4 labeled cases with their fixed fine arrays
    sample = SampleSpec((SIZE,) * 3, HU_WINDOW, FineAugmentSettings())
    every = [case_id for case_id, _, _ in validation_cases(db, dataset, sample, "cpu")]
    assert len(every) == 4
    loaded: list[str] = []
    real_load = np.load
    monkeypatch.setattr(fine_dataset.np, "load", lambda path, *a, **k: loaded.append(str(path)) or real_load(path, *a,
                                                                                                              **k))
    mine = [case_id for case_id, _, _ in validation_cases(db, dataset, sample, "cpu", 1, 2)]
    assert mine == every[1::2]
    assert len(loaded) == 2 * len(mine)  # image + mask of its own cases only


# ----------------------------------------------------------------------------------------------------- uif


class ThresholdNet(nn.Module):
    """Predicts the liver (channel 0) where the normalised input exceeds `threshold`, nothing else."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 13, *x.shape[2:]), -10.0)
        logits[:, 0] = 10.0 * (x[:, 0] - self.threshold)
        return logits


def make_pool(root: Path) -> Path:
    """Unlabeled records over hand-made regions: two-valued images (both nets agree) and ramps (they disagree)."""
    shape = (12, 14, 16)
    records = {}
    z = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.ones(shape, dtype=np.float32)
    images = {
        "agree_b": np.where(z < 6, -100, 100),
        "agree_a": np.where(z < 6, -100, 100),
        "agree_c": np.where(z < 6, -200, 200),      # same normalised image as agree_a: a three-way tie
        "disagree_a": -300 + 50 * z,
        "disagree_b": -300 + 40 * z,
    }
    for case_id, image in images.items():
        path = root / f"{case_id}.npy"
        np.save(path, image.astype(np.int16))
        records[case_id] = {
            "spacing_zyx": [2.0, 2.0, 2.0], "shape_zyx": list(shape), "region_path": str(path),
            "region_offset_zyx": [0, 0, 0], "region_shape_zyx": list(shape), "coarse_box": [[2, 9], [2, 11], [2, 13]],
            "coarse_box_source": "coarse_model", "organ_bbox": None, "region_mask_path": None,
        }
    db = root / "db" / "seg_trainu"
    open_store(db, readonly=False).put_many(records)
    return db


@pytest.mark.parametrize("method", ["disagreement", "entropy"])
def test_uif_step_keeps_agreeing_cases(tmp_path, monkeypatch, method):
    db = make_pool(tmp_path)
    monkeypatch.setattr(fine_uif, "load_round_networks", _threshold_pair)
    pool_db = tmp_path / "out" / "db" / "uif_pool"
    options = UifOptions(method=method, keep_ratio=0.1, size_zyx=(SIZE,) * 3, precision="fp32")
    common = dict(layout=RunLayout(tmp_path / "out"), k=1, unlabeled_db=db, data_base_dir=tmp_path,
                  device=torch.device("cpu"))
    rows = run_uif(options=replace(options, keep_count=3), **common)
    kept = {r.case for r in rows if r.kept}
    assert kept == {"agree_a", "agree_b", "agree_c"}
    assert [r.rank for r in rows] == [1, 2, 3, 4, 5]
    csv_rows = read_scores_csv(tmp_path / "out" / "uif_scores.csv")
    assert [(r.case, r.kept, r.rank) for r in csv_rows] == [(r.case, r.kept, r.rank) for r in rows]
    filtered = open_store(pool_db)
    assert filtered.keys() == sorted(kept)
    assert filtered.get("agree_a")["coarse_box"] == [[2, 9], [2, 11], [2, 13]]
    filtered.close()
    # The three agree_* tie: the lower ids win; the database shrinks to the new selection.
    rows = run_uif(options=replace(options, keep_count=1), **common)
    assert [r.case for r in rows if r.kept] == ["agree_a"]
    filtered = open_store(pool_db)
    assert filtered.keys() == ["agree_a"]
    filtered.close()
    # keep_ratio 0.4 of 5 -> 2
    rows = run_uif(options=replace(options, keep_count=None, keep_ratio=0.4), **common)
    assert [r.case for r in rows if r.kept] == ["agree_a", "agree_b"]


# ----------------------------------------------------------------------------------------------------- end to end


RUN_ENV = {**os.environ, "GPUS": "1", "OMP_NUM_THREADS": "2"}


def kill_run_sh_when(args: list[str], path: Path) -> None:
    """Start `sh run.sh args` and kill it (SIGKILL to its whole process group) as soon as `path` exists."""
    proc = subprocess.Popen(["sh", str(STAGE / "run.sh"), *args], cwd=REPO, env=RUN_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not path.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.is_file(), f"the run ended (rc {proc.poll()}) or timed out before writing {path}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_sh(args: list[str]) -> None:
    result = subprocess.run(["sh", str(STAGE / "run.sh"), *args], cwd=REPO, env=RUN_ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_run_sh_all_steps_with_resume_after_kill(dataset, tmp_path):
    """`sh run.sh` killed in round 1, then `sh run.sh` again: resumes round 1 and runs every later step."""
    args = overrides(dataset, tmp_path)
    out = tmp_path / "output"
    last = out / "round1" / "checkpoints" / "last.pt"
    kill_run_sh_when(args, last)
    killed_at = int(load_checkpoint(last)["iteration"])
    assert not (out / "round1" / "DONE").exists(), "round 1 finished before the kill"

    run_sh(args)
    log = (out / "round1" / "train.log").read_text()
    assert "resuming from" in log and f"at iteration {killed_at}/3" in log

    boxes = open_store(out / "db" / "unlabeled_boxes")
    assert all(boxes.get(k).get("coarse_box") is not None for k in boxes.keys())
    pool = boxes.keys()
    boxes.close()
    assert not any("coarse_box" in r for r in open_store(dataset / "db" / "seg_trainu").to_dict().values())
    for name, iterations in (("round1", 3), ("round2", 1)):
        round_dir = out / name
        assert json.loads((round_dir / "DONE").read_text())["iteration"] == iterations
        for ckpt in ("last.pt", "best_model_a.pt", "best_model_b.pt"):
            assert (round_dir / "checkpoints" / ckpt).is_file()
        assert (round_dir / "metrics.jsonl").read_text().strip()
        assert any((round_dir / "tb").iterdir())
        assert load_checkpoint(round_dir / "checkpoints" / "last.pt")["round"] == name
    rows = read_scores_csv(out / "uif_scores.csv")
    assert sorted(r.case for r in rows) == pool
    assert sum(r.kept for r in rows) == 2
    filtered = open_store(out / "db" / "uif_pool")
    assert filtered.keys() == sorted(r.case for r in rows if r.kept)
    filtered.close()
    model = load_model(tmp_path / "export", "fine")
    assert set(model.networks) == {"a", "b"} and model.primary == "a"
    assert model.preprocess.to_json() == {"size_zyx": [SIZE] * 3, "hu_window": list(HU_WINDOW), "extend_size_mm": 20.0,
                                "min_volume_mm3": FINE_MIN_VOLUME_MM3}
    assert (tmp_path / "export" / "config.yaml").is_file()
    # the export wrote the ONNX Runtime graphs of both networks (common.infer.backends.export_model_graphs)
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "export" / "onnx").glob("*.onnx")) == ["a", "b"]
    with torch.no_grad():
        assert model.net(torch.zeros(1, 1, SIZE, SIZE, SIZE)).shape == (1, 13, SIZE, SIZE, SIZE)
    # Everything is done: a rerun skips every step and changes nothing.
    stamp = (tmp_path / "export" / "model.pt").stat().st_mtime_ns
    results = main(fine_config(dataset, tmp_path))
    assert results["boxes"]["computed"] == 0
    assert results["round1"]["already_done"] and results["round2"]["already_done"]
    assert results["uif"]["skipped"] and results["export"]["skipped"]
    assert (tmp_path / "export" / "model.pt").stat().st_mtime_ns == stamp
    # A changed UIF setting changes the pool: round 2 and the export depend on it, so both are done again (the stale
    # round 2 is kept aside); round 1 does not depend on it.
    results = main(fine_config(dataset, tmp_path, "uif.keep_count=3"))
    assert results["uif"]["kept"] == 3 and results["round1"]["already_done"]
    assert not results["round2"]["already_done"] and not results["export"].get("skipped")
    assert (out / "round2" / "previous" / "DONE").is_file()
    assert "labeled + 3 unlabeled" in (out / "steps.log").read_text()
    assert (tmp_path / "export" / "model.pt").stat().st_mtime_ns != stamp
    # the pool changed again, but only the uif step ran: the export refuses the stale round 2
    main(fine_config(dataset, tmp_path, "uif.keep_count=1", "step=uif"))
    with pytest.raises(InputError, match="round2 was trained from other inputs"):
        main(fine_config(dataset, tmp_path, "uif.keep_count=1", "step=export"))


def _final_state(run: Path, k: int) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(run / "output" / f"round{k}" / "checkpoints" / "last.pt")
    return {f"{name}.{key}": value for name in ("a", "b") for key, value in checkpoint[f"net_{name}"].items()}


def test_three_filtered_rounds_resumed_after_a_kill_in_round2_equal_an_uninterrupted_run(dataset, tmp_path):
    """uif.rounds=3 with a growing keep: boxes, round1, uif, round2, uif2, round3, uif3, round4, export. A run killed
    in round 2 and started again ends with the same selections and networks as one that was never stopped."""
    extra = ("uif.rounds=3", "uif.keep_count=1", "uif.keep_schedule=growing", "schedule.iterations=2",
             "round2.iterations=6", "round2.init=warm")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_sh(overrides(dataset, straight, *extra))
    last = killed / "output" / "round2" / "checkpoints" / "last.pt"
    kill_run_sh_when(overrides(dataset, killed, *extra), last)
    assert not (last.parent.parent / "DONE").exists(), "round 2 finished before the kill"
    assert not (killed / "output" / "round3").exists()
    killed_at = int(load_checkpoint(last)["iteration"])
    run_sh(overrides(dataset, killed, *extra))
    assert f"at iteration {killed_at}/6" in (killed / "output" / "round2" / "train.log").read_text()

    for run in (straight, killed):
        layout = RunLayout(run / "output")
        # filter k scored the whole pool (4 cases) and kept k cases; round k + 1 trained on them
        for k in (1, 2, 3):
            rows = read_scores_csv(layout.scores_csv(k))
            assert len(rows) == 4 and sum(r.kept for r in rows) == k
            assert sorted(open_store(layout.pool_db(k), readonly=True).keys()) == sorted(r.case for r in rows
                                                                                            if r.kept)
        for k in (1, 2, 3, 4):
            assert json.loads((layout.round_dir(k) / "DONE").read_text())["iteration"] == (2 if k == 1 else 6)
        steps_log = layout.steps_log.read_text()
        assert all(f"labeled + {k} unlabeled" in steps_log for k in (1, 2, 3))
        assert json.loads(layout.export_marker.read_text())["round_dir"] == str(layout.round_dir(4))
        assert (run / "export" / "model.pt").is_file()
    for k in (1, 2, 3):
        assert (RunLayout(straight / "output").scores_csv(k).read_text()
                == RunLayout(killed / "output").scores_csv(k).read_text())
    for k in (1, 2, 3, 4):
        a, b = _final_state(straight, k), _final_state(killed, k)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"round{k} {key}")
    # the run is complete: every step is skipped, and step names past uif.rounds are refused
    results = main(fine_config(dataset, killed, *extra))
    assert all(results[f"round{k}"]["already_done"] for k in (1, 2, 3, 4))
    assert all(results[name]["skipped"] for name in ("uif", "uif2", "uif3", "export"))
    with pytest.raises(ConfigError, match="'round5' is not a step of this run"):
        fine_config(dataset, killed, *extra, "step=round5")


def test_run_sh_execs_the_trainer(tmp_path):
    """One GPU: run.sh replaces itself by the trainer, so a signal to the shell's pid reaches the trainer."""
    proc = subprocess.Popen(["sh", str(STAGE / "run.sh"), f"config={tmp_path / 'missing.yaml'}"], cwd=REPO,
                            env=RUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = b""
    while proc.poll() is None:
        try:
            seen = Path(f"/proc/{proc.pid}/cmdline").read_bytes() or seen
        except OSError:
            pass
        if b"fine_efficient_seg.train" in seen:
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert b"fine_efficient_seg.train" in seen, f"the shell's own process never became the trainer: {seen!r}"
    assert proc.returncode == 2 and "missing.yaml" in err


def copy_pool(dataset: Path, target: Path) -> Path:
    """A copy of the unlabeled database (the arrays stay where they are)."""
    target = target / "db" / "seg_trainu"
    open_store(target, readonly=False).put_many(open_store(dataset / "db" / "seg_trainu").to_dict())
    return target


def _boxes_worker(rank: int, world: int, init_file: str, dataset: str, db: str, out_dir: str) -> None:
    from common.train.distributed import RankFailedError

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:
            summary = run_boxes(Path(db), Path(out_dir) / "boxes", dataset, str(Path(dataset).parent / "coarse_model"))
            outcome = json.dumps(summary)
        except (RankFailedError, Exception) as exc:  # noqa: BLE001 - the test reads what each rank saw
            outcome = f"{type(exc).__name__}: {exc}"
        (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    finally:
        torch.distributed.destroy_process_group()


def _boxes_on_two_ranks(dataset: Path, db: Path, tmp_path: Path, name: str) -> tuple[list[str], Path]:
    out = tmp_path / f"ranks_{name}"
    out.mkdir()
    torch.multiprocessing.start_processes(_boxes_worker, args=(2, str(out / "init"), str(dataset), str(db), str(out)),
                                          nprocs=2, join=True, start_method="spawn")
    return [(out / f"rank{r}.txt").read_text() for r in range(2)], out / "boxes"


def test_boxes_step_shared_by_two_ranks(dataset, tmp_path):
    source = dataset / "db" / "seg_trainu"
    single = tmp_path / "single" / "boxes"
    run_boxes(source, single, dataset, str(dataset.parent / "coarse_model"))
    outcomes, shared = _boxes_on_two_ranks(dataset, source, tmp_path, "ok")
    for outcome in outcomes:
        assert json.loads(outcome)["computed"] == 4, outcome
    a, b = open_store(single), open_store(shared)
    assert a.keys() == b.keys()
    for key in a.keys():  # the same boxes and regions (each run writes its region files into its own folder)
        ra, rb = a.get(key), b.get(key)
        assert Path(rb["region_path"]).parent == shared.parent / "regions"
        np.testing.assert_array_equal(np.load(ra.pop("region_path")), np.load(rb.pop("region_path")))
        assert ra == rb
    a.close(), b.close()
    # A case whose coarse array is missing fails on the rank that has it: both ranks stop with that message.
    broken = copy_pool(dataset, tmp_path / "broken")
    store = open_store(broken, readonly=False)
    victim = store.keys()[1]  # rank 1's first case
    record = store.get(victim)
    record["coarse_image_path"] = str(tmp_path / "gone.npy")
    store.put_many({victim: record})
    store.close()
    (rank0, rank1), _ = _boxes_on_two_ranks(dataset, broken, tmp_path, "broken")
    assert rank1.startswith("InputError") and "gone.npy" in rank1
    assert rank0.startswith("RankFailedError: boxes failed on rank 1: InputError") and "gone.npy" in rank0


def _threshold_pair(round_dir, device) -> tuple[nn.Module, nn.Module]:
    return ThresholdNet(0.0), ThresholdNet(0.5)


def _uif_worker(rank: int, world: int, init_file: str, common: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    fine_uif.load_round_networks = _threshold_pair  # a spawned child does not see the parent's monkeypatch
    seen: list[str] = []
    score_pool = fine_uif.score_pool  # this child's copy: record which cases this rank scores
    fine_uif.score_pool = lambda cases, *a, **k: seen.extend(c.case_id for c in cases) or score_pool(cases, *a, **k)
    try:
        rows = run_uif(layout=RunLayout(Path(out_dir) / "out"), **common)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"rows": [(r.case, r.score, r.kept, r.rank) for r in rows], "scored": seen}))
    finally:
        torch.distributed.destroy_process_group()


def test_uif_step_shared_by_two_ranks(tmp_path, monkeypatch):
    db = make_pool(tmp_path)
    monkeypatch.setattr(fine_uif, "load_round_networks", _threshold_pair)
    options = UifOptions(keep_count=2, size_zyx=(SIZE,) * 3, precision="fp32")
    common = dict(k=1, unlabeled_db=db, data_base_dir=tmp_path, options=options, device=torch.device("cpu"))
    single = run_uif(layout=RunLayout(tmp_path / "single"), **common)
    torch.multiprocessing.start_processes(_uif_worker, args=(2, str(tmp_path / "init"), common, str(tmp_path)),
                                          nprocs=2, join=True, start_method="spawn")
    expected = [[r.case, r.score, r.kept, r.rank] for r in single]
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [o["rows"] for o in outcomes] == [expected, expected]
    scored = [o["scored"] for o in outcomes]
    assert sorted(scored[0] + scored[1]) == sorted(r.case for r in single) and [len(s) for s in scored] == [3, 2]
    assert (tmp_path / "out" / "uif_scores.csv").read_text() == (tmp_path / "single" / "uif_scores.csv").read_text()


# ----------------------------------------------------------------------------------------------------- init_from


def test_init_from_a_converted_release_starts_round1_from_it(dataset, tmp_path, write_original_checkpoint):
    """model.init_from = the converter's model folder of an original fine file (network A only): A and B both
    start from A's weights (vanishing learning rate: the first checkpoint still holds them)."""
    from common.original_weights import main as convert

    torch.manual_seed(21)
    net = build_network("efficient_seg_net", channels=json.loads(TINY), input_size_zyx=[SIZE] * 3)
    original = write_original_checkpoint(tmp_path / "release" / "best_model.pt", net, "efficient_seg_net")
    assert convert(["--fine", str(original), "--out", str(tmp_path / "converted"), "--fine-size", str(SIZE)]) == 0
    converted = tmp_path / "converted" / "efficient_fine_model"
    main(fine_config(dataset, tmp_path, "step=round1", "data.unlabeled_db=null", "schedule.iterations=1",
                     "optim.lr=1.0e-12", f"model.init_from={converted}"))
    ckpt = load_checkpoint(tmp_path / "output" / "round1" / "checkpoints" / "last.pt")
    for name in ("a", "b"):
        for key, value in net.state_dict().items():
            torch.testing.assert_close(ckpt[f"net_{name}"][key], value, atol=1e-6, rtol=0)


def test_snapshot_iterations():
    assert snapshot_iterations(400, 3) == (100, 200, 300)
    assert snapshot_iterations(3, 5) == (1, 2)       # never 0 or the last iteration; duplicates merge
    assert snapshot_iterations(400, 0) == ()


def test_round1_snapshots_and_stability_score(dataset, tmp_path):
    """Round 1 keeps uif.snapshots checkpoints (ST++); the uif step scores the pool by their stability."""
    cfg = fine_config(dataset, tmp_path, "schedule.iterations=4", "uif.snapshots=3", "uif.score=stability",
                      "schedule.checkpoint_interval=4")
    for step in ("boxes", "round1", "uif"):
        main(replace(cfg, step=step))
    ckpts = tmp_path / "output" / "round1" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("snapshot_*.pt")) == ["snapshot_1.pt", "snapshot_2.pt", "snapshot_3.pt"]
    assert load_checkpoint(ckpts / "snapshot_2.pt")["iteration"] == 2
    pairs = fine_uif.load_snapshots(tmp_path / "output" / "round1", torch.device("cpu"))
    assert len(pairs) == 3
    final = fine_uif.load_round_networks(tmp_path / "output" / "round1", torch.device("cpu"))[0]
    first = dict(pairs[0][0].named_parameters())
    assert any(not torch.equal(p, first[n]) for n, p in final.named_parameters()), "snapshot = final weights"
    rows = read_scores_csv(tmp_path / "output" / "uif_scores.csv")
    assert len(rows) == 4 and sum(r.kept for r in rows) == 2
    assert all(0.0 <= r.score <= 1.0 for r in rows)
    # No snapshots saved (uif.snapshots=0): the stability score says what is missing.
    with pytest.raises(InputError, match="snapshots"):
        fine_uif.score_pool([], final, final, UifOptions(size_zyx=(SIZE,) * 3), torch.device("cpu"),
                            methods=("stability",))


def test_filter1_compares_with_the_snapshots_before_the_best_networks(dataset, tmp_path, caplog):
    """When round 1's best networks are one of its snapshots, filter 1's change and stability scores compare with
    the snapshots taken before them: comparing with the networks themselves scored every case 0 (change), and the
    selection fell to the case order."""
    cfg = fine_config(dataset, tmp_path, "schedule.iterations=4", "uif.snapshots=3", "schedule.checkpoint_interval=4")
    for step in ("boxes", "round1"):
        main(replace(cfg, step=step))
    layout = RunLayout(tmp_path / "output")
    ckpts = layout.round_dir(1) / "checkpoints"
    done = layout.round_dir(1) / DONE_FILE
    assert read_marker(done)["best_iteration"] == {"a": 4, "b": 4}  # validated once, at the end
    for name in ("a", "b"):  # the best networks are those of the last snapshot (iteration 3)
        shutil.copy(ckpts / "snapshot_3.pt", ckpts / f"best_model_{name}.pt")
    write_marker(done, {**read_marker(done), "best_iteration": {"a": 3, "b": 3}})
    cpu = torch.device("cpu")
    assert fine_uif.best_iteration(layout.round_dir(1)) == 3
    earlier = fine_uif.earlier_networks(layout, 1, cpu)
    assert len(earlier) == 2  # snapshots 1 and 2
    second = fine_uif.load_snapshots(layout.round_dir(1), cpu)[1]
    assert all(torch.equal(p, q) for p, q in zip(earlier[-1][0].parameters(), second[0].parameters()))
    latest = fine_uif.earlier_networks(layout, 1, cpu, last_only=True)  # what the change score needs
    assert len(latest) == 1 and all(torch.equal(p, q) for p, q in zip(latest[0][1].parameters(),
                                                                       second[1].parameters()))

    cases = load_cases(db_path(cfg.data.unlabeled_db, cfg.data_base_dir, cfg.fold), cfg.data_base_dir, labeled=False,
                       boxes_db=layout.boxes_db)
    net_a, net_b = fine_uif.load_round_networks(layout.round_dir(1), cpu)
    options = UifOptions(size_zyx=(SIZE,) * 3, precision="fp32")
    against_all = fine_uif.score_pool(cases, net_a, net_b, options, cpu, methods=("change",),
                                      snapshots=fine_uif.load_snapshots(layout.round_dir(1), cpu))["change"]
    assert set(against_all.values()) == {0.0}  # what filter 1 scored before: no ranking at all
    scores = fine_uif.score_pool(cases, net_a, net_b, options, cpu, methods=("change",), snapshots=earlier)["change"]
    assert len(scores) == 4 and any(v > 0.0 for v in scores.values())

    # best networks at or before the first snapshot (A at 1): all snapshots, with a warning
    write_marker(done, {**read_marker(done), "best_iteration": {"a": 1, "b": 3}})
    caplog.set_level("WARNING")
    assert len(fine_uif.earlier_networks(layout, 1, cpu)) == 3
    assert "no snapshot" in caplog.text and "precedes its best networks (iteration 1)" in caplog.text


def test_cps_confidence_probe_counts_the_masked_voxels(dataset, tmp_path, capsys):
    """benchmarks/cps_confidence.py on a finished round 1: without a mask every voxel is kept and counted right as
    often as with one; with one, fewer are kept (two barely trained networks are unsure almost everywhere); the
    table prints one row per true class; bad input is named."""
    cfg = fine_config(dataset, tmp_path, "schedule.iterations=2")
    for step in ("boxes", "round1"):
        main(replace(cfg, step=step))
    fine_dir = tmp_path / "output"
    every = cps_confidence.confidence_counts(fine_dir, 0.0)
    sure = cps_confidence.confidence_counts(fine_dir, 0.9)
    for name in cps_confidence.CLASSES:
        assert every[name]["kept"] == every[name]["voxels"] > 0
        assert every[name]["right_kept"] == every[name]["right"] and sure[name]["right"] == every[name]["right"]
        assert sure[name]["voxels"] == every[name]["voxels"]
        assert sure[name]["right_kept"] <= sure[name]["kept"] <= sure[name]["voxels"]
    # two barely trained networks are unsure almost everywhere: the mask drops voxels
    classes = cps_confidence.CLASSES
    assert sum(sure[n]["kept"] for n in classes) < sum(every[n]["voxels"] for n in classes)
    assert cps_confidence.main([str(fine_dir), "--confidence", "0.9"]) == 0
    table = capsys.readouterr().out
    assert "| organ |" in table and "| background |" in table
    assert cps_confidence.main([str(tmp_path / "no_run")]) == 2  # a folder without round 1: named, exit 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_run/round1/config.yaml" in err
    assert cps_confidence.main([str(fine_dir), "--confidence", "1.0"]) == 2  # cps.confidence's own range
    assert "confidence" in capsys.readouterr().err
