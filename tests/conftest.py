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
