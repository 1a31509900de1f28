import math

import pytest
import torch

from common.core.labelmaps import one_hot_organs
from common.train.losses import LOSSES, bce_loss, build_loss, focal_loss, reference_focal_loss, soft_dice_loss

LN3 = math.log(3.0)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_one_hot_organs():
    label_map = torch.tensor([[[[0, 1], [13, 5]]]])  # (N=1, D=1, H=2, W=2)
    one_hot = one_hot_organs(label_map, 13)
    assert one_hot.shape == (1, 13, 1, 2, 2) and one_hot.dtype == torch.float32
    assert one_hot[0, :, 0, 0, 0].sum() == 0  # background -> all zeros
    assert one_hot[0, 0, 0, 0, 1] == 1 and one_hot[0, :, 0, 0, 1].sum() == 1  # label 1 -> channel 0
    assert one_hot[0, 12, 0, 1, 0] == 1 and one_hot[0, :, 0, 1, 0].sum() == 1  # label 13 -> channel 12
    assert one_hot[0, 4, 0, 1, 1] == 1 and one_hot[0, :, 0, 1, 1].sum() == 1  # label 5 -> channel 4


def test_soft_dice_hand_computed():
    # (N=2, C=2, D=1, H=1, W=2)
    logits = _t([[[[[0.0, 0.0]]], [[[100.0, -100.0]]]],
                 [[[[-100.0, -100.0]]], [[[LN3, LN3]]]]])
    target = _t([[[[[1, 0]]], [[[1, 0]]]],
                 [[[[0, 0]]], [[[1, 1]]]]])
    # sample 0: ch0 p=(.5,.5): 2*.5 / (.25+.25+1) = 2/3; ch1 perfect = 1 -> loss (1/3 + 0) / 2
    # sample 1: ch0 empty vs ~0 -> eps/eps = 1; ch1 p=.75: 2*1.5 / (2*.5625 + 2) = .96 -> loss (0 + .04) / 2
    per_sample = [1.0 / 6.0, 0.02]
    assert soft_dice_loss(logits, target).item() == pytest.approx(sum(per_sample) / 2, abs=1e-6)
    assert soft_dice_loss(logits, target, reduction="sum").item() == pytest.approx(sum(per_sample), abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        soft_dice_loss(logits, target[:1])


def test_bce_hand_computed_and_stable():
    logits = _t([[[0.0, LN3, 200.0, -200.0]]])
    target = _t([[[1.0, 0.0, 0.0, 1.0]]])
    expected = (math.log(2.0) + math.log(4.0) + 200.0 + 200.0) / 4  # -log(.5), -log(1-.75), saturated terms
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_hand_computed():
    logits = _t([[[0.0, LN3, LN3, -LN3]]])
    target = _t([[[1.0, 0.0, 1.0, 0.0]]])
    alpha = 0.25
    terms = [
        alpha * 0.5**2 * math.log(2.0),                  # positive, p=.5
        (1 - alpha) * 0.75**2 * math.log(4.0),           # negative, p=.75 -> p_t=.25
        alpha * 0.25**2 * math.log(4.0 / 3.0),           # positive, p=.75
        (1 - alpha) * 0.25**2 * math.log(4.0 / 3.0),     # negative, p=.25 -> p_t=.75
    ]
    assert focal_loss(logits, target, alpha=alpha, gamma=2.0).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    # gamma 0, alpha .5 -> half the BCE
    assert focal_loss(logits, target, alpha=0.5, gamma=0.0).item() == pytest.approx(
        0.5 * bce_loss(logits, target).item(), rel=1e-6)
    # per voxel: a confident correct voxel contributes almost nothing, unlike the reference formula
    assert focal_loss(_t([[[20.0]]]), _t([[[1.0]]])).item() < 1e-12


def test_reference_focal_hand_computed():
    logits = _t([[[0.0, LN3]]])
    target = _t([[[1.0, 0.0]]])
    weights = 0.5 * 0.5**2 + 0.5 * 0.75**2  # alpha (1-p)^2 on the positive, alpha p^2 on the negative
    mean_bce = (math.log(2.0) + math.log(4.0)) / 2
    assert reference_focal_loss(logits, target).item() == pytest.approx(mean_bce * weights / 1, rel=1e-5)
    # no positives -> divide by 1
    assert reference_focal_loss(logits, torch.zeros_like(target)).item() == pytest.approx(
        (math.log(2.0) + math.log(4.0)) / 2 * (0.5 * 0.25 + 0.5 * 0.5625), rel=1e-5)


def test_build_loss_combinations():
    torch.manual_seed(0)
    logits = torch.randn(2, 13, 3, 4, 5)
    target = one_hot_organs(torch.randint(0, 14, (2, 3, 4, 5)), 13)
    dice = soft_dice_loss(logits, target)
    assert build_loss("dice")(logits, target) == dice
    torch.testing.assert_close(build_loss("dice_bce")(logits, target), dice + bce_loss(logits, target))
    torch.testing.assert_close(build_loss("dice_focal")(logits, target), dice + focal_loss(logits, target))
    torch.testing.assert_close(build_loss("dice_focal_reference")(logits, target),
                               dice + reference_focal_loss(logits, target))
    assert set(LOSSES) >= {"dice", "dice_bce", "dice_focal"}
    with pytest.raises(ValueError, match="dice_bce"):
        build_loss("cross_entropy")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_compute_in_float32_and_have_gradients(name):
    torch.manual_seed(0)
    logits = torch.randn(1, 13, 4, 4, 4).bfloat16().requires_grad_()
    target = one_hot_organs(torch.randint(0, 14, (1, 4, 4, 4)), 13)
    loss = build_loss(name)(logits, target)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
