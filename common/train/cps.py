"""Cross pseudo supervision (CPS): two networks teach each other with hard pseudo labels (reference 3.1).

One training step (`cps_step`): each network runs once on concat(labeled, unlabeled); its loss is the
supervised loss on the labeled part plus `cps_weight` times the loss against the *other* network's detached
pseudo labels on all outputs; each network back-propagates its own loss and steps its own optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

import torch
from torch import nn

from common.core.amp import AmpSettings, autocast
from common.core.labelmaps import LABEL_THRESHOLD, logit, one_hot_organs, probs_to_labels
from common.train.losses import LossFn

T = TypeVar("T")
U = TypeVar("U")


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float = LABEL_THRESHOLD,
                  legacy_shift: bool = False) -> torch.Tensor:
    """Hard one-hot pseudo labels (N, C, D, H, W) float32 from logits of the same shape, without gradient.

    Default (DESIGN 5.1): the project's label rule `common.core.labelmaps.probs_to_labels` (the channel with the
    highest sigmoid if that sigmoid >= `threshold`, else background = all-zero vector), one-hot.
    `legacy_shift=True` reproduces the reference (3.1 [BUG]): argmax over the channels, one-hot with C+1
    channels, channel 0 dropped -- argmax k lands on channel k-1, argmax 0 gives all zeros, the last channel
    never gets a positive, and background voxels are always assigned an organ. For ablations only.
    """
    logits = logits.detach()
    if legacy_shift:
        index = logits.argmax(dim=1, keepdim=True)
        shape = (logits.shape[0], logits.shape[1] + 1) + tuple(logits.shape[2:])
        one_hot = torch.zeros(shape, dtype=torch.float32, device=logits.device).scatter_(1, index, 1.0)
        return one_hot[:, 1:].contiguous()
    labels = probs_to_labels(logits, logit(threshold), dim=1)
    return one_hot_organs(labels, num_organs=logits.shape[1])


@torch.no_grad()
def confident_voxels(logits: torch.Tensor, confidence: float) -> torch.Tensor | None:
    """Mask (N, 1, D, H, W) of the voxels whose pseudo label the network is sure of: its highest sigmoid is
    >= `confidence` (a sure organ) or <= 1 - `confidence` (sure background). None for `confidence` 0 (every voxel
    counts, the original method)."""
    if confidence <= 0.0:
        return None
    best = logits.detach().float().amax(dim=1, keepdim=True)
    return (best >= logit(confidence)) | (best <= logit(1.0 - confidence))


@dataclass(frozen=True)
class Pair(Generic[T]):
    """The two CPS networks' objects of one kind (networks, optimisers, learners, outputs, ...), named "a" and "b"."""

    a: T
    b: T

    def items(self) -> tuple[tuple[str, T], tuple[str, T]]:
        return (("a", self.a), ("b", self.b))

    def map(self, fn: Callable[[T], U]) -> Pair[U]:
        return Pair(fn(self.a), fn(self.b))

    def __iter__(self) -> Iterator[T]:
        return iter((self.a, self.b))


@dataclass
class Learner:
    """One CPS network as trained (possibly DDP-wrapped or compiled), its optimiser and its GradScaler (fp16)."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None


@dataclass(frozen=True)
class CPSSettings:
    """How a CPS step computes: the supervised loss, the CPS weight, mixed precision, which pseudo-label voxels count
    and how the CPS loss spans the batch, the ablation flag.

    `parts`: "joint" (the original) takes the CPS loss over concat(labeled, unlabeled), so a labeled crop weighs
    w / 2 in it beside an unlabeled one and w without; "separate" adds the CPS loss of the labeled part and that of
    the unlabeled part, so a labeled crop weighs w with or without unlabeled data (L/0 and L/U compare).
    """

    loss_fn: LossFn
    weight: float = 1.0
    amp: AmpSettings | None = None
    legacy_shift: bool = False  # the original release's shifted pseudo labels (see `pseudo_labels`)
    confidence: float = 0.0     # `confident_voxels`: 0 = every voxel of the partner's pseudo label counts
    parts: str = "joint"        # "joint" | "separate" (see above)


def cps_losses(out: Pair[torch.Tensor], y_l: torch.Tensor, settings: CPSSettings) -> dict[str, torch.Tensor]:
    """Loss tensors of both networks from their outputs on concat(labeled, unlabeled) (N_l + N_u, C, ...).

    `y_l` (N_l, C, ...) holds the targets of the first N_l outputs. Returns loss_a, loss_b (to back-propagate),
    sup_a, sup_b, cps_a, cps_b. The pseudo labels are detached, so loss_a has no path into network B.
    """
    n_l = y_l.shape[0]
    sup_a = settings.loss_fn(out.a[:n_l], y_l)
    sup_b = settings.loss_fn(out.b[:n_l], y_l)
    cps_a = _cps_loss(out.a, out.b, n_l, settings)  # A learns from B's pseudo labels
    cps_b = _cps_loss(out.b, out.a, n_l, settings)
    return {"loss_a": sup_a + settings.weight * cps_a, "loss_b": sup_b + settings.weight * cps_b,
            "sup_a": sup_a, "sup_b": sup_b, "cps_a": cps_a, "cps_b": cps_b}


def _cps_loss(student: torch.Tensor, teacher: torch.Tensor, n_l: int, settings: CPSSettings) -> torch.Tensor:
    """The loss of `student`'s outputs against `teacher`'s detached pseudo labels (its confident voxels only), over
    the whole batch ("joint") or as the sum of the labeled part's and the unlabeled part's ("separate")."""
    target = pseudo_labels(teacher, legacy_shift=settings.legacy_shift)
    mask = confident_voxels(teacher, settings.confidence)
    if settings.parts == "joint" or n_l == student.shape[0]:
        return settings.loss_fn(student, target, mask)
    if settings.parts != "separate":
        raise ValueError(f"unknown CPS parts {settings.parts!r}; expected 'joint' or 'separate'")
    labeled, unlabeled = slice(0, n_l), slice(n_l, None)
    return sum(settings.loss_fn(student[part], target[part], None if mask is None else mask[part])
               for part in (labeled, unlabeled))


def _backward_and_step(loss: torch.Tensor, learner: Learner) -> None:
    if learner.scaler is None:
        loss.backward()
        learner.optimizer.step()
    else:
        learner.scaler.scale(loss).backward()
        learner.scaler.step(learner.optimizer)
        learner.scaler.update()


def cps_step(learners: Pair[Learner], x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor | None,
             settings: CPSSettings) -> dict[str, float]:
    """One CPS training step of both networks; returns loss_a, loss_b, sup_a, sup_b, cps_a, cps_b as floats.

    x_l (N_l, 1, D, H, W) normalised labeled images, y_l (N_l, C, D, H, W) one-hot targets, x_u
    (N_u, 1, D, H, W) unlabeled images or None (CPS then acts on the labeled outputs only). The networks must
    be in train mode; they may be DDP-wrapped (each separately).
    """
    x = x_l if x_u is None else torch.cat([x_l, x_u], dim=0)
    for learner in learners:
        learner.optimizer.zero_grad(set_to_none=True)
    with autocast(settings.amp):
        out = learners.map(lambda learner: learner.net(x))
    # Losses compute in float32 (the loss functions upcast), outside autocast.
    losses = cps_losses(out, y_l, settings)
    _backward_and_step(losses["loss_a"], learners.a)
    _backward_and_step(losses["loss_b"], learners.b)
    names = list(losses)
    values = torch.stack([losses[k].detach().float() for k in names]).tolist()  # one device sync
    return dict(zip(names, values))


def cps_weight_at(iteration: int, weight: float, rampup_iterations: int) -> float:
    """CPS weight at `iteration`: weight * exp(-5 (1 - t)^2), t = min(iteration / rampup_iterations, 1).

    `rampup_iterations <= 0` means no ramp-up (the reference): always `weight`.
    """
    if rampup_iterations <= 0:
        return float(weight)
    t = min(max(iteration / rampup_iterations, 0.0), 1.0)
    return float(weight) * math.exp(-5.0 * (1.0 - t) ** 2)
