"""Cross pseudo supervision (CPS): two networks teach each other with hard pseudo labels (reference 3.1).

One training step (`cps_step`): each network runs once on concat(labeled, unlabeled); its loss is the
supervised loss on the labeled part plus `cps_weight` times the loss against the *other* network's detached
pseudo labels on all outputs; each network back-propagates its own loss and steps its own optimiser.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.core.amp import AmpSettings, autocast
from common.core.labelmaps import LABEL_THRESHOLD, logit, one_hot_organs, probs_to_labels
from common.train.losses import LossFn


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


def cps_losses(out_a: torch.Tensor, out_b: torch.Tensor, y_l: torch.Tensor, loss_fn: LossFn, cps_weight: float,
               legacy_shift: bool = False) -> dict[str, torch.Tensor]:
    """Loss tensors of both networks from their outputs on concat(labeled, unlabeled) (N_l + N_u, C, ...).

    `y_l` (N_l, C, ...) holds the targets of the first N_l outputs. Returns loss_a, loss_b (to back-propagate),
    sup_a, sup_b, cps_a, cps_b. The pseudo labels are detached, so loss_a has no path into network B.
    """
    n_l = y_l.shape[0]
    target_from_b = pseudo_labels(out_b, legacy_shift=legacy_shift)
    target_from_a = pseudo_labels(out_a, legacy_shift=legacy_shift)
    sup_a = loss_fn(out_a[:n_l], y_l)
    sup_b = loss_fn(out_b[:n_l], y_l)
    cps_a = loss_fn(out_a, target_from_b)
    cps_b = loss_fn(out_b, target_from_a)
    return {"loss_a": sup_a + cps_weight * cps_a, "loss_b": sup_b + cps_weight * cps_b,
            "sup_a": sup_a, "sup_b": sup_b, "cps_a": cps_a, "cps_b": cps_b}


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def cps_step(net_a: nn.Module, net_b: nn.Module, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer,
             x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor | None, loss_fn: LossFn, cps_weight: float,
             amp: AmpSettings | None = None, scaler_a: torch.amp.GradScaler | None = None,
             scaler_b: torch.amp.GradScaler | None = None, legacy_shift: bool = False) -> dict[str, float]:
    """One CPS training step of both networks; returns loss_a, loss_b, sup_a, sup_b, cps_a, cps_b as floats.

    x_l (N_l, 1, D, H, W) normalised labeled images, y_l (N_l, C, D, H, W) one-hot targets, x_u
    (N_u, 1, D, H, W) unlabeled images or None (CPS then acts on the labeled outputs only). The networks must
    be in train mode; they may be DDP-wrapped (each separately). `scaler_*` are GradScalers (fp16) or None.
    """
    x = x_l if x_u is None else torch.cat([x_l, x_u], dim=0)
    opt_a.zero_grad(set_to_none=True)
    opt_b.zero_grad(set_to_none=True)
    with autocast(amp):
        out_a = net_a(x)
        out_b = net_b(x)
    # Losses compute in float32 (the loss functions upcast), outside autocast.
    losses = cps_losses(out_a, out_b, y_l, loss_fn, cps_weight, legacy_shift=legacy_shift)
    _backward_and_step(losses["loss_a"], opt_a, scaler_a)
    _backward_and_step(losses["loss_b"], opt_b, scaler_b)
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
