"""Helpers for interop tests: tiny random Hugging Face models of each family and where the real
stories260K weights live (../shared/data beside the repo)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO.parent / "shared" / "data" / "models" / "stories260K"

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (transformers config class, kwargs). Each exercises a different row of the tables.
HF_MODELS: dict[str, Callable[[], object]] = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                            bos_token_id=1, eos_token_id=2),
    "llama": lambda: transformers.LlamaConfig(**_SMALL),
    # Llama 3 RoPE scaling (tiny original context so positions in the test cross the thresholds),
    # tied embeddings (SmolLM style)
    "llama3": lambda: transformers.LlamaConfig(**_SMALL, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True),
    # biases on q/k/v/o but not the MLP: llmkit fills the MLP biases with zeros
    "llama_attn_bias": lambda: transformers.LlamaConfig(**_SMALL, attention_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL),
    # a window shorter than the test sequences, so the window really masks
    "mistral": lambda: transformers.MistralConfig(**_SMALL, sliding_window=8),
}
FAMILY_OF = {"gpt2": "gpt2", "llama": "llama", "llama3": "llama", "llama_attn_bias": "llama",
             "qwen2": "qwen2", "mistral": "mistral"}


def random_hf_model(name: str, seed: int = 0):
    """A tiny transformers model whose every parameter (biases and norms included) is random,
    so a mapping mistake in any tensor shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_MODELS[name](), attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_llmkit_model(cfg):
    """An llmkit DecoderLM of `cfg` with seeded weights moved off their init (so parity tests are
    not passed by symmetric or zero parameters)."""
    from llmkit.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
