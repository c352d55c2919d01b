"""Helpers for the fine-tuning method tests (`from peft_helpers import ...`; conftest.py builds
its fixtures on them): tiny random Hugging Face models (a Llama and a GPT-2) saved with
transformers, and fresh llmkit copies of them (methods change a model in place, so a test never
shares one).

`tiny_llama(tmp)` is a plain function for tests that want their own model: it saves a random HF
Llama into `tmp` and returns `Tiny(dir, hf, ours)`. The fixtures `hf_llama_dir` / `hf_gpt2_dir`
(session-scoped folders) with `llama_pair` / `gpt2_pair` (fresh `Tiny`s on them) cover the rest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"

# small enough for a test to run in well under a second; GQA (4 heads, 2 kv heads) so the fused
# qkv slices q, k, v have different sizes
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2)


@dataclass
class Tiny:
    """A saved HF model folder, the transformers model read from it and the llmkit one (same weights)."""

    dir: Path
    hf: torch.nn.Module
    ours: torch.nn.Module


def random_hf(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model ("llama" or "gpt2") with every parameter moved off its init."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LLAMA) if kind == "llama" else transformers.GPT2Config(**GPT2)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(directory: Path, kind: str = "llama", seed: int = 0) -> Path:
    random_hf(kind, seed).save_pretrained(directory, safe_serialization=True)
    return directory


def load_pair(directory: Path) -> Tiny:
    """Fresh transformers and llmkit models from a saved folder (weights owned, not memory-mapped)."""
    from llmkit.interop.hf import load_hf

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    ours = load_hf(directory)
    for p in ours.parameters():
        p.data = p.data.clone()
    return Tiny(Path(directory), hf, ours.eval())


def tiny_llama(tmp: Path, seed: int = 0) -> Tiny:
    """A random tiny HF Llama saved into `tmp`, read by transformers and by llmkit."""
    return load_pair(save_hf(Path(tmp) / f"llama{seed}", "llama", seed))


def token_ids(n: int = 12, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """[batch, n] seeded ids in 3..127 (clear of the special ids)."""
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def logits(model, ids):
    """A transformers or llmkit model's logits on `ids`, without gradients."""
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)
