"""DeepSeek-V3 checkpoints (multi-head latent attention + sigmoid-routed, group-limited MoE with a
shared expert) load with transformers' logits, decode its greedy tokens through the latent cache,
export back, and refuse what llmkit cannot map exactly."""
from __future__ import annotations

import json

import pytest
import torch

from interop_helpers import DEEPSEEK_MODELS, random_llmkit_model, transformers
from interop_helpers import greedy_both, max_diff as _diff, token_ids as _ids
from llmkit.cli.main import main as cli
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.interop import config_from_hf, export_hf, load_hf
from llmkit.interop.families import (deepseek_v3_to_llmkit, deinterleave_rows, family_of, interleave_rows,
                                     yarn_mscale)
from llmkit.model_io import load_weights
from llmkit.nn.moe import MoE, route

NAMES = sorted(DEEPSEEK_MODELS)
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_within_1e4(name, deepseek_dirs, deepseek_models):
    model = load_hf(deepseek_dirs[name])
    assert family_of(json.loads((deepseek_dirs[name] / "config.json").read_text())).name == "deepseek_v3"
    # first_k_dense_replace 1: layer 0 dense, the rest MoE
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False] + [True] * (len(model.blocks) - 1)
    ids = _ids(24)  # past the YaRN config's original context (16)
    with torch.no_grad():
        assert _diff(model(ids), deepseek_models[name](ids).logits) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_20_greedy_tokens_through_the_latent_cache_match_transformers_generate(name, deepseek_dirs, deepseek_models):
    model = load_hf(deepseek_dirs[name])
    ours, ref = greedy_both(model, deepseek_models[name], _ids(5)[:1])
    assert ours == ref


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_in_transformers_with_equal_logits(name, deepseek_dirs, deepseek_models, tmp_path):
    model = load_hf(deepseek_dirs[name])
    export_hf(model, None, tmp_path)  # the family is found from the config: MLA + sigmoid MoE
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["rope_interleave"]) == ("deepseek_v3", True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert _diff(back(_ids(24)).logits, deepseek_models[name](_ids(24)).logits) < TOL
    assert config_from_hf(tmp_path) == model.cfg
    if name == "deepseek_v3":  # an interleaved checkpoint comes back tensor for tensor (the permutation inverted)
        original = load_weights(deepseek_dirs[name] / "model.safetensors")
        exported = load_weights(tmp_path / "model.safetensors")
        assert sorted(original) == sorted(exported)
        assert all(torch.equal(original[k], exported[k]) for k in original)


def test_rope_row_permutation_is_inverted_by_export():
    t = torch.arange(2 * 6 * 3).reshape(12, 3)
    moved = deinterleave_rows(t, 2, 4, 6)
    assert moved[:, 0].tolist() == [0, 3, 6, 12, 9, 15, 18, 21, 24, 30, 27, 33]  # rows 2..5 of each 6: 2, 4, 3, 5
    assert torch.equal(interleave_rows(moved, 2, 4, 6), t)


def test_config_maps_mla_moe_and_the_yarn_softmax_scale(deepseek_dirs):
    cfg, full_q = config_from_hf(deepseek_dirs["deepseek_v3"]), config_from_hf(deepseek_dirs["deepseek_v3_full_q"])
    assert (cfg.attention, cfg.head_dim, cfg.rotary_dim, cfg.n_kv_heads, cfg.d_ff) == ("mla", 12, 4, 4, 96)
    assert cfg.mla == dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    assert full_q.mla["q_lora_rank"] is None
    assert {k: cfg.moe[k] for k in ("n_experts", "top_k", "d_ff", "n_shared", "shared_d_ff", "router", "score_bias",
                                    "n_groups", "topk_groups", "norm_topk", "routed_scale", "first_dense")} == dict(
        n_experts=8, top_k=2, d_ff=32, n_shared=1, shared_d_ff=32, router="sigmoid", score_bias=True, n_groups=2,
        topk_groups=1, norm_topk=True, routed_scale=2.5, first_dense=1)
    assert (full_q.moe["n_shared"], full_q.moe["shared_d_ff"], full_q.moe["norm_topk"]) == (2, 64, False)
    assert cfg.attn_scale is None  # default RoPE: 1 / sqrt(12), the module's own default
    # YaRN factor 4, mscale_all_dim 1: transformers' scale 12^-0.5 * (0.1 ln 4 + 1)^2
    assert full_q.attn_scale == pytest.approx(12 ** -0.5 * (0.1 * torch.tensor(4.0).log().item() + 1) ** 2)
    assert full_q.rope_scaling["mscale"] == 0.8 and yarn_mscale(1.0, 1.0) == 1.0


def test_router_equals_transformers_deepseek_v3_topk_router():
    """nn/moe.py's `route` against DeepseekV3TopkRouter on the same logits: the same experts chosen
    (sigmoid scores, selection-only bias, groups ranked by the sum of their two best biased scores)
    and the same gates (unbiased scores, renormalised, times routed_scaling_factor)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DEEPSEEK_MODELS["deepseek_v3"]()
    router = DeepseekV3TopkRouter(hf_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.3)
    x = torch.randn(64, 64, generator=g)
    logits, ref_w, ref_e = router(x)
    moe = deepseek_v3_to_llmkit(hf_cfg.to_dict()).moe
    w, e, _ = route(logits, moe, router.e_score_correction_bias)
    ref_order, order = ref_e.sort(dim=-1), e.sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    assert _diff(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices)) < 1e-6
    # the groups bite: without the group limit other experts would be chosen for some tokens
    free, _, _ = route(logits, {**moe, "n_groups": 1, "topk_groups": 1}, router.e_score_correction_bias)
    assert not torch.equal(free.sort(dim=-1).values, w.sort(dim=-1).values)


def _undo_rope_permutation(model) -> None:
    for block in model.blocks:
        attn = block.attn
        q = attn.q_up if attn.q_lora_rank is not None else attn.q_proj
        q.weight.copy_(interleave_rows(q.weight, attn.nope_dim, attn.rope_dim, attn.nope_dim + attn.rope_dim))
        attn.kv_down.weight.copy_(interleave_rows(attn.kv_down.weight, attn.kv_lora_rank, attn.rope_dim,
                                                  attn.kv_lora_rank + attn.rope_dim))


@pytest.mark.parametrize("name, change", [
    ("deepseek_v3", "score_bias"), ("deepseek_v3", "routed_scale"), ("deepseek_v3", "n_groups"),
    ("deepseek_v3", "rope_layout"), ("deepseek_v3_full_q", "attn_scale"), ("deepseek_v3_full_q", "norm_topk"),
])
def test_each_mapped_feature_changes_the_logits(name, change, deepseek_dirs, deepseek_models):
    """Guard for the parity tests: without the feature the same weights give other logits, so the
    fixtures really exercise it."""
    model = load_hf(deepseek_dirs[name])
    moe = model.blocks[1].mlp.moe  # one settings dict shared by every MoE layer
    with torch.no_grad():
        if change == "score_bias":
            for block in model.blocks[1:]:
                block.mlp.score_bias.zero_()
        elif change == "routed_scale":
            moe["routed_scale"] = 1.0
        elif change == "n_groups":
            moe["n_groups"] = 1
        elif change == "norm_topk":
            moe["norm_topk"] = True
        elif change == "rope_layout":  # the checkpoint's interleaved rows taken as they are
            _undo_rope_permutation(model)
        elif change == "attn_scale":
            for block in model.blocks:
                block.attn.scale = model.cfg.head_dim ** -0.5
        assert _diff(model(_ids(24)), deepseek_models[name](_ids(24)).logits) > 1e-3


def test_info_shows_the_latent_cache_bytes_per_token(deepseek_dirs, capsys):
    assert cli(["info", str(deepseek_dirs["deepseek_v3"])]) == 0
    out = capsys.readouterr().out
    # 3 layers x (kv_lora_rank 16 + qk_rope_head_dim 4) x 4 bytes, not 3 x 2 x 4 heads x 12 x 4 = 1152
    assert "KV cache: 240 bytes per token" in out


_BASE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
             vocab_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             first_k_dense_replace=1)


@pytest.mark.parametrize("bad, match", [
    (dict(topk_method="greedy"), "topk_method 'greedy' is not supported"),
    (dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
    (dict(n_shared_experts=0), "n_shared_experts"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2 < num_attention_heads=4"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (dict(n_group="two"), "n_group"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0}), "yarn rope scaling lacks factor"),
])
def test_unmappable_options_are_refused_naming_the_option(bad, match):
    with pytest.raises(UserError, match=match):
        deepseek_v3_to_llmkit({**_BASE, **bad})


def test_a_larger_key_value_head_count_is_ignored_as_transformers_does():
    # transformers' DeepseekV3Config default (128) lands in tiny configs that leave it out; MLA keys are per head
    assert deepseek_v3_to_llmkit({**_BASE, "num_key_value_heads": 128}).n_kv_heads == 4


_NATIVE = dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, head_dim=12, mlp="swiglu",
               norm="rmsnorm", position="rope", rotary_dim=4, bias=False, tie_embeddings=False, attention="mla",
               mla=dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
               moe=dict(n_experts=4, top_k=2, d_ff=32, n_shared=1, router="sigmoid", score_bias=True, n_groups=2,
                        topk_groups=1, routed_scale=2.0, first_dense=1))


def test_native_mla_moe_model_exports_as_deepseek_v3(tmp_path):
    model = random_llmkit_model(ModelConfig(**_NATIVE))
    export_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert _diff(model(_ids(20)), back(_ids(20)).logits) < TOL


@pytest.mark.parametrize("change, why", [
    (dict(moe={**_NATIVE["moe"], "router": "softmax"}), "moe must be sigmoid-routed"),
    (dict(moe={**_NATIVE["moe"], "shared_gate": True}), "moe must be sigmoid-routed"),
    (dict(attn_scale=0.5), "attn_scale must be DeepSeek's"),
    (dict(attention="mha", mla=None, head_dim=16, rotary_dim=None), "attention must be 'mla'"),
])
def test_export_refuses_what_deepseek_v3_cannot_express(change, why, tmp_path):
    model = random_llmkit_model(ModelConfig(**{**_NATIVE, **change}))
    with pytest.raises(UserError, match=f"cannot be written as deepseek_v3: .*{why}"):
        export_hf(model, None, tmp_path, family="deepseek_v3")


def test_bf16_keeps_the_selection_bias_in_fp32_as_transformers_does(deepseek_dirs, tmp_path):
    """transformers keeps e_score_correction_bias in fp32 in a bf16 model (rounded, it flips near-tied
    expert choices): so does llmkit, loading the HF folder, saving and loading its own, exporting."""
    from llmkit.model_io import load_model, save_model

    d = deepseek_dirs["deepseek_v3"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager")
    ref_bias = ref.model.layers[1].mlp.gate.e_score_correction_bias
    assert ref_bias.dtype == torch.float32
    model = load_hf(d, dtype="bfloat16")
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[1].mlp.score_bias, ref_bias)  # the stored fp32 values, not rounded
    save_model(model, tmp_path / "own")
    again = load_model(tmp_path / "own")
    assert again.tok_emb.weight.dtype == torch.bfloat16 and torch.equal(again.blocks[1].mlp.score_bias, ref_bias)
    assert torch.equal(again.half().blocks[1].mlp.score_bias, ref_bias)  # a later cast keeps it too
    export_hf(model, out_dir=tmp_path / "hf")
    stored = load_weights(tmp_path / "hf" / "model.safetensors")
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_the_multi_token_prediction_layer_is_skipped_as_transformers_skips_it(deepseek_dirs, deepseek_models, tmp_path):
    """DeepSeek-V3's files hold its MTP module as model.layers.61 (transformers ignores those on load);
    any other tensor the config does not describe is still refused."""
    import shutil

    from safetensors.torch import save_file

    tensors = load_weights(deepseek_dirs["deepseek_v3"] / "model.safetensors")
    shutil.copy(deepseek_dirs["deepseek_v3"] / "config.json", tmp_path / "config.json")
    save_file({**tensors, "model.layers.61.eh_proj.weight": torch.zeros(64, 128)}, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert _diff(load_hf(tmp_path)(_ids(8)), deepseek_models["deepseek_v3"](_ids(8)).logits) < TOL
    save_file({**tensors, "model.layers.3.eh_proj.weight": torch.zeros(64, 128)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="tensors llmkit would not use .*model.layers.3.eh_proj.weight"):
        load_hf(tmp_path)
