"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "real"

# Tests run tiny networks on 2 cores next to data workers and subprocesses: one intra-op thread is as fast for
# these sizes and never oversubscribes the machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder with the three real CTs and their FLARE-id masks (../shared/data/real)."""
    if not REAL_DATA_DIR.is_dir():
        pytest.fail(f"real test data missing: {REAL_DATA_DIR} (the project expects ../shared beside the checkout)")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def write_original_checkpoint():
    """Factory: save one of our networks as the original release saved it (common.original_weights).

    `write(path, net, network, module_prefix=True)` writes `{"epoch", "state_dict" (original names, optionally
    `module.`-prefixed as from DDP), "optimizer_dict" (a real Adam state after one step), "lr"}` with torch.save.
    """
    from common.storage.original_release import NAME_TABLES

    def write(path: Path, net: torch.nn.Module, network: str, module_prefix: bool = True) -> Path:
        ours = net.state_dict()
        prefix = "module." if module_prefix else ""
        state = {prefix + orig: ours[mine].clone() for orig, mine in NAME_TABLES[network].items()}
        params = [torch.nn.Parameter(torch.zeros(3))]
        opt = torch.optim.Adam(params, lr=1.0e-3, betas=(0.9, 0.99), weight_decay=5.0e-5)
        params[0].sum().backward()
        opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 42, "state_dict": state, "optimizer_dict": opt.state_dict(), "lr": 1.0e-3}, path)
        return path

    return write
