"""Checkpoints and exported models: atomic writes, `weights_only=True` loads, RNG capture and restore.

Training checkpoint (`checkpoints/last.pt`, written by common.train.engine), a plain dict:
    {"format_version": 1, "net_a", "net_b" (state dicts without `module.`/`_orig_mod.` prefixes),
     "opt_a", "opt_b", "scaler_a", "scaler_b", "iteration": int (iterations completed),
     "rng": [capture_rng_state() of every rank], "best": {"a": float, "b": float},
     "config": resolved config dict, "model": {"name": str, "kwargs": dict}, ...engine extras}
Best-network checkpoint (`checkpoints/best_model_a.pt` / `best_model_b.pt`):
    {"format_version": 1, "network": "a"|"b", "net": state dict, "iteration": int, "dice": float,
     "dice_per_organ": list[float] (13), "model": {...}, "config": {...}}
Exported model folders are `common.storage.model_folder`'s.

Everything stored is made of tensors, numbers, strings, lists, tuples and dicts, which is what
`torch.load(weights_only=True)` accepts; numpy RNG states are stored as int64 tensors for that reason.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from common.core.errors import InputError
from common.core.files import atomic_path, write_failure
from common.core.logger import get_logger

logger = get_logger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save `state` (a plain dict) to `path` atomically: a kill mid-write leaves the old file intact. A write
    that fails or comes out short (full disk, file-size limit) raises WriteError naming `path`, the old file kept."""
    with atomic_path(path, suffix=".pt", verify=_zip_problem) as tmp:
        try:
            torch.save(dict(state), tmp)
        except RuntimeError as e:  # torch's C++ writer: "unexpected pos ...", "file write failed", ...
            raise write_failure(path, e) from None


def _zip_problem(path: Path) -> str | None:
    """What is wrong with a torch file just written (a zip archive: a cut one has no central directory at its end)."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return "the file is incomplete"
    except (zipfile.BadZipFile, OSError) as e:
        return f"the file is incomplete ({e})"
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (or any plain-dict torch file) with weights_only=True;
    `mmap` maps the tensors instead of reading them (for a file read only for its metadata; zip format only).

    Raises InputError naming the file when it is missing, truncated, not a torch file, or holds objects that
    are not plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        with warnings.catch_warnings():  # random bytes make torch warn about odd pickle protocols first
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a network's parameters and buffers (names, shapes, dtypes, bytes): its weights' identity, recorded
    in exported models and keying the ONNX cache."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
