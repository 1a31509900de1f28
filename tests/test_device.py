import pytest
import torch

from common.core.device import device_problem, resolve_device


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_spelling():
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "CUDA"):
        assert device_problem(good) is None, good
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", ""):
        assert "expected one of" in device_problem(bad), bad


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(name)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_device("tpu")


def test_cuda_index_is_local_rank_modulo_visible_devices(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    # a launcher that gives each process one visible GPU: LOCAL_RANK 3 still maps to cuda:0
    _fake_cuda(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_explicit_index_single_process_only(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every rank on GPU 1"):
        resolve_device("cuda:1")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
