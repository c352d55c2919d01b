"""Adapter targets (llmkit.peft.targets) and their peft names (llmkit.peft.files, interop.peft_format)."""
import pytest

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.peft.files import from_peft_key, naming_for, to_peft_key
from llmkit.peft.targets import find_targets


def _llama() -> DecoderLM:
    return DecoderLM(ModelConfig(vocab_size=50, context_length=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                                 position="rope", norm="rmsnorm", mlp="swiglu", d_ff=48, bias=False))


def test_q_and_v_are_row_slices_of_the_fused_projection():
    model = _llama()
    targets = find_targets(model, "q_proj,v")
    assert [t.name for t in targets] == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    q, v = targets[0], targets[1]
    assert q.path == v.path == "blocks.0.attn.qkv"
    assert q.rows == (0, 32) and v.rows == (32 + 16, 32 + 32)  # q: 4 heads x 8, k and v: 2 heads x 8


def test_all_linear_and_layers():
    model = _llama()
    names = [t.short for t in find_targets(model, "all-linear", layers={1})]
    assert names == ["qkv", "proj", "gate", "up", "down"]


def test_bad_targets_are_one_line():
    model = _llama()
    with pytest.raises(UserError, match="matches nothing.*choose among"):
        find_targets(model, "query_proj")
    with pytest.raises(UserError, match="both whole and as its slice"):
        find_targets(model, "qkv,q")


def test_llama_names_round_trip_through_peft_keys():
    model = _llama()
    naming = naming_for(model)
    key = "blocks.1.attn.v.lora_B.weight"
    peft_key = to_peft_key(key, naming)
    assert peft_key == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert from_peft_key(peft_key, naming) == key
    assert to_peft_key("blocks.0.mlp.down.ia3_l", naming) == "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    assert to_peft_key("prompt_embeddings", naming) == "prompt_embeddings"


def test_gpt2_fuses_qkv_in_c_attn():
    model = DecoderLM(ModelConfig(vocab_size=50, context_length=16, n_layers=1, d_model=32, n_heads=4))
    naming = naming_for(model)
    assert to_peft_key("blocks.0.attn.qkv.lora_A.weight", naming) == \
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    with pytest.raises(UserError, match="no Hugging Face module in the gpt2 layout"):
        to_peft_key("blocks.0.attn.q.lora_A.weight", naming)


def test_gpt2_c_proj_is_both_out_projections_as_peft_matches_it():
    model = DecoderLM(ModelConfig(vocab_size=50, context_length=16, n_layers=1, d_model=32, n_heads=4))
    assert [t.name for t in find_targets(model, "c_proj")] == ["blocks.0.attn.proj", "blocks.0.mlp.down"]
