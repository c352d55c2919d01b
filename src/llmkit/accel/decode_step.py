"""The decoder's one-token step as one native call (kernels/decode.c), and the weight layout for
decoding: the fast paths at `llmkit.models.decoder`'s DECODE_STEPS and DECODE_LAYOUTS seams.

The step is built once per KV cache from the model's own parameters (referenced, not copied) and
only where every module is exactly a class the C code implements, holding only what it implements
(`STEP`): a module replaced by an adapter or a quantized layer, a hook, attention weights asked for,
a non-causal or rescaled attention, active dropout, non-fp32 or non-CPU tensors all make it decline,
and the PyTorch modules run. Why: at batch 1 a GPT-2 token is ~150 module calls whose Python and
dispatch cost rivals the arithmetic; one call per token leaves only the weight streaming
(benchmarks/decode_speed.py: 2.0x transformers for GPT-2, 2.6-2.8x for the SmolLM shape).
"""
from __future__ import annotations

import torch
from torch import nn

from llmkit import kernels
from llmkit.accel import declared, hugepages
from llmkit.accel.declared import ANY, PLAIN_DROPOUT, PLAIN_LINEAR, is_none, plain
from llmkit.accel.guards import global_hooks_absent
from llmkit.models.decoder import Block, DecoderLM
from llmkit.nn import seams
from llmkit.nn.attention import Attention
from llmkit.nn.kv_cache import KVCache
from llmkit.nn.mlp import GeluMLP, GeluTanhMLP, SwiGLU
from llmkit.nn.norms import LayerNorm, RMSNorm
from llmkit.nn.positions import LearnedPositions, NoPositions, RotaryPositions, SinusoidalPositions

_MLP_CODES = {GeluMLP: "gelu", GeluTanhMLP: "gelu_tanh", SwiGLU: "swiglu"}  # decode.c's activations
_NORM_CODES = {LayerNorm: "layernorm", RMSNorm: "rmsnorm"}
_POSITION_KINDS = {LearnedPositions: "additive", SinusoidalPositions: "additive", RotaryPositions: "rotary",
                   NoPositions: None}
_EMBEDDING = plain(nn.Embedding, "weight", "num_embeddings", "embedding_dim", "padding_idx", "max_norm",
                   "norm_type", "scale_grad_by_freq", "sparse")


def _layer_list(m: nn.Module) -> bool:
    return type(m) is nn.ModuleList and not {"hooks", "forward"} & seams.own_attributes(m)


def _position_module(m: nn.Module) -> bool:
    return type(m) in _POSITION_KINDS and not {"hooks", "forward"} & seams.own_attributes(m)


# Every config field: the step reads sizes, the window and eps from it; kinds and biases are decided
# by the modules' classes and attributes below, never by the config alone. Of the switchboard's
# fields it implements only the defaults (one attention kind, one window for all layers, full RoPE,
# no caps, scales or extra norms): any other value makes it step aside.
_CONFIG = {name: ANY for name in ("vocab_size", "context_length", "n_layers", "d_model", "n_heads", "n_kv_heads",
                                  "head_dim", "mlp", "d_ff", "norm", "norm_eps", "position", "rope_base",
                                  "rope_scaling", "bias", "qkv_bias", "sliding_window", "dropout", "tie_embeddings",
                                  "init_std", "block", "sparse", "attn_scale")}
_CONFIG.update({"attention": lambda v: v == "mha", "embedding_norm": declared.is_false, "attn_gate": declared.is_false,
                **dict.fromkeys(("mla", "layer_types", "qk_norm", "attn_softcap", "final_softcap", "embedding_scale",
                                 "rotary_dim", "moe", "mod"), is_none)})
STEP: dict[type, seams.Implements] = {
    DecoderLM: seams.Implements(
        attributes={"cfg": ANY, "tok_emb": _EMBEDDING, "pos": _position_module, "drop": PLAIN_DROPOUT,
                    "blocks": _layer_list, "norm": ANY, "lm_head": PLAIN_LINEAR, "_decode_layout": ANY,
                    "emb_norm": is_none},  # a norm after the embeddings (Bloom): not in the C step
        config=_CONFIG),
    Block: seams.Implements(attributes={"norm1": ANY, "attn": ANY, "norm2": ANY, "mlp": ANY}, config=_CONFIG),
    # the C step computes the default scale only: `scale` is the module's attribute, not a call input
    Attention: declared.attention({"scale": is_none}, rope=ANY, mask=is_none, cache=ANY, bias=is_none),
    **declared.MLP, **declared.NORM,
}


def _covered(module: nn.Module) -> bool:
    decl = STEP.get(type(module))
    return decl is not None and decl.accepts(module)


def run(model: DecoderLM, idx: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
    """Logits [1, 1, vocab] for one new token of one sequence (its key and value enter the cache),
    or None where the native step does not apply."""
    offset = cache.pos
    if (type(cache) is not KVCache or idx.shape != (1, 1) or torch.is_grad_enabled() or offset >= cache.max_len
            or not global_hooks_absent()):
        return None
    step = _step_for(model, cache)
    if step is None:
        return None
    kind = _POSITION_KINDS[type(model.pos)]
    where = model.pos(torch.arange(offset, offset + 1, device=idx.device), offset + 1) if kind else None
    cos, sin = where if kind == "rotary" else (None, None)
    logits = step(int(idx), offset, where if kind == "additive" else None, cos, sin)
    cache.advance(1)
    return logits


def _step_for(model: DecoderLM, cache: KVCache) -> kernels.DecoderStep | None:
    """The cache's native step for this model (built on first use), or None if it cannot run."""
    # the key notices a new cache buffer (beam reorder) and moved weights (huge pages, .to(...))
    key = (cache.k.data_ptr(), model.tok_emb.weight.data_ptr())
    entry = cache.native
    if entry is None or entry[0] is not model or entry[1] != key:
        step = _build(model, cache) if kernels.available() else None
        entry = cache.native = (model, key, step)
    return entry[2]


def _fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype is torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _pointer_table(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None] | None:
    """The tensors detached for the C table, or None if any is not contiguous fp32 on CPU."""
    if not all(_fp32_cpu(t) for t in tensors.values()):
        return None
    return {k: None if t is None else t.detach() for k, t in tensors.items()}


def _dropout_active(model: DecoderLM) -> bool:
    """Any module would drop something in this call: decided by the modules (their training flag
    and rate, which may have been set after construction), never by the config alone."""
    return any(m.training and ((type(m) is nn.Dropout and m.p > 0) or (type(m) is Attention and m.dropout))
               for m in model.modules())


def _build(model: DecoderLM, cache: KVCache) -> kernels.DecoderStep | None:
    cfg = model.cfg
    if cache.k.shape[1] != 1 or not _fp32_cpu(cache.k) or _dropout_active(model):
        return None
    if not _covered(model.norm) or (_POSITION_KINDS[type(model.pos)] == "rotary" and cfg.head_dim % 2):
        return None
    # what runs is decided by the modules' classes (one kind across layers), never by the config alone
    norms, mlps, eps = {_NORM_CODES[type(model.norm)]}, set(), {model.norm.eps}
    layers = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if not all(_covered(m) for m in (block, block.norm1, attn, block.norm2, mlp)):
            return None
        norms |= {_NORM_CODES[type(block.norm1)], _NORM_CODES[type(block.norm2)]}
        eps |= {block.norm1.eps, block.norm2.eps}
        mlps.add(_MLP_CODES[type(mlp)])
        gate = getattr(mlp, "gate", None)
        layer = _pointer_table({
            "norm1_w": block.norm1.weight, "norm1_b": getattr(block.norm1, "bias", None),
            "qkv_w": attn.qkv.weight, "qkv_b": attn.qkv.bias, "proj_w": attn.proj.weight, "proj_b": attn.proj.bias,
            "norm2_w": block.norm2.weight, "norm2_b": getattr(block.norm2, "bias", None),
            "up_w": mlp.up.weight, "up_b": mlp.up.bias, "down_w": mlp.down.weight, "down_b": mlp.down.bias,
            "gate_w": None if gate is None else gate.weight, "gate_b": None if gate is None else gate.bias,
            "k_cache": cache.k[i, 0], "v_cache": cache.v[i, 0],
        })
        if layer is None:
            return None
        layers.append(layer)
    if len(norms) != 1 or len(mlps) != 1 or len(eps) != 1:
        return None
    top = _pointer_table({"tok_emb": model.tok_emb.weight, "norm_w": model.norm.weight,
                          "norm_b": getattr(model.norm, "bias", None), "head_w": model.lm_head.weight,
                          "head_b": model.lm_head.bias})
    if top is None or top["tok_emb"].shape[1] != cfg.d_model:
        return None
    sizes = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                 d_ff=model.blocks[0].mlp.up.out_features, max_len=cache.max_len, window=cfg.sliding_window or 0)
    return kernels.DecoderStep(sizes, norms.pop(), mlps.pop(), eps.pop(), top, layers)


def layout(model: nn.Module) -> None:
    """Place the weights for batch-1 decoding on CPU, once (DecoderLM.use_decode_layout).

    At batch 1 every linear layer is a matrix-vector product bound by reading its weight. With the
    native kernels the weights move into 2 MiB pages, which the kernel streams ~1.2x faster than
    4 KiB ones (accel/hugepages.py). Without them, every linear layer with more outputs than inputs
    is stored column-major, which MKL's sgemv streams about 1.25x faster than [out, in] (measured
    with benchmarks/decode_speed.py). Either way the values and the [out, in] shape stay the same,
    so forward results, saving (which makes tensors contiguous) and loading see no difference. A
    tied LM head moves with the embedding."""
    if model.tok_emb.weight.device.type != "cpu":
        return
    if kernels.available():
        hugepages.place_in_huge_pages(model)
        return
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w.shape[0] > w.shape[1] and w.stride(0) != 1:
            w.data = w.data.t().contiguous().t()


DECODE_STEP = seams.FastPath("whole-model decoding step (native)", run, STEP)
