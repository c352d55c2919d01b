"""Hugging Face model families as data: per family, a table of tensor names and transforms plus a
pair of config translations (HF config.json <-> `ModelConfig`).

A `Rule` says which HF tensor(s) make one llmkit tensor and how (copy, transpose, concatenate);
the same rule run backwards exports. `{i}` stands for the layer index. Adding a family that
reuses a known layout is a new `Family(...)` entry, not new code.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.options import Rule as OptionRule
from llmkit.options import integer, number
from llmkit.nn.positions import ROPE_SCALING_KEYS, ROPE_SCALING_OPTIONAL_KEYS

# --- transforms ------------------------------------------------------------------------------
# Each transform is (import, export): import turns the HF tensors of a rule into the llmkit tensor,
# export turns the llmkit tensor back into the HF tensors (a list, in the rule's order).


def _copy_in(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return parts[0]


def _copy_out(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [t]


def _transpose_in(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """GPT-2 stores linears as Conv1D with weight [in, out]; nn.Linear wants [out, in]."""
    return parts[0].t().contiguous()


def _transpose_out(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [t.t().contiguous()]


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    """Rows of the fused projection: q for every head, then k and v for every KV head."""
    return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]


def _concat_in(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _split_out(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    # clone: safetensors refuses to save tensors that share one storage
    return [p.clone() for p in t.split(_qkv_sizes(cfg), dim=0)]


def _stack_in(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Per-expert HF tensors (one each) -> one stacked [E, ...] tensor (llmkit.nn.moe's layout)."""
    return torch.stack(parts)


def _unstack_out(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [p.clone() for p in t.unbind(0)]


def _plus_one_in(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Gemma's RMSNorm scales by (1 + w): llmkit's RMSNorm, which scales by w, gets 1 + w (in fp32,
    as Gemma computes it, so fp32 checkpoints give the very same scale)."""
    return parts[0].float() + 1.0


def _minus_one_out(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [(t.float() - 1.0).to(t.dtype)]


def _heads_qkv_in(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """GPT-NeoX and Bloom fuse q/k/v per head: rows [H, 3, head_dim] (q_h, k_h, v_h of each head in
    turn); llmkit's fused projection holds all q rows, then all k, then all v: [3, H, head_dim]."""
    t = parts[0]
    H, d = cfg.n_heads, cfg.head_dim
    return t.reshape(H, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _heads_qkv_out(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    H, d = cfg.n_heads, cfg.head_dim
    return [t.reshape(3, H, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()]


def deinterleave_rows(t: torch.Tensor, start: int, width: int, every: int) -> torch.Tensor:
    """Within each block of `every` rows of t, the `width` rows from `start` reordered from
    interleaved pairs (0, 1), (2, 3), ... to halves (0, 2, 4, ..., 1, 3, 5, ...): the rows of
    projections whose outputs DeepSeek rotates pair by pair, in llmkit's half-rotation RoPE layout
    (`positions.apply_rotary`). Scores are dot products, so permuting the rope channels of the queries
    and the keys alike changes nothing but the layout."""
    blocks = t.reshape(-1, every, *t.shape[1:]).clone()
    rope = blocks[:, start:start + width]
    blocks[:, start:start + width] = torch.cat((rope[:, 0::2], rope[:, 1::2]), dim=1)
    return blocks.reshape(t.shape)


def interleave_rows(t: torch.Tensor, start: int, width: int, every: int) -> torch.Tensor:
    """The inverse of `deinterleave_rows` (halves back to interleaved pairs), for export."""
    blocks = t.reshape(-1, every, *t.shape[1:]).clone()
    rope = blocks[:, start:start + width].clone()
    blocks[:, start:start + width:2], blocks[:, start + 1:start + width:2] = rope[:, :width // 2], rope[:, width // 2:]
    return blocks.reshape(t.shape)


def _q_rope_layout(cfg: ModelConfig) -> tuple[int, int, int]:
    """MLA's query projection: per head qk_nope_head_dim rows, then qk_rope_head_dim rope rows."""
    m = cfg.mla
    return m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["qk_nope_head_dim"] + m["qk_rope_head_dim"]


def _kv_rope_layout(cfg: ModelConfig) -> tuple[int, int, int]:
    """MLA's kv down-projection: kv_lora_rank latent rows, then the shared key's qk_rope_head_dim rows."""
    m = cfg.mla
    return m["kv_lora_rank"], m["qk_rope_head_dim"], m["kv_lora_rank"] + m["qk_rope_head_dim"]


def _rope_rows(layout: Callable[[ModelConfig], tuple[int, int, int]]) -> "Transform":
    return (lambda parts, cfg: deinterleave_rows(parts[0], *layout(cfg)),
            lambda t, cfg: [interleave_rows(t, *layout(cfg))])


Transform = tuple[Callable[[list[torch.Tensor], ModelConfig], torch.Tensor],
                  Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]]

TRANSFORMS: dict[str, Transform] = {
    "copy": (_copy_in, _copy_out),
    "transpose": (_transpose_in, _transpose_out),
    "qkv": (_concat_in, _split_out),
    "stack": (_stack_in, _unstack_out),
    "plus_one": (_plus_one_in, _minus_one_out),
    "heads_qkv": (_heads_qkv_in, _heads_qkv_out),
    # DeepSeek-V3 (rope_interleave): the rope rows of the MLA query and kv down-projections
    "q_rope_rows": _rope_rows(_q_rope_layout),
    "kv_rope_rows": _rope_rows(_kv_rope_layout),
}


@dataclass(frozen=True)
class Rule:
    """One llmkit tensor <- one or more HF tensors through a named transform.

    zero_if_absent: the HF side may simply not have this tensor (a bias the HF config switched
    off while llmkit's single `bias` flag keeps it): a zero bias is the same function.
    piece: (k, n): the llmkit tensor is the k-th of n equal row blocks of the one HF tensor (Phi-3's
    fused gate_up_proj holds gate, then up); export writes the blocks back into one tensor.
    An HF name with `{j}` stands for one tensor per routed expert, j = 0..moe.n_experts-1, in order.
    """

    llmkit: str
    hf: tuple[str, ...]
    transform: str = "copy"
    zero_if_absent: bool = False
    piece: tuple[int, int] | None = None

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.llmkit).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def hf_names(self, layer: str | None, cfg: ModelConfig | None = None) -> list[str]:
        names = [name.replace("{i}", layer) if layer is not None else name for name in self.hf]
        if any("{j}" in name for name in names):
            experts = range(cfg.moe["n_experts"]) if cfg is not None and cfg.moe else ()
            names = [name.replace("{j}", str(j)) for name in names for j in experts]
        return names


def _rules(*rows: tuple) -> tuple[Rule, ...]:
    return tuple(Rule(*row) for row in rows)


GPT2_TENSORS = _rules(
    ("tok_emb.weight", ("transformer.wte.weight",)),
    ("pos.weight", ("transformer.wpe.weight",)),
    ("blocks.{i}.norm1.weight", ("transformer.h.{i}.ln_1.weight",)),
    ("blocks.{i}.norm1.bias", ("transformer.h.{i}.ln_1.bias",)),
    ("blocks.{i}.attn.qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",), "transpose"),
    ("blocks.{i}.attn.qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",)),
    ("blocks.{i}.attn.proj.weight", ("transformer.h.{i}.attn.c_proj.weight",), "transpose"),
    ("blocks.{i}.attn.proj.bias", ("transformer.h.{i}.attn.c_proj.bias",)),
    ("blocks.{i}.norm2.weight", ("transformer.h.{i}.ln_2.weight",)),
    ("blocks.{i}.norm2.bias", ("transformer.h.{i}.ln_2.bias",)),
    ("blocks.{i}.mlp.up.weight", ("transformer.h.{i}.mlp.c_fc.weight",), "transpose"),
    ("blocks.{i}.mlp.up.bias", ("transformer.h.{i}.mlp.c_fc.bias",)),
    ("blocks.{i}.mlp.down.weight", ("transformer.h.{i}.mlp.c_proj.weight",), "transpose"),
    ("blocks.{i}.mlp.down.bias", ("transformer.h.{i}.mlp.c_proj.bias",)),
    ("norm.weight", ("transformer.ln_f.weight",)),
    ("norm.bias", ("transformer.ln_f.bias",)),
    ("lm_head.weight", ("lm_head.weight",)),
)

_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"
LLAMA_TENSORS = _rules(
    ("tok_emb.weight", ("model.embed_tokens.weight",)),
    ("blocks.{i}.norm1.weight", ("model.layers.{i}.input_layernorm.weight",)),
    ("blocks.{i}.attn.qkv.weight", (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"), "qkv"),
    ("blocks.{i}.attn.qkv.bias", (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"), "qkv"),
    ("blocks.{i}.attn.proj.weight", (f"{_ATTN}.o_proj.weight",)),
    ("blocks.{i}.attn.proj.bias", (f"{_ATTN}.o_proj.bias",), "copy", True),
    ("blocks.{i}.norm2.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    ("blocks.{i}.mlp.gate.weight", (f"{_MLP}.gate_proj.weight",)),
    ("blocks.{i}.mlp.gate.bias", (f"{_MLP}.gate_proj.bias",), "copy", True),
    ("blocks.{i}.mlp.up.weight", (f"{_MLP}.up_proj.weight",)),
    ("blocks.{i}.mlp.up.bias", (f"{_MLP}.up_proj.bias",), "copy", True),
    ("blocks.{i}.mlp.down.weight", (f"{_MLP}.down_proj.weight",)),
    ("blocks.{i}.mlp.down.bias", (f"{_MLP}.down_proj.bias",), "copy", True),
    ("norm.weight", ("model.norm.weight",)),
    ("lm_head.weight", ("lm_head.weight",)),
)


# Qwen3: Llama's table plus an RMSNorm on each head's queries and keys
QWEN3_TENSORS = LLAMA_TENSORS + _rules(
    ("blocks.{i}.attn.q_norm.weight", (f"{_ATTN}.q_norm.weight",)),
    ("blocks.{i}.attn.k_norm.weight", (f"{_ATTN}.k_norm.weight",)),
)

# Gemma 2: four norms a layer (SandwichBlock), each a (1 + w) RMSNorm stored as w
_LAYER = "model.layers.{i}"
GEMMA2_TENSORS = tuple(r for r in LLAMA_TENSORS if "norm" not in r.llmkit) + _rules(
    ("blocks.{i}.norm1.weight", (f"{_LAYER}.input_layernorm.weight",), "plus_one"),
    ("blocks.{i}.post_attn_norm.weight", (f"{_LAYER}.post_attention_layernorm.weight",), "plus_one"),
    ("blocks.{i}.norm2.weight", (f"{_LAYER}.pre_feedforward_layernorm.weight",), "plus_one"),
    ("blocks.{i}.post_mlp_norm.weight", (f"{_LAYER}.post_feedforward_layernorm.weight",), "plus_one"),
    ("norm.weight", ("model.norm.weight",), "plus_one"),
)

# Phi-3: q/k/v in one qkv_proj (llmkit's own layout), gate and up in one gate_up_proj
PHI3_TENSORS = tuple(r for r in LLAMA_TENSORS if ".attn.qkv." not in r.llmkit and ".mlp.gate." not in r.llmkit
                     and ".mlp.up." not in r.llmkit) + _rules(
    ("blocks.{i}.attn.qkv.weight", (f"{_ATTN}.qkv_proj.weight",)),
    ("blocks.{i}.mlp.gate.weight", (f"{_MLP}.gate_up_proj.weight",), "copy", False, (0, 2)),
    ("blocks.{i}.mlp.up.weight", (f"{_MLP}.gate_up_proj.weight",), "copy", False, (1, 2)),
)

_NEOX = "gpt_neox.layers.{i}"
NEOX_TENSORS = _rules(
    ("tok_emb.weight", ("gpt_neox.embed_in.weight",)),
    ("blocks.{i}.norm1.weight", (f"{_NEOX}.input_layernorm.weight",)),
    ("blocks.{i}.norm1.bias", (f"{_NEOX}.input_layernorm.bias",)),
    ("blocks.{i}.attn.qkv.weight", (f"{_NEOX}.attention.query_key_value.weight",), "heads_qkv"),
    ("blocks.{i}.attn.qkv.bias", (f"{_NEOX}.attention.query_key_value.bias",), "heads_qkv"),
    ("blocks.{i}.attn.proj.weight", (f"{_NEOX}.attention.dense.weight",)),
    ("blocks.{i}.attn.proj.bias", (f"{_NEOX}.attention.dense.bias",), "copy", True),
    ("blocks.{i}.norm2.weight", (f"{_NEOX}.post_attention_layernorm.weight",)),
    ("blocks.{i}.norm2.bias", (f"{_NEOX}.post_attention_layernorm.bias",)),
    ("blocks.{i}.mlp.up.weight", (f"{_NEOX}.mlp.dense_h_to_4h.weight",)),
    ("blocks.{i}.mlp.up.bias", (f"{_NEOX}.mlp.dense_h_to_4h.bias",)),
    ("blocks.{i}.mlp.down.weight", (f"{_NEOX}.mlp.dense_4h_to_h.weight",)),
    ("blocks.{i}.mlp.down.bias", (f"{_NEOX}.mlp.dense_4h_to_h.bias",)),
    ("norm.weight", ("gpt_neox.final_layer_norm.weight",)),
    ("norm.bias", ("gpt_neox.final_layer_norm.bias",)),
    ("lm_head.weight", ("embed_out.weight",)),
)


_BLOOM = "transformer.h.{i}"
BLOOM_TENSORS = _rules(
    ("tok_emb.weight", ("transformer.word_embeddings.weight",)),
    ("emb_norm.weight", ("transformer.word_embeddings_layernorm.weight",)),
    ("emb_norm.bias", ("transformer.word_embeddings_layernorm.bias",)),
    ("blocks.{i}.norm1.weight", (f"{_BLOOM}.input_layernorm.weight",)),
    ("blocks.{i}.norm1.bias", (f"{_BLOOM}.input_layernorm.bias",)),
    ("blocks.{i}.attn.qkv.weight", (f"{_BLOOM}.self_attention.query_key_value.weight",), "heads_qkv"),
    ("blocks.{i}.attn.qkv.bias", (f"{_BLOOM}.self_attention.query_key_value.bias",), "heads_qkv"),
    ("blocks.{i}.attn.proj.weight", (f"{_BLOOM}.self_attention.dense.weight",)),
    ("blocks.{i}.attn.proj.bias", (f"{_BLOOM}.self_attention.dense.bias",)),
    ("blocks.{i}.norm2.weight", (f"{_BLOOM}.post_attention_layernorm.weight",)),
    ("blocks.{i}.norm2.bias", (f"{_BLOOM}.post_attention_layernorm.bias",)),
    ("blocks.{i}.mlp.up.weight", (f"{_BLOOM}.mlp.dense_h_to_4h.weight",)),
    ("blocks.{i}.mlp.up.bias", (f"{_BLOOM}.mlp.dense_h_to_4h.bias",)),
    ("blocks.{i}.mlp.down.weight", (f"{_BLOOM}.mlp.dense_4h_to_h.weight",)),
    ("blocks.{i}.mlp.down.bias", (f"{_BLOOM}.mlp.dense_4h_to_h.bias",)),
    ("norm.weight", ("transformer.ln_f.weight",)),
    ("norm.bias", ("transformer.ln_f.bias",)),
    ("lm_head.weight", ("lm_head.weight",)),
)


def _moe_rules(prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
               shared: str | None = None, shared_gate: str | None = None, score_bias: str | None = None) -> tuple[Rule, ...]:
    """An MoE layer's tensors (llmkit.nn.moe's layout) from per-expert HF tensors under `prefix`: the
    router, each expert's three projections stacked [E, ...], and the optional shared expert, its
    sigmoid gate and the router's selection bias. What transformers 5 writes with save_pretrained
    (it fuses the experts itself on load)."""
    rows = [("blocks.{i}.mlp.router.weight", (f"{prefix}.gate.weight",)),
            ("blocks.{i}.mlp.experts.gate", (f"{prefix}.experts.{{j}}.{gate}.weight",), "stack"),
            ("blocks.{i}.mlp.experts.up", (f"{prefix}.experts.{{j}}.{up}.weight",), "stack"),
            ("blocks.{i}.mlp.experts.down", (f"{prefix}.experts.{{j}}.{down}.weight",), "stack")]
    if shared is not None:
        rows += [(f"blocks.{{i}}.mlp.shared.{ours}.weight", (f"{prefix}.{shared}.{theirs}.weight",))
                 for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))]
    if shared_gate is not None:
        rows.append(("blocks.{i}.mlp.shared_gate.weight", (f"{prefix}.{shared_gate}.weight",)))
    if score_bias is not None:
        rows.append(("blocks.{i}.mlp.score_bias", (f"{prefix}.{score_bias}",)))
    return _rules(*rows)


MIXTRAL_TENSORS = LLAMA_TENSORS + _moe_rules("model.layers.{i}.block_sparse_moe", "w1", "w3", "w2")
QWEN2_MOE_TENSORS = LLAMA_TENSORS + _moe_rules(_MLP, shared="shared_expert", shared_gate="shared_expert_gate")
QWEN3_MOE_TENSORS = QWEN3_TENSORS + _moe_rules(_MLP)


def _deepseek_v3_rules(interleaved: bool) -> tuple[Rule, ...]:
    """DeepSeek-V3: Llama's embeddings, norms and dense MLP, multi-head latent attention
    (llmkit.nn.latent_attention's layout) and sigmoid-routed experts with a shared expert and the
    router's selection bias. `interleaved` (config.json rope_interleave, true by default): the rope
    rows of q_b_proj / q_proj and kv_a_proj_with_mqa are permuted into the half-rotation layout."""
    q_rows, kv_rows = ("q_rope_rows", "kv_rope_rows") if interleaved else ("copy", "copy")
    attention = _rules(
        ("blocks.{i}.attn.q_down.weight", (f"{_ATTN}.q_a_proj.weight",)),
        ("blocks.{i}.attn.q_down.bias", (f"{_ATTN}.q_a_proj.bias",)),
        ("blocks.{i}.attn.q_norm.weight", (f"{_ATTN}.q_a_layernorm.weight",)),
        ("blocks.{i}.attn.q_up.weight", (f"{_ATTN}.q_b_proj.weight",), q_rows),
        ("blocks.{i}.attn.q_proj.weight", (f"{_ATTN}.q_proj.weight",), q_rows),
        ("blocks.{i}.attn.kv_down.weight", (f"{_ATTN}.kv_a_proj_with_mqa.weight",), kv_rows),
        ("blocks.{i}.attn.kv_down.bias", (f"{_ATTN}.kv_a_proj_with_mqa.bias",), kv_rows),
        ("blocks.{i}.attn.kv_norm.weight", (f"{_ATTN}.kv_a_layernorm.weight",)),
        ("blocks.{i}.attn.kv_up.weight", (f"{_ATTN}.kv_b_proj.weight",)),
    )
    return (tuple(r for r in LLAMA_TENSORS if ".attn.qkv." not in r.llmkit) + attention
            + _moe_rules(_MLP, shared="shared_experts", score_bias="gate.e_score_correction_bias"))


DEEPSEEK_V3_TENSORS = _deepseek_v3_rules(interleaved=True)
DEEPSEEK_V3_HALF_ROPE_TENSORS = _deepseek_v3_rules(interleaved=False)


# --- config translation ----------------------------------------------------------------------

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# RoPE types transformers and llmkit.nn.positions both implement: what each requires and may carry
ROPE_TYPES = ("default", *ROPE_SCALING_KEYS)
SCALING_KEYS = ROPE_SCALING_KEYS
_ORIGINAL = "original_max_position_embeddings"
_TAKES_ORIGINAL = ("llama3", "yarn", "longrope")  # standardize_rope_params fills their original length


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


# The HF config.json fields the translations read, checked first: a value of the wrong type or an
# absurd size is one line here, not a TypeError (or a division by zero) in the arithmetic below.
HF_FIELD_RULES: dict[str, OptionRule] = {
    **{k: integer(1, 1 << 24, optional=True) for k in ("vocab_size",)},
    **{k: integer(1, 1 << 22, optional=True) for k in ("max_position_embeddings", "n_positions")},
    **{k: integer(1, 1 << 16, optional=True) for k in ("hidden_size", "n_embd")},
    **{k: integer(1, 1 << 20, optional=True) for k in ("intermediate_size", "n_inner")},
    **{k: integer(1, 1 << 22, optional=True) for k in ("seq_length",)},
    **{k: integer(1, 1 << 16, optional=True) for k in ("n_embed",)},
    **{k: integer(1, 1024, optional=True) for k in ("num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
                                                     "num_key_value_heads", "head_dim")},
    **{k: integer(0, 1024, optional=True) for k in ("max_window_layers",)},
    # 0 is what Qwen2-MoE files hold when use_sliding_window is false (no window applies)
    **{k: integer(0, 1 << 22, optional=True) for k in ("sliding_window",)},
    **{k: number(above=0.0, max=1.0, optional=True) for k in ("rms_norm_eps", "layer_norm_epsilon")},
    **{k: number(above=0.0, max=1e12, optional=True) for k in ("rope_theta",)},
    **{k: OptionRule(str, optional=True) for k in ("hidden_act", "activation_function", "hidden_activation")},
    **{k: number(above=0.0, max=1.0, optional=True) for k in ("layer_norm_eps",)},
    **{k: number(above=0.0, max=1e12, optional=True) for k in ("rotary_emb_base",)},
    **{k: number(above=0.0, max=1e6, optional=True) for k in ("query_pre_attn_scalar", "attn_logit_softcapping",
                                                               "final_logit_softcapping")},
    **{k: OptionRule(bool, optional=True) for k in ("use_parallel_residual",)},
    **{k: OptionRule(bool, optional=True) for k in ("tie_word_embeddings", "attention_bias", "mlp_bias",
                                                     "use_sliding_window", "scale_attn_by_inverse_layer_idx",
                                                     "add_cross_attention", "scale_attn_weights")},
}


def check_hf_fields(c: dict[str, Any]) -> None:
    """UserError naming the first field of an HF config.json that has the wrong type or size."""
    for key, rule in HF_FIELD_RULES.items():
        if key in c:
            rule.check(c[key], f"config.json: {key}")
    for key in ("rope_parameters", "rope_scaling"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise UserError(f"config.json: {key} must be an object or null, got {type(c[key]).__name__} {c[key]!r}")
    if c.get("layer_types") is not None and not isinstance(c["layer_types"], list):
        raise UserError(f"config.json: layer_types must be a list, got {type(c['layer_types']).__name__}")


def _get(c: dict[str, Any], key: str, default: Any) -> Any:
    """A config value, with transformers' class default when the file leaves it out (or null)."""
    value = c.get(key)
    return default if value is None else value


def gpt2_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    check_hf_fields(c)
    act = _get(c, "activation_function", "gelu_new")
    _require(act in GPT2_ACTIVATIONS,
             f"config.json: GPT-2 activation_function {act!r} is not supported: use one of {sorted(GPT2_ACTIVATIONS)}")
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                     ("scale_attn_weights", True)):
        _require(_get(c, flag, ok) == ok,
                 f"config.json: GPT-2 with {flag}={c.get(flag)} is not supported: only {flag}={ok} loads")
    d = _get(c, "n_embd", 768)
    return ModelConfig(
        vocab_size=_get(c, "vocab_size", 50257), context_length=_get(c, "n_positions", 1024),
        n_layers=_get(c, "n_layer", 12), d_model=d, n_heads=_get(c, "n_head", 12),
        mlp=GPT2_ACTIVATIONS[act], d_ff=_get(c, "n_inner", 4 * d), norm="layernorm",
        norm_eps=_get(c, "layer_norm_epsilon", 1e-5), position="learned", bias=True,
        tie_embeddings=_get(c, "tie_word_embeddings", True))


def gpt2_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    act = {v: k for k, v in GPT2_ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.mlp]
    return dict(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_layer=cfg.n_layers,
                n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function=act,
                layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)


def _missing(params: dict[str, Any], kind: str) -> list[str]:
    return [k for k in SCALING_KEYS.get(kind, ()) if params.get(k) is None]


def rope_from_hf(c: dict[str, Any], context_length: int | None = None,
                 original: int | None = None) -> tuple[float, dict[str, Any] | None]:
    """(theta, llmkit rope_scaling) from either transformers v5 `rope_parameters` or v4
    `rope_theta` + `rope_scaling`. Keys transformers requires are required here too, and the
    optional ones it reads are carried; the one it fills in (llama3/yarn/longrope's
    original_max_position_embeddings = the model's max_position_embeddings, `standardize_rope_params`)
    is filled the same way from `context_length`, or set to `original` where the family keeps its
    own top-level original_max_position_embeddings (Phi-3: it wins over rope_parameters)."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", _get(c, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    _require(kind in ROPE_TYPES,
             f"config.json: rope type {kind!r} is not supported: llmkit loads {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    if kind in _TAKES_ORIGINAL:
        if original is not None:
            params[_ORIGINAL] = original
        elif context_length is not None:
            params.setdefault(_ORIGINAL, context_length)
    missing = _missing(params, kind)
    _require(not missing, f"config.json: {kind} rope scaling lacks {', '.join(missing)}: add them to rope_parameters "
                          "(transformers refuses the file too)")
    keys = SCALING_KEYS[kind] + tuple(k for k in ROPE_SCALING_OPTIONAL_KEYS.get(kind, ()) if params.get(k) is not None)
    return theta, {"type": kind, **{k: params[k] for k in keys}}


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Both spellings: `rope_parameters` for transformers v5, `rope_theta`/`rope_scaling` for v4.
    A scaling missing a key transformers needs is refused: llmkit's own fallbacks for llama3
    (nn/positions.py) are not transformers' (it has none for the frequency factors, and takes
    max_position_embeddings for the original length), so writing the file anyway would change the model."""
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.pop("type", scaling.pop("rope_type", "default"))
    missing = _missing(scaling, kind)
    hint = (" (Llama 3.1 uses factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)"
            if kind == "llama3" else "")
    _require(not missing, f"this model's {kind} rope_scaling lacks {', '.join(missing)}, which transformers requires: "
                          f"set them in the model config's rope_scaling{hint}")
    params = {"rope_type": kind, "rope_theta": cfg.rope_base, **scaling}
    v4 = None if kind == "default" else {"rope_type": kind, **scaling}
    return {"rope_parameters": params, "rope_theta": cfg.rope_base, "rope_scaling": v4}


SWISH = ("silu", "swish")  # transformers' two names of one activation (ACT2FN maps both to SiLU)


def _llama_like(c: dict[str, Any], defaults: dict[str, Any], qkv_bias: bool, bias: bool,
                sliding_window: int | None, **switchboard: Any) -> ModelConfig:
    """A Llama-shaped config (RMSNorm, RoPE, a gated MLP): the fields every such family shares, with
    the family's class defaults for absent keys; `switchboard`: the family's other ModelConfig fields."""
    check_hf_fields(c)
    mlp = switchboard.pop("mlp", "swiglu")
    if mlp == "swiglu":
        act = _get(c, "hidden_act", "silu")
        _require(act in SWISH, f"config.json: hidden_act {act!r} is not supported for this family: only 'silu' "
                               "(SwiGLU)")
    n_heads = _get(c, "num_attention_heads", defaults["num_attention_heads"])
    d = _get(c, "hidden_size", defaults["hidden_size"])
    context_length = _get(c, "max_position_embeddings", defaults["max_position_embeddings"])
    theta, scaling = rope_from_hf(c, context_length, switchboard.pop("original", None))
    head_dim = _get(c, "head_dim", defaults.get("head_dim") or d // n_heads)
    return ModelConfig(
        vocab_size=_get(c, "vocab_size", defaults["vocab_size"]), context_length=context_length,
        n_layers=_get(c, "num_hidden_layers", defaults["num_hidden_layers"]), d_model=d, n_heads=n_heads,
        n_kv_heads=_get(c, "num_key_value_heads", defaults.get("num_key_value_heads", n_heads)), head_dim=head_dim,
        mlp=mlp, d_ff=_get(c, "intermediate_size", defaults["intermediate_size"]), norm="rmsnorm",
        norm_eps=_get(c, "rms_norm_eps", defaults.get("rms_norm_eps", 1e-6)), position="rope", rope_base=theta,
        rope_scaling=scaling, bias=bias, qkv_bias=qkv_bias, sliding_window=sliding_window,
        tie_embeddings=_get(c, "tie_word_embeddings", defaults.get("tie_word_embeddings", False)),
        rotary_dim=partial_rotary_dim(c, head_dim, defaults.get("partial_rotary_factor", 1.0)), **switchboard)


def _llama_like_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, **rope_to_hf(cfg))


def partial_rotary_dim(c: dict[str, Any], head_dim: int, default: float = 1.0) -> int | None:
    """llmkit's rotary_dim (None: every channel) from the share of each head's channels RoPE turns:
    `partial_rotary_factor` (transformers v5 keeps it in rope_parameters; v4 at the top level, GPT-NeoX
    v4 as `rotary_pct`), truncated to an integer as transformers does."""
    params = c.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", default)))
    _require(isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0.0 < factor <= 1.0,
             f"config.json: partial_rotary_factor must be a number in (0, 1], got {factor!r}")
    dim = int(head_dim * factor)
    return None if dim == head_dim else dim


def _rope_with_partial(cfg: ModelConfig) -> dict[str, Any]:
    """rope_to_hf plus the rotated share of each head (partial_rotary_factor), in every place a
    transformers version reads it (v5 takes a v4 `rope_scaling` over `rope_parameters` when both are there)."""
    rope = rope_to_hf(cfg)
    factor = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
    for params in (rope["rope_parameters"], rope["rope_scaling"]):
        if params is not None:
            params["partial_rotary_factor"] = factor
    return dict(rope, partial_rotary_factor=factor)


LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048)
QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=32768)
QWEN3_DEFAULTS = dict(QWEN2_DEFAULTS, head_dim=128)
MISTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)
PHI3_DEFAULTS = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                       tie_word_embeddings=True)


def llama_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    # llmkit has one `bias` flag for o_proj and the MLP; a bias present on only one of them is
    # loaded with zeros on the other (Rule.zero_if_absent), which computes the same function.
    attention_bias, mlp_bias = bool(_get(c, "attention_bias", False)), bool(_get(c, "mlp_bias", False))
    return _llama_like(c, LLAMA_DEFAULTS, qkv_bias=attention_bias, bias=attention_bias or mlp_bias,
                       sliding_window=None)


def llama_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.bias)


# transformers' per-layer attention kinds (config.json `layer_types`) <-> llmkit's layer types
HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def hf_layer_types(c: dict[str, Any], n_layers: int, window: int | None,
                   default: list[str]) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) from config.json's `layer_types` (or the family's `default`
    when absent): None for layer_types when every layer is alike (all full: no window either)."""
    types = c.get("layer_types") or default
    _require(len(types) == n_layers, f"config.json: layer_types has {len(types)} entries for num_hidden_layers="
                                     f"{n_layers}: give one per layer")
    unknown = sorted({t for t in types if t not in HF_LAYER_TYPES}, key=str)
    _require(not unknown, f"config.json: layer type(s) {unknown} are not supported: llmkit loads "
                          f"{', '.join(HF_LAYER_TYPES)}")
    mapped = [HF_LAYER_TYPES[t] for t in types]
    _require("sliding" not in mapped or window is not None,
             "config.json: layer_types has sliding_attention layers but no sliding_window is in effect "
             "(use_sliding_window false or sliding_window null): set the window or make those layers full_attention")
    if all(t == "full" for t in mapped):
        return None, None
    return int(window), None if all(t == "sliding" for t in mapped) else mapped


def qwen_layers(c: dict[str, Any], defaults: dict[str, Any]) -> tuple[int | None, list[str] | None]:
    """Qwen2/Qwen3 windows: `sliding_window` counts only with `use_sliding_window`; without
    `layer_types` the layers from `max_window_layers` on slide (transformers' Qwen2Config)."""
    n_layers = _get(c, "num_hidden_layers", defaults["num_hidden_layers"])
    window = c.get("sliding_window", 4096) if c.get("use_sliding_window") else None
    first = _get(c, "max_window_layers", 28)
    default = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layers)]
    return hf_layer_types(c, n_layers, window, default)


def qwen2_window(c: dict[str, Any]) -> int | None:
    """The window Qwen2 layers slide over (None: none slides)."""
    return qwen_layers(c, QWEN2_DEFAULTS)[0]


def _layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    back = {v: k for k, v in HF_LAYER_TYPES.items()}
    return [back[cfg.layer_type(i)] for i in range(cfg.n_layers)]


def _qwen_windows_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    window = cfg.sliding_window
    return dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                layer_types=_layer_types_to_hf(cfg))


def qwen2_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    window, types = qwen_layers(c, QWEN2_DEFAULTS)
    return _llama_like(c, QWEN2_DEFAULTS, qkv_bias=True, bias=False, sliding_window=window, layer_types=types)


def qwen2_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), **_qwen_windows_to_hf(cfg))


def qwen3_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """Qwen3: Qwen2 without the q/k/v biases (attention_bias puts them on q/k/v/o) and with an RMSNorm
    on each head's queries and keys (qk_norm "head"), head_dim given (128 by default)."""
    window, types = qwen_layers(c, QWEN3_DEFAULTS)
    attention_bias = bool(_get(c, "attention_bias", False))
    return _llama_like(c, QWEN3_DEFAULTS, qkv_bias=attention_bias, bias=attention_bias, sliding_window=window,
                       layer_types=types, qk_norm="head")


def qwen3_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, **_qwen_windows_to_hf(cfg))


def mistral_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    # transformers' Mistral windows every layer by `sliding_window` and ignores a `layer_types` key
    # (it warns: "use Ministral"), so llmkit does the same
    window = c["sliding_window"] if "sliding_window" in c else 4096  # null in the file: no window
    return _llama_like(c, MISTRAL_DEFAULTS, qkv_bias=False, bias=False, sliding_window=window)


def mistral_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), sliding_window=cfg.sliding_window)


def phi3_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """Phi-3: a Llama with fused qkv_proj and gate_up_proj, a window on every layer when
    sliding_window is set, and RoPE on a share of each head (partial_rotary_factor)."""
    params = c.get("rope_parameters") or c.get("rope_scaling")
    if isinstance(params, dict) and params.get("rope_type", params.get("type")) in ("su", "yarn"):
        c = {**c, "rope_parameters": {**params, "rope_type": "longrope"}}  # Phi3Config's old names of longrope
    return _llama_like(c, PHI3_DEFAULTS, qkv_bias=False, bias=False, sliding_window=c.get("sliding_window"),
                       original=_get(c, _ORIGINAL, 4096))


def phi3_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    # pad_token_id: Phi3Config's default (32000) is no token of a smaller vocabulary, and transformers
    # refuses to build the embedding then; a tokenizer, when exported too, sets its own
    return dict(_llama_like_to_hf(cfg), **_rope_with_partial(cfg), sliding_window=cfg.sliding_window,
                original_max_position_embeddings=(cfg.rope_scaling or {}).get(_ORIGINAL, cfg.context_length),
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                pad_token_id=None)


def gemma2_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """Gemma 2 (Gemma Team, 2024): sandwich norms, (1 + w) RMSNorms, embeddings times sqrt(hidden),
    scores scaled by query_pre_attn_scalar**-0.5 and soft-capped, soft-capped logits, sliding and
    full layers alternating, a GeGLU MLP."""
    check_hf_fields(c)
    act = _get(c, "hidden_activation", "gelu_pytorch_tanh")
    _require(act == "gelu_pytorch_tanh", f"config.json: Gemma 2 hidden_activation {act!r} is not supported: "
                                         "only 'gelu_pytorch_tanh' (GeGLU)")
    _require(not c.get("use_bidirectional_attention"),
             "config.json: Gemma 2 with use_bidirectional_attention is not supported: llmkit loads the causal decoder")
    n_layers = _get(c, "num_hidden_layers", GEMMA2_DEFAULTS["num_hidden_layers"])
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    window, types = hf_layer_types(c, n_layers, _get(c, "sliding_window", 4096), default)
    attention_bias = bool(_get(c, "attention_bias", False))
    d = _get(c, "hidden_size", GEMMA2_DEFAULTS["hidden_size"])
    caps = {}
    for ours, theirs, default_cap in (("attn_softcap", "attn_logit_softcapping", 50.0),
                                      ("final_softcap", "final_logit_softcapping", 30.0)):
        caps[ours] = c[theirs] if theirs in c else default_cap  # null in the file: no cap
    return _llama_like(c, GEMMA2_DEFAULTS, qkv_bias=attention_bias, bias=attention_bias, sliding_window=window,
                       layer_types=types, mlp="geglu", block="sandwich", embedding_scale=float(d) ** 0.5,
                       attn_scale=float(_get(c, "query_pre_attn_scalar", 256)) ** -0.5, **caps)


def gemma2_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    out = dict(_llama_like_to_hf(cfg), hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias,
               query_pre_attn_scalar=_integral((cfg.attn_scale or cfg.head_dim ** -0.5) ** -2),
               attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
               sliding_window=cfg.sliding_window or cfg.context_length, layer_types=_layer_types_to_hf(cfg))
    del out["hidden_act"]
    return out


def _integral(x: float) -> int | float:
    """x as an int when it is one up to rounding (config fields transformers types as int)."""
    return round(x) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


NEOX_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def neox_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """GPT-NeoX / Pythia (Black et al., 2022): LayerNorms, a GELU MLP with biases, q/k/v fused per
    head, RoPE on the first rotary_pct of each head, the parallel residual (or pre-norm without it)."""
    check_hf_fields(c)
    act = _get(c, "hidden_act", "gelu")
    _require(act in NEOX_ACTIVATIONS, f"config.json: GPT-NeoX hidden_act {act!r} is not supported: "
                                      f"use one of {sorted(NEOX_ACTIVATIONS)}")
    d, n_heads = _get(c, "hidden_size", 6144), _get(c, "num_attention_heads", 64)
    _require(d % n_heads == 0, f"config.json: hidden_size={d} is not a multiple of num_attention_heads={n_heads}")
    context_length = _get(c, "max_position_embeddings", 2048)
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", _get(c, "rotary_emb_base", 10000.0)))
    theta, scaling = rope_from_hf({"rope_parameters": {**params, "rope_theta": theta}}, context_length)
    attention_bias = bool(_get(c, "attention_bias", True))
    return ModelConfig(
        vocab_size=_get(c, "vocab_size", 50432), context_length=context_length,
        n_layers=_get(c, "num_hidden_layers", 44), d_model=d, n_heads=n_heads, mlp=NEOX_ACTIVATIONS[act],
        d_ff=_get(c, "intermediate_size", 24576), norm="layernorm", norm_eps=_get(c, "layer_norm_eps", 1e-5),
        position="rope", rope_base=theta, rope_scaling=scaling, bias=True, qkv_bias=attention_bias,
        rotary_dim=partial_rotary_dim(c, d // n_heads, 0.25),
        block="parallel" if _get(c, "use_parallel_residual", True) else "pre_norm",
        tie_embeddings=_get(c, "tie_word_embeddings", False))


def neox_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp]
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, hidden_act=act,
                max_position_embeddings=cfg.context_length, layer_norm_eps=cfg.norm_eps,
                use_parallel_residual=cfg.block == "parallel", attention_bias=True,
                tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, hidden_dropout=cfg.dropout,
                **_rope_with_partial(cfg), rotary_pct=(cfg.rotary_dim or cfg.head_dim) / cfg.head_dim)


def bloom_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """BLOOM (BigScience, 2022): ALiBi instead of positions, a LayerNorm right after the embeddings,
    q/k/v fused per head, a 4x tanh-GELU MLP, biases everywhere, tied embeddings."""
    check_hf_fields(c)
    _require(not c.get("apply_residual_connection_post_layernorm"),
             "config.json: Bloom with apply_residual_connection_post_layernorm=true is not supported: "
             "llmkit loads the pre-norm residual only")
    d = _get(c, "hidden_size", _get(c, "n_embed", 64))
    n_heads = _get(c, "n_head", _get(c, "num_attention_heads", 8))
    _require(d % n_heads == 0, f"config.json: hidden_size={d} is not a multiple of n_head={n_heads}")
    return ModelConfig(
        vocab_size=_get(c, "vocab_size", 250880), context_length=_get(c, "seq_length", 2048),
        n_layers=_get(c, "n_layer", _get(c, "num_hidden_layers", 2)), d_model=d, n_heads=n_heads, mlp="gelu_tanh",
        d_ff=4 * d, norm="layernorm", norm_eps=_get(c, "layer_norm_epsilon", 1e-5), position="alibi", bias=True,
        embedding_norm=True, tie_embeddings=_get(c, "tie_word_embeddings", True))


def bloom_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, seq_length=cfg.context_length,
                apply_residual_connection_post_layernorm=False, hidden_dropout=cfg.dropout,
                attention_dropout=cfg.dropout)


MIXTRAL_DEFAULTS = dict(MISTRAL_DEFAULTS, rms_norm_eps=1e-5)
QWEN2_MOE_DEFAULTS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                          num_attention_heads=16, max_position_embeddings=32768)
QWEN3_MOE_DEFAULTS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768)


def _n_experts(c: dict[str, Any], default: int) -> int:
    """The routed experts (transformers maps num_experts and num_local_experts to one attribute)."""
    value = c.get("num_local_experts", c.get("num_experts"))
    value = default if value is None else value
    integer(0, 1 << 16).check(value, "config.json: num_experts")
    return value


def _sparse_layers(c: dict[str, Any]) -> dict[str, int]:
    """Which layers are MoE in Qwen-MoE files (decoder_sparse_step, mlp_only_layers) as llmkit's
    moe.every and moe.first_dense: the dense layers must be the first ones."""
    every = _get(c, "decoder_sparse_step", 1)
    integer(1, 1024).check(every, "config.json: decoder_sparse_step")
    dense = _get(c, "mlp_only_layers", [])
    _require(isinstance(dense, list) and dense == list(range(len(dense))),
             f"config.json: mlp_only_layers {dense!r} is not supported: llmkit keeps dense MLPs only in the "
             "first layers (a list 0, 1, ..., n-1)")
    return {"every": every, "first_dense": len(dense)}


def _aux_coef(c: dict[str, Any], top_k: int) -> float:
    """transformers' load-balancing loss is top_k times llmkit's (llmkit.nn.moe): the same weight."""
    coef = _get(c, "router_aux_loss_coef", 0.001)
    number(0.0, max=1e6).check(coef, "config.json: router_aux_loss_coef")
    return float(coef) * top_k


def mixtral_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """Mixtral (Jiang et al., 2024): Mistral with a softmax top-k MoE of SwiGLU experts on every layer."""
    n, k = _n_experts(c, 8), _get(c, "num_experts_per_tok", 2)
    return _llama_like(c, MIXTRAL_DEFAULTS, qkv_bias=False, bias=False, sliding_window=c.get("sliding_window"),
                       moe=dict(n_experts=n, top_k=k, norm_topk=True, aux_loss_coef=_aux_coef(c, k)))


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    return dict(num_experts=moe["n_experts"], num_local_experts=moe["n_experts"], num_experts_per_tok=moe["top_k"],
                router_aux_loss_coef=moe["aux_loss_coef"] / moe["top_k"], norm_topk_prob=moe["norm_topk"],
                moe_intermediate_size=moe["d_ff"] or cfg.d_ff, decoder_sparse_step=moe["every"],
                mlp_only_layers=list(range(moe["first_dense"])))


def mixtral_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    out = dict(_llama_like_to_hf(cfg), sliding_window=cfg.sliding_window, **_moe_to_hf(cfg))
    for key in ("norm_topk_prob", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers"):
        del out[key]  # not Mixtral's: it always renormalises, its experts are intermediate_size wide
    return out


def qwen2_moe_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """Qwen1.5/2-MoE: Qwen2 attention, softmax top-k experts (not renormalised by default) plus one
    shared expert behind a sigmoid gate; dense MLPs in mlp_only_layers."""
    window, types = qwen_layers(c, QWEN2_MOE_DEFAULTS)
    n, k = _n_experts(c, 60), _get(c, "num_experts_per_tok", 4)
    moe = None if n == 0 else dict(
        n_experts=n, top_k=k, d_ff=_get(c, "moe_intermediate_size", 1408), n_shared=1,
        shared_d_ff=_get(c, "shared_expert_intermediate_size", 5632), shared_gate=True,
        norm_topk=bool(_get(c, "norm_topk_prob", False)), aux_loss_coef=_aux_coef(c, k), **_sparse_layers(c))
    return _llama_like(c, QWEN2_MOE_DEFAULTS, qkv_bias=bool(_get(c, "qkv_bias", True)), bias=False,
                       sliding_window=window, layer_types=types, moe=moe)


def qwen2_moe_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), **_qwen_windows_to_hf(cfg), **_moe_to_hf(cfg), qkv_bias=cfg.qkv_bias,
                shared_expert_intermediate_size=cfg.moe["shared_d_ff"] or (cfg.moe["d_ff"] or cfg.d_ff))


def qwen3_moe_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """Qwen3-MoE: Qwen3 attention (per-head qk-norm), softmax top-k experts, no shared expert."""
    _require(not c.get("use_sliding_window"), "config.json: Qwen3-MoE with use_sliding_window=true is not "
                                              "supported: set it false")
    n, k = _n_experts(c, 128), _get(c, "num_experts_per_tok", 8)
    moe = None if n == 0 else dict(
        n_experts=n, top_k=k, d_ff=_get(c, "moe_intermediate_size", 768),
        norm_topk=bool(_get(c, "norm_topk_prob", False)), aux_loss_coef=_aux_coef(c, k), **_sparse_layers(c))
    attention_bias = bool(_get(c, "attention_bias", False))
    return _llama_like(c, QWEN3_MOE_DEFAULTS, qkv_bias=attention_bias, bias=attention_bias, sliding_window=None,
                       qk_norm="head", moe=moe)


def qwen3_moe_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), **_moe_to_hf(cfg), attention_bias=cfg.qkv_bias, use_sliding_window=False)


DEEPSEEK_V3_DEFAULTS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                            num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                            routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                            v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                            first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                            rms_norm_eps=1e-6)
# DeepSeek-V3's own config.json fields, checked before any arithmetic (each refusal names the field)
DEEPSEEK_V3_FIELD_RULES: dict[str, OptionRule] = {
    **{k: integer(1, 1 << 16, optional=True) for k in ("q_lora_rank", "kv_lora_rank", "n_routed_experts",
                                                        "num_experts_per_tok")},
    **{k: integer(1, 1024, optional=True) for k in ("qk_nope_head_dim", "v_head_dim", "n_group", "topk_group")},
    "qk_rope_head_dim": integer(2, 1024, optional=True), "first_k_dense_replace": integer(0, 1024, optional=True),
    # transformers builds a zero-width shared MLP for 0; llmkit's MoE has none then: refused, not guessed
    "n_shared_experts": integer(1, 1 << 10, optional=True),
    "moe_intermediate_size": integer(1, 1 << 20, optional=True),
    "routed_scaling_factor": number(above=0.0, max=1e6, optional=True),
    "norm_topk_prob": OptionRule(bool, optional=True), "rope_interleave": OptionRule(bool, optional=True),
}
# DeepSeek-V3 balances its experts with the router's selection bias, updated outside the gradient
# (auxiliary-loss-free), plus a complementary balance loss of weight alpha = 0.0001 (DeepSeek-AI 2024,
# arXiv 2412.19437, section 2.1.2), which llmkit's load-balancing loss equals (over the batch rather
# than per sequence). llmkit does not update the bias, so fine-tuning keeps that small loss.
DEEPSEEK_V3_AUX_LOSS = 0.0001


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(s) + 1 (1 for s <= 1), DeepSeek's spelling."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def deepseek_v3_score_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """DeepSeek-V3's softmax scale: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim), times
    mscale(factor, mscale_all_dim)^2 under a (YaRN) rope scaling that sets mscale_all_dim, as
    transformers' `yarn_apply_mscale` computes it (the RoPE tables carry mscale / mscale_all_dim)."""
    scale = qk_head_dim ** -0.5
    params = rope_scaling or {}
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2
    return scale


def deepseek_v3_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V3 (DeepSeek-AI, 2024, arXiv 2412.19437): multi-head latent attention (`attention`
    "mla") and DeepSeekMoE with sigmoid routing, a selection-only score bias, group-limited routing
    (n_group / topk_group), a routed scaling factor and shared experts; the first
    first_k_dense_replace layers keep a dense MLP of intermediate_size. Also Kimi K2 / Moonlight,
    which reuse the architecture. A YaRN rope_scaling's mscale_all_dim is folded into `attn_scale`."""
    check_hf_fields(c)
    for key, rule in DEEPSEEK_V3_FIELD_RULES.items():
        if key in c:
            rule.check(c[key], f"config.json: {key}")
    act = _get(c, "hidden_act", "silu")
    _require(act in SWISH, f"config.json: DeepSeek-V3 hidden_act {act!r} is not supported: only 'silu' (SwiGLU)")
    # keys of DeepSeek's own modeling code that transformers' DeepseekV3 reads as these values only
    for key, only in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        _require(c.get(key) in (None, only), f"config.json: DeepSeek-V3 {key} {c.get(key)!r} is not supported: "
                                             f"llmkit (like transformers) routes with {key} {only!r} only")
    _require(not c.get("quantization_config"), "config.json: a quantized DeepSeek-V3 checkpoint (quantization_config) "
                                               "is not supported: dequantize it to bf16 first")
    g = lambda key: _get(c, key, DEEPSEEK_V3_DEFAULTS.get(key))  # noqa: E731
    n_heads = g("num_attention_heads")
    kv_heads = _get(c, "num_key_value_heads", n_heads)
    _require(kv_heads >= n_heads, f"config.json: DeepSeek-V3 num_key_value_heads={kv_heads} < num_attention_heads="
                                  f"{n_heads} is not supported (MLA expands a key and value for every head; "
                                  "transformers cannot run it either): set it to num_attention_heads")
    nope, rope, v = g("qk_nope_head_dim"), g("qk_rope_head_dim"), g("v_head_dim")
    groups, topk_groups = g("n_group"), g("topk_group")
    context_length = g("max_position_embeddings")
    theta, scaling = rope_from_hf(c, context_length)
    scale = deepseek_v3_score_scale(nope + rope, c.get("rope_parameters") or c.get("rope_scaling"))
    expert_ff, n_shared = g("moe_intermediate_size"), g("n_shared_experts")
    moe = dict(n_experts=g("n_routed_experts"), top_k=g("num_experts_per_tok"), d_ff=expert_ff, n_shared=n_shared,
               shared_d_ff=expert_ff * n_shared, router="sigmoid", score_bias=True, n_groups=groups,
               topk_groups=topk_groups, norm_topk=bool(g("norm_topk_prob")),
               routed_scale=float(g("routed_scaling_factor")), aux_loss_coef=DEEPSEEK_V3_AUX_LOSS,
               first_dense=g("first_k_dense_replace"))
    attention_bias = bool(_get(c, "attention_bias", False))
    return ModelConfig(
        vocab_size=g("vocab_size"), context_length=context_length, n_layers=g("num_hidden_layers"),
        d_model=g("hidden_size"), n_heads=n_heads, n_kv_heads=n_heads, head_dim=nope + rope, mlp="swiglu",
        d_ff=g("intermediate_size"), norm="rmsnorm", norm_eps=g("rms_norm_eps"), position="rope", rope_base=theta,
        rope_scaling=scaling, bias=attention_bias, qkv_bias=attention_bias,
        tie_embeddings=_get(c, "tie_word_embeddings", False), attention="mla", rotary_dim=rope,
        attn_scale=None if scale == (nope + rope) ** -0.5 else scale,
        mla=dict(q_lora_rank=c["q_lora_rank"] if "q_lora_rank" in c else DEEPSEEK_V3_DEFAULTS["q_lora_rank"],
                 kv_lora_rank=g("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v),
        moe=moe)


def deepseek_v3_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    m, moe = cfg.mla, cfg.moe
    expert_ff = moe["d_ff"] or cfg.d_ff
    out = dict(_llama_like_to_hf(cfg), num_key_value_heads=cfg.n_heads, moe_intermediate_size=expert_ff,
               n_routed_experts=moe["n_experts"], num_experts_per_tok=moe["top_k"], n_shared_experts=moe["n_shared"],
               n_group=moe["n_groups"], topk_group=moe["topk_groups"], norm_topk_prob=moe["norm_topk"],
               routed_scaling_factor=moe["routed_scale"], first_k_dense_replace=moe["first_dense"],
               q_lora_rank=m["q_lora_rank"], kv_lora_rank=m["kv_lora_rank"], qk_nope_head_dim=m["qk_nope_head_dim"],
               qk_rope_head_dim=m["qk_rope_head_dim"], v_head_dim=m["v_head_dim"], rope_interleave=True,
               attention_bias=cfg.qkv_bias, num_nextn_predict_layers=0)
    del out["head_dim"]  # DeepseekV3Config derives it (= qk_rope_head_dim)
    return out


def _deepseek_v3_rope_layout(fam: "Family", c: dict[str, Any]) -> "Family":
    """The table for this checkpoint: rope_interleave false stores the rope rows in llmkit's layout."""
    if _get(c, "rope_interleave", True):
        return fam
    return dataclasses.replace(fam, tensors=DEEPSEEK_V3_HALF_ROPE_TENSORS)


def _deepseek_v3_moe_exact(c: ModelConfig) -> bool:
    moe = c.moe
    return (moe is not None and moe["router"] == "sigmoid" and moe["score_bias"] and moe["n_shared"] >= 1
            and not moe["shared_gate"] and moe["every"] == 1
            and (moe["shared_d_ff"] or 0) in (0, (moe["d_ff"] or c.d_ff) * moe["n_shared"]))


def _deepseek_v3_scale_exact(c: ModelConfig) -> bool:
    qk = c.head_dim
    want = deepseek_v3_score_scale(qk, c.rope_scaling)
    return abs((c.attn_scale or qk ** -0.5) - want) <= 1e-9 * want


# --- families --------------------------------------------------------------------------------

Check = tuple[str, Callable[[ModelConfig], bool]]

_LLAMA_SHAPE: tuple[Check, ...] = (
    ("norm must be rmsnorm", lambda c: c.norm == "rmsnorm"),
    ("mlp must be swiglu", lambda c: c.mlp == "swiglu"),
    ("position must be rope", lambda c: c.position == "rope"),
)

# The switchboard fields (ModelConfig) at their plain values: a family writes only those it maps.
SWITCHBOARD_DEFAULTS: dict[str, Any] = {
    "attention": "mha", "block": "pre_norm", "qk_norm": None, "attn_scale": None, "attn_softcap": None,
    "final_softcap": None, "embedding_scale": None, "embedding_norm": False, "rotary_dim": None, "moe": None,
    "mla": None, "mod": None, "attn_gate": False,
}


def _uniform_layers(c: ModelConfig) -> bool:
    """Every layer attends alike: all sliding when the model has a window, else all full."""
    plain = "sliding" if c.sliding_window is not None else "full"
    return all(c.layer_type(i) == plain for i in range(c.n_layers))


def _plain_except(*mapped: str) -> tuple[Check, ...]:
    """Export checks: every switchboard field the family does not map (`mapped`) is at its plain
    value, so nothing the HF architecture cannot express is silently dropped. "layer_types" in
    `mapped`: per-layer full/sliding attention is written; otherwise every layer must attend alike."""
    checks = [(f"{name} must be {default!r}" if default is not None else f"{name} must be unset",
               lambda c, name=name, default=default: getattr(c, name) == default)
              for name, default in SWITCHBOARD_DEFAULTS.items() if name not in mapped]
    if "layer_types" in mapped:
        checks.append(("layer_types must be full or sliding", lambda c: all(
            c.layer_type(i) in ("full", "sliding") for i in range(c.n_layers))))
    else:
        checks.append(("layer_types must be uniform (every layer sliding with sliding_window, else full)",
                       _uniform_layers))
    return tuple(checks)

def _moe_shape(n_shared: int, shared_gate: bool, norm_topk: bool | None = None,
               dense_layers: bool = True) -> tuple[Check, ...]:
    """What a softmax-routed MoE family (Mixtral, Qwen-MoE) can write of cfg.moe."""
    checks: list[Check] = [
        ("moe must be set", lambda c: c.moe is not None),
        ("moe.router must be softmax, without score_bias, groups or routed_scale",
         lambda c: c.moe is not None and c.moe["router"] == "softmax" and not c.moe["score_bias"]
         and c.moe["n_groups"] == 1 and c.moe["routed_scale"] == 1.0),
        (f"moe.n_shared must be {n_shared}" + (" with shared_gate" if shared_gate else ""),
         lambda c: c.moe is not None and c.moe["n_shared"] == n_shared and c.moe["shared_gate"] == shared_gate)]
    if norm_topk is not None:
        checks.append((f"moe.norm_topk must be {norm_topk}", lambda c: c.moe is not None and c.moe["norm_topk"] == norm_topk))
    if not dense_layers:
        checks.append(("every layer must be MoE (moe.first_dense 0, moe.every 1, moe.d_ff unset or d_ff)",
                       lambda c: c.moe is not None and c.moe["first_dense"] == 0 and c.moe["every"] == 1
                       and (c.moe["d_ff"] or c.d_ff) == c.d_ff))
    return tuple(checks)


@dataclass(frozen=True)
class Family:
    """One HF architecture: how to recognise it, translate its config and rename its tensors."""

    name: str
    model_type: str
    architecture: str  # the *ForCausalLM class transformers builds
    tensors: tuple[Rule, ...]
    to_llmkit: Callable[[dict[str, Any]], ModelConfig]
    from_llmkit: Callable[[ModelConfig], dict[str, Any]]
    exportable: tuple[Check, ...]  # what a ModelConfig must satisfy to be written as this family
    # HF tensors that carry no weights llmkit needs (causal-mask buffers, cached RoPE tables)
    ignore: tuple[str, ...] = ()
    # key rewrites applied to checkpoint names first (old GPT-2 files lack "transformer.")
    key_fixups: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # the family as one checkpoint needs it, from its config.json (DeepSeek-V3: the rope layout)
    for_config: Callable[["Family", dict[str, Any]], "Family"] | None = None

    def export_problems(self, cfg: ModelConfig) -> list[str]:
        return [why for why, ok in self.exportable if not ok(cfg)]

    @property
    def hf_head(self) -> str:
        """The HF name of the LM head (lm_head.weight; GPT-NeoX: embed_out.weight)."""
        return next(rule.hf[0] for rule in self.tensors if rule.llmkit == "lm_head.weight")


_ROPE_CACHE = (r"rotary_emb\.inv_freq$",)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "gpt2", "GPT2LMHeadModel", GPT2_TENSORS, gpt2_to_llmkit, gpt2_from_llmkit,
           exportable=(("norm must be layernorm", lambda c: c.norm == "layernorm"),
                       ("position must be learned", lambda c: c.position == "learned"),
                       ("mlp must be gelu or gelu_tanh", lambda c: c.mlp in ("gelu", "gelu_tanh")),
                       ("bias and qkv_bias must be true", lambda c: c.bias and c.qkv_bias),
                       ("n_kv_heads must equal n_heads", lambda c: c.n_kv_heads == c.n_heads),
                       ("head_dim must be d_model / n_heads", lambda c: c.head_dim * c.n_heads == c.d_model),
                       ("sliding_window must be unset", lambda c: c.sliding_window is None)) + _plain_except(),
           ignore=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
           key_fixups=((r"^(?!transformer\.|lm_head\.)", "transformer."),)),
    Family("llama", "llama", "LlamaForCausalLM", LLAMA_TENSORS, llama_to_llmkit, llama_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("qkv_bias must equal bias", lambda c: c.qkv_bias == c.bias),
               ("sliding_window must be unset (use mistral)", lambda c: c.sliding_window is None)) + _plain_except(),
           ignore=_ROPE_CACHE),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_TENSORS, qwen2_to_llmkit, qwen2_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("qkv_bias must be true and bias false", lambda c: c.qkv_bias and not c.bias),)
           + _plain_except("layer_types"),
           ignore=_ROPE_CACHE),
    Family("mistral", "mistral", "MistralForCausalLM", LLAMA_TENSORS, mistral_to_llmkit, mistral_from_llmkit,
           exportable=_LLAMA_SHAPE + (("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias),)
           + _plain_except(),
           ignore=_ROPE_CACHE),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", QWEN3_TENSORS, qwen3_to_llmkit, qwen3_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("qk_norm must be 'head'", lambda c: c.qk_norm == "head"),
               # Qwen3 has no MLP biases to write llmkit's `bias` into
               ("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias))
           + _plain_except("qk_norm", "layer_types"),
           ignore=_ROPE_CACHE),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", GEMMA2_TENSORS, gemma2_to_llmkit, gemma2_from_llmkit,
           exportable=(("norm must be rmsnorm", lambda c: c.norm == "rmsnorm"),
                       ("mlp must be geglu", lambda c: c.mlp == "geglu"),
                       ("position must be rope", lambda c: c.position == "rope"),
                       ("block must be sandwich", lambda c: c.block == "sandwich"),
                       ("embedding_scale must be sqrt(d_model)", lambda c: c.embedding_scale is not None
                        and abs(c.embedding_scale - c.d_model ** 0.5) < 1e-6 * c.d_model ** 0.5),
                       ("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias))
           + _plain_except("block", "attn_scale", "attn_softcap", "final_softcap", "embedding_scale", "layer_types"),
           ignore=_ROPE_CACHE),
    Family("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", NEOX_TENSORS, neox_to_llmkit, neox_from_llmkit,
           exportable=(("norm must be layernorm", lambda c: c.norm == "layernorm"),
                       ("mlp must be gelu or gelu_tanh", lambda c: c.mlp in ("gelu", "gelu_tanh")),
                       ("position must be rope", lambda c: c.position == "rope"),
                       ("block must be parallel or pre_norm", lambda c: c.block in ("parallel", "pre_norm")),
                       ("bias and qkv_bias must be true", lambda c: c.bias and c.qkv_bias),
                       ("n_kv_heads must equal n_heads", lambda c: c.n_kv_heads == c.n_heads),
                       ("head_dim must be d_model / n_heads", lambda c: c.head_dim * c.n_heads == c.d_model),
                       ("sliding_window must be unset", lambda c: c.sliding_window is None))
           + _plain_except("block", "rotary_dim"),
           ignore=_ROPE_CACHE + (r"\.attention\.bias$", r"\.attention\.masked_bias$")),
    Family("phi3", "phi3", "Phi3ForCausalLM", PHI3_TENSORS, phi3_to_llmkit, phi3_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias),
               ("head_dim must be d_model / n_heads", lambda c: c.head_dim * c.n_heads == c.d_model))
           + _plain_except("rotary_dim"),
           ignore=_ROPE_CACHE),
    Family("bloom", "bloom", "BloomForCausalLM", BLOOM_TENSORS, bloom_to_llmkit, bloom_from_llmkit,
           exportable=(("norm must be layernorm", lambda c: c.norm == "layernorm"),
                       ("mlp must be gelu_tanh", lambda c: c.mlp == "gelu_tanh"),
                       ("position must be alibi", lambda c: c.position == "alibi"),
                       ("embedding_norm must be true", lambda c: c.embedding_norm),
                       ("d_ff must be 4 * d_model", lambda c: c.d_ff == 4 * c.d_model),
                       ("bias and qkv_bias must be true", lambda c: c.bias and c.qkv_bias),
                       ("n_kv_heads must equal n_heads", lambda c: c.n_kv_heads == c.n_heads),
                       ("head_dim must be d_model / n_heads", lambda c: c.head_dim * c.n_heads == c.d_model),
                       ("sliding_window must be unset", lambda c: c.sliding_window is None))
           + _plain_except("embedding_norm"),
           # the first Bloom checkpoints name tensors without the "transformer." prefix
           key_fixups=((r"^(?!transformer\.|lm_head\.)", "transformer."),)),
    Family("mixtral", "mixtral", "MixtralForCausalLM", MIXTRAL_TENSORS, mixtral_to_llmkit, mixtral_from_llmkit,
           exportable=_LLAMA_SHAPE + (("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias),)
           + _moe_shape(0, False, norm_topk=True, dense_layers=False) + _plain_except("moe"),
           ignore=_ROPE_CACHE),
    Family("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_MOE_TENSORS, qwen2_moe_to_llmkit,
           qwen2_moe_from_llmkit,
           exportable=_LLAMA_SHAPE + (("bias must be false", lambda c: not c.bias),)
           + _moe_shape(1, True) + _plain_except("moe", "layer_types"),
           ignore=_ROPE_CACHE),
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE_TENSORS, qwen3_moe_to_llmkit,
           qwen3_moe_from_llmkit,
           exportable=_LLAMA_SHAPE + (("qk_norm must be 'head'", lambda c: c.qk_norm == "head"),
                                      ("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias),
                                      ("sliding_window must be unset", lambda c: c.sliding_window is None))
           + _moe_shape(0, False) + _plain_except("moe", "qk_norm"),
           ignore=_ROPE_CACHE),
    Family("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_V3_TENSORS, deepseek_v3_to_llmkit,
           deepseek_v3_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("attention must be 'mla'", lambda c: c.attention == "mla" and c.mla is not None),
               ("head_dim must be mla.qk_nope_head_dim + qk_rope_head_dim", lambda c: c.mla is not None
                and c.head_dim == c.mla["qk_nope_head_dim"] + c.mla["qk_rope_head_dim"]),
               # DeepSeek-V3's MLPs have no biases to write llmkit's `bias` into
               ("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias),
               ("sliding_window must be unset", lambda c: c.sliding_window is None),
               ("moe must be sigmoid-routed with score_bias, n_shared >= 1 (shared_d_ff = d_ff x n_shared), no "
                "shared_gate, every 1", _deepseek_v3_moe_exact),
               ("attn_scale must be DeepSeek's (1/sqrt(head_dim), times the yarn mscale_all_dim factor squared)",
                _deepseek_v3_scale_exact))
           + _plain_except("attention", "mla", "moe", "rotary_dim", "attn_scale"),
           # transformers drops DeepSeek-V3's multi-token-prediction layer (model.layers.61) on load
           ignore=_ROPE_CACHE + (r"^model\.layers\.61\.",), for_config=_deepseek_v3_rope_layout),
)}

# Which family to write a native llmkit model as, first match wins (mistral first when windowed).
EXPORT_ORDER = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gpt_neox", "phi3", "bloom", "mixtral",
                "qwen2_moe", "qwen3_moe", "deepseek_v3")

def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of(hf_config: dict[str, Any]) -> Family:
    """The family of an HF config.json, by `model_type` (what transformers reads); only a config
    without one falls back to `architectures`. A model_type llmkit does not support is refused,
    whatever `architectures` says: loading a bert checkpoint as llama would be a silent wrong answer."""
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if model_type == fam.model_type:
            return fam.for_config(fam, hf_config) if fam.for_config is not None else fam
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"config.json: architectures must be a list of class names such as [\"LlamaForCausalLM\"], "
                        f"got {archs!r}")
    for fam in FAMILIES.values():
        if fam.architecture in archs:
            if model_type is None:
                return fam
            raise UserError(f"config.json: unsupported model_type {model_type!r} (transformers loads by model_type, "
                            f"not by architectures {', '.join(archs)}): llmkit loads the families {supported()}; "
                            f"fix model_type if the checkpoint really is one of them")
    shown = ", ".join(archs) or "none listed"
    raise UserError(f"unsupported architecture {shown} (model_type {model_type!r}): "
                    f"llmkit loads the families {supported()}")


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown family {name!r}: choose one of {supported()}")
    return FAMILIES[name]


def family_for_export(cfg: ModelConfig, name: str | None = None) -> Family:
    """The named family (checked) or the first whose shape fits `cfg`; UserError says why not."""
    if name is not None:
        fam = family_named(name)
        problems = fam.export_problems(cfg)
        if problems:
            raise UserError(f"this model cannot be written as {name}: {'; '.join(problems)}: "
                            "pick another --family or leave it out to choose automatically")
        return fam
    order = ("mistral",) + tuple(n for n in EXPORT_ORDER if n != "mistral") if cfg.sliding_window else EXPORT_ORDER
    reasons = []
    for n in order:
        problems = FAMILIES[n].export_problems(cfg)
        if not problems:
            return FAMILIES[n]
        reasons.append(f"{n} ({', '.join(problems)})")
    raise UserError("this model matches no Hugging Face family llmkit writes: " + "; ".join(reasons)
                    + ": export it as an llmkit directory instead (--to llmkit)")
