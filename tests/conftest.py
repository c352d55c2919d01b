"""Shared fixtures: paths to ../shared/data (skip when absent) and tiny configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/*.py helper modules (timeouts) import from any test folder

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def shakespeare(shared_data) -> Path:
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip("tinyshakespeare is not present")
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a shared machine's spare cores make OpenMP's
    multi-thread barriers very slow; restored after each test. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")` (autouse in tests/generation)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
