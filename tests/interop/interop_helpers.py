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


# --- the switchboard families (issue 13) ---------------------------------------------------------
# name -> (config factory, attention implementation transformers runs it with, the llmkit family).
# Each config makes its family's distinctive features bite at the test lengths (24 tokens): windows
# of 8, soft caps small enough to cap random scores, partial rotary, a non-default score scale.
_TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SWITCHBOARD_MODELS: dict[str, tuple[Callable[[], object], str, str]] = {
    # per-head qk-norm, head_dim (32) != hidden / heads (16); layers 1, 2 of 3 slide over 8 positions
    "qwen3": (lambda: transformers.Qwen3Config(**_TINY, num_hidden_layers=3, head_dim=32, use_sliding_window=True,
                                               sliding_window=8, max_window_layers=1), "sdpa", "qwen3"),
    # Qwen2 with explicit per-layer types: full, sliding, full
    "qwen2_layer_types": (lambda: transformers.Qwen2Config(
        **_TINY, num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention"]), "sdpa", "qwen2"),
    # sandwich norms, GeGLU, alternating sliding/full, caps that bite, scale 1/sqrt(24) != 1/sqrt(16)
    "gemma2": (lambda: transformers.Gemma2Config(**_TINY, num_hidden_layers=3, head_dim=16, sliding_window=8,
                                                 query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                                 final_logit_softcapping=3.0), "eager", "gemma2"),
    # parallel residual, rotary on a quarter of each head (4 of 16 channels), q/k/v fused per head
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=128, max_position_embeddings=128,
                                                    bos_token_id=1, eos_token_id=2), "sdpa", "gpt_neox"),
    "gpt_neox_sequential": (lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, use_parallel_residual=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        "sdpa", "gpt_neox"),
    # fused qkv_proj and gate_up_proj, half the channels rotated, a window of 8 on every layer
    "phi3": (lambda: transformers.Phi3Config(**_TINY, num_hidden_layers=2, sliding_window=8,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.5}), "sdpa", "phi3"),
    # LongRoPE (Phi-3.5): a tiny original context (16) so the test lengths switch to the long factors
    "phi3_longrope": (lambda: transformers.Phi3Config(
        **_TINY, num_hidden_layers=2, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}), "sdpa", "phi3"),
    # ALiBi, the embedding LayerNorm, q/k/v fused per head; 6 heads: ALiBi's slopes for a non-power of two
    "bloom": (lambda: transformers.BloomConfig(hidden_size=48, n_layer=2, n_head=6, vocab_size=128,
                                               bos_token_id=1, eos_token_id=2), "eager", "bloom"),
    # MoE: 4 experts, top 2 (renormalised); Qwen2-MoE: not renormalised, a gated shared expert, layer 0
    # dense (mlp_only_layers), layer 2 of 3 sliding; Qwen3-MoE: qk-norm, renormalised, every 2nd layer MoE
    "mixtral": (lambda: transformers.MixtralConfig(**_TINY, num_hidden_layers=2, num_local_experts=4,
                                                   num_experts_per_tok=2, sliding_window=8), "sdpa", "mixtral"),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(
        **_TINY, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[0], use_sliding_window=True, sliding_window=8,
        max_window_layers=2), "sdpa", "qwen2_moe"),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(
        **_TINY, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, decoder_sparse_step=2), "sdpa", "qwen3_moe"),
}


def random_switchboard_model(name: str, seed: int = 0):
    """`random_hf_model` for SWITCHBOARD_MODELS (each with its own attention implementation)."""
    make, attn, _ = SWITCHBOARD_MODELS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# --- DeepSeek-V3 (multi-head latent attention + sigmoid-routed MoE) --------------------------------
# Layer 0 dense (first_k_dense_replace 1), the others MoE. "deepseek_v3": low-rank queries, the
# interleaved rope layout (transformers' default), 8 experts in 2 groups of which the router may use
# 1. "deepseek_v3_full_q": a full-rank q_proj, the half-rotation layout, YaRN with a tiny original
# context (so the test lengths are past it) and mscale != mscale_all_dim (both the RoPE tables'
# factor and the softmax scale change), 4 groups of 2 experts (2 usable), 2 shared experts, gates
# not renormalised.
_DEEPSEEK = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                 first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DEEPSEEK_MODELS: dict[str, Callable[[], object]] = {
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**_DEEPSEEK, num_hidden_layers=3, q_lora_rank=24, n_group=2,
                                                         topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5),
    "deepseek_v3_full_q": lambda: transformers.DeepseekV3Config(
        **_DEEPSEEK, num_hidden_layers=2, q_lora_rank=None, rope_interleave=False, n_group=4, topk_group=2,
        n_shared_experts=2, routed_scaling_factor=1.5, norm_topk_prob=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 1.0}),
}


def random_deepseek_model(name: str, seed: int = 0):
    """`random_hf_model` for DEEPSEEK_MODELS, the router's selection bias (a buffer) random too and
    as large as the sigmoid scores, so it changes which experts are chosen."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(DEEPSEEK_MODELS[name](), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for buffer_name, b in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    return model.eval()


def token_ids(n: int, seed: int = 1) -> torch.Tensor:
    """[2, n] seeded ids in 3..127 (clear of the tiny configs' special ids)."""
    return torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours.float() - ref.float()).abs().max().item()


def greedy_both(model, reference, prompt: torch.Tensor, n: int = 20) -> tuple[list[int], list[int]]:
    """(llmkit's, transformers') `n` greedy ids after `prompt` [1, T]. No end-of-sequence token
    (eos_token_id=[]): llmkit's loop, without a tokenizer, neither stops at nor suppresses one."""
    from llmkit.generation.generate import GenerationConfig, generate_tokens

    ref = reference.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=[],
                             pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert len(ref) == n
    return list(generate_tokens(model, prompt[0].tolist(), GenerationConfig(max_new_tokens=n, temperature=0))), ref
