"""The original release's checkpoints (`best_model.pt`): safe reading, name mapping, conversion to a model folder.

The original FLARE22 release saved each network as `torch.save({"epoch": int, "state_dict": {...},
"optimizer_dict": {...}, "lr": float})`, state dict keys optionally prefixed with `module.` (DDP). Its coarse
stage wrote network A to `base_coarse_model/best_model.pt` (B, when saved, to `best_model_1.pt`); its fine stage
saved network A only (`efficient_fine_model/best_model.pt`). The networks in `common.networks` compute exactly
what the original ones compute; only the parameter names differ, and `UNET_NAMES` / `EFFICIENT_SEG_NET_NAMES`
below map every original name onto ours.

Three ways in:
- `python -m common.original_weights --coarse DIR_OR_FILE --fine DIR_OR_FILE --out model_weights/` writes this
  project's exported model folders (common.storage.model_folder.export_model), after which `sh predict.sh IN OUT`
  works;
- `sh predict.sh IN OUT --weights-dir ORIGINAL_DIR` reads the original layout directly (converted in memory by
  `common.storage.weights.load_model`);
- `model.init_from: PATH` of both training stages starts networks A and B from an original or converted model
  (`common.storage.weights.read_weights`, used by common.train.engine).

Files are read with `torch.load(weights_only=True)` (common.storage.checkpoint.load_checkpoint): the original
checkpoints hold only tensors, numbers and dicts, and a file that would import or call anything is refused before any of
it runs. A file whose names or shapes do not fit the expected network is refused with the first few missing and
unexpected names and the network it looks like.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from common.core.defaults import COARSE_SIZE_ZYX, EXTEND_SIZE_MM, FINE_SIZE_ZYX, HU_WINDOW
from common.core.errors import InputError
from common.core.labels import FLARE22
from common.core.logger import get_logger
from common.networks import build_network
from common.storage.checkpoint import load_checkpoint, strip_prefixes
from common.storage.model_folder import COARSE_DIR, FINE_DIR, PreprocessSpec, export_model

logger = get_logger("common.original_weights")  # also under `python -m`

CHECKPOINT_A = "best_model.pt"      # the original's network A of a stage
CHECKPOINT_B = "best_model_1.pt"    # the original coarse stage's network B (the fine stage never saved one)
# The original's clip window before the per-volume z-score and its input sizes are the project's defaults
# (common.core.defaults): HU_WINDOW, COARSE_SIZE_ZYX (trained and predicted), FINE_SIZE_ZYX (trained).
COARSE_SIZE = COARSE_SIZE_ZYX[0]
FINE_SIZE = FINE_SIZE_ZYX[0]
ORIGINAL_PREDICTOR_FINE_SIZE = 160  # what the original predictor's predict_config.yaml ran the fine network at
DROPOUT = 0.2                       # the original networks' Dropout3d probability (inactive at prediction)
STAGE_NETWORK = {"coarse": "unet", "fine": "efficient_seg_net"}
NETWORK_TITLE = {"unet": "coarse U-Net", "efficient_seg_net": "fine EfficientSegNet"}
_SHOW = 4  # how many missing / unexpected / misshapen names a refusal lists

# ------------------------------------------------------------------------------------------------ name tables
# Original name -> name in common.networks, in the original state_dict's order. Every weight is a bias-free
# convolution kernel; the original wraps most in a `.conv` submodule, ours are index 0 of an nn.Sequential.

UNET_NAMES: dict[str, str] = {
    "conv0_0.residual_unit_1.0.conv.weight": "encoders.0.0.main.0.0.weight",
    "conv0_0.residual_unit_1.1.conv.weight": "encoders.0.0.main.1.0.weight",
    "conv0_0.residual_unit_2.0.conv.weight": "encoders.0.1.main.0.0.weight",
    "conv0_0.residual_unit_2.1.conv.weight": "encoders.0.1.main.1.0.weight",
    "conv0_0.shortcut_unit_1.conv.weight": "encoders.0.0.shortcut.0.weight",
    "conv1_0.residual_unit_1.0.conv.weight": "encoders.1.0.main.0.0.weight",
    "conv1_0.residual_unit_1.1.conv.weight": "encoders.1.0.main.1.0.weight",
    "conv1_0.residual_unit_2.0.conv.weight": "encoders.1.1.main.0.0.weight",
    "conv1_0.residual_unit_2.1.conv.weight": "encoders.1.1.main.1.0.weight",
    "conv1_0.shortcut_unit_1.conv.weight": "encoders.1.0.shortcut.0.weight",
    "conv2_0.residual_unit_1.0.conv.weight": "encoders.2.0.main.0.0.weight",
    "conv2_0.residual_unit_1.1.conv.weight": "encoders.2.0.main.1.0.weight",
    "conv2_0.residual_unit_2.0.conv.weight": "encoders.2.1.main.0.0.weight",
    "conv2_0.residual_unit_2.1.conv.weight": "encoders.2.1.main.1.0.weight",
    "conv2_0.shortcut_unit_1.conv.weight": "encoders.2.0.shortcut.0.weight",
    "conv3_0.residual_unit_1.0.conv.weight": "encoders.3.0.main.0.0.weight",
    "conv3_0.residual_unit_1.1.conv.weight": "encoders.3.0.main.1.0.weight",
    "conv3_0.residual_unit_2.0.conv.weight": "encoders.3.1.main.0.0.weight",
    "conv3_0.residual_unit_2.1.conv.weight": "encoders.3.1.main.1.0.weight",
    "conv3_0.shortcut_unit_1.conv.weight": "encoders.3.0.shortcut.0.weight",
    "conv4_0.residual_unit_1.0.conv.weight": "encoders.4.0.main.0.0.weight",
    "conv4_0.residual_unit_1.1.conv.weight": "encoders.4.0.main.1.0.weight",
    "conv4_0.residual_unit_2.0.conv.weight": "encoders.4.1.main.0.0.weight",
    "conv4_0.residual_unit_2.1.conv.weight": "encoders.4.1.main.1.0.weight",
    "conv4_0.shortcut_unit_1.conv.weight": "encoders.4.0.shortcut.0.weight",
    "conv3_1.residual_unit.0.conv.weight": "decoders.3.main.0.0.weight",
    "conv3_1.residual_unit.1.conv.weight": "decoders.3.main.1.0.weight",
    "conv3_1.shortcut_unit.conv.weight": "decoders.3.shortcut.0.weight",
    "conv2_2.residual_unit.0.conv.weight": "decoders.2.main.0.0.weight",
    "conv2_2.residual_unit.1.conv.weight": "decoders.2.main.1.0.weight",
    "conv2_2.shortcut_unit.conv.weight": "decoders.2.shortcut.0.weight",
    "conv1_3.residual_unit.0.conv.weight": "decoders.1.main.0.0.weight",
    "conv1_3.residual_unit.1.conv.weight": "decoders.1.main.1.0.weight",
    "conv1_3.shortcut_unit.conv.weight": "decoders.1.shortcut.0.weight",
    "conv0_4.residual_unit.0.conv.weight": "decoders.0.main.0.0.weight",
    "conv0_4.residual_unit.1.conv.weight": "decoders.0.main.1.0.weight",
    "conv0_4.shortcut_unit.conv.weight": "decoders.0.shortcut.0.weight",
    "final.weight": "head.weight",
}

EFFICIENT_SEG_NET_NAMES: dict[str, str] = {
    "conv0_0.0.residual_unit.0.conv.weight": "encoders.0.0.main.0.0.weight",
    "conv0_0.0.residual_unit.1.conv.weight": "encoders.0.0.main.1.0.weight",
    "conv0_0.0.shortcut_unit.conv.weight": "encoders.0.0.shortcut.0.weight",
    "conv0_0.1.residual_unit.0.conv.weight": "encoders.0.1.main.0.0.weight",
    "conv0_0.1.residual_unit.1.conv.weight": "encoders.0.1.main.1.0.weight",
    "conv1_0.0.residual_unit.0.conv.weight": "encoders.1.0.main.0.0.weight",
    "conv1_0.0.residual_unit.1.conv.weight": "encoders.1.0.main.1.0.weight",
    "conv1_0.0.shortcut_unit.conv.weight": "encoders.1.0.shortcut.0.weight",
    "conv1_0.1.residual_unit.0.conv.weight": "encoders.1.1.main.0.0.weight",
    "conv1_0.1.residual_unit.1.conv.weight": "encoders.1.1.main.1.0.weight",
    "conv2_0.0.residual_unit.0.conv.weight": "encoders.2.0.main.0.0.weight",
    "conv2_0.0.residual_unit.1.conv.weight": "encoders.2.0.main.1.0.weight",
    "conv2_0.0.shortcut_unit.conv.weight": "encoders.2.0.shortcut.0.weight",
    "conv2_0.1.residual_unit.0.conv.weight": "encoders.2.1.main.0.0.weight",
    "conv2_0.1.residual_unit.1.conv.weight": "encoders.2.1.main.1.0.weight",
    "conv3_0.0.residual_unit.0.conv.weight": "encoders.3.0.main.0.0.weight",
    "conv3_0.0.residual_unit.1.conv.weight": "encoders.3.0.main.1.0.weight",
    "conv3_0.0.shortcut_unit.conv.weight": "encoders.3.0.shortcut.0.weight",
    "conv3_0.1.residual_unit.0.conv.weight": "encoders.3.1.main.0.0.weight",
    "conv3_0.1.residual_unit.1.conv.weight": "encoders.3.1.main.1.0.weight",
    "conv4_0.0.residual_unit.0.conv.weight": "encoders.4.0.main.0.0.weight",
    "conv4_0.0.residual_unit.1.conv.weight": "encoders.4.0.main.1.0.weight",
    "conv4_0.0.shortcut_unit.conv.weight": "encoders.4.0.shortcut.0.weight",
    "conv4_0.1.residual_unit.0.conv.weight": "encoders.4.1.main.0.0.weight",
    "conv4_0.1.residual_unit.1.conv.weight": "encoders.4.1.main.1.0.weight",
    "context_block.trans_layer.conv.weight": "context.reduce.0.weight",
    "context_block.conv1_1.conv.weight": "context.scale_in.0.weight",
    "context_block.conv1_2.conv.weight": "context.strip_in.0.weight",
    "context_block.conv2_0.conv.weight": "context.scale1.0.weight",
    "context_block.conv2_1.conv.weight": "context.scale2.0.weight",
    "context_block.conv2_2.conv.weight": "context.scale4.0.weight",
    "context_block.conv2_3.conv.weight": "context.strip_z.0.weight",
    "context_block.conv2_4.conv.weight": "context.strip_y.0.weight",
    "context_block.conv2_5.conv.weight": "context.strip_x.0.weight",
    "context_block.conv2_6.conv.weight": "context.scale_out.0.weight",
    "context_block.conv2_7.conv.weight": "context.strip_out.0.weight",
    "context_block.conv3.conv.weight": "context.merge.0.weight",
    "context_block.score_layer.0.conv.weight": "context.out.0.0.weight",
    "context_block.score_layer.1.weight": "context.out.1.weight",
    "trans_4.conv.weight": "transitions.3.0.weight",
    "trans_3.conv.weight": "transitions.2.0.weight",
    "trans_2.conv.weight": "transitions.1.0.weight",
    "trans_1.conv.weight": "transitions.0.0.weight",
    "conv3_1.0.residual_unit.0.conv.weight": "decoders.3.main.0.0.weight",
    "conv3_1.0.residual_unit.1.conv.weight": "decoders.3.main.1.0.weight",
    "conv3_1.0.shortcut_unit.conv.weight": "decoders.3.shortcut.0.weight",
    "conv2_2.0.residual_unit.0.conv.weight": "decoders.2.main.0.0.weight",
    "conv2_2.0.residual_unit.1.conv.weight": "decoders.2.main.1.0.weight",
    "conv2_2.0.shortcut_unit.conv.weight": "decoders.2.shortcut.0.weight",
    "conv1_3.0.residual_unit.0.conv.weight": "decoders.1.main.0.0.weight",
    "conv1_3.0.residual_unit.1.conv.weight": "decoders.1.main.1.0.weight",
    "conv1_3.0.shortcut_unit.conv.weight": "decoders.1.shortcut.0.weight",
    "conv0_4.0.residual_unit.0.conv.weight": "decoders.0.main.0.0.weight",
    "conv0_4.0.residual_unit.1.conv.weight": "decoders.0.main.1.0.weight",
    "conv0_4.0.shortcut_unit.conv.weight": "decoders.0.shortcut.0.weight",
    "final.weight": "head.weight",
}

NAME_TABLES: dict[str, dict[str, str]] = {"unet": UNET_NAMES, "efficient_seg_net": EFFICIENT_SEG_NET_NAMES}
# The first convolution of each of the 5 encoder levels: its output width is that level's channel count.
_LEVEL_KEYS = {
    "unet": tuple(f"conv{i}_0.residual_unit_1.0.conv.weight" for i in range(5)),
    "efficient_seg_net": tuple(f"conv{i}_0.0.residual_unit.0.conv.weight" for i in range(5)),
}
_HEAD_KEY = "final.weight"


# ------------------------------------------------------------------------------------------------ reading


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load an original `best_model.pt` safely; returns the payload with its `state_dict` stripped of `module.`.

    Raises InputError naming the file when it is missing, truncated, not a PyTorch file, would run code when
    unpickled (refused before anything runs), or has no `state_dict` of tensors.
    """
    path = Path(path)
    payload = load_checkpoint(path)  # weights_only: refuses pickled code with a message naming the file
    return {**payload, "state_dict": checked_state_dict(payload, path)}


def checked_state_dict(payload: Mapping[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `state_dict` of an original checkpoint's payload, `module.` stripped; InputError naming `path` if the
    payload has none or it holds anything but tensors."""
    if "state_dict" not in payload:
        ours = [k for k in ("networks", "net", "net_a") if k in payload]
        hint = (f" (it holds {ours[0]!r}: this project's own format, use it directly)" if ours
                else f" (keys: {', '.join(sorted(map(str, payload))[:_SHOW])})")
        raise InputError(path, f"not an original release checkpoint: no 'state_dict'{hint}")
    state = payload["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise InputError(path, f"'state_dict' is {'empty' if isinstance(state, Mapping) else type(state).__name__}, "
                               "expected a dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(path, f"'state_dict' holds non-tensor values under {', '.join(bad[:_SHOW])}")
    return strip_prefixes(state)


def looks_like(state_dict: Mapping[str, Any]) -> str | None:
    """The original network whose names cover most of `state_dict`'s keys (more than half), else None."""
    keys = set(state_dict)
    best, share = None, 0.5
    for name, table in NAME_TABLES.items():
        overlap = len(keys & table.keys()) / max(len(keys), len(table))
        if overlap > share:
            best, share = name, overlap
    return best


def _first(names: Sequence[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def original_model_spec(network: str, channels: Sequence[int] = (16, 32, 64, 128, 256),
                        fine_size: int = FINE_SIZE) -> dict[str, Any]:
    """{"name", "kwargs"} of our network for an original one (as common.train.engine.model_spec_from_config)."""
    kwargs: dict[str, Any] = {"channels": [int(c) for c in channels], "dropout": DROPOUT}
    if network == "efficient_seg_net":
        kwargs["input_size_zyx"] = [int(fine_size)] * 3
    return {"name": network, "kwargs": kwargs}


def _channels(state_dict: Mapping[str, torch.Tensor], network: str, source: Path) -> list[int]:
    """The 5 encoder widths of an original state dict (checked: 1 input channel, 13 organ outputs)."""
    first = state_dict[_LEVEL_KEYS[network][0]]
    head = state_dict[_HEAD_KEY]
    if first.ndim != 5 or first.shape[1] != 1:
        raise InputError(source, f"{_LEVEL_KEYS[network][0]} has shape {tuple(first.shape)}: expected a 3D "
                                 "convolution over 1 input channel (CT)")
    if head.ndim != 5 or head.shape[0] != FLARE22.num_organs:
        raise InputError(source, f"{_HEAD_KEY} has shape {tuple(head.shape)}: expected {FLARE22.num_organs} output "
                                 "channels (the 13 FLARE22 organs)")
    return [int(state_dict[k].shape[0]) for k in _LEVEL_KEYS[network]]


def _expected_shapes(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        net = build_network(spec["name"], **spec["kwargs"])
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def to_project_state_dict(state_dict: Mapping[str, torch.Tensor], network: str, source: str | os.PathLike,
                          fine_size: int = FINE_SIZE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename an original state dict (prefixes already stripped) onto `network` ("unet" | "efficient_seg_net").

    Returns (our state dict, model spec); the channel widths are read from the file's shapes, so a network
    trained at other widths converts too. InputError naming `source` when any name is missing or unexpected
    (the first few of each, and which original network the file looks like) or any shape does not fit.
    """
    source = Path(source)
    table = NAME_TABLES[network]
    missing = [k for k in table if k not in state_dict]
    unexpected = [k for k in state_dict if k not in table]
    if missing or unexpected:
        guess = looks_like(state_dict)
        if guess is not None and guess != network:
            what = f"it looks like the original {NETWORK_TITLE[guess]} ({guess}), not the {NETWORK_TITLE[network]}"
        elif guess is None:
            what = "it looks like neither original network"
        else:
            what = f"it looks like the original {NETWORK_TITLE[network]} with some names differing"
        parts = [f"{len(missing)} missing key(s): {_first(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {_first(unexpected)}" if unexpected else ""]
        raise InputError(source, f"does not match the original {NETWORK_TITLE[network]} ({network}): {what}; "
                                 + "; ".join(p for p in parts if p))
    spec = original_model_spec(network, _channels(state_dict, network, source), fine_size)
    expected = _expected_shapes(spec)
    converted = {ours: state_dict[orig] for orig, ours in table.items()}
    misshapen = [f"{orig} {tuple(state_dict[orig].shape)} (expected {expected[ours]})"
                 for orig, ours in table.items() if tuple(converted[ours].shape) != expected[ours]]
    if misshapen:
        raise InputError(source, f"shapes do not fit the original {NETWORK_TITLE[network]} with channels "
                                 f"{'-'.join(map(str, spec['kwargs']['channels']))}: {_first(misshapen)}")
    return {k: v.float().contiguous() for k, v in converted.items()}, spec


def load_original_network(path: str | os.PathLike, network: str, fine_size: int = FINE_SIZE
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(our state dict, model spec, {"epoch", "lr"} of the file) for the original checkpoint at `path`."""
    payload = read_original_checkpoint(path)
    state, spec = to_project_state_dict(payload["state_dict"], network, path, fine_size)
    info = {k: payload[k] for k in ("epoch", "lr") if isinstance(payload.get(k), (int, float))}
    return state, spec, info


def original_files(path: str | os.PathLike, b_path: str | os.PathLike | None = None) -> dict[str, Path]:
    """{"a": file, "b": file (when there is one)} of an original stage given as its folder or its A file.

    A folder gives `best_model.pt` (A) and, if present, `best_model_1.pt` (B); a file `best_model.pt` also
    takes a `best_model_1.pt` beside it as B. `b_path` names B explicitly.
    """
    path = Path(path)
    a = path / CHECKPOINT_A if path.is_dir() else path
    if not a.is_file():
        raise InputError(a, "original checkpoint not found" + (" (expected best_model.pt in this folder)"
                                                               if path.is_dir() else ""))
    files = {"a": a}
    if b_path is not None:
        files["b"] = Path(b_path)
    elif a.name == CHECKPOINT_A and (a.parent / CHECKPOINT_B).is_file():
        files["b"] = a.parent / CHECKPOINT_B
    return files


def is_original_layout(model_dir: str | os.PathLike) -> bool:
    """True for a stage folder of the original release (best_model.pt, no model.pt of this project's format)."""
    model_dir = Path(model_dir)
    return model_dir.is_dir() and not (model_dir / "model.pt").exists() and (model_dir / CHECKPOINT_A).is_file()


# ------------------------------------------------------------------------------------------------ conversion


def original_stage(stage: str, files: Mapping[str, str | os.PathLike], size: int | None = None) -> dict[str, Any]:
    """Everything `export_model` takes for one original stage: model, networks, primary, preprocess, config.

    `size` is the network input size per axis (default: coarse 160, fine 192; the original predictor ran the fine
    network at 160). Networks A and B must have the same architecture.
    """
    network = STAGE_NETWORK[stage]
    size = int(size if size is not None else (COARSE_SIZE if stage == "coarse" else FINE_SIZE))
    preprocess = PreprocessSpec(stage, (size,) * 3, HU_WINDOW, extend_size_mm=EXTEND_SIZE_MM)  # checks the size
    networks: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, dict[str, Any]] = {}
    spec: dict[str, Any] | None = None
    for name, path in files.items():
        state, this_spec, info = load_original_network(path, network, fine_size=size)
        if spec is not None and this_spec != spec:
            raise InputError(path, f"network {name} has channels {this_spec['kwargs']['channels']}, network a has "
                                   f"{spec['kwargs']['channels']}")
        spec = this_spec
        networks[name] = state
        sources[name] = {"file": str(Path(path).resolve()), **info}
    assert spec is not None, "no files given"
    # No training config exists for these weights; the record says where they came from.
    config = {"converted_from": "original SemiSeg-CSSN release (common.original_weights)", "stage": stage,
              "networks": sources, "model": {"name": network, "channels": spec["kwargs"]["channels"]},
              "preprocess": preprocess.to_json()}
    return {"stage": stage, "model": spec, "networks": networks, "primary": "a", "preprocess": preprocess,
            "config": config}


def convert_release(out_dir: str | os.PathLike, coarse: str | os.PathLike | None = None,
                    fine: str | os.PathLike | None = None, coarse_b: str | os.PathLike | None = None,
                    fine_b: str | os.PathLike | None = None, coarse_size: int = COARSE_SIZE,
                    fine_size: int = FINE_SIZE) -> dict[str, Path]:
    """Write `out_dir/base_coarse_model/` and/or `out_dir/efficient_fine_model/` from original checkpoints.

    Every given file is read and checked before anything is written. Returns {stage: model.pt path}.
    """
    wanted = {"coarse": (coarse, coarse_b, coarse_size, COARSE_DIR), "fine": (fine, fine_b, fine_size, FINE_DIR)}
    stages = {stage: original_stage(stage, original_files(a, b), size)
              for stage, (a, b, size, _) in wanted.items() if a is not None}
    if not stages:
        raise ValueError("give --coarse and/or --fine")
    written = {}
    for stage, record in stages.items():
        written[stage] = export_model(Path(out_dir) / wanted[stage][3], **record)
        if "b" not in record["networks"]:
            logger.info("%s: network a only (the original %s stage saved no network b): predict without "
                        "--ensemble", written[stage], stage)
    return written
