"""Fixtures for interop tests: the tiny random HF models saved once per session, and the real
stories260K weights (skipped when ../shared/data is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from interop_helpers import (DEEPSEEK_MODELS, HF_MODELS, STORIES, SWITCHBOARD_MODELS, random_deepseek_model,
                             random_hf_model, random_switchboard_model, transformers)


def save_each(root: Path, names, make) -> dict[str, Path]:
    """name -> directory holding `make(name)` saved by transformers (config.json + model.safetensors)."""
    for name in names:
        make(name).save_pretrained(root / name, safe_serialization=True)
    return {name: root / name for name in names}


def reload_each(dirs: dict[str, Path], attention) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory; `attention(name)`
    is its attn_implementation."""
    return {name: transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation=attention(name)).eval()
            for name, d in dirs.items()}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> directory holding the saved random model (config.json + model.safetensors)."""
    return save_each(tmp_path_factory.mktemp("hf"), HF_MODELS, random_hf_model)


@pytest.fixture(scope="session")
def hf_models(hf_dirs) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory."""
    return reload_each(hf_dirs, lambda name: "sdpa")


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
    return save_each(tmp_path_factory.mktemp("switchboard"), SWITCHBOARD_MODELS, random_switchboard_model)


@pytest.fixture(scope="session")
def switch_models(switch_dirs) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory."""
    return reload_each(switch_dirs, lambda name: SWITCHBOARD_MODELS[name][1])


@pytest.fixture(scope="session")
def deepseek_dirs(tmp_path_factory) -> dict[str, Path]:
    """DEEPSEEK_MODELS saved once per session: name -> directory."""
    return save_each(tmp_path_factory.mktemp("deepseek"), DEEPSEEK_MODELS, random_deepseek_model)


@pytest.fixture(scope="session")
def deepseek_models(deepseek_dirs) -> dict[str, object]:
    """name -> the reference transformers model, reloaded from its saved directory."""
    return reload_each(deepseek_dirs, lambda name: "eager")
