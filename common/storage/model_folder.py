"""Exported model folders: what prediction needs of a trained stage, written by `export_model`.

A model folder (`model_weights/base_coarse_model/`, `model_weights/efficient_fine_model/`) holds `model.pt`, a plain
dict written by `export_model` (read back by `common.storage.weights.load_model`):
    {"format_version": 1, "stage": "coarse"|"fine", "model": {"name", "kwargs"}, "networks": {"a": state dict,
     "b": state dict (optional)}, "primary": "a"|"b", "preprocess": `PreprocessSpec.to_json()`,
     "labels": `LabelSet.to_json()` (FLARE22 when absent), "best_dice": {"a": float, ...},
     "config": the resolved training config,
     "weights_sha256": {"a": `state_digest` of network a, ...} (checked on loading; older exports have none)}
and `config.yaml`, the same config for the reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from torch import nn

from common.core.defaults import (
    COARSE_MIN_VOLUME_MM3,
    EXTEND_SIZE_MM,
    FINE_MIN_VOLUME_MM3,
    HU_WINDOW,
    Z_WINDOW_MM,
)
from common.core.errors import InputError
from common.core.files import write_text_atomic
from common.core.labels import FLARE22, LabelSet
from common.core.logger import get_logger
from common.networks import input_size_problem
from common.storage.checkpoint import load_checkpoint, save_checkpoint, state_digest, strip_prefixes
from common.storage.labelsets import model_labels

logger = get_logger(__name__)

COARSE_DIR = "base_coarse_model"
FINE_DIR = "efficient_fine_model"
EXPORT_FORMAT_VERSION = 1
EXPORT_FILE = "model.pt"
EXPORT_CONFIG_FILE = "config.yaml"



STAGES = ("coarse", "fine")
_STAGE_KEYS = {"coarse": ("size_zyx", "hu_window", "min_volume_mm3", "z_window_mm"),
               "fine": ("size_zyx", "hu_window", "extend_size_mm", "min_volume_mm3")}
_DEFAULT_MIN_VOLUME_MM3 = {"coarse": COARSE_MIN_VOLUME_MM3, "fine": FINE_MIN_VOLUME_MM3}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a stage's network input is made and its output post-processed: stored with the model as `preprocess`.

    size_zyx: network input size; hu_window: clip window (HU) before the per-volume z-score; min_volume_mm3: smallest
    component kept per organ (coarse: mm^3 of the coarse grid, before the organ box is taken; fine: mm^3 of the crop
    grid, the final mask); z_window_mm (coarse): half height of the organ box's z-window; extend_size_mm (fine):
    margin around the organ box. The post-processing values are the exporting config's, so changing them needs no
    retraining, and predict.sh's flags override them for one run.
    """

    stage: str
    size_zyx: tuple[int, int, int]
    hu_window: tuple[float, float] = HU_WINDOW
    min_volume_mm3: float | None = None  # None: the stage's default (common.core.defaults)
    z_window_mm: float = Z_WINDOW_MM
    extend_size_mm: float = EXTEND_SIZE_MM

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        object.__setattr__(self, "size_zyx", tuple(int(s) for s in self.size_zyx))
        object.__setattr__(self, "hu_window", (float(self.hu_window[0]), float(self.hu_window[1])))
        volume = _DEFAULT_MIN_VOLUME_MM3[self.stage] if self.min_volume_mm3 is None else self.min_volume_mm3
        object.__setattr__(self, "min_volume_mm3", float(volume))
        object.__setattr__(self, "z_window_mm", float(self.z_window_mm))
        object.__setattr__(self, "extend_size_mm", float(self.extend_size_mm))
        problem = input_size_problem(self.size_zyx)
        if problem is not None:
            raise ValueError(f"input size {problem}")

    def to_json(self) -> dict[str, Any]:
        """The stored record: the stage's keys only, lists for the sizes and the window."""
        values = {"size_zyx": list(self.size_zyx), "hu_window": list(self.hu_window),
                  "min_volume_mm3": self.min_volume_mm3, "z_window_mm": self.z_window_mm,
                  "extend_size_mm": self.extend_size_mm}
        return {key: values[key] for key in _STAGE_KEYS[self.stage]}

    @classmethod
    def from_json(cls, record: Mapping[str, Any], stage: str, source: str | os.PathLike) -> "PreprocessSpec":
        """The spec of a stored record; keys an older export lacks take their defaults. InputError naming `source`
        when the record is incomplete or its values are unusable."""
        try:
            known = {key: record[key] for key in _STAGE_KEYS[stage] if key in record}
            return cls(stage=stage, **known)
        except KeyError as exc:
            raise InputError(source, f"preprocess settings incomplete ({exc}); re-export the model") from None
        except (TypeError, ValueError, IndexError) as exc:
            raise InputError(source, f"preprocess settings unusable ({exc}); re-export the model") from None


@dataclass
class ExportedModel:
    """A model folder loaded for prediction: networks in eval mode on the requested device."""

    stage: str
    networks: dict[str, nn.Module]
    primary: str
    preprocess: PreprocessSpec
    config: dict[str, Any]
    labels: LabelSet = FLARE22
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
    preprocess: PreprocessSpec,
    config: Mapping[str, Any],
    labels: LabelSet = FLARE22,
    best_dice: Mapping[str, float] | None = None,
) -> Path:
    """Write `<out_dir>/model.pt` and `<out_dir>/config.yaml` atomically; returns the model.pt path.

    Args:
        stage: "coarse" or "fine".
        model: {"name": network name for common.networks.build_network, "kwargs": its keyword arguments}.
        networks: {"a": state dict, "b": state dict (optional)}; `primary` must be one of the keys.
        preprocess: what prediction needs to rebuild the input and post-process the output (its `stage` must be
            `stage`).
        config: the resolved training config (config_to_dict), stored in model.pt and as config.yaml.
        labels: the label set the networks segment (one output channel per label).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if primary not in networks:
        raise ValueError(f"primary network {primary!r} not among the exported networks {sorted(networks)}")
    if preprocess.stage != stage:
        raise ValueError(f"preprocess spec of the {preprocess.stage} stage given for a {stage} model")
    out_dir = Path(out_dir)
    payload = {
        "format_version": EXPORT_FORMAT_VERSION,
        "stage": stage,
        "model": {"name": str(model["name"]), "kwargs": dict(model.get("kwargs", {}))},
        "networks": {name: strip_prefixes(sd) for name, sd in networks.items()},
        "weights_sha256": {name: state_digest(strip_prefixes(sd)) for name, sd in networks.items()},
        "primary": primary,
        "preprocess": preprocess.to_json(),
        "labels": labels.to_json(),
        "best_dice": {k: float(v) for k, v in (best_dice or {}).items()},
        "config": dict(config),
    }
    path = out_dir / EXPORT_FILE
    save_checkpoint(path, payload)
    write_text_atomic(out_dir / EXPORT_CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False))
    logger.info("exported %s model (%s, primary %s) to %s", stage, "+".join(sorted(networks)), primary, path)
    return path


def best_checkpoint_paths(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The best-checkpoint files of networks a and b that the engine writes under `run_dir/checkpoints/`."""
    return {name: Path(run_dir) / "checkpoints" / f"best_model_{name}.pt" for name in ("a", "b")}


def export_best_networks(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, stage: str, primary: str,
                         preprocess: Callable[[dict], PreprocessSpec]) -> tuple[Path, dict]:
    """Export a training run's best networks (the primary one required, the other kept for ensembles).

    `preprocess(config_dict)` builds the model's `PreprocessSpec` from the run's resolved config (as trained).
    Returns the path of the written model.pt and the primary network's best-checkpoint payload.
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
    labels = model_labels(payloads[primary])
    path = export_model(
        out_dir,
        stage=stage,
        model=spec,
        networks={name: payload["net"] for name, payload in payloads.items()},
        primary=primary,
        preprocess=preprocess(config),
        config=config,
        labels=labels,
        best_dice={name: float("nan") if p.get("dice") is None else float(p["dice"]) for name, p in payloads.items()},
    )
    return path, payloads[primary]
