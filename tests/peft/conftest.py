"""Fixtures for the fine-tuning method tests (helpers in peft_helpers.py): the session folders
`hf_llama_dir` / `hf_gpt2_dir` (tiny random HF models saved once) with `llama_pair` / `gpt2_pair`
(fresh `Tiny`s on them), `make_tiny_llama` and a fixed batch of token ids."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from peft_helpers import Tiny, load_pair, save_hf, tiny_llama, token_ids


@pytest.fixture(scope="session")
def hf_root() -> Iterator[Path]:
    """A folder of this session's own (not under pytest's basetemp, which a concurrent pytest run of
    the same user may prune while this one still reads it)."""
    with tempfile.TemporaryDirectory(prefix="llmkit-peft-tests-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def hf_llama_dir(hf_root) -> Path:
    """A tiny random HF Llama (2 layers, d 64, 4 heads, 2 kv heads, vocab 128) saved by transformers."""
    return save_hf(hf_root / "llama", "llama")


@pytest.fixture(scope="session")
def hf_gpt2_dir(hf_root) -> Path:
    """A tiny random HF GPT-2 (2 layers, d 64, 4 heads, vocab 128; fused c_attn, Conv1D layers)."""
    return save_hf(hf_root / "gpt2", "gpt2")


@pytest.fixture
def llama_pair(hf_llama_dir) -> Tiny:
    """Fresh transformers + llmkit copies of the session's tiny Llama."""
    return load_pair(hf_llama_dir)


@pytest.fixture
def gpt2_pair(hf_gpt2_dir) -> Tiny:
    """Fresh transformers + llmkit copies of the session's tiny GPT-2."""
    return load_pair(hf_gpt2_dir)


@pytest.fixture
def make_tiny_llama():
    """The `tiny_llama` function, for tests in other folders that cannot import this conftest."""
    return tiny_llama


@pytest.fixture
def ids() -> torch.Tensor:
    return token_ids()
