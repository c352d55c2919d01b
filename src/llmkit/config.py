"""`ModelConfig`: the single source of truth for a transformer's shape (litgpt-style).

Every architectural variant is a field here, switched on by name from a registry in `llmkit.nn`;
a preset is just a named set of field values.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llmkit.errors import UserError
from llmkit.options import Rule, integer, number
from llmkit.nn.blocks import ATTENTIONS, BLOCKS, LAYER_TYPES
from llmkit.nn.mlp import MLPS
from llmkit.nn.norms import NORMS
from llmkit.nn.positions import POSITIONS, ROPE_SCALING_KEYS, ROPE_SCALING_OPTIONAL_KEYS, ROPE_SCALINGS
from llmkit.utils import atomic_write_text, read_json_object


# What each field may hold, checked before anything is derived or built: a config.json value of the
# wrong type, NaN, or a size no machine holds is one line, not a TypeError, a hang building 2**31
# layers or an allocation of terabytes. The bounds are far above every published model.
FIELD_RULES: dict[str, Rule] = {
    "vocab_size": integer(1, 1 << 24), "context_length": integer(1, 1 << 22), "n_layers": integer(1, 1024),
    "d_model": integer(1, 1 << 16), "n_heads": integer(1, 1024), "n_kv_heads": integer(1, 1024, optional=True),
    "head_dim": integer(1, 1024, optional=True), "d_ff": integer(1, 1 << 20, optional=True),
    "mlp": Rule(str), "norm": Rule(str), "position": Rule(str), "norm_eps": number(above=0.0, max=1.0),
    "rope_base": number(above=0.0, max=1e12), "bias": Rule(bool), "qkv_bias": Rule(bool, optional=True),
    "sliding_window": integer(1, 1 << 22, optional=True), "dropout": number(0.0, below=1.0),
    "tie_embeddings": Rule(bool), "init_std": number(0.0, max=1e3),
    "attention": Rule(str), "block": Rule(str), "qk_norm": Rule(str, choices=("head", "full"), optional=True),
    "attn_scale": number(above=0.0, max=1e3, optional=True), "attn_softcap": number(above=0.0, max=1e6, optional=True),
    "final_softcap": number(above=0.0, max=1e6, optional=True),
    "embedding_scale": number(above=0.0, max=1e6, optional=True), "embedding_norm": Rule(bool),
    "rotary_dim": integer(2, 1024, optional=True), "attn_gate": Rule(bool),
}
# The variants that carry settings of their own are one field holding an object (a dict in
# config.json and recipes): key -> (rule, default). A key missing from the object takes the default;
# an unknown key is refused. The module that implements the variant reads the completed object.
SUBCONFIGS: dict[str, dict[str, tuple[Rule, Any]]] = {
    # Mixture-of-Experts feed-forward (llmkit.nn.moe)
    "moe": {
        "n_experts": (integer(1, 1 << 16), 8), "top_k": (integer(1, 1 << 16), 2),
        "d_ff": (integer(1, 1 << 20, optional=True), None),  # each expert's hidden size; None: the model's d_ff
        "n_shared": (integer(0, 1 << 10), 0),  # always-on shared experts (DeepSeekMoE, Qwen2-MoE)
        "shared_d_ff": (integer(1, 1 << 20, optional=True), None),  # None: d_ff * n_shared
        "shared_gate": (Rule(bool), False),  # a sigmoid gate on the shared expert's output (Qwen2-MoE)
        "router": (Rule(str, choices=("softmax", "sigmoid")), "softmax"),  # sigmoid: DeepSeek-V3
        "norm_topk": (Rule(bool), True),  # renormalise the top-k gate weights to sum to 1
        "routed_scale": (number(above=0.0, max=1e6), 1.0),  # DeepSeek-V3 routed_scaling_factor
        "n_groups": (integer(1, 1 << 10), 1), "topk_groups": (integer(1, 1 << 10), 1),  # DeepSeek-V3 group-limited routing
        "score_bias": (Rule(bool), False),  # DeepSeek-V3 e_score_correction_bias (selection only)
        "capacity_factor": (number(above=0.0, max=1e6, optional=True), None),  # Switch: drop tokens past capacity
        "aux_loss_coef": (number(0.0, max=1e6), 0.01), "z_loss_coef": (number(0.0, max=1e6), 0.0),
        "first_dense": (integer(0, 1024), 0),  # the first N layers keep a dense MLP (DeepSeek first_k_dense_replace)
        "every": (integer(1, 1024), 1),  # an MoE layer every N layers (Qwen2-MoE decoder_sparse_step)
    },
    # Multi-head latent attention (llmkit.nn.mla), DeepSeek-V2
    "mla": {
        "q_lora_rank": (integer(1, 1 << 16, optional=True), None),  # None: a full-rank query projection
        "kv_lora_rank": (integer(1, 1 << 16), 512),
        "qk_nope_head_dim": (integer(1, 1024), 128), "qk_rope_head_dim": (integer(2, 1024), 64),
        "v_head_dim": (integer(1, 1024), 128),
    },
    # Mixture-of-Depths (llmkit.nn.depth_routing), Raposo et al. 2024
    "mod": {
        "capacity": (number(above=0.0, max=1.0), 0.125),  # the share of tokens a routed block processes
        "every": (integer(1, 1024), 2),  # route every N-th block (the others process every token)
        "aux_loss_coef": (number(0.0, max=1e6), 0.01),  # the causal predictor's loss
    },
    # Sparse attention patterns for layers of type "sparse" (llmkit.nn.masks)
    "sparse": {
        "pattern": (Rule(str, choices=("longformer", "block")), "longformer"),
        "window": (integer(1, 1 << 22), 256),  # local window (longformer: tokens; causal)
        "global_tokens": (integer(0, 1 << 22), 1),  # the first N positions are seen by and see every token
        "block_size": (integer(1, 1 << 16), 64),  # block pattern: block edge in tokens
        "local_blocks": (integer(0, 1 << 16), 1),  # block pattern: earlier blocks each block sees
        "global_blocks": (integer(0, 1 << 16), 1),  # block pattern: leading blocks everyone sees
    },
}


class _FactorList:
    """A rope_scaling rule for LongRoPE's per-frequency factors: a list of finite numbers > 0."""

    def check(self, value: Any, name: str) -> list[float]:
        if (not isinstance(value, (list, tuple)) or not value
                or not all(_is_number(v) and 0 < v <= 1e6 for v in value)):
            raise UserError(f"{name} must be a list of finite numbers > 0 (one per rotated channel pair), "
                            f"got {type(value).__name__} {value!r}")
        return [float(v) for v in value]


# Each rope_scaling key's values (llmkit.nn.positions.ROPE_SCALING_KEYS says which type takes which).
ROPE_SCALING_RULES: dict[str, Any] = {
    "factor": number(above=0.0, max=1e6), "low_freq_factor": number(above=0.0, max=1e6),
    "high_freq_factor": number(above=0.0, max=1e6), "original_max_position_embeddings": integer(1, 1 << 22),
    "attention_factor": number(above=0.0, max=1e6, optional=True),  # yarn, longrope: None = the paper's
    "beta_fast": number(above=0.0, max=1e6, optional=True), "beta_slow": number(above=0.0, max=1e6, optional=True),
    "mscale": number(0.0, max=1e6, optional=True), "mscale_all_dim": number(0.0, max=1e6, optional=True),
    "truncate": Rule(bool), "short_factor": _FactorList(), "long_factor": _FactorList(),
}


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer. `None` fields are derived in `__post_init__`."""

    vocab_size: int = 50304
    context_length: int = 1024
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None  # < n_heads: grouped-query; 1: multi-query; None: = n_heads
    head_dim: int | None = None  # None: d_model // n_heads
    mlp: str = "gelu"  # a key of llmkit.nn.mlp.MLPS
    d_ff: int | None = None  # MLP hidden size; None: 4*d_model (gelu) or 8/3*d_model rounded (swiglu)
    norm: str = "layernorm"  # a key of llmkit.nn.norms.NORMS
    norm_eps: float = 1e-5
    position: str = "learned"  # a key of llmkit.nn.positions.POSITIONS
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # context extension (e.g. {"type": "llama3", ...})
    bias: bool = True  # biases on linear layers and norms
    qkv_bias: bool | None = None  # None: same as bias (Qwen2: True with bias False)
    sliding_window: int | None = None  # attend only to the last N positions (Mistral)
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # --- the switchboard (issue 13): each a registry key or an object of settings -------------
    attention: str = "mha"  # a key of llmkit.nn.blocks.ATTENTIONS: mha (with n_kv_heads: GQA/MQA), mla
    mla: dict[str, Any] | None = None  # multi-head latent attention's ranks (SUBCONFIGS["mla"])
    block: str = "pre_norm"  # a key of llmkit.nn.blocks.BLOCKS: pre_norm, post_norm, sandwich, parallel, ...
    layer_types: list[str] | None = None  # per layer: full, sliding or sparse; None: all sliding if
    # sliding_window is set, else all full
    sparse: dict[str, Any] | None = None  # the pattern of "sparse" layers (SUBCONFIGS["sparse"])
    qk_norm: str | None = None  # RMSNorm on queries and keys: per head (Qwen3) or over all heads (OLMo 2)
    attn_scale: float | None = None  # score scale; None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2)
    embedding_scale: float | None = None  # token embeddings times this (Gemma: sqrt(d_model))
    embedding_norm: bool = False  # a norm right after the embeddings (Bloom)
    rotary_dim: int | None = None  # RoPE on the first N channels of each head (GPT-NeoX, Phi); None: all
    attn_gate: bool = False  # attention output times sigmoid(W_g x), per channel (gated attention, Qwen3-Next)
    moe: dict[str, Any] | None = None  # Mixture-of-Experts feed-forward (SUBCONFIGS["moe"])
    mod: dict[str, Any] | None = None  # Mixture-of-Depths routing (SUBCONFIGS["mod"])

    def __post_init__(self) -> None:
        self._check_types()
        self._complete_subconfigs()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = _default_d_ff(self.mlp, self.d_model)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        self.validate()

    def _check_types(self) -> None:
        """Each field against FIELD_RULES (typed values stored back: a float field given 1 holds 1.0)."""
        for name, rule in FIELD_RULES.items():
            setattr(self, name, rule.check(getattr(self, name), f"config: {name}"))
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise UserError(f"config: rope_scaling must be an object like {{\"type\": \"linear\", \"factor\": 2.0}} "
                                f"or null, got {type(self.rope_scaling).__name__} {self.rope_scaling!r}")
            self.rope_scaling = dict(self.rope_scaling)
            for key, rule in ROPE_SCALING_RULES.items():
                if key in self.rope_scaling:
                    self.rope_scaling[key] = rule.check(self.rope_scaling[key], f"config: rope_scaling.{key}")

    def _complete_subconfigs(self) -> None:
        """Each settings object checked key by key and completed with its defaults."""
        for name, table in SUBCONFIGS.items():
            given = getattr(self, name)
            if given is None:
                continue
            if not isinstance(given, dict):
                example = ", ".join(f'"{k}": {json.dumps(d)}' for k, (_, d) in list(table.items())[:2])
                raise UserError(f"config: {name} must be an object like {{{example}}} or null, "
                                f"got {type(given).__name__} {given!r}")
            unknown = sorted(set(given) - set(table))
            if unknown:
                raise UserError(f"config: unknown {name} keys {unknown}: valid keys are {sorted(table)}")
            setattr(self, name, {key: rule.check(given.get(key, default), f"config: {name}.{key}")
                                 for key, (rule, default) in table.items()})
        if self.layer_types is not None:
            if not isinstance(self.layer_types, (list, tuple)) or not all(isinstance(t, str) for t in self.layer_types):
                raise UserError(f"config: layer_types must be a list of {', '.join(LAYER_TYPES)} (one per layer) "
                                f"or null, got {self.layer_types!r}")
            self.layer_types = list(self.layer_types)

    def layer_type(self, i: int) -> str:
        """What layer i attends to: full (causal), sliding (the last sliding_window positions) or sparse."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "sliding" if self.sliding_window is not None else "full"

    def validate(self) -> None:
        """Reject inconsistent shapes with a message that says what to change."""
        positive = ("vocab_size", "context_length", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"config: {name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            raise UserError(
                f"config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "change one of them or set head_dim explicitly"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(
                f"config: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}: "
                f"pick n_kv_heads from {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}"
            )
        for name, kinds in (("mlp", MLPS), ("norm", NORMS), ("position", POSITIONS), ("attention", ATTENTIONS),
                            ("block", BLOCKS)):
            if getattr(self, name) not in kinds:
                raise UserError(f"config: unknown {name} {getattr(self, name)!r}: choose one of {', '.join(kinds)}")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"config: RoPE needs an even head_dim, got {self.head_dim}: change d_model or n_heads")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise UserError(f"config: rotary_dim must be even and at most head_dim={self.head_dim}, got {self.rotary_dim}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise UserError(f"config: layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}: "
                                "give one per layer")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise UserError(f"config: unknown layer_types {bad}: choose from {', '.join(LAYER_TYPES)}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise UserError("config: layer_types has sliding layers but sliding_window is null: set the window")
            if "sparse" in self.layer_types and self.sparse is None:
                self.sparse = {key: default for key, (_, default) in SUBCONFIGS["sparse"].items()}
        if self.attention == "mla" and self.mla is None:
            raise UserError("config: attention 'mla' needs its ranks: set mla, e.g. {\"kv_lora_rank\": 512, "
                            "\"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64, \"v_head_dim\": 128}")
        if self.moe is not None and self.moe["top_k"] > self.moe["n_experts"]:
            raise UserError(f"config: moe.top_k={self.moe['top_k']} exceeds moe.n_experts={self.moe['n_experts']}")
        if self.moe is not None and (self.moe["n_experts"] % self.moe["n_groups"]
                                     or self.moe["topk_groups"] > self.moe["n_groups"]):
            raise UserError(f"config: moe.n_groups={self.moe['n_groups']} must divide n_experts="
                            f"{self.moe['n_experts']} and be >= topk_groups={self.moe['topk_groups']}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise UserError(f"config: sinusoidal positions need an even d_model, got {self.d_model}")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALINGS:
                raise UserError(f"config: unknown rope_scaling type {kind!r}: choose one of {', '.join(ROPE_SCALINGS)}")
            self._check_rope_scaling(kind)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise UserError(f"config: norm_eps must be > 0, got {self.norm_eps}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UserError(f"config: sliding_window must be a positive integer or null, got {self.sliding_window}")

    def _check_rope_scaling(self, kind: str) -> None:
        """The keys a scaling type requires are there, no other key is, and the values fit the head."""
        required, optional = ROPE_SCALING_KEYS[kind], ROPE_SCALING_OPTIONAL_KEYS.get(kind, ())
        missing = [name for name in required if self.rope_scaling.get(name) is None]
        if missing:
            raise UserError(f"config: rope_scaling {kind!r} needs {', '.join(missing)} "
                            f"(got {self.rope_scaling}): copy them from the model's original config")
        unknown = sorted(set(self.rope_scaling) - {"type", "rope_type", *required, *optional})
        if unknown:
            raise UserError(f"config: rope_scaling {kind!r} takes no {', '.join(unknown)}: its keys are "
                            f"{', '.join((*required, *optional))}")
        dim = self.rotary_dim or self.head_dim
        if kind in ("dynamic", "ntk") and dim <= 2:
            raise UserError(f"config: rope_scaling {kind!r} changes the base by an exponent d / (d - 2): it needs "
                            f"more than 2 rotated channels, got {dim}")
        for key in ("short_factor", "long_factor"):
            if key in self.rope_scaling and len(self.rope_scaling[key]) != dim // 2:
                raise UserError(f"config: rope_scaling.{key} has {len(self.rope_scaling[key])} factors: give one per "
                                f"rotated channel pair, {dim // 2} (rotary_dim or head_dim / 2)")

    @property
    def n_query_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    # --- serialisation -------------------------------------------------------------------------
    # config.json's "architecture" (llmkit.models.kinds) and how messages name this config's keys;
    # a kind whose config subclasses this one sets both and `presets`
    ARCHITECTURE: ClassVar[str] = "decoder"
    KEY_LABEL: ClassVar[str] = ""

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """This config class's named shapes (`--preset NAME`)."""
        return PRESETS

    def to_dict(self) -> dict[str, Any]:
        """config.json's contents: llmkit's marker, the architecture (see llmkit.models.kinds), the fields."""
        return {"model_type": "llmkit", "architecture": self.ARCHITECTURE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config of this class from config.json's contents (no `architecture`: an old run, this
        class's architecture)."""
        architecture = d.get("architecture", cls.ARCHITECTURE)
        if architecture != cls.ARCHITECTURE:
            article = "an" if cls.ARCHITECTURE[:1] in "aeiou" else "a"
            raise UserError(f"config: architecture {architecture!r} is not {article} {cls.ARCHITECTURE}: load it with "
                            "llmkit.models.load_config (or llmkit.load), which picks each architecture's config")
        d = {k: v for k, v in d.items() if k not in ("model_type", "architecture")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"config: unknown {cls.KEY_LABEL}keys {unknown}: valid keys are {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        d = read_json_object(path)
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        presets = cls.presets()
        if name not in presets:
            raise UserError(f"unknown {cls.KEY_LABEL}preset {name!r}: choose one of {', '.join(sorted(presets))}")
        return cls.from_dict({**presets[name], **overrides})


def _default_d_ff(mlp: str, d_model: int) -> int:
    if mlp in ("swiglu", "geglu"):  # gated: keep the parameter count of a 4x GELU MLP (LLaMA paper), rounded to 64
        return int(-(-(8 * d_model // 3) // 64) * 64)
    return 4 * d_model


PRESETS: dict[str, dict[str, Any]] = {
    # A few-thousand-parameter model for tests.
    "tiny": dict(vocab_size=256, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                 mlp="swiglu", norm="rmsnorm", position="rope", bias=False),
    # nanoGPT's CPU "baby GPT" for the character-level Shakespeare run.
    "baby-gpt": dict(vocab_size=65, context_length=64, n_layers=4, d_model=128, n_heads=4,
                     mlp="gelu", norm="layernorm", position="learned", bias=True),
    # GPT-2 small (124M).
    "gpt2": dict(vocab_size=50257, context_length=1024, n_layers=12, d_model=768, n_heads=12,
                 mlp="gelu_tanh", norm="layernorm", position="learned", bias=True, tie_embeddings=True),
    # SmolLM-135M shape (a Llama): GQA 9/3, SwiGLU, RMSNorm, RoPE.
    "llama-small": dict(vocab_size=49152, context_length=2048, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3,
                        d_ff=1536, mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, position="rope",
                        rope_base=10000.0, bias=False, tie_embeddings=True, init_std=0.02),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
