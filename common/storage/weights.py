"""Network weights from any file the project reads, and the one way to build a network from them.

Accepted sources (a file, or a folder holding one):
- an exported model folder or its `model.pt` (common.storage.model_folder): networks "a" and "b";
- a training checkpoint `last.pt` or `snapshot_<it>.pt` (common.train.engine): `net_a`, `net_b`;
- a best-network checkpoint `best_model_a.pt` / `best_model_b.pt`: its one network, for either name;
- the original release's `best_model.pt` or stage folder (common.storage.original_release), converted on reading:
  `best_model.pt` is network A, `best_model_1.pt` beside it network B (A again when there is none, as for the
  original fine stage, which saved A only).

`read_weights` returns a network's state dict with its architecture; `load_network` builds and loads it; `load_model`
loads a whole stage folder (exported, or original converted in memory) for prediction and the fine boxes step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from common.core.errors import InputError
from common.core.logger import get_logger
from common.networks import build_network
from common.storage.checkpoint import load_checkpoint, load_model_state, state_digest
from common.storage.labelsets import model_labels
from common.storage.model_folder import EXPORT_FILE, EXPORT_FORMAT_VERSION, ExportedModel, PreprocessSpec
from common.storage.original_release import (
    CHECKPOINT_A,
    CHECKPOINT_B,
    checked_state_dict,
    is_original_layout,
    looks_like,
    original_files,
    original_stage,
    to_project_state_dict,
)

logger = get_logger(__name__)

NETWORK_NAMES = ("a", "b")


@dataclass
class NetworkWeights:
    """One network's weights: its architecture {"name", "kwargs"}, its state dict (our names), the file."""

    spec: dict[str, Any]
    state: dict[str, torch.Tensor]
    source: Path


def _weights_file(path: Path) -> Path:
    """The file a folder stands for: its model.pt (exported) or best_model.pt (original release)."""
    if not path.is_dir():
        return path
    return path / CHECKPOINT_A if is_original_layout(path) else path / EXPORT_FILE


def _original_pair(path: Path) -> dict[str, Path] | None:
    """{"a", "b"} files of an original stage folder or its best_model.pt (B = A when there is no best_model_1.pt),
    or None when `path` is not the original release's."""
    if not (is_original_layout(path) or (path.is_file() and path.name == CHECKPOINT_A)):
        return None
    files = original_files(path)
    if "b" not in files:
        logger.info("%s: no %s, so network b is network a's weights", path, CHECKPOINT_B)
    return {"a": files["a"], "b": files.get("b", files["a"])}


def _from_payload(payload: Mapping[str, Any], network: str, path: Path, architecture: str | None) -> NetworkWeights:
    """Network `network` of a loaded checkpoint payload of any of the accepted kinds."""
    if "state_dict" in payload:  # the original release's best_model.pt
        state = checked_state_dict(payload, path)
        name = architecture or looks_like(state) or "unet"
        converted, spec = to_project_state_dict(state, name, path)
        return NetworkWeights(spec, converted, path)
    spec = payload.get("model")
    if f"net_{network}" in payload:
        state = payload[f"net_{network}"]
    elif "networks" in payload:
        nets = payload["networks"]
        state = nets[network] if network in nets else nets[payload.get("primary", next(iter(nets)))]
    elif "net" in payload:
        state = payload["net"]
    else:
        raise InputError(path, "holds no network weights (expected net_a/net_b, networks or net)")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise InputError(path, "does not say which network it holds (no model name)")
    return NetworkWeights({"name": str(spec["name"]), "kwargs": dict(spec.get("kwargs", {}))}, dict(state), path)


def read_weights(source: str | os.PathLike, network: str = "a", architecture: str | None = None) -> NetworkWeights:
    """Network `network` ("a" or "b") of `source` (any accepted file or folder, see the module docstring).

    `architecture` is the network name an original release file must be converted to (None: the one it looks like).
    InputError naming the file when it is missing, unreadable or holds no weights.
    """
    path = _network_file(source, network)
    return _from_payload(load_checkpoint(path), network, path, architecture)


def _network_file(source: str | os.PathLike, network: str) -> Path:
    """The file network `network` of `source` is read from; InputError when it is missing."""
    if network not in NETWORK_NAMES:
        raise ValueError(f"network must be one of {NETWORK_NAMES}, got {network!r}")
    path = Path(source)
    pair = _original_pair(path)
    if pair is not None:
        path = pair[network]
    path = _weights_file(path)
    if not path.is_file():
        raise InputError(path, "weights not found")
    return path


def load_network(source: str | os.PathLike | NetworkWeights, network: str = "a",
                 device: str | torch.device = "cpu", spec: Mapping[str, Any] | None = None) -> nn.Module:
    """Build network `network` of `source` (or the given weights) and load its weights; eval mode, on `device`.

    `spec` builds another architecture than the one stored (the weights must fit it).
    """
    weights = source if isinstance(source, NetworkWeights) else read_weights(source, network)
    spec = dict(spec) if spec is not None else weights.spec
    net = build_network(spec["name"], **spec.get("kwargs", {}))
    load_model_state(net, weights.state, source=weights.source)
    return net.to(device).eval()


def read_network_pair(source: str | os.PathLike | Mapping[str, str | os.PathLike],
                      architecture: str | None = None) -> dict[str, NetworkWeights]:
    """Networks {"a", "b"} of one source, or of {"a": source, "b": source} (each file's matching or only network);
    a file both come from (a last.pt, a snapshot) is read once. `architecture`: see `read_weights`."""
    sources = source if isinstance(source, Mapping) else {"a": source, "b": source}
    payloads: dict[Path, Mapping[str, Any]] = {}
    pair = {}
    for name in NETWORK_NAMES:
        path = _network_file(sources[name], name)
        if path not in payloads:
            payloads[path] = load_checkpoint(path)
        pair[name] = _from_payload(payloads[path], name, path, architecture)
    return pair


def read_weight_pair(source: str | os.PathLike | Mapping[str, str | os.PathLike],
                     architecture: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts {"a", "b"} for a warm start (`model.init_from`): see `read_network_pair`."""
    return {name: weights.state for name, weights in read_network_pair(source, architecture).items()}


def load_model(model_dir: str | os.PathLike, stage: str | None = None, device: str | torch.device = "cpu",
               networks: tuple[str, ...] | None = None) -> ExportedModel:
    """A stage's model folder (or its model.pt) for prediction and the fine boxes step: exported by
    `common.storage.model_folder.export_model`, or the original release's stage folder (best_model.pt [+
    best_model_1.pt]), converted in memory. Networks in eval mode on `device`.

    `stage`: when given, a model of another stage is an InputError. `networks`: which to build (default: all stored).
    InputError naming the file on any problem.
    """
    model_dir = Path(model_dir)
    if is_original_layout(model_dir):
        if stage is None:
            raise ValueError("an original release folder needs its stage (coarse or fine)")
        return _finite(_load_original(model_dir, stage, device), model_dir)
    path = model_dir if model_dir.suffix == ".pt" else model_dir / EXPORT_FILE
    if not path.is_file():
        raise InputError(path, "exported model not found (train the stage and run its export step, "
                               "or download the weights into this folder)")
    payload = load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("stage", "model", "networks", "primary", "preprocess") if k not in payload]
    if missing:
        raise InputError(path, f"not an exported model: missing {', '.join(missing)}")
    if payload.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise InputError(path, f"exported with a newer format_version {payload['format_version']}")
    if stage is not None and payload["stage"] != stage:
        raise InputError(path, f"holds a {payload['stage']} model, expected a {stage} model")
    built: dict[str, nn.Module] = {}
    for name in (tuple(payload["networks"]) if networks is None else networks):
        if name not in payload["networks"]:
            raise InputError(path, f"has no network {name!r} (stored: {sorted(payload['networks'])})")
        _check_weights_hash(payload, name, path)
        built[name] = load_network(_from_payload(payload, name, path, None), device=device)
    primary = payload["primary"] if payload["primary"] in built else next(iter(built))
    try:
        labels = model_labels(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"its label set is unreadable ({exc}); re-export the model") from None
    for name, net in built.items():
        outputs = _output_channels(net)
        if outputs is not None and outputs != labels.num_organs:
            raise InputError(path, f"network {name} has {outputs} output channels but the model's label set "
                                   f"{labels.name!r} has {labels.num_organs} labels; re-export the model")
    return _finite(ExportedModel(stage=payload["stage"], networks=built, primary=primary,
                                 preprocess=PreprocessSpec.from_json(payload["preprocess"], payload["stage"], path),
                                 config=dict(payload.get("config", {})), labels=labels,
                                 model=dict(payload["model"]), best_dice=dict(payload.get("best_dice", {}))), path)


def _finite(model: ExportedModel, path: Path) -> ExportedModel:
    """`model`, or InputError when a network holds NaN or infinite weights: they give empty masks marked "ok" in
    prediction, and empty coarse boxes (a silent whole-volume fallback) in the fine boxes step."""
    for key, network in model.networks.items():
        bad = [name for name, t in network.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise InputError(path, f"network {key} holds NaN or infinite weights ({bad[0]}"
                                   f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); export a good checkpoint")
    return model


def _check_weights_hash(payload: Mapping[str, Any], network: str, path: Path) -> None:
    """InputError when network `network` of an exported model no longer has the weights hash recorded at export (a
    bit flip or a damaged copy still loads, and may give empty masks reported ok); older exports record none."""
    recorded = payload.get("weights_sha256", {}).get(network)
    if recorded is not None and state_digest(payload["networks"][network]) != recorded:
        raise InputError(path, f"network {network}'s weights do not match the hash recorded at export: the file was "
                               "damaged after it was written (a flipped bit, a partial copy); export it or download "
                               "it again")


def _load_original(model_dir: Path, stage: str, device: str | torch.device) -> ExportedModel:
    """An original stage folder as an ExportedModel, converted in memory."""
    files = original_files(model_dir)
    record = original_stage(stage, files)
    built = {name: load_network(NetworkWeights(record["model"], state, files[name]), device=device)
             for name, state in record["networks"].items()}
    return ExportedModel(stage=stage, networks=built, primary="a", preprocess=record["preprocess"],
                         config=record["config"], model=record["model"])


def _output_channels(net: nn.Module) -> int | None:
    """Output channels of a network's last convolution (its `head`), or None when it has no such layer."""
    head = getattr(net, "head", None)
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
