import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.core.errors import InputError
from common.storage.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    model_state_dict,
    restore_rng_state,
    save_checkpoint,
    strip_prefixes,
)
from common.storage.model_folder import PreprocessSpec, export_model
from common.storage.weights import load_model


def _draw() -> tuple:
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


def test_round_trip_restores_everything_and_rng(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2), nn.Conv3d(2, 1, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=5e-5)
    net(torch.randn(1, 1, 5, 5, 5)).sum().backward()
    opt.step()
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leave a cached gaussian in numpy's legacy state
    torch.manual_seed(3)
    state = {
        "net_a": model_state_dict(net),
        "opt_a": opt.state_dict(),
        "scaler_a": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "iteration": 17,
        "rng": [capture_rng_state()],
        "best": {"a": 0.5, "b": float("-inf")},
        "config": {"optim": {"lr": 1.0e-2, "betas": [0.9, 0.99]}, "output_dir": "output", "x": None},
        "model": {"name": "unet", "kwargs": {"channels": [2, 4, 4, 8, 8]}},
    }
    expected = _draw()
    save_checkpoint(tmp_path / "c" / "last.pt", state)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["last.pt"]  # no temporary file left behind

    _draw()  # move every generator on
    loaded = load_checkpoint(tmp_path / "c" / "last.pt")
    restore_rng_state(loaded["rng"][0])
    assert _draw() == expected
    assert loaded["iteration"] == 17 and loaded["best"] == {"a": 0.5, "b": float("-inf")}
    assert loaded["config"] == state["config"] and loaded["model"] == state["model"]

    net2 = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2), nn.Conv3d(2, 1, 1))
    load_model_state(net2, loaded["net_a"])
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1.0)
    opt2.load_state_dict(loaded["opt_a"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert torch.equal(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"],
                       opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path):
    with pytest.raises(InputError, match="last.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "last.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.arange(1000.0)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match=r"truncated\.pt: cannot read checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(InputError, match=r"garbage\.pt: cannot read checkpoint"):
        load_checkpoint(garbage)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("x")}, path)
    with pytest.raises(InputError, match="evil.pt"):
        load_checkpoint(path)


def test_strip_prefixes_and_wrapped_models():
    sd = {"module._orig_mod.enc.weight": 1, "_orig_mod.module.dec.bias": 2, "head.w": 3, "x.module.y": 4}
    assert strip_prefixes(sd) == {"enc.weight": 1, "dec.bias": 2, "head.w": 3, "x.module.y": 4}

    class Wrapped(nn.Module):  # stands in for torch.compile's OptimizedModule (which stores _orig_mod)
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    inner = nn.Linear(2, 2)
    assert set(model_state_dict(Wrapped(inner))) == {"weight", "bias"}
    target = nn.Linear(2, 2)
    load_model_state(target, {"module._orig_mod." + k: v for k, v in inner.state_dict().items()})
    assert torch.equal(target.weight, inner.weight)
    with pytest.raises(InputError, match="src.pt: weights do not match"):
        load_model_state(nn.Linear(3, 2), inner.state_dict(), source="src.pt")


def test_export_and_load_model(tmp_path):
    from common.networks import build_network

    spec = {"name": "unet", "kwargs": {"channels": [2, 4, 4, 8, 8], "dropout": 0.0}}
    torch.manual_seed(0)
    net_a = build_network(spec["name"], **spec["kwargs"])
    net_b = build_network(spec["name"], **spec["kwargs"])
    config = {"model": {"name": "unet"}, "data": {"size_zyx": [32, 32, 32]}}
    path = export_model(
        tmp_path / "base_coarse_model", stage="coarse", model=spec,
        networks={"a": {"module." + k: v for k, v in net_a.state_dict().items()}, "b": net_b.state_dict()},
        primary="b", preprocess=PreprocessSpec("coarse", (32, 32, 32)), config=config,
        best_dice={"a": 0.4, "b": 0.5},
    )
    assert path.name == "model.pt" and (path.parent / "config.yaml").is_file()
    loaded = load_model(path.parent, "coarse")
    assert loaded.primary == "b" and set(loaded.networks) == {"a", "b"}
    assert loaded.preprocess.size_zyx == (32, 32, 32) and loaded.config == config
    assert not loaded.net.training
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.networks["a"](x), net_a.eval()(x))
    with pytest.raises(InputError, match="holds a coarse model, expected a fine model"):
        load_model(path.parent, "fine")
    with pytest.raises(InputError, match="exported model not found"):
        load_model(tmp_path / "nowhere")


def test_random_bytes_always_give_a_message_and_never_unsafe_advice(tmp_path):
    """The weights-only unpickler raises IndexError/KeyError/... on some random files (about 10 %)."""
    path = tmp_path / "random.pt"
    for seed in range(120):
        rng = np.random.default_rng(seed)
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes())
        with pytest.raises(InputError, match=r"random\.pt: cannot read checkpoint") as info:
            load_checkpoint(path)
        assert "weights_only" not in str(info.value)
    evil = tmp_path / "evil.pt"
    torch.save({"obj": Path("x")}, evil)
    with pytest.raises(InputError, match=r"objects other than tensors and plain data \(pathlib\.\w*Path\); it is "
                                         "refused because loading it could run code") as info:
        load_checkpoint(evil)
    assert "weights_only" not in str(info.value) and "False" not in str(info.value)
