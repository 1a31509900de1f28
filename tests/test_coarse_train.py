import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coarse_base_seg.train import cli, main
from common.config import CoarseTrainConfig, PrepareConfig
from common.core.defaults import HU_WINDOW
from common.core.typed_config import load_config
from common.storage.checkpoint import load_checkpoint
from common.storage.lmdb_store import LmdbStore
from common.storage.weights import load_model, read_weight_pair

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "coarse_base_seg"
SIZE = 32
ITERATIONS = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The synthetic "tiny" dataset run through data_prepare at 32^3: fold 1 = 2 train / 1 val, 2 unlabeled."""
    from data_prepare.run import main as prepare
    from data_prepare.run import split_fold1
    from data_prepare.synthetic import write_dataset

    base = tmp_path_factory.mktemp("dataset")
    write_dataset(base, labeled=3, unlabeled=2, val=0, size="tiny")
    # a case's fold depends on its id alone: take the first split seed that validates on one of the three
    seed = next(s for s in range(100) if len(split_fold1([f"train_{i:03d}" for i in range(3)], 0.2, s)[1]) == 1)
    cfg = load_config(PrepareConfig, ROOT / "data_prepare" / "config.yaml", [
        f"data_base_dir={base}", f"coarse_size_zyx=[{SIZE},{SIZE},{SIZE}]", f"fine_size_zyx=[{SIZE},{SIZE},{SIZE}]",
        "num_workers=0", f"split_seed={seed}"])
    assert prepare(cfg) == 0
    return base


def _overrides(base: Path, out: Path, *extra: str) -> list[str]:
    return [f"data_base_dir={base}", f"output_dir={out}", "device=cpu", "model.channels=[2,4,4,8,8]",
            f"data.size_zyx=[{SIZE},{SIZE},{SIZE}]", f"schedule.iterations={ITERATIONS}", "schedule.val_interval=3",
            "schedule.checkpoint_interval=2", "schedule.log_interval=1", "data.num_workers=1",
            f"export.dir={out / 'exported'}", *extra]


def _cfg(base: Path, out: Path, *extra: str) -> CoarseTrainConfig:
    return load_config(CoarseTrainConfig, STAGE / "config.yaml", _overrides(base, out, *extra))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # run.sh sets it
    return env


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coarse") / "run"
    torch.set_num_threads(1)
    summary = main(_cfg(prepared, out))
    assert summary["iteration"] == ITERATIONS and not summary["already_done"]
    return out


def test_training_writes_every_output_file_and_exports(trained, prepared, capsys):
    out = trained
    for name in ("config.yaml", "train.log", "metrics.jsonl", "DONE", "checkpoints/last.pt",
                 "checkpoints/best_model_a.pt", "checkpoints/best_model_b.pt"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert [m["iteration"] for m in _metrics(out)] == [3, 6]
    assert _metrics(out)[0]["num_cases"] == 1
    saved = load_config(CoarseTrainConfig, out / "config.yaml")
    assert saved.data_base_dir == str(prepared) and saved.schedule.iterations == ITERATIONS

    # a rerun of the finished run says so and does nothing
    assert cli(_overrides(prepared, out)) == 0
    assert "already finished" in capsys.readouterr().out

    # export: the chosen network's best weights + the other one + the resolved config
    assert cli(_overrides(prepared, out, "step=export", "export.network=b")) == 0
    model = load_model(out / "exported", "coarse")
    assert model.primary == "b" and set(model.networks) == {"a", "b"}
    assert model.preprocess.to_json() == {"size_zyx": [SIZE] * 3, "hu_window": list(HU_WINDOW),
                                          "min_volume_mm3": 1000.0, "z_window_mm": 240.0}
    assert model.config["model"]["channels"] == [2, 4, 4, 8, 8]
    assert (out / "exported" / "config.yaml").is_file()
    assert sorted(p.name.split("_")[0] for p in (out / "exported" / "onnx").glob("*.onnx")) == ["a", "b"]
    best_b = load_checkpoint(out / "checkpoints" / "best_model_b.pt")
    for key, value in model.networks["b"].state_dict().items():
        assert torch.equal(value, best_b["net"][key])
    with torch.no_grad():
        assert model.net(torch.zeros(1, 1, SIZE, SIZE, SIZE)).shape == (1, 13, SIZE, SIZE, SIZE)


def test_sigkill_then_rerun_gives_the_uninterrupted_results(trained, prepared, tmp_path):
    out = tmp_path / "killed"
    cmd = ["sh", str(STAGE / "run.sh"), *_overrides(prepared, out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # run.sh execs python: this is the trainer itself
    proc.wait()
    proc.stderr.close()
    killed_at = load_checkpoint(last)["iteration"]
    assert killed_at < ITERATIONS and not (out / "DONE").exists()

    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {last} at iteration {killed_at}/{ITERATIONS}" in (out / "train.log").read_text()
    straight, resumed = _metrics(trained), _metrics(out)
    assert [m["iteration"] for m in resumed] == [3, 6]
    for a, b in zip(straight, resumed):
        for key in a["train"]:
            assert b["train"][key] == pytest.approx(a["train"][key], rel=1e-4), key
        assert b["mean_dice_a"] == pytest.approx(a["mean_dice_a"], abs=1e-4)
        assert b["mean_dice_b"] == pytest.approx(a["mean_dice_b"], abs=1e-4)


def test_two_processes_through_torchrun(prepared, tmp_path):
    out = tmp_path / "ddp"
    cmd = ["sh", str(STAGE / "run.sh"), *_overrides(prepared, out, "schedule.iterations=2", "schedule.val_interval=2")]
    result = subprocess.run(cmd, env={**_env(), "GPUS": "2"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and last["iteration"] == 2 and len(last["rng"]) == 2
    assert "world size 2" in (out / "train.log").read_text()
    assert (out / "train.rank1.log").is_file() and (out / "DONE").is_file()
    assert _metrics(out)[0]["num_cases"] == 1


def test_bad_config_and_missing_database_give_clear_messages(prepared, tmp_path, capsys):
    result = subprocess.run(["sh", str(STAGE / "run.sh"), "schedule.iteratons=5"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "schedule.iteratons: unknown key; did you mean 'schedule.iterations'" in result.stderr

    assert cli(_overrides(prepared, tmp_path / "out", "optim.lr=-1", "amp.precision=fp8")) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "amp.precision" in err

    assert cli(_overrides(tmp_path / "no_dataset", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"database not found: the dataset folder {tmp_path / 'no_dataset'} is missing (check data_base_dir)" in err

    assert cli(_overrides(prepared, tmp_path / "out", "data.size_zyx=[48,48,48]")) == 2
    assert "differs from data.size_zyx [48, 48, 48]" in capsys.readouterr().err

    assert cli(_overrides(prepared, tmp_path / "out", "data.labeled_db=db/seg_train_fold_9")) == 2
    assert "seg_train_fold_9: database not found" in capsys.readouterr().err

    assert cli(_overrides(prepared, tmp_path / "untrained", "step=export")) == 2
    assert "best_model_a.pt: not found: train first" in capsys.readouterr().err


def _sphere_case(base: Path) -> None:
    """One labeled case: a bright sphere (liver) in noise, listed as both training and validation database."""
    grid = np.stack(np.mgrid[:SIZE, :SIZE, :SIZE]).astype(np.float32)
    inside = ((grid - np.array([14, 17, 15], np.float32).reshape(3, 1, 1, 1)) ** 2).sum(0) < 81
    rng = np.random.default_rng(0)
    image = rng.normal(-80, 40, (SIZE,) * 3) + 150 * inside
    (base / "img").mkdir(parents=True)
    np.save(base / "img" / "case.npy", image.astype(np.int16))
    np.save(base / "img" / "case_mask.npy", inside.astype(np.uint8))
    record = {"coarse_image_path": str(base / "img" / "case.npy"), "coarse_mask_path": "img/case_mask.npy"}
    for db in ("seg_train_fold_1", "seg_val_fold_1"):
        store = LmdbStore(base / "db" / db, readonly=False)
        store.put("case", record)
        store.close()


def test_overfitting_one_case_raises_its_dice(tmp_path):
    base = tmp_path / "data"
    _sphere_case(base)
    out = tmp_path / "overfit"
    summary = main(_cfg(base, out, "data.unlabeled_db=null", "data.num_workers=0", "model.dropout=0.0",
                        "schedule.iterations=20", "schedule.val_interval=2", "schedule.log_interval=10",
                        "optim.lr=3.0e-2", "loss.name=dice_bce"))
    metrics = _metrics(out)
    first, last = metrics[0], metrics[-1]
    assert last["iteration"] == 20
    for net in ("a", "b"):
        assert last[f"dice_{net}"]["liver"] > 0.5, metrics
        assert last[f"dice_{net}"]["liver"] > first[f"dice_{net}"]["liver"] + 0.2
    assert summary["best_a"] >= last["mean_dice_a"]
    assert "no unlabeled" in (out / "train.log").read_text()  # the labeled-only path


# ------------------------------------------------------------------------------------------------ model.init_from


def test_init_from_the_original_release_starts_both_networks_from_it(prepared, tmp_path, write_original_checkpoint):
    """model.init_from = an original base_coarse_model/ folder: A from best_model.pt (DDP-prefixed), B from
    best_model_1.pt. With a vanishing learning rate the first checkpoint still holds exactly those weights."""
    from common.networks import build_network

    release = tmp_path / "release" / "base_coarse_model"
    nets = {}
    for name, seed in (("a", 11), ("b", 12)):
        torch.manual_seed(seed)
        nets[name] = build_network("unet", channels=[2, 4, 4, 8, 8], dropout=0.2)
    write_original_checkpoint(release / "best_model.pt", nets["a"], "unet")
    write_original_checkpoint(release / "best_model_1.pt", nets["b"], "unet", module_prefix=False)
    out = tmp_path / "run"
    summary = main(_cfg(prepared, out, f"model.init_from={release}", "schedule.iterations=1", "optim.lr=1.0e-12",
                        "schedule.val_interval=1"))
    assert summary["iteration"] == 1
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    for name, net in nets.items():
        for key, value in net.state_dict().items():
            torch.testing.assert_close(ckpt[f"net_{name}"][key], value, atol=1e-6, rtol=0)
    assert not torch.allclose(ckpt["net_a"]["head.weight"], ckpt["net_b"]["head.weight"])
    assert f"warm start from {release}" in (out / "train.log").read_text()

    # the folder's best_model.pt named alone: B still comes from best_model_1.pt beside it

    weights = read_weight_pair(release / "best_model.pt", "unet")
    for name, net in nets.items():
        assert all(torch.equal(weights[name][k], v) for k, v in net.state_dict().items())


def test_init_from_a_file_of_the_other_network_is_refused(prepared, tmp_path, write_original_checkpoint, capsys):
    from common.networks import build_network

    fine_file = write_original_checkpoint(tmp_path / "best_model.pt",
                                          build_network("efficient_seg_net", channels=[2, 4, 4, 8, 8]),
                                          "efficient_seg_net")
    code = cli(_overrides(prepared, tmp_path / "run", f"model.init_from={fine_file}"))
    err = capsys.readouterr().err
    assert code == 2 and str(fine_file) in err and "looks like the original fine EfficientSegNet" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_empty_unlabeled_pool_points_to_unlabeled_db_null(tmp_path):
    from coarse_base_seg.dataset import read_cases
    from common.core.errors import InputError
    from common.storage.lmdb_store import LmdbStore
    from fine_efficient_seg.dataset import load_cases

    db = tmp_path / "db" / "seg_trainu"
    LmdbStore(db, readonly=False).replace_all({})
    with pytest.raises(InputError, match=r"seg_trainu: database is empty: no unlabeled case.*data\.unlabeled_db=null"):
        read_cases(db, tmp_path, labeled=False)
    with pytest.raises(InputError, match=r"data\.unlabeled_db=null"):
        load_cases(db, tmp_path, labeled=False)


def test_a_checkpoint_a_full_disk_cuts_short_stops_with_one_line_and_exit_1(prepared, tmp_path, capsys,
                                                                             monkeypatch):
    """torch's writer raises a bare C++ error on a full disk or `ulimit -f`: the user gets the file and the cause."""
    from common.core.files import is_temp_name
    from common.storage import checkpoint

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    assert cli(_overrides(prepared, out)) == 1
    err = capsys.readouterr().err
    assert f"{out / 'checkpoints'}" in err and "could not be written completely" in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]


def test_a_second_trainer_on_the_same_output_dir_stops_at_once_naming_the_first(prepared, tmp_path, capsys):
    """Two trainers on one output_dir interleave their logs and delete each other's checkpoints: the second must
    stop before it touches anything, saying which process (pid, host) holds the folder."""
    import socket
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(  # the first trainer, as far as the folder is concerned
        [sys.executable, "-c", "import sys, time\nfrom common.core.files import folder_lock\n"
         "with folder_lock(sys.argv[1], 'training run'):\n    print('locked', flush=True)\n    time.sleep(60)\n",
         str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli(_overrides(prepared, out)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and str(out) in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "the second trainer wrote into the folder"
    finally:
        holder.kill()
        holder.wait()
