"""What the fast paths implement of each reference class, as `seams.Implements` declarations that
the paths in this package share. A class or config field that gains a name not listed here makes
every path that covers it step aside (and tests/accel/test_declarations.py fail)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from llmkit.nn.linear import Linear
from llmkit.nn.mlp import GeluMLP, GeluTanhMLP, SwiGLU
from llmkit.nn.norms import LayerNorm, RMSNorm
from llmkit.nn.seams import Implements, own_attributes

ANY = None


def plain(cls: type, *attributes: str) -> Callable[[Any], bool]:
    """A check for a submodule: exactly `cls`, holding only `attributes`, no hooks, no patched
    forward (an adapter, a quantized layer or an inspected module runs as itself)."""
    allowed = set(attributes)
    return lambda m: m is None or (type(m) is cls and own_attributes(m) <= allowed)


def is_false(value: Any) -> bool:
    return value is False


def is_none(value: Any) -> bool:
    return value is None


def is_true(value: Any) -> bool:
    return value is True


PLAIN_LINEAR = plain(Linear, "weight", "bias", "in_features", "out_features")
PLAIN_DROPOUT = plain(nn.Dropout, "p", "inplace")

# The norms whose arithmetic the native kernels implement: class -> whether it centres (LayerNorm).
NORMS: dict[type, bool] = {LayerNorm: True, RMSNorm: False}
NORM = {
    LayerNorm: Implements(attributes={"weight": ANY, "bias": ANY, "eps": ANY}),
    RMSNorm: Implements(attributes={"weight": ANY, "eps": ANY}),
}

# Config fields that shape no module a sublayer path covers (embeddings, depth, init): any value.
_OUTSIDE_SUBLAYERS = dict.fromkeys(("vocab_size", "context_length", "n_layers", "tie_embeddings", "init_std",
                                    "position", "rope_base", "rope_scaling", "block", "embedding_scale",
                                    "embedding_norm", "final_softcap", "mod"), ANY)
# Fields whose effect reaches a sublayer only through its modules' attributes and inputs, which the
# declarations below check (sizes, biases, norm kind and eps, dropout, the window's mask).
# The attention, feed-forward and norm kinds are module classes (a path covers exact classes only);
# qk_norm, attn_scale, attn_softcap, attn_gate and rotary_dim are attributes of the attention module or the shape
# of its rope input, checked below; layer types and sparse patterns reach it as the mask input.
_THROUGH_MODULES = dict.fromkeys(("d_model", "n_heads", "n_kv_heads", "head_dim", "mlp", "d_ff", "norm", "norm_eps",
                                  "bias", "qkv_bias", "dropout", "sliding_window", "attention", "mla", "moe",
                                  "qk_norm", "attn_scale", "attn_softcap", "rotary_dim", "attn_gate", "layer_types",
                                  "sparse"), ANY)
SUBLAYER_CONFIG = {**_OUTSIDE_SUBLAYERS, **_THROUGH_MODULES}


def attention(attributes: Mapping[str, Callable[[Any], bool] | None] | None = None,
              **inputs: Callable[[Any], bool] | None) -> Implements:
    """Causal self-attention as nn.attention.Attention computes it, with these inputs. `attributes`
    narrows the checks on the module's own attributes (e.g. {"scale": is_none} for a path that
    computes only the default scale); it names no attribute beyond the module's."""
    own = {"layer_idx": ANY, "n_heads": ANY, "n_kv_heads": ANY, "head_dim": ANY, "causal": is_true,
           "scale": ANY, "softcap": is_none, "qkv": PLAIN_LINEAR, "proj": PLAIN_LINEAR, "dropout": ANY,
           # query-key norms (qk_norm) and output gating (attn_gate): no path implements them, so
           # their presence declines
           "q_norm": is_none, "k_norm": is_none, "qk_norm_per_head": is_none, "out_gate": is_none,
           "resid_dropout": PLAIN_DROPOUT, "return_weights": is_false, "last_weights": ANY}
    if attributes and not attributes.keys() <= own.keys():
        raise ValueError(f"not attributes of Attention: {sorted(attributes.keys() - own.keys())}")
    return Implements(attributes={**own, **(attributes or {})}, inputs=inputs, config=SUBLAYER_CONFIG)


MLP_ATTRIBUTES = {"up": PLAIN_LINEAR, "down": PLAIN_LINEAR, "dropout": PLAIN_DROPOUT}
MLP = {
    GeluMLP: Implements(attributes=MLP_ATTRIBUTES, config=SUBLAYER_CONFIG),
    GeluTanhMLP: Implements(attributes=MLP_ATTRIBUTES, config=SUBLAYER_CONFIG),
    SwiGLU: Implements(attributes={**MLP_ATTRIBUTES, "gate": PLAIN_LINEAR}, config=SUBLAYER_CONFIG),
}
LINEAR = Implements(attributes={"weight": ANY, "bias": ANY, "in_features": ANY, "out_features": ANY},
                    config=SUBLAYER_CONFIG)


def norm_accepted(norm: nn.Module) -> bool | None:
    """Whether the native norm kernels compute this norm: True for LayerNorm, False for RMSNorm
    (the `center` flag), None where they do not (another class, hooks, more attributes)."""
    decl = NORM.get(type(norm))
    return NORMS[type(norm)] if decl is not None and decl.accepts(norm) else None
