"""Fixtures for interop tests: the tiny random HF models saved once per session, and the real
stories260K weights (skipped when ../shared/data is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from interop_helpers import (DEEPSEEK_MODELS, HF_MODELS, STORIES, SWITCHBOARD_MODELS, random_deepseek_model,
                             random_hf_model, random_switchboard_model, transformers)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> directory holding the saved random model (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in HF_MODELS:
        random_hf_model(name).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def hf_models(hf_dirs) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory."""
    return {name: transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
            for name, d in hf_dirs.items()}


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory) -> Path:
    """The llama test model saved in many shards with a model.safetensors.index.json."""
    d = tmp_path_factory.mktemp("sharded") / "llama"
    random_hf_model("llama").save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    return d


@pytest.fixture
def stories() -> Path:
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("../shared/data/models/stories260K is not present")
    return STORIES


@pytest.fixture(scope="session")
def switch_dirs(tmp_path_factory) -> dict[str, Path]:
    """SWITCHBOARD_MODELS saved once per session: name -> directory."""
    root = tmp_path_factory.mktemp("switchboard")
    out = {}
    for name in SWITCHBOARD_MODELS:
        random_switchboard_model(name).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def switch_models(switch_dirs) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory."""
    return {name: transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation=SWITCHBOARD_MODELS[name][1]).eval() for name, d in switch_dirs.items()}


@pytest.fixture(scope="session")
def deepseek_dirs(tmp_path_factory) -> dict[str, Path]:
    """DEEPSEEK_MODELS saved once per session: name -> directory."""
    root = tmp_path_factory.mktemp("deepseek")
    out = {}
    for name in DEEPSEEK_MODELS:
        random_deepseek_model(name).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def deepseek_models(deepseek_dirs) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory."""
    return {name: transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
            for name, d in deepseek_dirs.items()}
