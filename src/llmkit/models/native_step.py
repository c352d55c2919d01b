"""The decoder's batch-1 decoding step as one native call (llmkit/kernels/decode.c).

`DecoderLM.forward` asks `native_step(model, cache)` for a step when it runs one new token of one
sequence through a KV cache without grad. The step is built once per cache from the model's own
parameters (referenced, not copied) and is None whenever the model holds anything the C code does
not implement: a module replaced by an adapter or a quantized layer, a forward hook (inspection
tools must see every module run), attention weights requested, active dropout, non-fp32 or non-CPU
tensors. Then the PyTorch modules run as usual, so the native step can only change speed.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from llmkit import kernels
from llmkit.nn.attention import Attention
from llmkit.nn.kv_cache import KVCache
from llmkit.nn.linear import Linear
from llmkit.nn.mlp import GeluMLP, GeluTanhMLP, SwiGLU
from llmkit.nn.norms import LayerNorm, RMSNorm

_MLP_KINDS = {GeluMLP: "gelu", GeluTanhMLP: "gelu_tanh", SwiGLU: "swiglu"}
_NORM_KINDS = {LayerNorm: "layernorm", RMSNorm: "rmsnorm"}


def native_step(model: nn.Module, cache: KVCache) -> kernels.DecoderStep | None:
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


def _hooked(model: nn.Module) -> bool:
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _build(model: nn.Module, cache: KVCache) -> kernels.DecoderStep | None:
    cfg = model.cfg
    if (model.training and cfg.dropout > 0) or cache.k.shape[1] != 1 or not _fp32_cpu(cache.k) or _hooked(model):
        return None
    # what runs is decided by the modules' classes (and must be one kind across layers), never by
    # the config alone: a module swapped after construction must not be silently skipped
    norms, mlps, eps = set(), set(), set()
    layers = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention or attn.return_weights or type(mlp) not in _MLP_KINDS:
            return None
        linears = [attn.qkv, attn.proj, mlp.up, mlp.down] + ([mlp.gate] if type(mlp) is SwiGLU else [])
        if any(type(m) is not Linear for m in linears):
            return None
        norms |= {_NORM_KINDS.get(type(block.norm1)), _NORM_KINDS.get(type(block.norm2))}
        eps |= {block.norm1.eps, block.norm2.eps}
        mlps.add(_MLP_KINDS[type(mlp)])
        layer = _pointer_table({
            "norm1_w": block.norm1.weight, "norm1_b": getattr(block.norm1, "bias", None),
            "qkv_w": attn.qkv.weight, "qkv_b": attn.qkv.bias, "proj_w": attn.proj.weight, "proj_b": attn.proj.bias,
            "norm2_w": block.norm2.weight, "norm2_b": getattr(block.norm2, "bias", None),
            "up_w": mlp.up.weight, "up_b": mlp.up.bias, "down_w": mlp.down.weight, "down_b": mlp.down.bias,
            "gate_w": getattr(getattr(mlp, "gate", None), "weight", None),
            "gate_b": getattr(getattr(mlp, "gate", None), "bias", None),
            "k_cache": cache.k[i, 0], "v_cache": cache.v[i, 0],
        })
        if layer is None:
            return None
        layers.append(layer)
    norms.add(_NORM_KINDS.get(type(model.norm)))
    eps.add(model.norm.eps)
    if (len(norms) != 1 or None in norms or len(mlps) != 1 or len(eps) != 1 or type(model.lm_head) is not Linear
            or (model.pos.rotary and cfg.head_dim % 2) or type(model.tok_emb) is not nn.Embedding):
        return None
    top = _pointer_table({"tok_emb": model.tok_emb.weight, "norm_w": model.norm.weight,
                          "norm_b": getattr(model.norm, "bias", None), "head_w": model.lm_head.weight,
                          "head_b": model.lm_head.bias})
    if top is None or top["tok_emb"].shape[1] != cfg.d_model:
        return None
    sizes = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                 d_ff=model.blocks[0].mlp.up.out_features, max_len=cache.max_len, window=cfg.sliding_window or 0)
    return kernels.DecoderStep(sizes, norms.pop(), mlps.pop(), eps.pop(), top, layers)
