"""Files written by the code before the common/ restructure still load and give the same labels.

The fixture (tests/fixtures/pre_refactor, see its README) was made by a tiny run of the real stages at the commit
before the restructure: two exported model folders, a coarse run's checkpoints, a validation CT with the mask that
code predicted for it, and prepared-case records.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.infer.folder import predict_folder
from common.infer.predictor import PredictOptions
from common.storage.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from common.storage.model_folder import COARSE_DIR, FINE_DIR, PreprocessSpec, export_best_networks
from common.storage.weights import load_model, load_network, read_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_refactor"


@pytest.fixture
def weights(tmp_path) -> Path:
    """A copy of the fixture's model folders (prediction may write an ONNX cache beside them)."""
    out = tmp_path / "model_weights"
    shutil.copytree(FIXTURE / "model_weights", out)
    return out


def _predict(weights_dir: Path, out: Path) -> dict[str, np.ndarray]:
    summary = predict_folder(FIXTURE / "input", out, PredictOptions(weights_dir=weights_dir, device="cpu",
                                                                    backend="torch", progress=False))
    assert summary["ok"] == len(list((FIXTURE / "input").iterdir())), summary
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))}


def _expected() -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted((FIXTURE / "expected").iterdir())}


def test_old_model_folders_predict_the_same_labels(weights, tmp_path):
    expected = _expected()
    assert expected and all(len(np.unique(m)) > 2 for m in expected.values())  # not an empty or trivial mask
    got = _predict(weights, tmp_path / "pred")
    assert got.keys() == expected.keys()
    for name, mask in expected.items():
        np.testing.assert_array_equal(got[name], mask, err_msg=name)


def test_old_checkpoints_export_and_predict_the_same_labels(weights, tmp_path):
    """The coarse run's best checkpoints, exported by today's code, are the model the old code exported."""
    run = tmp_path / "coarse_run"
    shutil.copytree(FIXTURE / "coarse_run", run)
    shutil.rmtree(weights / COARSE_DIR)
    old = load_checkpoint(FIXTURE / "model_weights" / COARSE_DIR / "model.pt")
    export_best_networks(run, weights / COARSE_DIR, stage="coarse", primary="a",
                         preprocess=lambda config: PreprocessSpec.from_json(old["preprocess"], "coarse", "fixture"))
    for name in ("a", "b"):
        new = load_network(weights / COARSE_DIR, name)
        for key, value in new.state_dict().items():
            torch.testing.assert_close(value, old["networks"][name][key], rtol=0, atol=0)
    got = _predict(weights, tmp_path / "pred")
    for name, mask in _expected().items():
        np.testing.assert_array_equal(got[name], mask, err_msg=name)


def test_old_training_checkpoint_loads_with_its_rng_state():
    last = FIXTURE / "coarse_run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["iteration"] == 10 and {"net_a", "net_b", "opt_a", "opt_b"} <= set(ckpt)
    net_a, net_b = load_network(last, "a"), load_network(last, "b")
    for key in ("net_a", "net_b"):
        assert read_weights(last, key[-1]).spec == ckpt["model"]
    assert not torch.equal(next(iter(net_a.state_dict().values())), next(iter(net_b.state_dict().values())))
    optimizer = torch.optim.Adam(net_a.parameters())
    optimizer.load_state_dict(ckpt["opt_a"])
    saved, own = ckpt["rng"][0], capture_rng_state()
    try:
        restore_rng_state(saved)
        now = capture_rng_state()  # every generator holds the state the old checkpoint recorded
        assert torch.equal(now["torch"], saved["torch"]) and now["python"] == list(saved["python"])
        assert torch.equal(now["numpy"]["keys"], saved["numpy"]["keys"])
        assert now["numpy"]["pos"] == saved["numpy"]["pos"]
    finally:
        restore_rng_state(own)  # the rest of the test process keeps its own random streams


def test_old_model_folder_metadata_loads(weights):
    coarse = load_model(weights / COARSE_DIR, "coarse")
    fine = load_model(weights / FINE_DIR, "fine")
    assert sorted(coarse.networks) == sorted(fine.networks) == ["a", "b"]
    assert coarse.preprocess.size_zyx == (32, 32, 32) and fine.preprocess.extend_size_mm == 20.0
