"""Decoder properties: causality, KV cache, attention invariances, round trips, config checks."""
from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.model_io import load_model, save_model
from llmkit.models.decoder import DecoderLM
from llmkit.nn.attention import eager_attention

VARIANTS = {
    "gpt2-like": dict(position="learned", mlp="gelu_tanh", norm="layernorm", bias=True),
    "llama-like-gqa": dict(position="rope", mlp="swiglu", norm="rmsnorm", bias=False, n_kv_heads=2),
    "mqa-sinusoidal": dict(position="sinusoidal", mlp="gelu", norm="layernorm", n_kv_heads=1),
    "nope-qkv-bias": dict(position="none", mlp="swiglu", norm="rmsnorm", bias=False, qkv_bias=True),
    "sliding-window": dict(position="rope", mlp="swiglu", norm="rmsnorm", bias=False, sliding_window=5),
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=32, n_layers=2, d_model=32, n_heads=4)
    return ModelConfig(**{**base, **kw})


def model_for(cfg: ModelConfig, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(cfg).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_later_token_never_changes_earlier_logits(variant):
    model = model_for(tiny(**VARIANTS[variant]))
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation(variant):
    model = model_for(tiny(**VARIANTS[variant]))
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2)
        pieces = [model(x[:, :7], cache=cache), model(x[:, 7:10], cache=cache)]  # multi-token chunk after a prefix
        pieces += [model(x[:, t:t + 1], cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 24


def test_sliding_window_wider_than_sequence_equals_full_attention():
    x = torch.randint(0, 97, (2, 20))
    full = model_for(tiny(position="rope"))(x)
    windowed = model_for(tiny(position="rope", sliding_window=20))(x)
    torch.testing.assert_close(full, windowed)
    narrow = model_for(tiny(position="rope", sliding_window=4))(x)
    torch.testing.assert_close(full[:, :4], narrow[:, :4])  # first positions see fewer than 4 keys anyway
    assert not torch.allclose(full[:, 10:], narrow[:, 10:])


def test_gqa_equals_mha_with_each_kv_head_repeated():
    """GQA with kv heads shared across groups = MHA whose k/v heads are copies within each group."""
    gqa = model_for(tiny(n_kv_heads=2, position="rope", mlp="swiglu", norm="rmsnorm", bias=False))
    mha = DecoderLM(tiny(n_kv_heads=4, position="rope", mlp="swiglu", norm="rmsnorm", bias=False)).eval()
    state = gqa.state_dict()
    H, KV, d = 4, 2, 8
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([H * d, KV * d, KV * d])
        expand = lambda t: t.view(KV, d, -1).repeat_interleave(H // KV, 0).reshape(H * d, -1)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_sdpa_path_equals_eager_path_with_weights():
    model = model_for(tiny(n_kv_heads=2, position="rope"))
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.return_weights = True
        eager = model(x)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    w = model.blocks[0].attn.last_weights
    assert w.shape == (1, 4, 16, 16)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 16))
    assert torch.all(w.triu(1) == 0)  # causal


def test_eager_attention_masks_future_keys():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    out, w = eager_attention(q, k, v, None, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_left_padding_with_attention_mask_matches_unpadded_row():
    model = model_for(tiny(position="rope"))
    x = torch.randint(0, 97, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(x)
        out = model(padded, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    for variant in ("gpt2-like", "llama-like-gqa"):
        model = model_for(tiny(**VARIANTS[variant]))
        save_model(model, tmp_path / variant)
        loaded = load_model(tmp_path / variant)
        x = torch.randint(0, 97, (2, 16))
        assert torch.equal(model(x), loaded(x))
        assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied


def test_load_refuses_pickled_weights_by_default(tmp_path):
    model = model_for(tiny())
    model.cfg.save(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickled"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_pickle=True)
    x = torch.randint(0, 97, (1, 8))
    assert torch.equal(model(x), loaded(x))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_model(model_for(tiny()), tmp_path)
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model(tmp_path)


def test_weights_of_another_shape_are_named(tmp_path):
    save_model(model_for(tiny()), tmp_path)
    ModelConfig(**{**tiny().__dict__, "d_model": 64, "d_ff": None, "head_dim": None}).save(tmp_path / "config.json")
    with pytest.raises(UserError, match="shape"):
        load_model(tmp_path)


@pytest.mark.parametrize("kw, words", [
    (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(mlp="sigmoid"), "unknown mlp 'sigmoid'"),
    (dict(position="alibi2"), "unknown position"),
    (dict(n_layers=0), "n_layers must be an integer >= 1"),
    (dict(dropout=1.5), "dropout must be a finite number >= 0 and < 1"),
])
def test_inconsistent_config_is_rejected_with_what_to_change(kw, words):
    with pytest.raises(UserError, match=words):
        tiny(**kw)


def test_config_json_round_trip_and_presets(tmp_path):
    cfg = ModelConfig.from_preset("llama-small")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")
    with pytest.raises(UserError, match="unknown keys"):
        ModelConfig.from_dict({"n_layerz": 3})


@pytest.mark.parametrize("preset, millions", [("gpt2", 124.44), ("llama-small", 134.52), ("baby-gpt", 0.81)])
def test_preset_parameter_counts_match_the_reference_models(preset, millions):
    with torch.device("meta"):
        model = DecoderLM(ModelConfig.from_preset(preset))
    assert model.num_params() / 1e6 == pytest.approx(millions, abs=0.01)


def test_residual_projections_use_scaled_init():
    model = model_for(ModelConfig.from_preset("baby-gpt"))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_logits_equal_transformers_gpt2_with_same_weights():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = DecoderLM(tiny(position="learned", mlp="gelu_tanh", norm="layernorm", bias=True)).eval()
    sd = hf.state_dict()
    mapped = {"tok_emb.weight": sd["transformer.wte.weight"], "pos.weight": sd["transformer.wpe.weight"],
              "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(2):
        h = f"transformer.h.{i}."
        for ours_name, hf_name in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            mapped[f"blocks.{i}.{ours_name}.weight"] = sd[h + hf_name + ".weight"]
            mapped[f"blocks.{i}.{ours_name}.bias"] = sd[h + hf_name + ".bias"]
        for ours_name, hf_name in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                   ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
            mapped[f"blocks.{i}.{ours_name}.weight"] = sd[h + hf_name + ".weight"].t()  # Conv1D stores [in, out]
            mapped[f"blocks.{i}.{ours_name}.bias"] = sd[h + hf_name + ".bias"]
    mapped["lm_head.weight"] = mapped["tok_emb.weight"]
    ours.load_state_dict(mapped)
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
