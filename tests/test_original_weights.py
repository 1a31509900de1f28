"""common.original_weights: the original release's checkpoints converted, checked, refused, predicted, CLI.

The fixture in ../shared/data/original_release gives the original state_dict names and shapes and the original
networks' logits for weights and an input made by a seeded recipe. Those two forwards run the full-size networks
at 128^3 (the only full-size forwards in the suite); every other test uses tiny networks (channels 2,4,4,8,8).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from common import original_weights as ow_cli
from common.core.defaults import HU_WINDOW
from common.core.errors import InputError, WeightsError
from common.infer.backends import make_forwards
from common.infer.predictor import PredictOptions, Predictor
from common.networks import build_network
from common.storage import original_release as ow
from common.storage.checkpoint import load_checkpoint
from common.storage.model_folder import COARSE_DIR, FINE_DIR, PreprocessSpec, export_model
from common.storage.weights import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT.parent / "shared" / "data" / "original_release"
KEYS_FILE = {"unet": "unet_state_dict_keys.json", "efficient_seg_net": "efficient_seg_net_state_dict_keys.json"}
LOGITS_FILE = {"unet": "unet_expected_logits.npy", "efficient_seg_net": "efficient_seg_net_expected_logits.npy"}
TINY = [2, 4, 4, 8, 8]
SIZE = 32


def _fixture_keys(network: str) -> list[tuple[str, list[int]]]:
    path = FIXTURE / KEYS_FILE[network]
    if not path.is_file():
        pytest.fail(f"original release fixture missing: {path}")
    return [(k, s) for k, s in json.loads(path.read_text())]


@functools.cache
def _recipe(network: str) -> dict[str, torch.Tensor]:
    state = {}
    for i, (key, shape) in enumerate(_fixture_keys(network)):
        g = torch.Generator().manual_seed(1000 + i)
        state[key] = torch.randn(shape, generator=g, dtype=torch.float32) * math.sqrt(2 / math.prod(shape[1:]))
    return state


def _recipe_state_dict(network: str) -> dict[str, torch.Tensor]:
    """The fixture's weights, under the original names (README of the fixture: seeds 1000 + i, He scaling).

    A new dict each call (tests replace entries); the tensors are shared and never changed in place."""
    return dict(_recipe(network))


def _save_original(path: Path, state: dict[str, torch.Tensor], module_prefix: bool) -> Path:
    """torch.save in the original's checkpoint layout, with a real Adam optimizer state beside the weights."""
    params = [torch.nn.Parameter(torch.ones(4))]
    opt = torch.optim.Adam(params, lr=1.0e-2, betas=(0.9, 0.99), weight_decay=5.0e-5)
    params[0].square().sum().backward()
    opt.step()
    prefix = "module." if module_prefix else ""
    torch.save({"epoch": 317, "state_dict": {prefix + k: v for k, v in state.items()},
                "optimizer_dict": opt.state_dict(), "lr": 1.0e-4}, path)
    return path


def _tiny(network: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"channels": TINY, "dropout": 0.0}
    if network == "efficient_seg_net":
        kwargs["input_size_zyx"] = [SIZE] * 3
    return build_network(network, **kwargs).eval()


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory, write_original_checkpoint) -> Path:
    """An original release folder of tiny networks: coarse A (DDP prefix) + B (no prefix), fine A only."""
    root = tmp_path_factory.mktemp("release")
    write_original_checkpoint(root / COARSE_DIR / "best_model.pt", _tiny("unet", 1), "unet")
    write_original_checkpoint(root / COARSE_DIR / "best_model_1.pt", _tiny("unet", 2), "unet", module_prefix=False)
    write_original_checkpoint(root / FINE_DIR / "best_model.pt", _tiny("efficient_seg_net", 3), "efficient_seg_net")
    return root


# ------------------------------------------------------------------------------------------------ name tables


@pytest.mark.parametrize("network", ["unet", "efficient_seg_net"])
def test_name_table_covers_the_original_and_our_network(network):
    keys = _fixture_keys(network)
    table = ow.NAME_TABLES[network]
    assert list(table) == [k for k, _ in keys]  # every original name, in the original order
    ours = build_network(network).state_dict()
    assert sorted(table.values()) == sorted(ours)  # onto every one of ours, once
    for key, shape in keys:
        assert list(ours[table[key]].shape) == shape, key
    assert sum(math.prod(s) for _, s in keys) == {"unet": 10_705_552, "efficient_seg_net": 9_366_160}[network]


# ------------------------------------------------------------------------------------------------ fixture logits


@pytest.mark.parametrize("network", ["unet", "efficient_seg_net"])
def test_recipe_weights_reproduce_the_original_logits(tmp_path, network):
    """Original-format files (with and without `module.`, with optimizer state) -> our network -> fixture logits."""
    recipe = _recipe_state_dict(network)
    with_prefix = _save_original(tmp_path / "ddp.pt", recipe, module_prefix=True)
    plain = _save_original(tmp_path / "plain.pt", recipe, module_prefix=False)
    state, spec, info = ow.load_original_network(with_prefix, network)
    state_plain, spec_plain, _ = ow.load_original_network(plain, network)
    assert spec == spec_plain == ow.original_model_spec(network)
    assert info == {"epoch": 317, "lr": 1.0e-4}
    assert state.keys() == state_plain.keys() and all(torch.equal(state[k], state_plain[k]) for k in state)

    kwargs = dict(spec["kwargs"])
    if network == "efficient_seg_net":
        kwargs["input_size_zyx"] = [128] * 3  # the fixture input's size (documentation only: see the network)
    net = build_network(network, **kwargs).eval()
    net.load_state_dict(state, strict=True)
    x = torch.randn((1, 1, 128, 128, 128), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the two full-size forwards of the suite: use both cores
    try:
        with torch.inference_mode():
            logits = net(x)[0, :, ::4, ::4, ::4].numpy()
    finally:
        torch.set_num_threads(threads)
    expected = np.load(FIXTURE / LOGITS_FILE[network])
    assert logits.shape == expected.shape == (13, 32, 32, 32)
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals


def _refused(path: Path, network: str = "unet") -> str:
    with pytest.raises(InputError) as err:
        ow.load_original_network(path, network)
    assert str(path) in str(err.value)
    return str(err.value)


def test_wrong_network_is_refused_naming_what_it_looks_like(tmp_path):
    path = _save_original(tmp_path / "fine.pt", _recipe_state_dict("efficient_seg_net"), module_prefix=True)
    message = _refused(path, "unet")
    assert "looks like the original fine EfficientSegNet" in message
    assert "missing key(s): conv0_0.residual_unit_1.0.conv.weight" in message
    assert "unexpected key(s): conv0_0.0.residual_unit.0.conv.weight" in message


def test_missing_key_and_wrong_shape_are_refused(tmp_path):
    state = _recipe_state_dict("unet")
    del state["conv2_2.shortcut_unit.conv.weight"]
    message = _refused(_save_original(tmp_path / "missing.pt", state, module_prefix=True))
    assert "1 missing key(s): conv2_2.shortcut_unit.conv.weight" in message and "unexpected" not in message
    assert "looks like the original coarse U-Net with some names differing" in message

    state = _recipe_state_dict("unet")
    state["conv1_3.residual_unit.1.conv.weight"] = torch.zeros(32, 32, 1, 3, 3)
    message = _refused(_save_original(tmp_path / "shape.pt", state, module_prefix=False))
    assert "conv1_3.residual_unit.1.conv.weight (32, 32, 1, 3, 3) (expected (32, 32, 3, 3, 3))" in message

    state = _recipe_state_dict("unet")
    state["final.weight"] = torch.zeros(14, 16, 1, 1, 1)
    assert "13 output channels" in _refused(_save_original(tmp_path / "classes.pt", state, module_prefix=False))


def test_truncated_random_and_foreign_files_are_refused(tmp_path, write_original_checkpoint):
    good = write_original_checkpoint(tmp_path / "good.pt", _tiny("unet", 0), "unet")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in _refused(truncated)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "cannot read" in _refused(noise)
    assert "not found" in _refused(tmp_path / "absent.pt")
    ours = tmp_path / "ours.pt"
    torch.save({"format_version": 1, "networks": {"a": _tiny("unet", 0).state_dict()}}, ours)
    assert "this project's own format" in _refused(ours)


class _RunsCode:
    """Unpickling this calls open(marker, "w"), creating the marker file: a checkpoint that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "code_ran"
    path = tmp_path / "best_model.pt"
    torch.save({"epoch": 1, "state_dict": _recipe_state_dict("unet"), "lr": _RunsCode(marker)}, path,
               pickle_protocol=protocol)
    message = _refused(path)
    if protocol == 2:  # torch.save's default: the unpickler names what the file asks for
        assert "(io.open); it is refused because loading it could run code" in message
    else:  # protocol 4's STACK_GLOBAL is refused before the name is known
        assert "cannot read checkpoint" in message
    assert not marker.exists()
    with pytest.raises(WeightsError):  # the same file met by the predictor's in-memory route
        (tmp_path / COARSE_DIR).mkdir()
        shutil.move(path, tmp_path / COARSE_DIR / "best_model.pt")
        Predictor(PredictOptions(tmp_path, device="cpu"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ CLI + predict


def test_cli_writes_model_folders_that_predict_sh_runs_on_a_real_ct(tmp_path, tiny_release, real_data_dir, capsys):
    """CLI -> exported folders -> `sh predict.sh` on case_0003 (exact grid); --ensemble needs network b, which the
    original fine stage never saved. (Tiny networks at 32^3: the full-size networks take minutes per CT here.)"""
    out = tmp_path / "weights"
    fine_file = tiny_release / FINE_DIR / "best_model.pt"
    code = ow_cli.main(["--coarse", str(tiny_release / COARSE_DIR), "--fine", str(fine_file), "--out", str(out),
                    "--coarse-size", str(SIZE), "--fine-size", str(SIZE)])
    assert code == 0, capsys.readouterr().err
    coarse = load_model(out / COARSE_DIR, "coarse")
    fine = load_model(out / FINE_DIR, "fine")
    assert set(coarse.networks) == {"a", "b"} and set(fine.networks) == {"a"}
    assert coarse.preprocess == PreprocessSpec("coarse", (SIZE,) * 3, HU_WINDOW)
    assert fine.preprocess == PreprocessSpec("fine", (SIZE,) * 3, HU_WINDOW, extend_size_mm=20.0)
    assert fine.model == {"name": "efficient_seg_net",
                          "kwargs": {"channels": TINY, "dropout": 0.2, "input_size_zyx": [SIZE] * 3}}
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():  # the converted networks compute what the saved ones do
        assert torch.equal(coarse.networks["b"](x), _tiny("unet", 2)(x))
        assert torch.equal(fine.net(x), _tiny("efficient_seg_net", 3)(x))
    assert (out / FINE_DIR / "config.yaml").is_file()

    in_dir = tmp_path / "in"
    in_dir.mkdir()
    ct = real_data_dir / "case_0003.nii.gz"
    (in_dir / "case_0003_0000.nii.gz").symlink_to(ct)
    result = subprocess.run(["sh", str(REPO_ROOT / "predict.sh"), str(in_dir), str(tmp_path / "out"), "--device",
                             "cpu", "--weights-dir", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    written = tmp_path / "out" / "case_0003.nii.gz"
    mask, image = sitk.ReadImage(str(written)), sitk.ReadImage(str(ct))
    assert mask.GetSize() == image.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-6)
    assert mask.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-4)
    assert mask.GetDirection() == pytest.approx(image.GetDirection(), abs=1e-6)

    capsys.readouterr()
    code = predict.main(["-i", str(in_dir), "-o", str(tmp_path / "ens"), "--weights-dir", str(out), "--device", "cpu",
                         "--ensemble", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--ensemble needs networks a and b" in err and f"{out / FINE_DIR}:" in err
    assert not (tmp_path / "ens" / "case_0003.nii.gz").exists()


def test_predictor_reads_the_original_layout_directly(tmp_path, tiny_release, monkeypatch):
    """--weights-dir at the original folders: the same networks and settings as the converted folders (default
    sizes), so the prediction is the converter's. (The full-size run on case_0003 gave identical masks.)"""
    assert ow_cli.main(["--coarse", str(tiny_release / COARSE_DIR), "--fine", str(tiny_release / FINE_DIR),
                    "--out", str(tmp_path / "converted")]) == 0
    direct = Predictor(PredictOptions(tiny_release, device="cpu", backend="torch"))
    converted = Predictor(PredictOptions(tmp_path / "converted", device="cpu", backend="torch"))
    for ours, theirs in ((direct.coarse, converted.coarse), (direct.fine, converted.fine)):
        assert (ours.preprocess, ours.primary) == (theirs.preprocess, theirs.primary)
        assert ours.modules.keys() == theirs.modules.keys() == ours.networks.keys()
        for name, net in ours.modules.items():
            mine, other = net.state_dict(), theirs.modules[name].state_dict()
            assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    assert direct.coarse.size_zyx == (160, 160, 160) and direct.fine.size_zyx == (192, 192, 192)
    assert Predictor(PredictOptions(tiny_release, device="cpu", backend="torch", fine_size=160)).fine.size_zyx == (
        160, 160, 160)
    # ONNX Runtime (the CPU default; in requirements-test.txt) also runs the in-memory converted networks
    # ... and writes its graph into the user cache, never into the downloaded release folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = sorted(p.relative_to(tiny_release) for p in tiny_release.rglob("*"))
    forwards = make_forwards("onnxruntime", direct.fine.modules, tiny_release / FINE_DIR, (SIZE,) * 3)
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(forwards["a"](x), _tiny("efficient_seg_net", 3)(x), atol=1e-4, rtol=0)
    assert sorted(p.relative_to(tiny_release) for p in tiny_release.rglob("*")) == before
    assert list((tmp_path / "cache").rglob("*.onnx"))


def test_cli_refuses_a_swapped_file_and_writes_nothing(tmp_path, tiny_release, capsys):
    out = tmp_path / "weights"
    code = ow_cli.main(["--coarse", str(tiny_release / FINE_DIR / "best_model.pt"),
                        "--fine", str(tiny_release / FINE_DIR), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "looks like the original fine EfficientSegNet" in err and "best_model.pt" in err
    assert not out.exists()
    assert ow_cli.main(["--out", str(out)]) == 2 and "--coarse and/or --fine" in capsys.readouterr().err


def test_cli_output_that_is_a_file_is_named_not_a_traceback(tmp_path, tiny_release, capsys):
    out = tmp_path / "weights"
    out.write_text("not a folder")
    assert ow_cli.main(["--coarse", str(tiny_release / COARSE_DIR), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}") and "Traceback" not in err
    assert out.read_text() == "not a folder"


def test_exported_folder_round_trips_through_export_model(tmp_path, tiny_release):
    """original_stage() is exactly what export_model takes; the file holds only plain data."""
    record = ow.original_stage("coarse", ow.original_files(tiny_release / COARSE_DIR), size=SIZE)
    path = export_model(tmp_path / "m", **record)
    payload = load_checkpoint(path)
    assert payload["primary"] == "a" and set(payload["networks"]) == {"a", "b"}
    assert payload["config"]["networks"]["a"]["epoch"] == 42
    fine = ow.original_stage("fine", ow.original_files(tiny_release / FINE_DIR))
    assert fine["preprocess"] == PreprocessSpec("fine", (192,) * 3, HU_WINDOW, extend_size_mm=20.0)
    assert set(fine["networks"]) == {"a"} and fine["model"]["kwargs"]["input_size_zyx"] == [192] * 3
    faster = ow.original_stage("fine", ow.original_files(tiny_release / FINE_DIR), size=ow.ORIGINAL_PREDICTOR_FINE_SIZE)
    assert faster["preprocess"].size_zyx == (160,) * 3
