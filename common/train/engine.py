"""CPS training engine shared by the coarse and fine stages: one loop, resumable, single process or DDP.

How a stage uses it (see coarse_base_seg/train.py for a complete example):

    from common.train.distributed import init_distributed
    from common.train.engine import CPSJob, run_cps_training

    dist_info = init_distributed(cfg.device)             # torchrun env -> process group; no-op for one process
    job = CPSJob(
        cfg=cfg,                                         # CoarseTrainConfig | FineTrainConfig (read, never changed)
        out_dir=Path(cfg.output_dir),                    # fine: e.g. <output_dir>/round1
        labeled_stream=lambda start: ...,                # start iteration -> endless iterator of (x, y)
        unlabeled_stream=lambda start: ...,              # same, yields x only; None = labeled-only training
        val_cases=lambda rank, world_size: ...,          # -> this rank's (case_id, x (1,1,D,H,W), y (1,D,H,W))
        iterations=cfg.schedule.iterations,
        input_transform=None,                            # applied on the device to every x (e.g. window+z-score)
        init_weights=None,                               # warm start (fine round 2), see below
        dist=dist_info,
        stage="fine",                                    # stored in checkpoints, shown in the log and the bar
        model=None,                                      # {"name", "kwargs"}; default model_spec_from_config(cfg)
        extra_checkpoint={},                             # extra plain-data keys stored in last.pt
    )
    summary = run_cps_training(job)                      # {"iteration", "best_a", "best_b", "out_dir", ...}

Streams. `labeled_stream(k)` must yield, from iteration k on, this rank's batches: x (B, 1, D, H, W) (normalised,
or raw HU with an `input_transform`) and y either a label map (B, D, H, W) of integers 0..13 or a one-hot float
(B, 13, D, H, W). Tensors may live on the CPU (the engine moves them with non_blocking copies; pin them) or on the
training device already. Sample n of a stream must depend only on (seed, stream name, n) -- e.g. items from
`common.train.distributed.InfiniteSampler(start=k, batch_size=B)` and per-sample generators seeded with
`derive_seed(seed, name, position)` -- so a resumed run sees the same data as an uninterrupted one without
saving loader state. `val_cases(rank, world_size)` yields only that rank's validation cases, chosen before
anything is loaded (`common.train.distributed.shard`: case i on rank i % world_size); they are evaluated with the plain
(unwrapped) networks in eval mode and the Dice sums are added over ranks.

What the engine does: seeds (torch.manual_seed(model.seed_a) before building net A, seed_b before B; the
dropout RNG is reseeded every iteration from (seed, rank, iteration)), Adam per network, the step LR schedule of
`cfg.schedule` (factor lr_drop_factor[i] from lr_drop_at[i] * iterations on), `common.train.cps.cps_step` with
the configured loss, CPS weight ramp-up and AMP, optional torch.compile, DDP when world_size > 1, tqdm bar on
rank 0, text log, TensorBoard scalars (train/<every named loss>, train/lr, train/cps_weight, time/iter_s,
time/data_s, val/dice_{a,b}_<organ>, val/mean_dice_{a,b}) and one metrics.jsonl line per validation.

Output folder `out_dir`:
    config.yaml                     resolved config (rewritten at every start)
    train.log (train.rank<r>.log)   text log of rank 0 (other ranks)
    metrics.jsonl                   one JSON line per validation (iteration, lr, per-organ Dice of both nets,
                                    mean training losses since the previous validation, best so far)
    tb/                             TensorBoard event files
    checkpoints/last.pt             every `schedule.checkpoint_interval` iterations, at the end and on SIGINT/SIGTERM
    checkpoints/best_model_a.pt     on a strictly better validation mean Dice of net A (same for B)
    checkpoints/snapshot_<it>.pt    both networks after each iteration in `job.snapshot_iterations` (UIF stability)
    DONE                            JSON {"iteration", "best"} once the schedule has finished
    inputs.json                     `job.inputs` when given: the run is done only while they are unchanged
    previous/                       the outputs of a run trained from other inputs (set aside when they changed)
Checkpoint contents are described in common/storage/checkpoint.py.

Resume and stop:
- A run whose out_dir holds checkpoints/last.pt continues from it at the same iteration (weights, optimisers,
  scalers, best scores, RNG states of every rank, running loss sums); metrics.jsonl lines and TensorBoard points
  after that iteration (written before a kill) are dropped so the logs read as one uninterrupted run.
- If out_dir holds DONE for >= `iterations`, the run logs that it has finished and returns at once
  (summary["already_done"] is True). With a larger `iterations` it continues from last.pt.
- With `job.inputs` (the fine rounds: their pool and settings), a folder trained from other inputs is not done: its
  outputs move to previous/ and the run starts from scratch (or from `init_weights`).
- SIGINT / SIGTERM: the current iteration finishes, last.pt is written, and `TrainingInterrupted` (a SystemExit
  with code 130 for SIGINT and 143 for SIGTERM, the shell's 128 + signal convention) is raised after a one-line
  log message, so an uncaught interruption exits the process with that code and no traceback. A second SIGINT
  aborts at once (KeyboardInterrupt). SIGKILL cannot be caught: the rerun resumes from the last last.pt.
  With DDP the ranks agree on stopping through a tiny all-reduce every iteration, so they all save at the same
  iteration.
- A NaN/inf loss raises `NonFiniteLossError` naming the iteration and the loss; last.pt is not overwritten,
  so it keeps the last good weights.
- Warm start: `init_weights` is any weights file or folder `common.storage.weights.read_weights` reads (last.pt,
  an exported model, best_model_x.pt into both, the original release's files) or a dict {"a": path, "b": path}
  (each file's matching or only network). The stages pass `model.init_from` here. It only applies to a fresh run:
  an existing last.pt wins.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from common.core.amp import AmpSettings, amp_settings, autocast, make_grad_scaler
from common.core.device import set_cudnn_benchmark
from common.core.errors import InputError
from common.core.files import folder_lock, remove_stale_temps, write_text_atomic
from common.core.labelmaps import one_hot_organs
from common.core.labels import FLARE22, LabelSet
from common.core.logger import get_logger, log_to_file, progress
from common.core.typed_config import config_to_dict, save_config
from common.evaluation.metrics import hard_dice_per_organ
from common.networks import build_network
from common.storage.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    model_state_dict,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from common.storage.step_marker import read_marker, write_marker
from common.storage.weights import read_weight_pair
from common.train.cps import CPSSettings, Learner, Pair, cps_step, cps_weight_at
from common.train.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    derive_seed,
    init_distributed,
)
from common.train.losses import build_loss

logger = get_logger(__name__)


LAST_CHECKPOINT = "last.pt"
DONE_FILE = "DONE"
METRICS_FILE = "metrics.jsonl"
INPUTS_FILE = "inputs.json"
PREVIOUS_DIR = "previous"
# What a run writes into its folder besides its log: set aside together when its inputs change.
_RUN_OUTPUTS = ("checkpoints", DONE_FILE, METRICS_FILE, "tb", "config.yaml", INPUTS_FILE)

Batch = tuple[torch.Tensor, torch.Tensor]
ValCase = tuple[str, torch.Tensor, torch.Tensor]


class TrainingInterrupted(SystemExit):
    """Raised after SIGINT/SIGTERM once last.pt is saved; exit code 128 + signal number (130 / 143)."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path) -> None:
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(128 + signum)
        self.message = (f"training interrupted by {name} after iteration {iteration}; saved {checkpoint}. "
                        "Run the same command again to resume.")

    def __str__(self) -> str:
        return self.message


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class CPSJob:
    """Everything one CPS training run needs (see the module docstring)."""

    cfg: Any
    out_dir: Path
    labeled_stream: Callable[[int], Iterator[Batch]]
    unlabeled_stream: Callable[[int], Iterator[torch.Tensor]] | None
    val_cases: Callable[[int, int], Iterable[ValCase]] | None
    iterations: int
    init_weights: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    model: Mapping[str, Any] | None = None
    dist: DistInfo | None = None
    stage: str = "train"
    labels: LabelSet = FLARE22  # what the networks segment: one output channel per label (the dataset's set)
    extra_checkpoint: dict[str, Any] = field(default_factory=dict)
    # Iterations after which both networks are also kept as checkpoints/snapshot_<iteration>.pt (UIF stability).
    snapshot_iterations: tuple[int, ...] = ()
    # What the trained networks depend on besides `iterations` (plain JSON data, e.g. the pool and the settings read):
    # a run folder trained from other inputs is not "done"; its outputs are set aside in previous/ and it trains anew.
    inputs: Mapping[str, Any] | None = None


def run_folder_lock(output_dir: str | os.PathLike, info: DistInfo) -> contextlib.AbstractContextManager:
    """The lock a training stage holds on its output_dir for the whole run (the main rank; the other ranks of the same
    run share it): a second trainer on the folder stops at once with InputError naming the first's pid and host,
    before it writes anything (two trainers would interleave their logs and delete each other's checkpoints)."""
    return folder_lock(output_dir, "training run") if info.is_main else contextlib.nullcontext()


def run_log_path(out_dir: Path, info: DistInfo) -> Path:
    """The run's text log: train.log on rank 0, train.rank<r>.log on the others."""
    return Path(out_dir) / ("train.log" if info.is_main else f"train.rank{info.rank}.log")


def model_spec_from_config(cfg: Any, labels: LabelSet = FLARE22) -> dict[str, Any]:
    """{"name", "kwargs"} of the network in `cfg.model` (EfficientSegNet also gets input_size_zyx = data.size_zyx)
    with one output channel per label (`num_classes`, written only when it is not FLARE22's 13, the networks'
    default, so FLARE22 runs keep the specs of earlier versions)."""
    kwargs: dict[str, Any] = {"channels": [int(c) for c in cfg.model.channels], "dropout": float(cfg.model.dropout)}
    if cfg.model.name == "efficient_seg_net":
        kwargs["input_size_zyx"] = [int(s) for s in cfg.data.size_zyx]
    if labels.num_organs != FLARE22.num_organs:
        kwargs["num_classes"] = labels.num_organs
    return {"name": cfg.model.name, "kwargs": kwargs}


def lr_at(iteration: int, base_lr: float, iterations: int, drop_at: Iterable[float],
          drop_factor: Iterable[float]) -> float:
    """Step schedule: base_lr * drop_factor[i] for the last i with iteration >= drop_at[i] * iterations.

    The factors are absolute, not cumulative (reference 4.2: x0.1 after 66 %, x0.05 after 86 %).
    """
    factor = 1.0
    for fraction, f in zip(drop_at, drop_factor):
        if iteration >= fraction * iterations:
            factor = f
    return base_lr * factor


def build_cps_networks(spec: Mapping[str, Any], seed_a: int, seed_b: int) -> tuple[nn.Module, nn.Module]:
    """The two CPS networks, each initialised right after torch.manual_seed of its own seed (DESIGN 5.2)."""
    torch.manual_seed(seed_a)
    net_a = build_network(spec["name"], **spec["kwargs"])
    torch.manual_seed(seed_b)
    net_b = build_network(spec["name"], **spec["kwargs"])
    return net_a, net_b


# ------------------------------------------------------------------------------------------------ signals


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between iterations (only in the main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.signum = signum
        logger.warning("received %s: finishing the current iteration, then saving last.pt",
                       signal.Signals(signum).name)

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# ------------------------------------------------------------------------------------------------ helpers


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def _targets(y: torch.Tensor, device: torch.device, num_organs: int) -> torch.Tensor:
    """One-hot float (B, C, D, H, W) on `device` from a label map (B, D, H, W) or an already one-hot tensor."""
    y = _to_device(y, device)
    if y.ndim == 5 and y.shape[1] == num_organs and y.is_floating_point():
        return y
    return one_hot_organs(y.long(), num_organs)


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()
    shutdown = getattr(stream, "_shutdown_workers", None)  # DataLoader iterators
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Keep only metrics.jsonl lines up to `iteration` (lines written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
            if int(json.loads(line)["iteration"]) <= iteration:
                kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(_config_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclass
class _State:
    iteration: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"a": -math.inf, "b": -math.inf})
    best_iteration: dict[str, int] = field(default_factory=lambda: {"a": -1, "b": -1})
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_count: int = 0

    def add_losses(self, losses: Mapping[str, float]) -> None:
        for k, v in losses.items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v
        self.loss_count += 1


@dataclass
class _Streams:
    """The labeled and (optional) unlabeled iterators of one run; `close` stops their workers."""

    labeled: Iterator[Batch]
    unlabeled: Iterator[torch.Tensor] | None

    def close(self) -> None:
        _close(self.labeled)
        if self.unlabeled is not None:
            _close(self.unlabeled)


class _Progress:
    """tqdm bar, train/* and time/* scalars and the log line every `log_interval` iterations.

    time/iter_s counts training iterations only: the time spent inside `paused()` (validation, checkpoints) is
    left out; time/data_s is the time of `fetch` (reading, device copy, input transform) per iteration.
    """

    def __init__(self, trainer: "_Trainer", start: int) -> None:
        self.trainer = trainer
        self.total = trainer.job.iterations
        self.interval = trainer.cfg.schedule.log_interval
        # off a terminal no bar: the log line every log_interval iterations is the progress
        self.bar = progress(total=self.total, initial=start, disable=not trainer.main,
                            desc=f"{trainer.job.stage} CPS", unit="it", lines=False)
        self.window_start = time.perf_counter()
        self.window_data_s = 0.0
        self.window_iters = 0

    @contextlib.contextmanager
    def timing_data(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.window_data_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - t0

    def log(self, done: int, losses: Mapping[str, float], lr: float, cps_weight: float) -> None:
        """Count iteration `done`; every `log_interval` (and at the end) log the rank-mean losses (collective)."""
        self.window_iters += 1
        if done % self.interval == 0 or done == self.total:
            mean_losses = all_reduce_mean(losses)
            now = time.perf_counter()
            iter_s = (now - self.window_start) / self.window_iters
            data_s = self.window_data_s / self.window_iters
            self.window_start, self.window_data_s, self.window_iters = now, 0.0, 0
            if self.trainer.main:
                writer = self.trainer.writer
                for k, v in mean_losses.items():
                    writer.add_scalar(f"train/{k}", v, done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/cps_weight", cps_weight, done)
                writer.add_scalar("time/iter_s", iter_s, done)
                writer.add_scalar("time/data_s", data_s, done)
                self.bar.set_postfix(loss_a=f"{mean_losses['loss_a']:.4f}", loss_b=f"{mean_losses['loss_b']:.4f}",
                                     lr=f"{lr:.1e}", refresh=False)
                logger.info("iteration %d/%d lr %.2e cps_weight %.3f %s | %.3f s/it (data %.3f s)", done,
                            self.total, lr, cps_weight, " ".join(f"{k} {v:.4f}" for k, v in mean_losses.items()),
                            iter_s, data_s)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------ the engine


class _Trainer:
    def __init__(self, job: CPSJob) -> None:
        self.job = job
        self.cfg = job.cfg
        self.info = job.dist or init_distributed(self.cfg.device)
        self.device = self.info.device
        self.main = self.info.is_main
        self.out_dir = Path(job.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_path = self.ckpt_dir / LAST_CHECKPOINT
        self.spec = dict(job.model) if job.model is not None else model_spec_from_config(self.cfg, job.labels)
        self.labels = job.labels
        self.organ_keys = tuple(label.key for label in job.labels)  # metric keys: liver, right_kidney, ...
        self.config_dict = config_to_dict(self.cfg)
        self.state = _State()
        self.writer: Any = None

    # -- setup ------------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        if cfg.model.seed_a == cfg.model.seed_b:
            raise ValueError("model.seed_a and model.seed_b must differ")
        random.seed(derive_seed(cfg.seed, "python", self.info.rank))
        np.random.seed(derive_seed(cfg.seed, "numpy", self.info.rank) % 2**32)
        self.nets: Pair[nn.Module] = Pair(*build_cps_networks(self.spec, cfg.model.seed_a, cfg.model.seed_b))
        for net in self.nets:
            net.to(self.device)
        betas = tuple(float(b) for b in cfg.optim.betas)
        self.opts: Pair[torch.optim.Optimizer] = self.nets.map(lambda net: torch.optim.Adam(
            net.parameters(), lr=cfg.optim.lr, betas=betas, weight_decay=cfg.optim.weight_decay))
        self.amp: AmpSettings = amp_settings(cfg.amp.precision, self.device)
        self.scalers: Pair[torch.amp.GradScaler] = self.nets.map(lambda _: make_grad_scaler(self.amp))
        self.cps = CPSSettings(build_loss(cfg.loss.name), cfg.cps.weight, self.amp, cfg.cps.legacy_shift,
                               cfg.cps.confidence, cfg.cps.parts)
        set_cudnn_benchmark(self.device)  # fixed input sizes: cuDNN picks the fastest kernels, as the predictor

    def restore(self) -> None:
        if self.last_path.is_file():
            ckpt = load_checkpoint(self.last_path, map_location="cpu")
            missing = [k for k in ("net_a", "net_b", "opt_a", "opt_b", "iteration") if k not in ckpt]
            if missing:
                raise InputError(self.last_path, f"not a training checkpoint: missing {', '.join(missing)}")
            if ckpt.get("model") and dict(ckpt["model"]) != self.spec:
                raise InputError(self.last_path, f"was trained with model {ckpt['model']}, but the config asks for "
                                                 f"{self.spec}; use another output_dir or delete the old run")
            for name, net in self.nets.items():
                load_model_state(net, ckpt[f"net_{name}"], self.last_path)
            try:
                for name, opt in self.opts.items():
                    opt.load_state_dict(ckpt[f"opt_{name}"])
            except (ValueError, KeyError) as exc:
                raise InputError(self.last_path, f"optimizer state does not match: {exc}") from exc
            if ckpt.get("scaler_a") and self.scalers.a.is_enabled():
                for name, scaler in self.scalers.items():
                    scaler.load_state_dict(ckpt[f"scaler_{name}"])
            self.state.iteration = int(ckpt["iteration"])
            self.state.best = {k: float(v) for k, v in ckpt.get("best", self.state.best).items()}
            self.state.best_iteration = {k: int(v) for k, v in ckpt.get("best_iteration",
                                                                         self.state.best_iteration).items()}
            accum = ckpt.get("train_accum", {})
            self.state.loss_sums = {k: float(v) for k, v in accum.get("sums", {}).items()}
            self.state.loss_count = int(accum.get("count", 0))
            rng = ckpt.get("rng")
            world = int(ckpt.get("world_size", 1))
            if rng and len(rng) == self.info.world_size:
                restore_rng_state(rng[self.info.rank])
            if world != self.info.world_size:
                logger.warning("%s was written by %d process(es), this run has %d: the data order after the resume "
                               "differs from an uninterrupted run", self.last_path, world, self.info.world_size)
            if self.main:
                diffs = _config_differences(ckpt.get("config", {}), self.config_dict)
                if diffs:
                    logger.warning("config differs from the checkpoint's: %s", "; ".join(diffs))
            logger.info("resuming from %s at iteration %d/%d", self.last_path, self.state.iteration,
                        self.job.iterations)
        elif self.job.init_weights is not None:
            weights = read_weight_pair(self.job.init_weights, self.spec["name"])
            for name, net in self.nets.items():
                load_model_state(net, weights[name], str(self.job.init_weights))
            logger.info("warm start from %s", self.job.init_weights)

    def wrap(self) -> None:
        """`self.learners`: the networks as trained (DDP-wrapped with world_size > 1, compiled with amp.compile) with
        their optimisers and scalers."""
        models: Pair[nn.Module] = self.nets
        if self.info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            models = models.map(lambda net: nn.parallel.DistributedDataParallel(net, device_ids=ids))
        if self.cfg.amp.compile:
            models = models.map(torch.compile)
        self.learners = Pair(*(Learner(model, opt, scaler)
                               for model, opt, scaler in zip(models, self.opts, self.scalers)))

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_last(self, iteration: int) -> None:
        rng = all_gather_object(capture_rng_state())
        if not self.main:
            return
        state = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "stage": self.job.stage,
            **{f"net_{k}": model_state_dict(net) for k, net in self.nets.items()},
            **{f"opt_{k}": opt.state_dict() for k, opt in self.opts.items()},
            **{f"scaler_{k}": scaler.state_dict() for k, scaler in self.scalers.items()},
            "iteration": iteration,
            "rng": rng,
            "world_size": self.info.world_size,
            "best": dict(self.state.best),
            "best_iteration": dict(self.state.best_iteration),
            "train_accum": {"sums": dict(self.state.loss_sums), "count": self.state.loss_count},
            "config": self.config_dict,
            "model": self.spec,
            "labels": self.labels.to_json(),
            **self.job.extra_checkpoint,
        }
        save_checkpoint(self.last_path, state)

    def save_best(self, name: str, net: nn.Module, iteration: int, dice: float | None,
                  per_organ: list[float] | None) -> None:
        if not self.main:
            return
        save_checkpoint(self.ckpt_dir / f"best_model_{name}.pt", {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "stage": self.job.stage,
            "network": name,
            "net": model_state_dict(net),
            "iteration": iteration,
            "dice": dice,
            "dice_per_organ": per_organ,
            "config": self.config_dict,
            "model": self.spec,
            "labels": self.labels.to_json(),
        })

    def save_snapshot(self, iteration: int) -> None:
        """Both networks at `iteration`, kept for UIF's stability score (common.storage.checkpoint's layout)."""
        if not self.main:
            return
        save_checkpoint(self.ckpt_dir / f"snapshot_{iteration}.pt", {
            "format_version": CHECKPOINT_FORMAT_VERSION, "stage": self.job.stage, "iteration": iteration,
            "model": self.spec,
            **{f"net_{k}": model_state_dict(net) for k, net in self.nets.items()}})

    # -- validation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> tuple[dict[str, torch.Tensor], int]:
        """Per-organ hard Dice (13,) of each network averaged over the validation cases of all ranks."""
        nets = dict(self.nets.map(unwrap_model).items())
        for net in nets.values():
            net.eval()
        sums = {name: torch.zeros(self.labels.num_organs, dtype=torch.float64) for name in nets}
        count = 0
        try:
            assert self.job.val_cases is not None
            # val_cases shards before loading (common.train.distributed.shard), so no rank reads another's cases
            for case_id, x, y in self.job.val_cases(self.info.rank, self.info.world_size):
                x = _to_device(x, self.device)
                if self.job.input_transform is not None:
                    x = self.job.input_transform(x)
                target = _targets(y, self.device, self.labels.num_organs)
                for name, net in nets.items():
                    with autocast(self.amp):
                        logits = net(x)
                    sums[name] += hard_dice_per_organ(logits.float(), target).double().cpu()
                count += 1
        finally:
            for net in nets.values():
                net.train()
        total = all_reduce_sum({"count": float(count), **{f"sum_{k}": v for k, v in sums.items()}})
        n = int(round(total["count"]))
        return {k: total[f"sum_{k}"] / max(n, 1) for k in nets}, n

    def run_validation(self, iteration: int, lr: float) -> None:
        dice, n_cases = self.validate()
        if n_cases == 0:
            logger.warning("no validation cases: skipping validation at iteration %d", iteration)
            return
        means = {k: float(v.mean()) for k, v in dice.items()}
        improved = []
        for name, net in self.nets.items():
            if means[name] > self.state.best[name]:
                self.state.best[name] = means[name]
                self.state.best_iteration[name] = iteration
                self.save_best(name, net, iteration, means[name], dice[name].tolist())
                improved.append(name)
        train_means = ({k: v / self.state.loss_count for k, v in self.state.loss_sums.items()}
                       if self.state.loss_count else {})
        if self.info.world_size > 1 and train_means:
            train_means = all_reduce_mean(train_means)  # every rank ran the same number of iterations
        self.state.loss_sums, self.state.loss_count = {}, 0
        if not self.main:
            return
        record = {
            "iteration": iteration,
            "lr": lr,
            "num_cases": n_cases,
            "mean_dice_a": means["a"],
            "mean_dice_b": means["b"],
            "dice_a": dict(zip(self.organ_keys, dice["a"].tolist())),
            "dice_b": dict(zip(self.organ_keys, dice["b"].tolist())),
            "best_a": self.state.best["a"],
            "best_b": self.state.best["b"],
            "improved": improved,
            "train": train_means,
            "time": time.time(),
        }
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name in ("a", "b"):
                self.writer.add_scalar(f"val/mean_dice_{name}", means[name], iteration)
                for organ, value in zip(self.organ_keys, dice[name].tolist()):
                    self.writer.add_scalar(f"val/dice_{name}_{organ}", value, iteration)
            self.writer.flush()
        logger.info("validation at iteration %d on %d case(s): mean Dice A %.4f (best %.4f) B %.4f (best %.4f)%s",
                    iteration, n_cases, means["a"], self.state.best["a"], means["b"], self.state.best["b"],
                    f"; new best {'+'.join(improved)}" if improved else "")

    # -- main loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with log_to_file(run_log_path(self.out_dir, self.info), rank=self.info.rank):
            return self._run()

    def _run(self) -> dict[str, Any]:
        job, cfg, info = self.job, self.cfg, self.info
        if job.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {job.iterations}")

        self._set_aside_if_stale()
        done_path = self.out_dir / DONE_FILE
        finished = self._finished(done_path)
        if finished is not None:
            return finished

        if self.main:  # partial checkpoints (full size) a kill left between write and rename
            remove_stale_temps(self.ckpt_dir)
        self.build()
        self.restore()
        start = self.state.iteration
        if self.main:
            save_config(cfg, self.out_dir / "config.yaml")
            if start > 0:
                _truncate_metrics(self.out_dir / METRICS_FILE, start)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=start if start > 0 else None)
            logger.info("CPS training (%s): %s %s on %s, world size %d, iterations %d..%d, out_dir %s",
                        job.stage, self.spec["name"], self.spec["kwargs"], self.device, info.world_size, start,
                        job.iterations, self.out_dir)
        self.wrap()
        barrier()

        final = max(start, job.iterations)  # a last.pt beyond a lowered `iterations` stays where it is
        try:
            if start > job.iterations:
                logger.warning("%s is at iteration %d, beyond iterations=%d: nothing to train; the run stands at "
                               "iteration %d (DONE says so). Use another output_dir to train %d iterations.",
                               self.last_path, start, job.iterations, start, job.iterations)
            elif start == job.iterations:
                logger.info("checkpoint already at iteration %d of %d", start, job.iterations)
            else:
                self._loop(start)
            barrier()
            if self.main:
                if not (self.ckpt_dir / "best_model_a.pt").is_file():
                    # no validation ran (no cases): the final weights stand in as the "best" ones
                    logger.warning("no validation result: saving the final weights as best_model_a/b.pt")
                    for name, net in self.nets.items():
                        self.save_best(name, net, job.iterations, None, None)
                        self.state.best_iteration[name] = job.iterations
                write_marker(done_path, {"iteration": final, "best": self.state.best,
                                         "best_iteration": self.state.best_iteration})
                logger.info("training finished: %d iterations, best mean Dice A %.4f (iteration %d), "
                            "B %.4f (iteration %d); outputs in %s", final, self.state.best["a"],
                            self.state.best_iteration["a"], self.state.best["b"], self.state.best_iteration["b"],
                            self.out_dir)
        finally:
            if self.writer is not None:
                self.writer.close()
        return {"iteration": final, "best_a": self.state.best["a"], "best_b": self.state.best["b"],
                "best_iteration_a": self.state.best_iteration["a"],
                "best_iteration_b": self.state.best_iteration["b"], "out_dir": str(self.out_dir),
                "already_done": False}

    def _set_aside_if_stale(self) -> None:
        """With `job.inputs`: a folder whose inputs.json records other inputs was trained from them, so its outputs
        (checkpoints, DONE, metrics, TensorBoard) move to previous/ (replacing an older one) and the run starts anew;
        then inputs.json records this run's. A folder of an earlier version (no inputs.json) is kept as it is."""
        if self.job.inputs is None:
            return
        path = self.out_dir / INPUTS_FILE
        wanted = json.loads(json.dumps(dict(self.job.inputs)))
        recorded = read_marker(path)
        trained = any((self.out_dir / name).exists() for name in ("checkpoints", DONE_FILE))
        if self.main and recorded is not None and recorded != wanted and trained:
            previous = self.out_dir / PREVIOUS_DIR
            shutil.rmtree(previous, ignore_errors=True)
            previous.mkdir()
            for name in _RUN_OUTPUTS:
                if (self.out_dir / name).exists():
                    os.replace(self.out_dir / name, previous / name)
            logger.warning("%s was trained from other inputs (%s): training it again; its outputs are kept in %s",
                           self.out_dir, "; ".join(_config_differences(recorded, wanted)), previous)
        barrier()
        if self.main:
            write_marker(path, wanted)

    def _finished(self, done_path: Path) -> dict[str, Any] | None:
        """The summary of a run DONE at >= the wanted iterations, else None (a DONE below them is removed, and the
        run continues from last.pt)."""
        if not done_path.is_file():
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            done = read_marker(done_path) or {}
            if int(done["iteration"]) >= self.job.iterations:
                logger.info("training in %s already finished at iteration %d (%s exists); nothing to do. "
                            "Use another output_dir, or raise the number of iterations to continue.",
                            self.out_dir, int(done["iteration"]), done_path)
                best = done.get("best", {})
                return {"iteration": int(done["iteration"]), "best_a": best.get("a"), "best_b": best.get("b"),
                        "out_dir": str(self.out_dir), "already_done": True}
            logger.warning("%s says the run finished at iteration %s; continuing to %d iterations",
                           done_path, done["iteration"], self.job.iterations)
        barrier()
        if self.main:
            with contextlib.suppress(FileNotFoundError):
                done_path.unlink()
        return None

    def _loop(self, start: int) -> None:
        """Iterations start..iterations-1: fetch, step both networks, log, validate, checkpoint, maybe stop."""
        job = self.job
        data = _Streams(job.labeled_stream(start), job.unlabeled_stream(start) if job.unlabeled_stream else None)
        progress = _Progress(self, start)
        try:
            with _StopRequest() as stop:
                for it in range(start, job.iterations):
                    lr = self._begin_iteration(it)
                    with progress.timing_data():
                        x_l, target, x_u = self._fetch(data, stop, it)
                    weight = cps_weight_at(it, self.cfg.cps.weight, self.cfg.cps.rampup_iterations)
                    losses = cps_step(self.learners, x_l, target, x_u, replace(self.cps, weight=weight))
                    done = it + 1
                    stop_agreed = self._check_losses(losses, stop, done)
                    self.state.add_losses(losses)
                    progress.log(done, losses, lr, weight)
                    with progress.paused():
                        self._validate_and_checkpoint(done, lr)
                    if stop_agreed or (self.info.world_size == 1 and stop.signum is not None):
                        self._stop(stop.signum or signal.SIGTERM, done, saved=self._checkpoint_due(done))
        finally:
            progress.close()
            data.close()

    # -- the steps of one iteration -----------------------------------------------------------------------------
    def _begin_iteration(self, it: int) -> float:
        """Set the scheduled LR of both optimisers and reseed the dropout RNG from (seed, rank, it); return the LR."""
        sched = self.cfg.schedule
        lr = lr_at(it, self.cfg.optim.lr, self.job.iterations, sched.lr_drop_at, sched.lr_drop_factor)
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = lr
        torch.manual_seed(derive_seed(self.cfg.seed, "iteration", self.info.rank, it))
        return lr

    def _fetch(self, data: _Streams, stop: _StopRequest,
               it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Next x_l, one-hot target and x_u (or None) of this rank, on the device, after the input transform."""
        try:
            x_l, y_l = next(data.labeled)
            x_u = next(data.unlabeled) if data.unlabeled is not None else None
        except Exception:
            if stop.signum is not None:  # Ctrl-C also reaches DataLoader workers: stop, do not fail
                # With DDP the other ranks may be elsewhere: no collective save, the last periodic last.pt stays
                # the resume point.
                self._stop(stop.signum, it, collective=self.info.world_size == 1)
            raise
        x_l = _to_device(x_l, self.device)
        target = _targets(y_l, self.device, self.labels.num_organs)
        if x_u is not None:
            x_u = _to_device(x_u, self.device)
        transform = self.job.input_transform
        if transform is not None:
            x_l = transform(x_l)
            x_u = transform(x_u) if x_u is not None else None
        return x_l, target, x_u

    def _check_losses(self, losses: Mapping[str, float], stop: _StopRequest, done: int) -> bool:
        """Raise NonFiniteLossError if any rank's loss is NaN/inf; return whether any rank asked to stop.

        With DDP both answers come from one all-reduce, so every rank decides the same at the same iteration.
        """
        bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
        flags = {"stop": float(stop.signum is not None), "bad": float(bool(bad))}
        if self.info.world_size > 1:
            flags = all_reduce_max(flags)
        if flags["bad"]:
            which = ", ".join(f"{k}={losses[k]}" for k in bad) or "on another rank"
            if self.last_path.is_file():
                kept = f"{self.last_path} is kept as the last good checkpoint"
            else:
                kept = f"no checkpoint was saved yet ({self.last_path} does not exist): a rerun starts from scratch"
            raise NonFiniteLossError(
                f"non-finite loss at iteration {done} ({which}); stopping. {kept}. Try a lower optim.lr or "
                "amp.precision=fp32.")
        return bool(flags["stop"])

    def _checkpoint_due(self, done: int) -> bool:
        return done % self.cfg.schedule.checkpoint_interval == 0 or done == self.job.iterations

    def _validate_and_checkpoint(self, done: int, lr: float) -> None:
        if self.job.val_cases is not None and (done % self.cfg.schedule.val_interval == 0
                                               or done == self.job.iterations):
            self.run_validation(done, lr)
        if self._checkpoint_due(done):
            self.save_last(done)
        if done in self.job.snapshot_iterations:
            self.save_snapshot(done)

    def _stop(self, signum: int, iteration: int, saved: bool = False, collective: bool = True) -> None:
        """The one stop path: save last.pt at `iteration` (unless `saved`), then raise TrainingInterrupted.

        `collective=False` (a DDP rank whose data stream failed after the signal): no collective save; the
        iteration reported is that of the last periodic last.pt.
        """
        if collective:
            if not saved:
                self.save_last(iteration)
            barrier()
        else:
            ckpt = load_checkpoint(self.last_path) if self.last_path.is_file() else {}
            iteration = int(ckpt.get("iteration", 0))
        err = TrainingInterrupted(signum, iteration, self.last_path)
        logger.warning("%s", err.message)
        raise err


def run_cps_training(job: CPSJob) -> dict[str, Any]:
    """Train (or resume, or confirm finished) the CPS pair described by `job`; see the module docstring.

    Returns {"iteration", "best_a", "best_b", "best_iteration_a", "best_iteration_b", "out_dir", "already_done"}.
    Raises TrainingInterrupted (SystemExit 130/143) after SIGINT/SIGTERM, NonFiniteLossError on a NaN/inf loss,
    InputError for an unreadable or mismatching checkpoint.
    """
    return _Trainer(job).run()
