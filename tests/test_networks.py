import math

import numpy as np
import pytest
import torch
from torch import nn

from common.core.defaults import HU_WINDOW
from common.core.labels import FLARE22
from common.networks import NETWORKS, EfficientSegNet, UNet, build_network
from common.networks.blocks import AnisoBlock, ConvIN, ConvINReLU, ResBaseBlock
from common.volume.intensity import normalize_hu
from common.volume.network_input import prepare_input
from common.volume.resize import resize_volume

TINY = (4, 8, 8, 16, 16)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_default_parameter_counts_match_reference():
    unet = UNet()
    assert _count(unet) == 10_705_552
    assert _count(unet.encoders) == 8_289_984
    assert _count(unet.decoders) == 2_415_360
    assert _count(unet.head) == 208
    net = EfficientSegNet()
    assert _count(net) == 9_366_160
    assert _count(net.encoders) == 8_289_984
    assert _count(net.context) == 749_568
    assert _count(net.transitions) == 43_520
    assert _count(net.decoders) == 282_880
    assert _count(net.head) == 208


def test_build_network_by_name():
    assert set(NETWORKS) == {"unet", "efficient_seg_net"}
    net = build_network("unet", channels=TINY, dropout=0.0)
    assert isinstance(net, UNet)
    assert net.channels == TINY
    net = build_network("efficient_seg_net", channels=list(TINY), input_size_zyx=[64, 64, 64])
    assert isinstance(net, EfficientSegNet)
    assert net.context.strip_kernel_zyx == (4, 4, 4)
    with pytest.raises(ValueError, match="efficient_seg_net.*unet|unet.*efficient_seg_net"):
        build_network("resnet")
    with pytest.raises(ValueError, match="5 channel widths"):
        build_network("unet", channels=(4, 8, 16))


@pytest.mark.parametrize("name", ["unet", "efficient_seg_net"])
def test_block_structure(name):
    net = build_network(name, channels=TINY, dropout=0.3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert convs and norms
    assert all(c.bias is None for c in convs)
    assert all(not n.affine and not n.track_running_stats for n in norms)
    assert not any(isinstance(m, (nn.BatchNorm3d, nn.Linear, nn.ConvTranspose3d)) for m in net.modules())
    units = [m for m in net.modules() if isinstance(m, ConvINReLU)]
    assert units
    for unit in units:  # conv -> IN -> Dropout3d(p) -> ReLU
        assert [type(m) for m in unit] == [nn.Conv3d, nn.InstanceNorm3d, nn.Dropout3d, nn.ReLU]
        assert unit[2].p == 0.3
    dropouts = [m for m in net.modules() if isinstance(m, (nn.Dropout, nn.Dropout3d))]
    assert len(dropouts) == len(units)  # dropout lives only inside ConvINReLU units
    assert net.head.kernel_size == (1, 1, 1) and net.head.out_channels == FLARE22.num_organs


def test_unet_topology():
    net = UNet(channels=TINY)
    assert isinstance(net.pool, nn.MaxPool3d)
    assert (net.pool.kernel_size, net.pool.stride, net.pool.padding) == (3, 2, 1)
    # decoder level i sees concat[skip_i, up(level i+1)]
    assert [d.main[0][0].in_channels for d in net.decoders] == [4 + 8, 8 + 8, 8 + 16, 16 + 16]
    # every residual block of the U-Net decoder has a projection shortcut
    assert all(isinstance(d.shortcut, ConvIN) for d in net.decoders)
    assert not any(m.stride != (1, 1, 1) for m in net.modules() if isinstance(m, nn.Conv3d))


def test_efficient_seg_net_topology():
    net = EfficientSegNet(channels=TINY, num_blocks=(2, 1, 3, 2))
    assert [len(layer) for layer in net.encoders] == [2, 2, 1, 3, 2]  # enc1 reuses num_blocks[0]
    for level, layer in enumerate(net.encoders):
        first = layer[0]
        assert isinstance(first, ResBaseBlock) and isinstance(first.shortcut, ConvIN)  # always projected
        stride = (1, 1, 1) if level == 0 else (2, 2, 2)
        assert first.main[0][0].stride == stride and first.shortcut[0].stride == stride
        assert all(isinstance(b.shortcut, nn.Identity) for b in layer[1:])
    assert not any(isinstance(m, nn.MaxPool3d) for m in net.modules())
    for block in net.decoders:
        assert isinstance(block, AnisoBlock) and isinstance(block.shortcut, ConvIN)
        assert block.main[0][0].kernel_size == (3, 3, 1) and block.main[0][0].padding == (1, 1, 0)
        assert block.main[1][0].kernel_size == (1, 1, 3) and block.main[1][0].padding == (0, 0, 1)
    ctx = net.context
    assert ctx.strip_z[0].kernel_size == (3, 1, 1)
    assert ctx.strip_y[0].kernel_size == (1, 3, 1)
    assert ctx.strip_x[0].kernel_size == (1, 1, 3)
    assert ctx.reduce[0].out_channels == 16 // 4 and ctx.out[-1].out_channels == 16
    assert EfficientSegNet(channels=TINY, input_size_zyx=(160, 192, 128)).context.strip_kernel_zyx == (10, 12, 8)


def test_kaiming_normal_init():
    torch.manual_seed(0)
    net = UNet()
    conv = net.encoders[3][0].main[1][0]  # 128 -> 128, 3^3: fan_in 3456
    std = conv.weight.std().item()
    assert std == pytest.approx(math.sqrt(2.0 / (128 * 27)), rel=0.02)
    assert abs(conv.weight.mean().item()) < 0.05 * std


@pytest.mark.parametrize("name", ["unet", "efficient_seg_net"])
@pytest.mark.parametrize("shape", [(2, 1, 32, 48, 64), (1, 1, 64, 32, 48)])
def test_output_shape_and_gradients(name, shape):
    torch.manual_seed(0)
    net = build_network(name, channels=TINY, input_size_zyx=(64, 64, 64)) if name == "efficient_seg_net" \
        else build_network(name, channels=TINY)
    net.train()
    x = torch.randn(shape, requires_grad=True)
    out = net(x)
    assert out.shape == (shape[0], FLARE22.num_organs) + shape[2:]
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    net.eval()
    with torch.no_grad():
        assert net(x.detach()).shape == out.shape


def test_efficient_seg_net_is_size_agnostic_in_eval():
    torch.manual_seed(0)
    net = EfficientSegNet(channels=TINY, input_size_zyx=(64, 64, 64)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64, 64)).shape == (1, 13, 64, 64, 64)
        assert net(torch.randn(1, 1, 96, 80, 48)).shape == (1, 13, 96, 80, 48)


def test_eval_mode_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    net = EfficientSegNet(channels=TINY).eval()
    x = torch.randn(2, 1, 32, 32, 48)
    with torch.no_grad():
        both = net(x)
        first = net(x[:1])
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-4)


def _reference_prepare(raw: np.ndarray, size_zyx, window_hu) -> np.ndarray:
    """The data-preparation path: scipy corner-aligned linear zoom, clip, z-score (population std + 1e-5)."""
    return normalize_hu(resize_volume(raw, size_zyx), window_hu)


def test_prepare_input_matches_numpy_path():
    rng = np.random.default_rng(0)
    raws = [rng.integers(-1024, 1500, size=(33, 47, 45)).astype(np.int16) for _ in range(2)]
    raws[1][:10] = -1000  # a second sample with different statistics
    size_zyx, window = (32, 48, 40), HU_WINDOW
    out = prepare_input(torch.from_numpy(np.stack(raws)[:, None]), size_zyx, window)
    assert out.dtype == torch.float32 and out.shape == (2, 1) + size_zyx
    for i, raw in enumerate(raws):
        np.testing.assert_allclose(out[i, 0].numpy(), _reference_prepare(raw, size_zyx, window), atol=1e-4)
        assert out[i].mean().abs() < 1e-4 and out[i].std(correction=0) == pytest.approx(1.0, abs=1e-3)


def test_prepare_input_same_size_and_constant_volume():
    raw = torch.full((1, 1, 32, 32, 32), 2000, dtype=torch.int32)
    out = prepare_input(raw, (32, 32, 32), HU_WINDOW)
    assert torch.equal(out, torch.zeros_like(out, dtype=torch.float32))  # no division by zero
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        prepare_input(raw[0], (32, 32, 32), HU_WINDOW)
