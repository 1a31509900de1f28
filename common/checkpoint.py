"""Checkpoints and exported models: atomic writes, `weights_only=True` loads, RNG capture and restore.

Training checkpoint (`checkpoints/last.pt`, written by common.engine), a plain dict:
    {"format_version": 1, "net_a", "net_b" (state dicts without `module.`/`_orig_mod.` prefixes),
     "opt_a", "opt_b", "scaler_a", "scaler_b", "iteration": int (iterations completed),
     "rng": [capture_rng_state() of every rank], "best": {"a": float, "b": float},
     "config": resolved config dict, "model": {"name": str, "kwargs": dict}, ...engine extras}
Best-network checkpoint (`checkpoints/best_model_a.pt` / `best_model_b.pt`):
    {"format_version": 1, "network": "a"|"b", "net": state dict, "iteration": int, "dice": float,
     "dice_per_organ": list[float] (13), "model": {...}, "config": {...}}
Exported model (`model_weights/<stage>/model.pt` + `config.yaml` beside it), see `export_model`.

Everything stored is made of tensors, numbers, strings, lists, tuples and dicts, which is what
`torch.load(weights_only=True)` accepts; numpy RNG states are stored as int64 tensors for that reason.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml
from torch import nn

from common.errors import InputError
from common.fileutil import atomic_path, write_text_atomic
from common.logger import get_logger

logger = get_logger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
EXPORT_FORMAT_VERSION = 1
EXPORT_FILE = "model.pt"
EXPORT_CONFIG_FILE = "config.yaml"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save `state` (a plain dict) to `path` atomically: a kill mid-write leaves the old file intact."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (or any plain-dict torch file) with weights_only=True.

    Raises InputError naming the file when it is missing, truncated, not a torch file, or holds objects that
    are not plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        with warnings.catch_warnings():  # random bytes make torch warn about odd pickle protocols first
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler raises anything (IndexError, KeyError, ...)
        raise InputError(path, _load_error_text(exc)) from exc  # the cause stays for callers (original_weights)
    if not isinstance(state, dict):
        raise InputError(path, f"checkpoint holds a {type(state).__name__}, expected a dict")
    return state


def _load_error_text(exc: Exception) -> str:
    """What to say about a checkpoint torch cannot load. torch's own advice to retry with weights_only=False is
    left out on purpose: loading an untrusted file that way can run arbitrary code."""
    text = str(exc).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
    if detail and "Unsupported global" in detail.group(1):
        found = re.search(r"GLOBAL (\S+)", detail.group(1))
        what = f" ({found.group(1)})" if found else ""
        return (f"checkpoint holds Python objects other than tensors and plain data{what}; it is refused because "
                "loading it could run code. Use a checkpoint written by this project")
    if detail:
        reason = detail.group(1).strip()
    else:
        reason = text.splitlines()[0] if text else ""
    if "weights_only" in reason:
        reason = ""
    return (f"cannot read checkpoint (truncated, corrupt or not a PyTorch file: {type(exc).__name__}"
            f"{': ' + reason[:200] if reason else ''}); replace the file")


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes, in any order and nesting, from keys."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped network, tensors detached on CPU, keys without wrapper prefixes."""
    return {k: v.detach().cpu().clone() for k, v in strip_prefixes(unwrap_model(model).state_dict()).items()}


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], source: str | os.PathLike = "<state>") -> None:
    """Load `state_dict` (prefixes stripped) into the unwrapped `model`; InputError naming `source` on a mismatch."""
    try:
        unwrap_model(model).load_state_dict(strip_prefixes(state_dict), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise InputError(source, f"weights do not match the configured network: {detail}") from exc


# ------------------------------------------------------------------------------------------------ RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process uses: python `random`, numpy's global RandomState, torch CPU and the current CUDA
    device (when CUDA is in use)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [int(py_version), list(py_internal), py_gauss],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        # Only this process's current device: a DDP rank owns one GPU (and touching the others is waste).
        "cuda": torch.cuda.get_rng_state().cpu() if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`; the CUDA state goes to the current device."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((
        np_state["kind"], keys.astype(np.uint32), int(np_state["pos"]), int(np_state["has_gauss"]),
        float(np_state["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda_state = state.get("cuda")
    if cuda_state is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8))
        else:
            logger.warning("checkpoint holds a CUDA RNG state but CUDA is not available; CUDA RNG not restored")


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportedModel:
    """A model folder loaded for prediction: networks in eval mode on the requested device."""

    stage: str
    networks: dict[str, nn.Module]
    primary: str
    preprocess: dict[str, Any]
    config: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    best_dice: dict[str, float] = field(default_factory=dict)

    @property
    def net(self) -> nn.Module:
        """The primary network."""
        return self.networks[self.primary]


def export_model(
    out_dir: str | os.PathLike,
    *,
    stage: str,
    model: Mapping[str, Any],
    networks: Mapping[str, Mapping[str, torch.Tensor]],
    primary: str,
    preprocess: Mapping[str, Any],
    config: Mapping[str, Any],
    best_dice: Mapping[str, float] | None = None,
) -> Path:
    """Write `<out_dir>/model.pt` and `<out_dir>/config.yaml` atomically; returns the model.pt path.

    Args:
        stage: "coarse" or "fine".
        model: {"name": network name for common.networks.build_network, "kwargs": its keyword arguments}.
        networks: {"a": state dict, "b": state dict (optional)}; `primary` must be one of the keys.
        preprocess: what prediction needs to rebuild the input, e.g. {"size_zyx": [160,160,160],
            "hu_window": [-325.0, 325.0]} (+ "extend_size_mm" for the fine stage).
        config: the resolved training config (config_to_dict), stored in model.pt and as config.yaml.
    """
    if stage not in ("coarse", "fine"):
        raise ValueError(f"stage must be 'coarse' or 'fine', got {stage!r}")
    if primary not in networks:
        raise ValueError(f"primary network {primary!r} not among the exported networks {sorted(networks)}")
    out_dir = Path(out_dir)
    payload = {
        "format_version": EXPORT_FORMAT_VERSION,
        "stage": stage,
        "model": {"name": str(model["name"]), "kwargs": dict(model.get("kwargs", {}))},
        "networks": {name: strip_prefixes(sd) for name, sd in networks.items()},
        "primary": primary,
        "preprocess": dict(preprocess),
        "best_dice": {k: float(v) for k, v in (best_dice or {}).items()},
        "config": dict(config),
    }
    path = out_dir / EXPORT_FILE
    save_checkpoint(path, payload)
    write_text_atomic(out_dir / EXPORT_CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False))
    logger.info("exported %s model (%s, primary %s) to %s", stage, "+".join(sorted(networks)), primary, path)
    return path


def load_exported_model(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    stage: str | None = None,
    networks: tuple[str, ...] | None = None,
) -> ExportedModel:
    """Load `<model_dir>/model.pt` (or the file itself) written by `export_model`.

    Args:
        stage: when given, a file of another stage is an InputError.
        networks: which networks to build (default: all stored).
    """
    from common.networks import build_network  # imported here: checkpoint I/O must not need the network code

    model_dir = Path(model_dir)
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
    spec = payload["model"]
    wanted = tuple(payload["networks"]) if networks is None else networks
    built: dict[str, nn.Module] = {}
    for name in wanted:
        if name not in payload["networks"]:
            raise InputError(path, f"has no network {name!r} (stored: {sorted(payload['networks'])})")
        net = build_network(spec["name"], **spec.get("kwargs", {}))
        load_model_state(net, payload["networks"][name], source=path)
        built[name] = net.to(device).eval()
    primary = payload["primary"] if payload["primary"] in built else next(iter(built))
    return ExportedModel(
        stage=payload["stage"],
        networks=built,
        primary=primary,
        preprocess=dict(payload["preprocess"]),
        config=dict(payload.get("config", {})),
        model=dict(spec),
        best_dice=dict(payload.get("best_dice", {})),
    )


def best_checkpoint_paths(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The best-checkpoint files of networks a and b that the engine writes under `run_dir/checkpoints/`."""
    return {name: Path(run_dir) / "checkpoints" / f"best_model_{name}.pt" for name in ("a", "b")}


def export_best_networks(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, stage: str, primary: str,
                         preprocess: Callable[[dict], dict]) -> tuple[Path, dict]:
    """Export a training run's best networks (the primary one required, the other kept for ensembles).

    `preprocess(config_dict)` builds the model's preprocessing record from the run's resolved config. Returns the
    path of the written model.pt and the primary network's best-checkpoint payload.
    """
    sources = best_checkpoint_paths(run_dir)
    payloads = {}
    for name, path in sources.items():
        if path.is_file():
            payloads[name] = load_checkpoint(path)
        elif name == primary:
            raise InputError(path, "not found: train first (sh run.sh), or point output_dir at a finished run")
        else:
            logger.warning("%s not found: exporting network %s only", path, primary)
    spec = payloads[primary]["model"]
    for name, payload in payloads.items():
        if payload.get("model") != spec:
            raise InputError(sources[name], f"model {payload.get('model')} differs from network {primary}'s {spec}")
    config = payloads[primary]["config"]
    path = export_model(
        out_dir,
        stage=stage,
        model=spec,
        networks={name: payload["net"] for name, payload in payloads.items()},
        primary=primary,
        preprocess=preprocess(config),
        config=config,
        best_dice={name: float("nan") if p.get("dice") is None else float(p["dice"]) for name, p in payloads.items()},
    )
    return path, payloads[primary]
