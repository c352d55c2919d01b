"""The Hugging Face families that made the switchboard's variants famous (issue 13) load with
transformers' logits, decode its greedy tokens through the KV cache, and export back."""
from __future__ import annotations

import json

import pytest
import torch

from interop_helpers import SWITCHBOARD_MODELS, random_llmkit_model, transformers
from interop_helpers import greedy_both, max_diff as _diff, token_ids as _ids
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.interop import config_from_hf, export_hf, load_hf
from llmkit.nn.positions import POSITIONS
from llmkit.interop.families import (family_of, gemma2_to_llmkit, neox_to_llmkit, qwen2_to_llmkit,
                                     qwen3_to_llmkit)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(SWITCHBOARD_MODELS)
TOL = 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_within_1e4(name, switch_dirs, switch_models):
    model = load_hf(switch_dirs[name])
    assert family_of(json.loads((switch_dirs[name] / "config.json").read_text())).name == SWITCHBOARD_MODELS[name][2]
    ids = _ids(24)  # longer than every window (8)
    with torch.no_grad():
        assert _diff(model(ids), switch_models[name](ids).logits) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_20_greedy_tokens_through_the_kv_cache_match_transformers_generate(name, switch_dirs, switch_models):
    model = load_hf(switch_dirs[name])
    # LongRoPE: a prompt already past the original context (16). transformers' Phi-3 generate drops
    # its cache and recomputes everything with the long factors when decoding first crosses that
    # length; llmkit's decoding keeps the cached keys (a generation-level difference, not the model's)
    n = 17 if name == "phi3_longrope" else 5
    ours, ref = greedy_both(model, switch_models[name], _ids(n)[:1])
    assert ours == ref


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_in_transformers_with_equal_logits(name, switch_dirs, switch_models, tmp_path):
    model = load_hf(switch_dirs[name])
    export_hf(model, None, tmp_path, family=SWITCHBOARD_MODELS[name][2])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=SWITCHBOARD_MODELS[name][1])
    assert type(back).__name__ == type(switch_models[name]).__name__
    with torch.no_grad():
        assert _diff(back.eval()(_ids(24)).logits, switch_models[name](_ids(24)).logits) < TOL
    # and the written config reads back as the same llmkit config
    assert config_from_hf(tmp_path) == model.cfg


def test_configs_map_to_the_switchboard_fields(switch_dirs):
    qwen3, gemma2 = config_from_hf(switch_dirs["qwen3"]), config_from_hf(switch_dirs["gemma2"])
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.sliding_window, qwen3.layer_types) == (
        "head", 32, 8, ["full", "sliding", "sliding"])
    assert config_from_hf(switch_dirs["qwen2_layer_types"]).layer_types == ["full", "sliding", "full"]
    assert (gemma2.block, gemma2.mlp, gemma2.attn_softcap, gemma2.final_softcap) == ("sandwich", "geglu", 2.0, 3.0)
    assert gemma2.attn_scale == pytest.approx(24 ** -0.5) and gemma2.embedding_scale == pytest.approx(8.0)
    assert gemma2.layer_types == ["sliding", "full", "sliding"] and gemma2.tie_embeddings
    neox, seq = config_from_hf(switch_dirs["gpt_neox"]), config_from_hf(switch_dirs["gpt_neox_sequential"])
    assert (neox.block, neox.rotary_dim, seq.block, seq.rotary_dim) == ("parallel", 4, "pre_norm", 8)
    assert config_from_hf(switch_dirs["phi3"]).rotary_dim == 8
    longrope = config_from_hf(switch_dirs["phi3_longrope"]).rope_scaling
    assert (longrope["type"], longrope["original_max_position_embeddings"]) == ("longrope", 16)
    bloom = config_from_hf(switch_dirs["bloom"])
    assert (bloom.position, bloom.embedding_norm, bloom.mlp, bloom.d_ff) == ("alibi", True, "gelu_tanh", 192)
    q2m = config_from_hf(switch_dirs["qwen2_moe"]).moe
    assert {k: q2m[k] for k in ("n_experts", "top_k", "d_ff", "n_shared", "shared_d_ff", "shared_gate", "norm_topk",
                                "first_dense", "every")} == dict(n_experts=4, top_k=2, d_ff=32, n_shared=1,
                                                                 shared_d_ff=48, shared_gate=True, norm_topk=False,
                                                                 first_dense=1, every=1)
    assert config_from_hf(switch_dirs["qwen3_moe"]).moe["every"] == 2
    assert config_from_hf(switch_dirs["mixtral"]).moe["norm_topk"] is True


def test_moe_dense_layers_other_than_the_first_ones_are_refused():
    from llmkit.interop.families import qwen3_moe_to_llmkit
    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=128,
                num_experts=4, num_experts_per_tok=2)
    with pytest.raises(UserError, match=r"mlp_only_layers \[1\] is not supported"):
        qwen3_moe_to_llmkit({**base, "mlp_only_layers": [1]})


@pytest.mark.parametrize("name, change", [
    ("gemma2", dict(attn_softcap=None)), ("gemma2", dict(final_softcap=None)), ("gemma2", dict(attn_scale=None)),
    ("gemma2", dict(layer_types=None)), ("qwen3", dict(layer_types=None)), ("qwen2_layer_types", dict(layer_types=None)),
    ("gpt_neox", dict(rotary_dim=None)), ("phi3", dict(sliding_window=None)), ("phi3_longrope", dict(rope_scaling=None)),
    ("bloom", dict(embedding_norm=False)), ("bloom", dict(position="none")),
])
def test_each_mapped_feature_changes_the_logits(name, change, switch_dirs, switch_models):
    """Guard for the parity tests: without the feature the same weights give other logits, so the
    fixtures really exercise it."""
    model = load_hf(switch_dirs[name])
    for key, value in change.items():
        setattr(model.cfg, key, value)
    if {"rotary_dim", "rope_scaling", "position"} & set(change):  # the position module is built from the config
        model.pos = POSITIONS[model.cfg.position](model.cfg)
    for block in model.blocks:
        block.attn.softcap, block.attn.scale = model.cfg.attn_softcap, model.cfg.attn_scale
    with torch.no_grad():
        assert _diff(model(_ids(24)), switch_models[name](_ids(24)).logits) > 1e-3


def test_swish_is_silu():
    base = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=128)
    assert qwen2_to_llmkit({**base, "hidden_act": "swish"}).mlp == "swiglu"


@pytest.mark.parametrize("bad, match", [
    (dict(layer_types=["full_attention", "chunked_attention"]), r"layer type\(s\) \['chunked_attention'\]"),
    (dict(layer_types=["full_attention"]), "layer_types has 1 entries for num_hidden_layers=2"),
    (dict(layer_types=["full_attention", "sliding_attention"], use_sliding_window=False), "no sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_qwen3_config_problems_are_one_line_naming_the_key(bad, match):
    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=128,
                head_dim=16, use_sliding_window=True, sliding_window=8)
    with pytest.raises(UserError, match=match):
        qwen3_to_llmkit({**base, **bad})


@pytest.mark.parametrize("to_llmkit, bad, match", [
    (gemma2_to_llmkit, dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
    (gemma2_to_llmkit, dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (gemma2_to_llmkit, dict(query_pre_attn_scalar="big"), "query_pre_attn_scalar"),
    (neox_to_llmkit, dict(hidden_act="relu"), "hidden_act 'relu'"),
    (neox_to_llmkit, dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.0}),
     "partial_rotary_factor"),
])
def test_unsupported_family_options_are_refused_naming_the_option(to_llmkit, bad, match):
    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=128)
    with pytest.raises(UserError, match=match):
        to_llmkit({**base, **bad})


_NATIVE = dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp="swiglu",
               norm="rmsnorm", position="rope", bias=False)


@pytest.mark.parametrize("fields, family, attn", [
    (dict(qk_norm="head"), "qwen3", "sdpa"),
    (dict(rotary_dim=8), "phi3", "sdpa"),
    (dict(mlp="geglu", block="sandwich", embedding_scale=8.0, attn_softcap=20.0, final_softcap=10.0,
          sliding_window=6, layer_types=["sliding", "full"]), "gemma2", "eager"),
    (dict(mlp="gelu", norm="layernorm", bias=True, n_kv_heads=4, block="parallel", rotary_dim=8), "gpt_neox", "sdpa"),
    (dict(mlp="gelu_tanh", norm="layernorm", bias=True, n_kv_heads=4, position="alibi", embedding_norm=True, d_ff=256),
     "bloom", "eager"),
])
def test_native_switchboard_model_exports_to_the_family_that_expresses_it(fields, family, attn, tmp_path):
    model = random_llmkit_model(ModelConfig(**{**_NATIVE, **fields}))
    export_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    with torch.no_grad():
        assert _diff(model(_ids(20)), back(_ids(20)).logits) < TOL


@pytest.mark.parametrize("fields, family, why", [
    (dict(attn_softcap=30.0), "llama", "attn_softcap must be unset"),
    (dict(qk_norm="full"), "qwen3", "qk_norm must be 'head'"),
    (dict(sliding_window=6, layer_types=["sliding", "full"]), "mistral", "layer_types must be uniform"),
    (dict(embedding_norm=True), "qwen2", "embedding_norm must be False"),
])
def test_export_refuses_a_switchboard_field_the_family_cannot_express(fields, family, why, tmp_path):
    model = random_llmkit_model(ModelConfig(**{**_NATIVE, **fields}))
    with pytest.raises(UserError, match=f"cannot be written as {family}: .*{why}"):
        export_hf(model, None, tmp_path, family=family)
