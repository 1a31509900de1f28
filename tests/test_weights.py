"""common.storage.weights: every weights file the project reads, through one reader and one network loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import TINY, export_tiny_stage

from common.core.defaults import HU_WINDOW
from common.core.errors import InputError
from common.networks import build_network
from common.storage import weights as weights_module
from common.storage.checkpoint import load_checkpoint, state_digest
from common.storage.model_folder import COARSE_DIR
from common.storage.weights import load_model, load_network, read_network_pair, read_weight_pair, read_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_refactor"
RUN = FIXTURE / "coarse_run" / "checkpoints"


def _same(net: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_every_project_format():
    last = load_checkpoint(RUN / "last.pt")
    exported = load_checkpoint(FIXTURE / "model_weights" / COARSE_DIR / "model.pt")
    for name in ("a", "b"):
        assert _same(load_network(RUN / "last.pt", name), last[f"net_{name}"])
        assert _same(load_network(FIXTURE / "model_weights" / COARSE_DIR, name), exported["networks"][name])
        assert _same(load_network(FIXTURE / "model_weights" / COARSE_DIR / "model.pt", name),
                     exported["networks"][name])
    best_a = load_checkpoint(RUN / "best_model_a.pt")
    # a best-network checkpoint holds one network: it is both a and b
    assert _same(load_network(RUN / "best_model_a.pt", "b"), best_a["net"])
    pair = read_weight_pair({"a": RUN / "best_model_a.pt", "b": RUN / "best_model_b.pt"})
    best_b = load_checkpoint(RUN / "best_model_b.pt")["net"]
    assert pair["b"].keys() == best_b.keys() and all(torch.equal(pair["b"][k], best_b[k]) for k in best_b)
    assert read_weights(RUN / "last.pt").spec == last["model"]
    assert not load_network(RUN / "last.pt").training  # eval mode


def test_a_pair_reads_each_file_once(monkeypatch):
    """Networks a and b of one last.pt (a snapshot, a warm start) come from one read of the file; two files are read
    once each. The weights are those of the file."""
    reads = []
    monkeypatch.setattr(weights_module, "load_checkpoint", lambda path: reads.append(Path(path).name) or
                        load_checkpoint(path))
    pair = read_network_pair(RUN / "last.pt")
    assert reads == ["last.pt"]
    last = load_checkpoint(RUN / "last.pt")
    assert all(torch.equal(pair[n].state[k], v) for n in ("a", "b") for k, v in last[f"net_{n}"].items())
    reads.clear()
    read_weight_pair({"a": RUN / "best_model_a.pt", "b": RUN / "best_model_b.pt"})
    assert reads == ["best_model_a.pt", "best_model_b.pt"]


def test_original_release_files(tmp_path, write_original_checkpoint):
    torch.manual_seed(0)
    net_a = build_network("unet", channels=TINY)
    torch.manual_seed(1)
    net_b = build_network("unet", channels=TINY)
    stage = tmp_path / "base_coarse_model"
    write_original_checkpoint(stage / "best_model.pt", net_a, "unet")
    # the folder, and its best_model.pt alone (no best_model_1.pt: b is a)
    for source in (stage, stage / "best_model.pt"):
        assert _same(load_network(source, "a"), net_a.state_dict())
        assert _same(load_network(source, "b"), net_a.state_dict())
    write_original_checkpoint(stage / "best_model_1.pt", net_b, "unet", module_prefix=False)
    assert _same(load_network(stage, "b"), net_b.state_dict())
    model = load_model(stage, "coarse")
    assert _same(model.networks["b"], net_b.state_dict()) and model.preprocess.hu_window == HU_WINDOW
    with pytest.raises(ValueError, match="stage"):
        load_model(stage)


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(InputError, match="weights not found"):
        read_weights(tmp_path / "nowhere.pt")
    with pytest.raises(InputError, match="model.pt"):
        read_weights(tmp_path)  # an empty folder
    torch.save({"iteration": 3}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="holds no network weights"):
        read_weights(tmp_path / "other.pt")
    torch.save({"net": build_network("unet", channels=TINY).state_dict()}, tmp_path / "nameless.pt")
    with pytest.raises(InputError, match="which network"):
        read_weights(tmp_path / "nameless.pt")
    with pytest.raises(ValueError):
        read_weights(RUN / "last.pt", "c")
    folder = tmp_path / "model"
    shutil.copytree(FIXTURE / "model_weights" / COARSE_DIR, folder)
    with pytest.raises(InputError, match="expected a fine model"):
        load_model(folder, "fine")
    with pytest.raises(InputError, match="no network 'c'"):
        load_model(folder, "coarse", networks=("c",))


def test_a_bit_flipped_model_is_refused_by_its_weights_hash(tmp_path):
    """A bit flip in model.pt's tensor data still loads (and may give empty masks marked ok): the export records a
    hash of each network's weights and loading checks it."""
    import zipfile

    folder = export_tiny_stage(tmp_path, "coarse", "unet", 32, seed=1)
    assert set(load_model(folder, "coarse").networks) == {"a", "b"}
    path = folder / "model.pt"
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model.pt: network [ab]'s weights do not match the hash recorded"):
        load_model(folder, "coarse")


def test_nan_weights_are_refused_by_the_loader_every_user_shares(tmp_path):
    """load_model refuses a network with NaN weights, so prediction, the fine boxes step (a NaN coarse model gave
    empty boxes and a silent whole-volume fallback) and the ONNX export all refuse it, naming the file."""
    folder = export_tiny_stage(tmp_path, "coarse", "unet", 32, seed=1)
    payload = torch.load(folder / "model.pt", weights_only=True)
    first = next(t for t in payload["networks"]["b"].values() if t.is_floating_point())
    first.fill_(float("nan"))
    payload["weights_sha256"] = {k: state_digest(v) for k, v in payload["networks"].items()}  # exported that way
    torch.save(payload, folder / "model.pt")
    with pytest.raises(InputError, match=r"model\.pt: network b holds NaN or infinite weights"):
        load_model(folder, "coarse")
