import pytest
import torch

from common.core.amp import AmpSettings, amp_settings, autocast, make_grad_scaler


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cpu_is_always_fp32(precision):
    settings = amp_settings(precision, "cpu")
    assert settings == AmpSettings("cpu", None)
    assert not settings.enabled
    assert not make_grad_scaler(settings).is_enabled()
    with autocast(settings):
        a = torch.randn(4, 4)
        assert (a @ a).dtype == torch.float32


def test_fp32_on_cuda_needs_no_gpu():
    settings = amp_settings("fp32", torch.device("cuda", 0))
    assert settings == AmpSettings("cuda", None) and not settings.enabled
    assert not make_grad_scaler(settings).is_enabled()


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match=r"'off'.*bf16.*fp16.*fp32.*former 'off'"):
        amp_settings("off", "cpu")  # the one vocabulary: fp32, as the predictor spells it
    with pytest.raises(ValueError):
        amp_settings("BF16", "cuda")


def test_autocast_none_and_enabled_settings():
    with autocast(None):
        a = torch.randn(4, 4)
        assert (a @ a).dtype == torch.float32
    # an explicitly enabled CPU setting really autocasts (the context manager is not a no-op)
    with autocast(AmpSettings("cpu", torch.bfloat16)):
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32


def test_grad_scaler_only_for_fp16_cuda():
    assert not make_grad_scaler(None).is_enabled()
    assert not make_grad_scaler(AmpSettings("cuda", torch.bfloat16)).is_enabled()
    if torch.cuda.is_available():
        assert make_grad_scaler(AmpSettings("cuda", torch.float16)).is_enabled()
