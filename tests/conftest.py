"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "real"

# Two CPU cores: keep torch from oversubscribing them when pytest and data workers run side by side.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder with the three real CTs and their FLARE-id masks (../shared/data/real)."""
    if not REAL_DATA_DIR.is_dir():
        pytest.fail(f"real test data missing: {REAL_DATA_DIR} (the project expects ../shared beside the checkout)")
    return REAL_DATA_DIR
