"""Hugging Face checkpoints load into llmkit and compute what transformers computes."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from interop_helpers import FAMILY_OF, HF_MODELS
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.interop import config_from_hf, load_hf
from llmkit.interop.families import QWEN2_DEFAULTS, family_of, qwen2_window, qwen_layers, rope_from_hf

NAMES = sorted(HF_MODELS)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_within_1e4(name, hf_dirs, hf_models):
    model = load_hf(hf_dirs[name])
    ids = _ids(24)  # longer than the mistral window (8) and the llama3 original context (16)
    with torch.no_grad():
        ours, ref = model(ids), hf_models[name](ids).logits
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_32_greedy_tokens_match_transformers_generate(name, hf_dirs, hf_models):
    model = load_hf(hf_dirs[name])
    prompt = _ids(5)[:1]
    ref = hf_models[name].generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                   pad_token_id=0)[0, 5:].tolist()
    ours = list(generate_tokens(model, prompt[0].tolist(), GenerationConfig(max_new_tokens=32, temperature=0)))
    assert ours == ref


@pytest.mark.parametrize("name", NAMES)
def test_config_maps_to_the_family_shape(name, hf_dirs):
    cfg = config_from_hf(hf_dirs[name])
    hf = json.loads((hf_dirs[name] / "config.json").read_text())
    assert family_of(hf).name == FAMILY_OF[name]
    assert (cfg.n_layers, cfg.d_model, cfg.vocab_size) == (2, 64, 128)
    assert cfg.n_kv_heads == (4 if name == "gpt2" else 2)


def test_sharded_checkpoint_with_index_equals_its_single_file_save(sharded_llama, tmp_path):
    assert (sharded_llama / "model.safetensors.index.json").is_file()
    assert len(list(sharded_llama.glob("*.safetensors"))) > 3
    import transformers
    single = tmp_path / "single"
    transformers.AutoModelForCausalLM.from_pretrained(sharded_llama).save_pretrained(single)
    a, b = load_hf(sharded_llama), load_hf(single)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_sharded_checkpoint_without_index_loads_by_scanning_files(sharded_llama, tmp_path):
    d = tmp_path / "noindex"
    shutil.copytree(sharded_llama, d)
    (d / "model.safetensors.index.json").unlink()
    ref = load_hf(sharded_llama)
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in load_hf(d).state_dict().items())


def test_bf16_checkpoint_loads_in_bf16_and_casts_to_fp32_on_request(hf_models, tmp_path):
    d = tmp_path / "bf16"
    # a copy: .to() is in place on the session's shared model, and bf16 -> fp32 would not restore its
    # weights (every later comparison against hf_models["llama"] would then see rounded weights)
    copy.deepcopy(hf_models["llama"]).to(torch.bfloat16).save_pretrained(d)
    assert hf_models["llama"].model.embed_tokens.weight.dtype == torch.float32
    assert load_hf(d).tok_emb.weight.dtype == torch.bfloat16
    fp32 = load_hf(d, dtype="fp32")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    with torch.no_grad():
        out = load_hf(d)(_ids(8))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fp32_checkpoint_casts_to_fp16_on_request(hf_dirs):
    model = load_hf(hf_dirs["qwen2"], dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_transformers_v4_rope_keys_parse_like_v5_rope_parameters():
    v4 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {"rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}
    assert rope_from_hf(v4) == rope_from_hf(v5)
    assert rope_from_hf(v4)[1]["type"] == "llama3"
    assert rope_from_hf({}) == (10000.0, None)


def test_qwen2_windows_map_to_layer_types_as_transformers_derives_them():
    base = {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 16}
    assert qwen_layers({**base, "max_window_layers": 0}, QWEN2_DEFAULTS) == (16, None)  # all slide
    assert qwen_layers({**base, "max_window_layers": 4}, QWEN2_DEFAULTS) == (None, None)  # none slides
    assert qwen_layers({**base, "use_sliding_window": False}, QWEN2_DEFAULTS) == (None, None)
    assert qwen_layers({**base, "max_window_layers": 2}, QWEN2_DEFAULTS) == (16, ["full", "full", "sliding", "sliding"])
    assert qwen2_window({**base, "max_window_layers": 2}) == 16


def test_unsupported_rope_type_is_refused_naming_the_supported_ones():
    with pytest.raises(UserError, match="rope type 'axial'.*default, linear, .*llama3"):
        rope_from_hf({"rope_parameters": {"rope_type": "axial", "factor": 4.0}})


def test_rope_scaling_carries_required_and_given_optional_keys_and_fills_the_original_length():
    theta, scaling = rope_from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                                       "beta_fast": 16}}, context_length=4096)
    assert (theta, scaling) == (5e5, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                      "beta_fast": 16})
    with pytest.raises(UserError, match="longrope rope scaling lacks short_factor, long_factor"):
        rope_from_hf({"rope_parameters": {"rope_type": "longrope"}}, context_length=64)


def test_mistral_fixture_really_exercises_the_sliding_window(hf_dirs, hf_models):
    """Guard for the test above: without the window the same weights give other logits."""
    model = load_hf(hf_dirs["mistral"])
    assert model.cfg.sliding_window == 8
    model.cfg.sliding_window = None
    with torch.no_grad():
        assert (model(_ids(24)) - hf_models["mistral"](_ids(24)).logits).abs().max().item() > 1e-3


def test_legacy_gpt2_names_without_prefix_and_mask_buffers_load(hf_dirs, hf_models, tmp_path):
    """Old GPT-2 files (as on the hub) name tensors `h.0...` and carry `attn.bias` mask buffers."""
    from safetensors.torch import load_file, save_file
    d = _copy_dir(hf_dirs["gpt2"], tmp_path / "old")
    state = {k.removeprefix("transformer."): v for k, v in load_file(d / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        assert (load_hf(d)(_ids(10)) - hf_models["gpt2"](_ids(10)).logits).abs().max().item() < 1e-4


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst
