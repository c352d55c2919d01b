"""Hugging Face model families as data: per family, a table of tensor names and transforms plus a
pair of config translations (HF config.json <-> `ModelConfig`).

A `Rule` says which HF tensor(s) make one llmkit tensor and how (copy, transpose, concatenate);
the same rule run backwards exports. `{i}` stands for the layer index. Adding a family that
reuses a known layout is a new `Family(...)` entry, not new code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.options import Rule as OptionRule
from llmkit.options import integer, number

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


Transform = tuple[Callable[[list[torch.Tensor], ModelConfig], torch.Tensor],
                  Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]]

TRANSFORMS: dict[str, Transform] = {
    "copy": (_copy_in, _copy_out),
    "transpose": (_transpose_in, _transpose_out),
    "qkv": (_concat_in, _split_out),
}


@dataclass(frozen=True)
class Rule:
    """One llmkit tensor <- one or more HF tensors through a named transform.

    zero_if_absent: the HF side may simply not have this tensor (a bias the HF config switched
    off while llmkit's single `bias` flag keeps it): a zero bias is the same function.
    """

    llmkit: str
    hf: tuple[str, ...]
    transform: str = "copy"
    zero_if_absent: bool = False

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.llmkit).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def hf_names(self, layer: str | None) -> list[str]:
        return [name.replace("{i}", layer) if layer is not None else name for name in self.hf]


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


# --- config translation ----------------------------------------------------------------------

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SCALING_KEYS = {"linear": ("factor",), "llama3": _LLAMA3_KEYS}  # what transformers requires of each type


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
    **{k: integer(1, 1024, optional=True) for k in ("num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
                                                     "num_key_value_heads", "head_dim")},
    **{k: integer(0, 1024, optional=True) for k in ("max_window_layers",)},
    **{k: integer(1, 1 << 22, optional=True) for k in ("sliding_window",)},
    **{k: number(above=0.0, max=1.0, optional=True) for k in ("rms_norm_eps", "layer_norm_epsilon")},
    **{k: number(above=0.0, max=1e12, optional=True) for k in ("rope_theta",)},
    **{k: OptionRule(str, optional=True) for k in ("hidden_act", "activation_function")},
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


def rope_from_hf(c: dict[str, Any], context_length: int | None = None) -> tuple[float, dict[str, Any] | None]:
    """(theta, llmkit rope_scaling) from either transformers v5 `rope_parameters` or v4
    `rope_theta` + `rope_scaling`. Keys transformers requires are required here too; the one it
    fills in (llama3's original_max_position_embeddings = the model's max_position_embeddings,
    `standardize_rope_params`) is filled the same way from `context_length`."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", _get(c, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    _require(kind in ROPE_TYPES,
             f"config.json: rope type {kind!r} is not supported: llmkit loads {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    if kind == "llama3" and context_length is not None:
        params.setdefault("original_max_position_embeddings", context_length)
    missing = _missing(params, kind)
    _require(not missing, f"config.json: {kind} rope scaling lacks {', '.join(missing)}: add them to rope_parameters "
                          "(transformers refuses the file too)")
    return theta, {"type": kind, **{k: params[k] for k in SCALING_KEYS[kind]}}


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


def _llama_like(c: dict[str, Any], defaults: dict[str, Any], qkv_bias: bool, bias: bool,
                sliding_window: int | None) -> ModelConfig:
    check_hf_fields(c)
    act = _get(c, "hidden_act", "silu")
    _require(act == "silu", f"config.json: hidden_act {act!r} is not supported for this family: only 'silu' (SwiGLU)")
    n_heads = _get(c, "num_attention_heads", defaults["num_attention_heads"])
    d = _get(c, "hidden_size", defaults["hidden_size"])
    context_length = _get(c, "max_position_embeddings", defaults["max_position_embeddings"])
    theta, scaling = rope_from_hf(c, context_length)
    return ModelConfig(
        vocab_size=_get(c, "vocab_size", defaults["vocab_size"]), context_length=context_length,
        n_layers=_get(c, "num_hidden_layers", defaults["num_hidden_layers"]), d_model=d, n_heads=n_heads,
        n_kv_heads=_get(c, "num_key_value_heads", n_heads), head_dim=_get(c, "head_dim", d // n_heads),
        mlp="swiglu", d_ff=_get(c, "intermediate_size", defaults["intermediate_size"]), norm="rmsnorm",
        norm_eps=_get(c, "rms_norm_eps", 1e-6), position="rope", rope_base=theta, rope_scaling=scaling,
        bias=bias, qkv_bias=qkv_bias, sliding_window=sliding_window,
        tie_embeddings=_get(c, "tie_word_embeddings", False))


def _llama_like_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, **rope_to_hf(cfg))


LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048)
QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=32768)
MISTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=131072)


def llama_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    # llmkit has one `bias` flag for o_proj and the MLP; a bias present on only one of them is
    # loaded with zeros on the other (Rule.zero_if_absent), which computes the same function.
    attention_bias, mlp_bias = bool(_get(c, "attention_bias", False)), bool(_get(c, "mlp_bias", False))
    return _llama_like(c, LLAMA_DEFAULTS, qkv_bias=attention_bias, bias=attention_bias or mlp_bias,
                       sliding_window=None)


def llama_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.bias)


def qwen2_window(c: dict[str, Any]) -> int | None:
    """Qwen2 windows only the layers from `max_window_layers` on; llmkit windows all or none."""
    n_layers = _get(c, "num_hidden_layers", QWEN2_DEFAULTS["num_hidden_layers"])
    if not c.get("use_sliding_window") or c.get("sliding_window") is None:
        return None
    types = c.get("layer_types") or ["sliding_attention" if i >= _get(c, "max_window_layers", 28)
                                     else "full_attention" for i in range(n_layers)]
    if all(t == "full_attention" for t in types):
        return None
    _require(all(t == "sliding_attention" for t in types),
             "config.json: Qwen2 with sliding windows on only some layers is not supported: "
             "set use_sliding_window=false or max_window_layers=0")
    return int(c["sliding_window"])


def qwen2_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    return _llama_like(c, QWEN2_DEFAULTS, qkv_bias=True, bias=False, sliding_window=qwen2_window(c))


def qwen2_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    window = cfg.sliding_window
    return dict(_llama_like_to_hf(cfg), use_sliding_window=window is not None, sliding_window=window,
                max_window_layers=0 if window is not None else cfg.n_layers)


def mistral_to_llmkit(c: dict[str, Any]) -> ModelConfig:
    window = c["sliding_window"] if "sliding_window" in c else 4096  # null in the file: no window
    return _llama_like(c, MISTRAL_DEFAULTS, qkv_bias=False, bias=False, sliding_window=window)


def mistral_from_llmkit(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_llama_like_to_hf(cfg), sliding_window=cfg.sliding_window)


# --- families --------------------------------------------------------------------------------

Check = tuple[str, Callable[[ModelConfig], bool]]

_LLAMA_SHAPE: tuple[Check, ...] = (
    ("norm must be rmsnorm", lambda c: c.norm == "rmsnorm"),
    ("mlp must be swiglu", lambda c: c.mlp == "swiglu"),
    ("position must be rope", lambda c: c.position == "rope"),
)


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

    def export_problems(self, cfg: ModelConfig) -> list[str]:
        return [why for why, ok in self.exportable if not ok(cfg)]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "gpt2", "GPT2LMHeadModel", GPT2_TENSORS, gpt2_to_llmkit, gpt2_from_llmkit,
           exportable=(("norm must be layernorm", lambda c: c.norm == "layernorm"),
                       ("position must be learned", lambda c: c.position == "learned"),
                       ("mlp must be gelu or gelu_tanh", lambda c: c.mlp in ("gelu", "gelu_tanh")),
                       ("bias and qkv_bias must be true", lambda c: c.bias and c.qkv_bias),
                       ("n_kv_heads must equal n_heads", lambda c: c.n_kv_heads == c.n_heads),
                       ("head_dim must be d_model / n_heads", lambda c: c.head_dim * c.n_heads == c.d_model),
                       ("sliding_window must be unset", lambda c: c.sliding_window is None)),
           ignore=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
           key_fixups=((r"^(?!transformer\.|lm_head\.)", "transformer."),)),
    Family("llama", "llama", "LlamaForCausalLM", LLAMA_TENSORS, llama_to_llmkit, llama_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("qkv_bias must equal bias", lambda c: c.qkv_bias == c.bias),
               ("sliding_window must be unset (use mistral)", lambda c: c.sliding_window is None)),
           ignore=(r"rotary_emb\.inv_freq$",)),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_TENSORS, qwen2_to_llmkit, qwen2_from_llmkit,
           exportable=_LLAMA_SHAPE + (
               ("qkv_bias must be true and bias false", lambda c: c.qkv_bias and not c.bias),),
           ignore=(r"rotary_emb\.inv_freq$",)),
    Family("mistral", "mistral", "MistralForCausalLM", LLAMA_TENSORS, mistral_to_llmkit, mistral_from_llmkit,
           exportable=_LLAMA_SHAPE + (("bias and qkv_bias must be false", lambda c: not c.bias and not c.qkv_bias),),
           ignore=(r"rotary_emb\.inv_freq$",)),
)}

# Which family to write a native llmkit model as, first match wins (mistral only when windowed).
EXPORT_ORDER = ("gpt2", "llama", "qwen2", "mistral")


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of(hf_config: dict[str, Any]) -> Family:
    """The family of an HF config.json, by `model_type` (what transformers reads); only a config
    without one falls back to `architectures`. A model_type llmkit does not support is refused,
    whatever `architectures` says: loading a bert checkpoint as llama would be a silent wrong answer."""
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if model_type == fam.model_type:
            return fam
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
