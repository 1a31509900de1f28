"""common.infer.backends: backend choice, ONNX export cache (atomic, keyed by the model), agreement with torch.

Tiny networks (channels 2,4,4,8,8; 32^3 inputs) exported through the real `export_model`, CPU only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_models import export_tiny_stage

import predict
from common.core.labelmaps import probs_to_labels
from common.evaluation.uncertainty import labels_disagreement
from common.infer import backends
from common.infer.backends import (
    cached_onnx,
    export_model_graphs,
    make_forwards,
    onnx_cache_path,
    phantom_input,
    resolve_backend,
)
from common.infer.predictor import PredictOptions, Predictor
from common.storage.model_folder import COARSE_DIR, FINE_DIR


@pytest.fixture
def weights_dir(tmp_path) -> Path:
    export_tiny_stage(tmp_path, "coarse", "unet", 32, seed=1)
    export_tiny_stage(tmp_path, "fine", "efficient_seg_net", 32, seed=3)
    return tmp_path


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "onnxruntime"  # installed by requirements-test.txt
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("openvino", cpu)


def test_resolve_backend_without_onnxruntime(monkeypatch):
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        resolve_backend("onnxruntime", torch.device("cpu"))


@pytest.mark.parametrize("stage", [COARSE_DIR, FINE_DIR])
def test_onnxruntime_labels_agree_with_torch(weights_dir, stage):
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="torch"))
    st = predictor.coarse if stage == COARSE_DIR else predictor.fine
    x = phantom_input((32, 32, 32))
    forwards = make_forwards("onnxruntime", st.modules, st.path, st.size_zyx)
    for name, net in st.modules.items():
        with torch.inference_mode():
            ref = net(x)[0]
        out = forwards[name](x)[0]
        assert out.shape == ref.shape and out.dtype == torch.float32
        a, b = probs_to_labels(ref, 0.0), probs_to_labels(out, 0.0)
        assert len(torch.unique(a)) > 1  # a non-trivial label map, so agreement means something
        assert float((a == b).float().mean()) >= 0.999
        assert labels_disagreement(a, b, 13) < 0.01
        assert float((ref - out).abs().max()) < 1e-2  # fp32 reassociation (instance norm of few channels)


def test_onnx_cache_made_once_and_keyed_by_model(weights_dir):
    folder = weights_dir / COARSE_DIR
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="torch"))
    net = predictor.coarse.modules["a"]
    path = cached_onnx(net, folder, "a", (32, 32, 32))
    assert path.parent == folder / "onnx" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cached_onnx(net, folder, "a", (32, 32, 32)) == path and path.stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # no temporary file left behind
    # Another input size is another graph; both stay.
    other = cached_onnx(net, folder, "a", (48, 48, 48))
    assert other != path and path.is_file()
    # A changed model re-exports, and the stale graph of that network and size is removed.
    export_tiny_stage(folder.parent, "coarse", "unet", 32, seed=7)
    changed = Predictor(PredictOptions(weights_dir, device="cpu", backend="onnxruntime"))
    assert onnx_cache_path(changed.coarse.modules["a"], folder, "a", (32, 32, 32)) != path
    new_path = changed.coarse.networks["a"].path
    assert new_path != path and new_path.is_file() and not path.exists()
    x = phantom_input((32, 32, 32))
    with torch.inference_mode():
        ref = changed.coarse.modules["a"](x)
    assert float((changed.coarse.networks["a"](x) - ref).abs().max()) < 1e-2


def test_onnx_cache_falls_back_when_model_folder_unwritable(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = weights_dir / FINE_DIR
    (folder / "onnx").write_text("not a folder")  # the cache folder cannot be made
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="onnxruntime"))
    path = predictor.fine.networks["a"].path
    assert path.is_file() and (tmp_path / "cache") in path.parents
    assert (folder / "onnx").read_text() == "not a folder"


def _write_ct(path: Path, shape_zyx=(37, 45, 41)) -> None:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    vol = np.full(shape_zyx, -1000.0)
    vol[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 40.0
    vol[(z / 0.5) ** 2 + (y / 0.3) ** 2 + (x / 0.3) ** 2 < 1] = 120.0
    img = sitk.GetImageFromArray(vol.astype(np.int16))
    img.SetSpacing((0.8, 0.9, 2.5))
    sitk.WriteImage(img, str(path))


def test_predict_cli_onnxruntime_matches_torch(weights_dir, tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz")
    masks = {}
    for backend in ("torch", "onnxruntime"):
        argv = ["-i", str(in_dir), "-o", str(tmp_path / backend), "--weights-dir", str(weights_dir), "--device", "cpu",
                "--backend", backend, "--quiet"]
        assert predict.main(argv) == 0
        masks[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / backend / "c1.nii.gz")))
    assert masks["torch"].any()
    assert float((masks["torch"] == masks["onnxruntime"]).mean()) >= 0.999


def test_only_the_networks_used_are_exported(weights_dir, tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz")
    argv = ["-i", str(in_dir), "-o", str(tmp_path / "out"), "--weights-dir", str(weights_dir), "--device", "cpu",
            "--backend", "onnxruntime", "--uncertainty", "off", "--quiet"]
    assert predict.main(argv) == 0
    for folder in (COARSE_DIR, FINE_DIR):  # network b is neither ensembled nor compared: never exported
        assert [p.name.split("_")[0] for p in (weights_dir / folder / "onnx").glob("*.onnx")] == ["a"]


# ------------------------------------------------------------------------------------------------ issue 21


def test_a_swapped_or_truncated_cached_graph_is_rebuilt_not_trusted(weights_dir, caplog):
    """The cache was trusted by name: swapping networks A's and B's graphs changed every mask silently, and a
    truncated graph failed every case and was never rebuilt. Each graph carries its key and is checked on loading."""
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="torch"))
    stage = predictor.coarse
    x = phantom_input((32, 32, 32))
    first = make_forwards("onnxruntime", stage.modules, stage.path, stage.size_zyx)
    paths = {name: first[name].path for name in ("a", "b")}
    with torch.inference_mode():
        ref = {name: net(x) for name, net in stage.modules.items()}
    a_bytes, b_bytes = paths["a"].read_bytes(), paths["b"].read_bytes()
    paths["a"].write_bytes(b_bytes)
    paths["b"].write_bytes(a_bytes)
    caplog.set_level("WARNING")
    swapped = make_forwards("onnxruntime", stage.modules, stage.path, stage.size_zyx)
    for name in ("a", "b"):
        assert float((swapped[name](x) - ref[name]).abs().max()) < 1e-2, f"network {name} ran the other's graph"
    assert "exporting it again" in caplog.text
    paths["a"].write_bytes(paths["a"].read_bytes()[:1000])  # cut short
    truncated = make_forwards("onnxruntime", stage.modules, stage.path, stage.size_zyx)
    assert float((truncated["a"](x) - ref["a"]).abs().max()) < 1e-2
    assert paths["a"].stat().st_size > 1000


def test_no_writable_place_for_the_graphs_runs_torch_with_a_warning(weights_dir, tmp_path, monkeypatch, caplog):
    """A weights folder that cannot be written and no writable cache gave a PermissionError traceback per case."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(backends, "export_onnx", refuse)
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="onnxruntime"))
    x = phantom_input((32, 32, 32))
    caplog.set_level("WARNING")
    with torch.inference_mode():
        ref = predictor.coarse.modules["a"](x)
        out = predictor.coarse.networks["a"](x)
    assert torch.equal(out, ref) and "running network a with torch" in caplog.text


# ------------------------------------------------------------------------------------------------ issue 20


def _graph_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def test_export_writes_the_graphs_with_their_label_agreement_and_prediction_reuses_them(weights_dir, tmp_path):
    """A stage's export step writes each network's graph into the model folder with its agreement with torch on the
    phantom, so the first prediction exports nothing."""
    folder = weights_dir / FINE_DIR
    agreements = export_model_graphs(folder, "fine")
    assert set(agreements) == {"a", "b"} and all(value >= backends.MIN_LABEL_AGREEMENT for value in agreements.values())
    graphs = {path.name.split("_")[0]: path for path in (folder / "onnx").glob("*.onnx")}
    assert set(graphs) == {"a", "b"}
    for name, path in graphs.items():
        assert float(_graph_metadata(path)[backends.ONNX_AGREEMENT_FIELD]) == pytest.approx(agreements[name], abs=1e-6)
    stamps = {path: path.stat().st_mtime_ns for path in graphs.values()}
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _write_ct(in_dir / "c1_0000.nii.gz")
    argv = ["-i", str(in_dir), "-o", str(tmp_path / "out"), "--weights-dir", str(weights_dir), "--device", "cpu",
            "--backend", "onnxruntime", "--ensemble", "--quiet"]
    assert predict.main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in (folder / "onnx").glob("*.onnx")} == stamps


def test_a_graph_whose_labels_disagree_with_torch_is_not_used(weights_dir, monkeypatch, caplog):
    """Below 99.9 % agreement on the phantom the network runs with torch, with a warning, at export and prediction."""
    monkeypatch.setattr(backends, "label_agreement", lambda net, forward, size_zyx: 0.95)
    caplog.set_level("WARNING")
    assert export_model_graphs(weights_dir / COARSE_DIR, "coarse") == {"a": 0.95, "b": 0.95}
    assert "below 99.9 %" in caplog.text
    caplog.clear()
    predictor = Predictor(PredictOptions(weights_dir, device="cpu", backend="onnxruntime"))
    x = phantom_input((32, 32, 32))
    with torch.inference_mode():
        ref = predictor.coarse.modules["a"](x)
        out = predictor.coarse.networks["a"](x)
    assert torch.equal(out, ref), "the disagreeing graph ran"
    assert "agree with torch's on 95.00 %" in caplog.text and "running network a with torch" in caplog.text


def test_a_graph_without_a_measured_agreement_is_exported_again(weights_dir, monkeypatch, caplog):
    """Graphs cached before the agreement was stored are measured once (exported again) instead of trusted."""
    stage = Predictor(PredictOptions(weights_dir, device="cpu", backend="torch")).coarse
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)  # the export stores no agreement
    path = cached_onnx(stage.modules["a"], stage.path, "a", stage.size_zyx)
    assert backends.ONNX_AGREEMENT_FIELD not in _graph_metadata(path)
    monkeypatch.undo()
    caplog.set_level("WARNING")
    forwards = make_forwards("onnxruntime", stage.modules, stage.path, stage.size_zyx)
    forwards["a"].load()
    assert "no measured label agreement" in caplog.text
    assert float(_graph_metadata(path)[backends.ONNX_AGREEMENT_FIELD]) >= backends.MIN_LABEL_AGREEMENT


def test_export_without_onnxruntime_writes_no_graph(weights_dir, monkeypatch):
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert export_model_graphs(weights_dir / COARSE_DIR, "coarse") == {}
    assert not (weights_dir / COARSE_DIR / "onnx").exists()
