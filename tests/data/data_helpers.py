"""Helpers and fixtures for data-pipeline tests: the real GPT-2 tokenizer and corpora in ../shared/data (skipped
when absent) and tiny WordLevel tokenizers built in memory (fast; any vocabulary size)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from llmkit.tokenizers import HFTokenizer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture
def gpt2_dir() -> Path:
    return shared("tokenizers", "gpt2")


@pytest.fixture
def shakespeare() -> Path:
    return shared("tinyshakespeare", "input.txt")


def word_tokenizer(directory: Path, vocab_size: int, eos: bool = True) -> Path:
    """A whitespace WordLevel tokenizer whose vocabulary has `vocab_size` entries, saved to `directory`."""
    words = ["<unk>"] + (["<|endoftext|>"] if eos else []) + ["the", "cat", "sat", "on", "mat", "a", "dog"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        backend.add_special_tokens(["<|endoftext|>"])
    directory.mkdir(parents=True, exist_ok=True)
    HFTokenizer(backend).save(directory)
    return directory


@pytest.fixture
def small_tok(tmp_path) -> Path:
    return word_tokenizer(tmp_path / "tok-small", 100)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path
