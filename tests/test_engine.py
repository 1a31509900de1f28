import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from common.config import CoarseTrainConfig
from common.core.labels import FLARE22
from common.core.typed_config import load_config
from common.storage.checkpoint import load_checkpoint, save_checkpoint
from common.storage.weights import read_weight_pair
from common.train.distributed import DistInfo, derive_seed, shard
from common.train.engine import (
    CPSJob,
    NonFiniteLossError,
    TrainingInterrupted,
    lr_at,
    model_spec_from_config,
    run_cps_training,
)

CONFIG = Path(__file__).resolve().parents[1] / "coarse_base_seg" / "config.yaml"
SIZE = 32
ITERATIONS = 4


def _cfg(out_dir: Path, *overrides: str) -> CoarseTrainConfig:
    return load_config(CoarseTrainConfig, CONFIG, [
        f"output_dir={out_dir}", "device=cpu", "model.channels=[2,4,4,8,8]", f"data.size_zyx=[{SIZE},{SIZE},{SIZE}]",
        f"schedule.iterations={ITERATIONS}", "schedule.val_interval=2", "schedule.checkpoint_interval=2",
        "schedule.log_interval=1", "amp.precision=fp32", *overrides])


def _sample(name: str, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `position` of stream `name`: a noisy volume with a bright sphere (label 1) at a random place."""
    g = torch.Generator().manual_seed(derive_seed(0, name, position))
    center = torch.randint(10, SIZE - 10, (3,), generator=g).float()
    grid = torch.stack(torch.meshgrid(*(torch.arange(SIZE, dtype=torch.float32),) * 3, indexing="ij"))
    inside = ((grid - center.view(3, 1, 1, 1)) ** 2).sum(0) < 49
    x = 0.3 * torch.randn(1, SIZE, SIZE, SIZE, generator=g) + inside.float()
    return x, inside.long()


def _stream(name: str, labeled: bool, fail_at: int | None = None, nan_at: int | None = None,
            signal_at: int | None = None):
    def stream(start: int):
        iteration = start
        while True:
            if iteration == fail_at:
                raise RuntimeError("injected crash")
            if iteration == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            x, y = _sample(name, iteration)
            if iteration == nan_at:
                x = torch.full_like(x, float("nan"))
            yield (x[None], y[None]) if labeled else x[None]
            iteration += 1
    return stream


def _val_cases(rank=0, world_size=1):
    for i in range(rank, 2, world_size):
        x, y = _sample("val", i)
        yield f"case{i}", x[None], y[None]


def _job(cfg: CoarseTrainConfig, **kwargs) -> CPSJob:
    args = dict(cfg=cfg, out_dir=Path(cfg.output_dir), labeled_stream=_stream("labeled", True),
                unlabeled_stream=_stream("unlabeled", False), val_cases=_val_cases,
                iterations=cfg.schedule.iterations, stage="test")
    args.update(kwargs)
    return CPSJob(**args)


def _metrics(out_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("time")
    return lines


def _assert_same_run(out_a: Path, out_b: Path) -> None:
    ma, mb = _metrics(out_a), _metrics(out_b)
    assert [m["iteration"] for m in ma] == [m["iteration"] for m in mb] == [2, 4]
    for a, b in zip(ma, mb):
        assert a["train"].keys() == b["train"].keys() == {"loss_a", "loss_b", "sup_a", "sup_b", "cps_a", "cps_b"}
        for key in a["train"]:
            assert a["train"][key] == pytest.approx(b["train"][key], rel=1e-5, abs=1e-7), key
        for key in ("mean_dice_a", "mean_dice_b"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)
    la, lb = load_checkpoint(out_a / "checkpoints" / "last.pt"), load_checkpoint(out_b / "checkpoints" / "last.pt")
    assert la["iteration"] == lb["iteration"] == ITERATIONS
    for net in ("net_a", "net_b"):
        for key, value in la[net].items():
            torch.testing.assert_close(value, lb[net][key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    torch.set_num_threads(1)
    summary = run_cps_training(_job(_cfg(out)))
    assert summary["iteration"] == ITERATIONS and not summary["already_done"]
    return out


def test_lr_schedule_and_model_spec():
    lrs = [lr_at(i, 1e-2, 100, [0.66, 0.86], [0.1, 0.05]) for i in range(100)]
    assert lrs[65] == 1e-2 and lrs[66] == pytest.approx(1e-3) and lrs[85] == pytest.approx(1e-3)
    assert lrs[86] == pytest.approx(5e-4) and lrs[99] == pytest.approx(5e-4)
    cfg = load_config(CoarseTrainConfig, CONFIG, ["model.name=efficient_seg_net", "data.size_zyx=[64,64,64]"])
    assert model_spec_from_config(cfg) == {"name": "efficient_seg_net", "kwargs": {
        "channels": [16, 32, 64, 128, 256], "dropout": 0.2, "input_size_zyx": [64, 64, 64]}}


def test_run_writes_every_output_and_a_rerun_does_nothing(straight_run, caplog):
    out = straight_run
    for name in ("config.yaml", "train.log", "metrics.jsonl", "DONE", "checkpoints/last.pt",
                 "checkpoints/best_model_a.pt", "checkpoints/best_model_b.pt"):
        assert (out / name).is_file(), name
    assert "validation at iteration 4" in (out / "train.log").read_text()
    assert load_config(CoarseTrainConfig, out / "config.yaml").model.channels == [2, 4, 4, 8, 8]
    metrics = _metrics(out)
    assert [m["iteration"] for m in metrics] == [2, 4]
    assert list(metrics[0]["dice_a"]) == [label.key for label in FLARE22] and metrics[0]["num_cases"] == 2
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert {"net_a", "net_b", "opt_a", "opt_b", "scaler_a", "scaler_b", "iteration", "rng", "best", "config",
            "model"} <= set(last)
    assert last["best"]["a"] == max(m["mean_dice_a"] for m in metrics)
    best_b = load_checkpoint(out / "checkpoints" / "best_model_b.pt")
    assert best_b["network"] == "b" and best_b["dice"] == last["best"]["b"] and len(best_b["dice_per_organ"]) == 13
    assert json.loads((out / "DONE").read_text())["iteration"] == ITERATIONS

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss_a", "train/cps_b", "train/sup_a", "train/lr", "time/iter_s", "val/mean_dice_a",
                "val/mean_dice_b", "val/dice_a_liver", "val/dice_b_left_kidney"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss_a")] == [1, 2, 3, 4]

    before = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        summary = run_cps_training(_job(_cfg(out)))
    assert summary["already_done"] and summary["iteration"] == ITERATIONS
    assert "already finished" in caplog.text
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_resume_after_a_crash_matches_the_uninterrupted_run(straight_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected crash"):
        run_cps_training(_job(_cfg(out), labeled_stream=_stream("labeled", True, fail_at=3)))
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 2
    assert not (out / "DONE").exists()
    summary = run_cps_training(_job(_cfg(out)))
    assert summary["iteration"] == ITERATIONS
    _assert_same_run(straight_run, out)
    assert "resuming from" in (out / "train.log").read_text()


def test_sigterm_saves_last_and_exits_143_then_resumes(straight_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        run_cps_training(_job(_cfg(out, "schedule.checkpoint_interval=3"),
                              labeled_stream=_stream("labeled", True, signal_at=1)))
    assert info.value.code == 143 and info.value.iteration == 2 and "SIGTERM" in str(info.value)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    run_cps_training(_job(_cfg(out)))
    _assert_same_run(straight_run, out)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="iteration 3 "):
        run_cps_training(_job(_cfg(out), labeled_stream=_stream("labeled", True, nan_at=2)))
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in last["net_a"].values())
    assert not (out / "DONE").exists()


def test_warm_start_from_a_checkpoint(straight_run, tmp_path):
    source = straight_run / "checkpoints" / "last.pt"
    weights = read_weight_pair(source)
    assert set(weights) == {"a", "b"}
    best = read_weight_pair({"a": straight_run / "checkpoints" / "best_model_a.pt",
                              "b": straight_run / "checkpoints" / "best_model_b.pt"})
    assert set(best["b"]) == set(weights["b"])
    out = tmp_path / "warm"
    # lr 1e-9: one Adam step moves every weight by ~1e-9, so the result must equal the warm-start weights
    summary = run_cps_training(_job(_cfg(out, "optim.lr=1.0e-9", "schedule.iterations=1"), iterations=1,
                                    init_weights=source, val_cases=None))
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    for key, value in weights["a"].items():
        torch.testing.assert_close(last["net_a"][key], value, rtol=0, atol=1e-6)
    # without validation the final weights stand in for the best ones
    assert load_checkpoint(out / "checkpoints" / "best_model_a.pt")["dice"] is None
    # ... and the run says so: their iteration is the last one (it was -1, "never", in DONE and the summary)
    assert (summary["best_iteration_a"], summary["best_iteration_b"]) == (1, 1)
    assert json.loads((out / "DONE").read_text())["best_iteration"] == {"a": 1, "b": 1}
    assert "warm start" in (out / "train.log").read_text()


def test_mismatching_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    save_checkpoint(out / "checkpoints" / "last.pt", {"net_a": {}, "net_b": {}, "opt_a": {}, "opt_b": {},
                                                      "iteration": 1, "model": {"name": "unet", "kwargs": {}}})
    from common.core.errors import InputError

    with pytest.raises(InputError, match="last.pt: was trained with model"):
        run_cps_training(_job(_cfg(out)))


def test_legacy_cps_shift_reaches_the_step(monkeypatch, tmp_path):
    """`cps.legacy_shift=true` (an ablation of the original's pseudo labels) is passed to every CPS step."""
    import common.train.engine as engine_mod

    seen = []
    real_step = engine_mod.cps_step

    def spy(learners, x_l, y_l, x_u, settings):
        seen.append(settings.legacy_shift)
        return real_step(learners, x_l, y_l, x_u, settings)

    monkeypatch.setattr(engine_mod, "cps_step", spy)
    assert _cfg(tmp_path / "default").cps.legacy_shift is False
    cfg = _cfg(tmp_path / "legacy", "cps.legacy_shift=true", "schedule.iterations=2")
    run_cps_training(_job(cfg))
    assert seen == [True, True]


def _sharded_validation_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    loaded: list[str] = []

    def val_cases(shard_rank: int, world_size: int):
        for i in shard(list(range(3)), shard_rank, world_size):
            loaded.append(f"case{i}")  # "loading" happens only for the cases asked for
            x, y = _sample("val", i)
            yield f"case{i}", x[None], y[None]

    try:
        cfg = _cfg(Path(out_dir) / "run", "schedule.iterations=2", "schedule.checkpoint_interval=2")
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        run_cps_training(_job(cfg, val_cases=val_cases, iterations=2, dist=info))
        (Path(out_dir) / f"loaded{rank}.json").write_text(json.dumps(loaded))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_validation_loads_each_case_on_one_rank_only(tmp_path):
    torch.multiprocessing.start_processes(_sharded_validation_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                          nprocs=2, join=True, start_method="spawn")
    loaded = [json.loads((tmp_path / f"loaded{r}.json").read_text()) for r in range(2)]
    assert loaded == [["case0", "case2"], ["case1"]]
    assert [m["num_cases"] for m in _metrics(tmp_path / "run")] == [3]


# ------------------------------------------------------------------------------------------------ issue 14


def test_nan_before_any_checkpoint_claims_none(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="no checkpoint was saved yet") as info:
        run_cps_training(_job(_cfg(out), labeled_stream=_stream("labeled", True, nan_at=0)))
    assert "kept as the last good" not in str(info.value)
    assert not (out / "checkpoints" / "last.pt").exists()


def test_resume_removes_partial_checkpoints_and_a_lowered_schedule_keeps_its_iteration(straight_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    (out / "DONE").unlink()
    partial = out / "checkpoints" / ".last.pt.k1ll3d00.tmp.pt"
    partial.write_bytes(b"\0" * 4096)  # a kill between write and rename
    summary = run_cps_training(_job(_cfg(out, "schedule.iterations=3"), iterations=3))
    assert not partial.exists()
    assert summary["iteration"] == ITERATIONS  # last.pt is at 4: the run stands at 4, not at the lowered 3
    assert json.loads((out / "DONE").read_text())["iteration"] == ITERATIONS
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == ITERATIONS
    assert "beyond iterations=3" in caplog.text
