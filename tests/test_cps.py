import math

import pytest
import torch

from common.core.amp import amp_settings, make_grad_scaler
from common.core.labelmaps import one_hot_organs
from common.networks import UNet
from common.train.cps import (
    CPSSettings,
    Learner,
    Pair,
    confident_voxels,
    cps_losses,
    cps_step,
    cps_weight_at,
    pseudo_labels,
)
from common.train.losses import build_loss

TINY = (2, 4, 4, 8, 8)
# Tiny nets with a 4-channel top level often start with dead (all-zero ReLU) regions and learn slowly; 16 channels
# at every level (the real top-level width) overfit the blobs in ~20 steps.
OVERFIT_CHANNELS = (16, 16, 16, 16, 16)
OVERFIT_STEPS = 30


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_pseudo_labels_rule_on_hand_made_logits():
    # 3 voxels x 13 channels: organ 3 wins with p .9; best is p .4 -> background; tie-free organ 13 with p .6
    logits = torch.full((1, 13, 1, 1, 3), _logit(0.1))
    logits[0, 2, 0, 0, 0] = _logit(0.9)
    logits[0, 5, 0, 0, 0] = _logit(0.7)
    logits[0, 7, 0, 0, 1] = _logit(0.4)
    logits[0, 12, 0, 0, 2] = _logit(0.6)
    logits.requires_grad_()
    labels = pseudo_labels(logits)
    assert labels.shape == logits.shape and labels.dtype == torch.float32 and not labels.requires_grad
    assert labels[0, :, 0, 0, 0].tolist() == [0, 0, 1] + [0] * 10
    assert labels[0, :, 0, 0, 1].sum() == 0
    assert labels[0, :, 0, 0, 2].tolist() == [0] * 12 + [1]
    # exactly at the threshold counts as foreground
    at_half = torch.zeros(1, 13, 1, 1, 1)
    assert pseudo_labels(at_half).sum() == 1


def test_pseudo_labels_legacy_shift_reproduces_reference_bug():
    logits = torch.full((1, 13, 1, 1, 4), -5.0)
    logits[0, 2, 0, 0, 0] = 3.0    # argmax 2 (organ 3) -> legacy target on channel 1 (organ 2)
    logits[0, 0, 0, 0, 1] = 3.0    # argmax 0 (liver) -> all-zero target
    logits[0, 12, 0, 0, 2] = 3.0   # argmax 12 (left kidney) -> channel 11; channel 12 never positive
    logits[0, 7, 0, 0, 3] = -4.0   # background voxel (all sigmoids < .5) is still forced to an organ
    legacy = pseudo_labels(logits, legacy_shift=True)
    assert legacy.shape == logits.shape
    assert legacy[0, :, 0, 0, 0].nonzero().flatten().tolist() == [1]
    assert legacy[0, :, 0, 0, 1].sum() == 0
    assert legacy[0, :, 0, 0, 2].nonzero().flatten().tolist() == [11]
    assert legacy[0, :, 0, 0, 3].nonzero().flatten().tolist() == [6]
    assert legacy[0, 12].sum() == 0
    fixed = pseudo_labels(logits)
    assert [fixed[0, :, 0, 0, i].nonzero().flatten().tolist() for i in range(4)] == [[2], [0], [12], []]


def _pair(seed: int = 0, channels=TINY, dropout: float = 0.0) -> tuple[UNet, UNet]:
    torch.manual_seed(seed)
    net_a = UNet(channels=channels, dropout=dropout)
    torch.manual_seed(seed + 1)
    net_b = UNet(channels=channels, dropout=dropout)
    return net_a, net_b


def _batch(size: int = 32):
    torch.manual_seed(123)
    x_l = torch.randn(1, 1, size, size, size)
    x_u = torch.randn(1, 1, size, size, size)
    y_l = one_hot_organs(torch.randint(0, 14, (1, size, size, size)), 13)
    return x_l, y_l, x_u


def test_no_gradient_crosses_between_networks():
    net_a, net_b = _pair()
    x_l, y_l, x_u = _batch()
    x = torch.cat([x_l, x_u])
    losses = cps_losses(Pair(net_a(x), net_b(x)), y_l, CPSSettings(build_loss("dice_bce"), weight=1.0))
    losses["loss_a"].backward()
    assert all(p.grad is not None for p in net_a.parameters())
    assert all(p.grad is None for p in net_b.parameters())
    losses["loss_b"].backward()
    assert all(p.grad is not None for p in net_b.parameters())
    assert set(losses) == {"loss_a", "loss_b", "sup_a", "sup_b", "cps_a", "cps_b"}
    torch.testing.assert_close(losses["loss_a"], losses["sup_a"] + losses["cps_a"])


def _snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(before, net):
    return [not torch.equal(b, p) for b, p in zip(before, net.parameters())]


def test_each_network_steps_only_its_own_optimizer():
    net_a, net_b = _pair()
    x_l, y_l, x_u = _batch()
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-2)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.0)  # B must not move: nothing else may step it
    a0, b0 = _snapshot(net_a), _snapshot(net_b)
    out = cps_step(Pair(Learner(net_a, opt_a), Learner(net_b, opt_b)), x_l, y_l, x_u,
                   CPSSettings(build_loss("dice_focal"), weight=0.5))
    assert set(out) == {"loss_a", "loss_b", "sup_a", "sup_b", "cps_a", "cps_b"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["loss_a"] == pytest.approx(out["sup_a"] + 0.5 * out["cps_a"], rel=1e-5)
    assert all(_changed(a0, net_a))
    assert not any(_changed(b0, net_b))
    # gradients were zeroed with set_to_none before the step and B's grads come from loss_b only
    assert opt_a.state and len(opt_a.state) == len(list(net_a.parameters()))


def test_cps_step_labeled_only_and_with_disabled_scalers():
    net_a, net_b = _pair()
    x_l, y_l, _ = _batch()
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-3)
    amp = amp_settings("bf16", "cpu")  # disabled on CPU
    scaler_a, scaler_b = make_grad_scaler(amp), make_grad_scaler(amp)
    a0, b0 = _snapshot(net_a), _snapshot(net_b)
    out = cps_step(Pair(Learner(net_a, opt_a, scaler_a), Learner(net_b, opt_b, scaler_b)), x_l, y_l, None,
                   CPSSettings(build_loss("dice_bce"), weight=1.0, amp=amp))
    assert math.isfinite(out["loss_a"]) and math.isfinite(out["loss_b"])
    assert all(_changed(a0, net_a)) and all(_changed(b0, net_b))


def _blob_case(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    z, y, x = torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij")
    label = torch.zeros(size, size, size, dtype=torch.long)
    label[(z - 11) ** 2 + (y - 12) ** 2 + (x - 11) ** 2 <= 8**2] = 1       # "liver"
    label[(z - 22) ** 2 + (y - 21) ** 2 + (x - 22) ** 2 <= 7**2] = 5       # "aorta"
    g = torch.Generator().manual_seed(7)
    image = 0.3 * torch.randn(size, size, size, generator=g)
    image[label == 1] += 1.0
    image[label == 5] -= 1.0
    image = (image - image.mean()) / image.std()
    return image[None, None], label[None]


def test_tiny_pair_overfits_one_case():
    x_l, label = _blob_case()
    label[label == 5] = 2  # two organ channels keep the test fast
    y_l = one_hot_organs(label, num_organs=2)
    x_u = torch.flip(x_l, dims=(2, 3, 4))  # an "unlabeled" volume with the blobs elsewhere
    nets = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        nets.append(UNet(num_classes=2, channels=OVERFIT_CHANNELS, dropout=0.0))
    net_a, net_b = nets
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-2, betas=(0.9, 0.99))
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-2, betas=(0.9, 0.99))
    loss_fn = build_loss("dice_bce")
    learners = Pair(Learner(net_a, opt_a), Learner(net_b, opt_b))
    history = [cps_step(learners, x_l, y_l, x_u, CPSSettings(loss_fn, weight=1.0))
               for _ in range(OVERFIT_STEPS)]
    for key in ("sup_a", "sup_b", "cps_a", "cps_b"):
        assert history[-1][key] < 0.5 * history[0][key], key
    for name, net in (("a", net_a), ("b", net_b)):
        net.eval()
        with torch.no_grad():
            predicted = net(x_l) > 0  # sigmoid > 0.5
        for channel in (0, 1):
            p, g = predicted[0, channel], y_l[0, channel].bool()
            dice = 2 * (p & g).sum().item() / (p.sum().item() + g.sum().item())
            assert dice > 0.9, f"net {name} channel {channel}: hard Dice {dice:.3f}"


def test_cps_weight_rampup():
    assert cps_weight_at(0, 2.0, 0) == 2.0
    assert cps_weight_at(500, 2.0, 0) == 2.0
    assert cps_weight_at(0, 1.0, 100) == pytest.approx(math.exp(-5.0))
    assert cps_weight_at(50, 1.0, 100) == pytest.approx(math.exp(-5.0 * 0.25))
    assert cps_weight_at(100, 1.0, 100) == 1.0
    assert cps_weight_at(1000, 0.5, 100) == 0.5


def _outputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, 13, 4, 5, 6), generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("loss", ["dice_bce", "dice_focal"])
def test_separate_parts_give_a_labeled_crop_the_same_cps_weight_with_or_without_unlabeled_data(loss):
    """The L/0 and L/U rows of the benchmark: with parts=separate the labeled crop's CPS term is the same whether an
    unlabeled crop shares the batch or not (L/U = L/0 + the unlabeled part's term); with parts=joint (the original)
    the unlabeled crop dilutes it (for the element-mean BCE term exactly to half)."""
    out_a, out_b = _outputs(2, 1), _outputs(2, 2)  # sample 0 labeled, sample 1 unlabeled
    y_l = one_hot_organs(torch.randint(0, 14, (1, 4, 5, 6), generator=torch.Generator().manual_seed(3)), 13)
    fn = build_loss(loss)
    for parts in ("joint", "separate"):
        settings = CPSSettings(fn, weight=1.0, parts=parts)
        l0 = cps_losses(Pair(out_a[:1], out_b[:1]), y_l, settings)       # labeled only
        lu = cps_losses(Pair(out_a, out_b), y_l, settings)               # labeled + unlabeled
        u_only = fn(out_a[1:], pseudo_labels(out_b[1:]))
        assert lu["sup_a"].item() == pytest.approx(l0["sup_a"].item())  # the supervised term never changes
        if parts == "separate":
            assert lu["cps_a"].item() == pytest.approx(l0["cps_a"].item() + u_only.item(), rel=1e-5)
        else:
            assert lu["cps_a"].item() != pytest.approx(l0["cps_a"].item() + u_only.item(), rel=1e-3)
    bce = build_loss("dice_bce")
    joint = cps_losses(Pair(out_a, out_b), y_l, CPSSettings(lambda o, t, m=None: bce(o, t, m) -
                                                            build_loss("dice")(o, t, m), parts="joint"))
    labeled_bce = bce(out_a[:1], pseudo_labels(out_b[:1])) - build_loss("dice")(out_a[:1], pseudo_labels(out_b[:1]))
    unlabeled_bce = bce(out_a[1:], pseudo_labels(out_b[1:])) - build_loss("dice")(out_a[1:], pseudo_labels(out_b[1:]))
    assert joint["cps_a"].item() == pytest.approx(0.5 * (labeled_bce + unlabeled_bce).item(), rel=1e-5)


def test_confidence_leaves_out_the_voxels_the_partner_is_unsure_of():
    student, teacher = _outputs(1, 4), torch.full((1, 13, 4, 5, 6), _logit(0.05))
    teacher[0, 0, :2] = _logit(0.95)  # sure liver in slices 0-1
    teacher[0, 3, 2] = _logit(0.6)    # unsure pancreas in slice 2
    mask = confident_voxels(teacher, 0.8)
    assert mask.shape == (1, 1, 4, 5, 6)
    assert mask[0, 0, :2].all() and not mask[0, 0, 2].any() and mask[0, 0, 3].all()  # slice 3: sure background
    assert confident_voxels(teacher, 0.0) is None
    changed = student.clone()
    changed[0, :, 2] = 10.0  # the student's outputs where the teacher is unsure
    no_labeled = torch.zeros(0, 13, 4, 5, 6)

    def cps(out: torch.Tensor, confidence: float) -> float:
        settings = CPSSettings(build_loss("dice_bce"), confidence=confidence)
        return cps_losses(Pair(out, teacher), no_labeled, settings)["cps_a"].item()

    assert cps(changed, 0.8) == pytest.approx(cps(student, 0.8), rel=1e-6)  # they do not count
    assert cps(changed, 0.0) != pytest.approx(cps(student, 0.0), rel=1e-3)  # without the mask they do
