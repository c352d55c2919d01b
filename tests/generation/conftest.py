"""Fixtures for decoding tests: tiny transformers GPT-2 / Llama models with random, deliberately
peaked weights (init std 0.3, so argmax decisions are not near-ties), and llmkit copies of them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.interop import from_transformers

from generation_constants import CTX, EOS, VOCAB

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def build_pair(family: str, seed: int = 0, n_layers: int = 2, std: float = 0.3):
    """(transformers model, llmkit model) with identical weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if family == "gpt2":
        hf_cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=32, n_layer=n_layers, n_head=4,
                                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, initializer_range=std,
                                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=0)
        cfg = ModelConfig(vocab_size=VOCAB, context_length=CTX, n_layers=n_layers, d_model=32, n_heads=4,
                          mlp="gelu_tanh", norm="layernorm", position="learned", bias=True)
        hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    else:
        hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=CTX, rms_norm_eps=1e-5, initializer_range=std,
                                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
        cfg = ModelConfig(vocab_size=VOCAB, context_length=CTX, n_layers=n_layers, d_model=32, n_heads=4,
                          n_kv_heads=2, d_ff=64, mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, position="rope",
                          bias=False, tie_embeddings=False)
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = from_transformers(hf)
    assert ours.cfg == cfg  # the fixtures below rely on this exact shape
    return hf, ours


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    return build_pair(request.param)


@pytest.fixture(scope="module")
def llama_pair():
    return build_pair("llama")


@pytest.fixture(scope="module")
def tiny_target_and_draft():
    """Two unrelated tiny llmkit models over the same 64-token vocabulary."""
    return build_pair("llama", seed=1)[1], build_pair("llama", seed=2, n_layers=1)[1]


@pytest.fixture
def gpt2_tokenizer():
    vocab = SHARED_DATA / "tokenizers" / "gpt2" / "vocab.json"
    if not vocab.is_file():
        pytest.skip("../shared/data/tokenizers/gpt2 is not present")
    from llmkit.tokenizers import load_tokenizer

    return load_tokenizer(vocab)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every generation test on one thread (tests/conftest.py's one_thread)."""
    yield
