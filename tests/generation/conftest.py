"""Fixtures for decoding tests: tiny transformers GPT-2 / Llama models with random, deliberately
peaked weights (init std 0.3, so argmax decisions are not near-ties), and llmkit copies of them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM

VOCAB, CTX, EOS = 64, 64, 7
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _gpt2_state(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """transformers GPT-2 names -> llmkit names (Conv1D weights are stored [in, out]: transpose)."""
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"],
           "lm_head.weight": sd["lm_head.weight"]}
    pairs = [("norm1", "ln_1", False), ("norm2", "ln_2", False), ("attn.qkv", "attn.c_attn", True),
             ("attn.proj", "attn.c_proj", True), ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)]
    for i in range(n_layers):
        for ours, theirs, conv in pairs:
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = w.t() if conv else w
            out[f"blocks.{i}.{ours}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    return out


def _llama_state(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """transformers Llama names -> llmkit names (q, k, v fused into one projection, rows [q | k | v])."""
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        out[f"blocks.{i}.attn.proj.weight"] = sd[a + "o_proj.weight"]
        out[f"blocks.{i}.norm1.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        out[f"blocks.{i}.norm2.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
        for name in ("gate", "up", "down"):
            out[f"blocks.{i}.mlp.{name}.weight"] = sd[m + f"{name}_proj.weight"]
    return out


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
        state = _gpt2_state(hf.state_dict(), n_layers)
    else:
        hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=CTX, rms_norm_eps=1e-5, initializer_range=std,
                                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
        cfg = ModelConfig(vocab_size=VOCAB, context_length=CTX, n_layers=n_layers, d_model=32, n_heads=4,
                          n_kv_heads=2, d_ff=64, mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, position="rope",
                          bias=False, tie_embeddings=False)
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        state = _llama_state(hf.state_dict(), n_layers)
    ours = DecoderLM(cfg).eval()
    ours.load_state_dict(state)
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
def one_thread():
    """Tiny models run fastest on one thread, and a shared machine's spare cores make OpenMP's
    multi-thread barriers very slow; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
