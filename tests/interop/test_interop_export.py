"""Exported directories load in transformers and give llmkit's logits."""
from __future__ import annotations

import json

import pytest
import torch

from interop_helpers import HF_MODELS, random_llmkit_model, transformers
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.interop import export_hf, load_hf
from llmkit.models.decoder import DecoderLM

IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))


def _reload(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()


def _max_diff(model: DecoderLM, hf_model, ids: torch.Tensor = IDS) -> float:
    with torch.no_grad():
        return (model(ids).float() - hf_model(ids).logits.float()).abs().max().item()


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_round_trip_reloads_in_transformers_with_equal_logits(name, hf_dirs, hf_models, tmp_path):
    model = load_hf(hf_dirs[name])
    export_hf(model, None, tmp_path / "out")
    back = _reload(tmp_path / "out")
    assert type(back).__name__ == type(hf_models[name]).__name__
    with torch.no_grad():
        assert (back(IDS).logits - hf_models[name](IDS).logits).abs().max().item() < 1e-4


NATIVE = {
    # preset-like llmkit models and the family they must be written as
    "llama": dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                  mlp="swiglu", norm="rmsnorm", position="rope", bias=False),
    "gpt2": dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, mlp="gelu",
                 norm="layernorm", position="learned", bias=True, tie_embeddings=False),
    "qwen2": dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=1,
                  mlp="swiglu", norm="rmsnorm", position="rope", bias=False, qkv_bias=True),
    "mistral": dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                    mlp="swiglu", norm="rmsnorm", position="rope", bias=False, sliding_window=6),
}


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_native_model_exports_to_the_family_of_its_shape(family, tmp_path):
    model = random_llmkit_model(ModelConfig(**NATIVE[family]))
    export_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    assert _max_diff(model, _reload(tmp_path)) < 1e-4


def test_native_llama_with_linear_rope_scaling_exports_with_equal_logits(tmp_path):
    model = random_llmkit_model(ModelConfig(**NATIVE["llama"], rope_scaling={"type": "linear", "factor": 4.0}))
    export_hf(model, None, tmp_path)
    assert _max_diff(model, _reload(tmp_path)) < 1e-4


def test_export_in_bf16_writes_bf16_that_transformers_reads(tmp_path):
    model = random_llmkit_model(ModelConfig(**NATIVE["llama"]))
    export_hf(model, None, tmp_path, dtype="bf16")
    back = _reload(tmp_path)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, model.tok_emb.weight.to(torch.bfloat16))


def test_model_no_family_can_express_is_refused_with_the_reasons(tmp_path):
    model = DecoderLM(ModelConfig(vocab_size=64, context_length=16, n_layers=1, d_model=32, n_heads=2,
                                  position="sinusoidal"))
    with pytest.raises(UserError, match=r"matches no Hugging Face family.*position must be learned.*--to llmkit"):
        export_hf(model, None, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_explicit_family_that_does_not_fit_is_refused(tmp_path):
    model = DecoderLM(ModelConfig(**NATIVE["llama"]))
    with pytest.raises(UserError, match="cannot be written as gpt2: norm must be layernorm"):
        export_hf(model, None, tmp_path, family="gpt2")
