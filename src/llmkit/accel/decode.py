"""Decoding-time kernels at the block's seams: a few rows of fp32 CPU input without autograd (one
new token of a few sequences, beams, a short draft) through the native matrix-vector product
(kernels/gemv.c), RMSNorm and RoPE on a single row, and single-query attention over the KV cache.

Why: at a few rows every linear layer reads its whole weight for little arithmetic, and MKL's sgemv
reaches about one core's bandwidth where the native kernel reads with every core; the small
operations between them cost more in PyTorch's dispatch than in arithmetic (benchmarks/decode_speed.py).
Batch 1 usually takes the whole-model step instead (accel/decode_step.py); these serve where it
declines. Same arithmetic as the modules, summed in another order (float rounding apart).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit import kernels
from llmkit.accel import declared
from llmkit.accel.guards import fp32_cpu_inference, global_hooks_absent
from llmkit.nn.attention import attend
from llmkit.nn.mlp import SwiGLU
from llmkit.nn.norms import RMSNorm
from llmkit.nn.positions import apply_rotary


def _few_rows(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    return (x.dim() >= 2 and 0 < x.numel() <= kernels.MAX_ROWS * x.shape[-1] and global_hooks_absent()
            and fp32_cpu_inference(x, *tensors))


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    y = kernels.linear(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias) if y is None else y


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = kernels.rms_norm(x, norm.weight, norm.eps) if type(norm) is RMSNorm else None
    return norm(x) if y is None else y


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    y = kernels.rope(x, cos, sin)  # a single position only
    return apply_rotary(x, cos, sin) if y is None else y


def attention_residual(attn: nn.Module, norm: nn.Module, x: torch.Tensor, rope=None, mask=None,
                       cache=None, bias=None) -> torch.Tensor | None:
    """x + attn(norm(x), rope, mask, cache) for a few rows at decoding time, or None (also for an
    additive bias or partial rotary angles)."""
    if (not _few_rows(x, attn.qkv.weight) or declared.norm_accepted(norm) is None or (attn.training and attn.dropout)
            or bias is not None or (rope is not None and rope[0].shape[-1] != attn.head_dim)):
        return None
    B, T, _ = x.shape
    q, k, v = attn.split_heads(linear(_norm(norm, x), attn.qkv))
    if rope is not None:
        q, k = _rope(q, *rope), _rope(k, *rope)
    if cache is not None:
        k, v = cache.update(attn.layer_idx, k, v)
    y, _ = attend(q, k, v, mask=mask, is_causal=mask is None and T > 1, scale=attn.scale)
    out = linear(y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim), attn.proj)
    return x + (attn.resid_dropout(out) if attn.training else out)


def mlp_residual(mlp: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x + mlp(norm(x)) for a few rows at decoding time, or None."""
    if not _few_rows(x, mlp.up.weight) or declared.norm_accepted(norm) is None:
        return None
    h = _norm(norm, x)
    if type(mlp) is SwiGLU:
        a = F.silu(linear(h, mlp.gate)) * linear(h, mlp.up)
    else:
        a = F.gelu(linear(h, mlp.up), approximate=mlp.approximate)
    return x + mlp.dropout(linear(a, mlp.down))


def head(norm: nn.Module, lm_head: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """lm_head(norm(x)) for a few rows at decoding time, or None."""
    if not _few_rows(x, lm_head.weight) or declared.norm_accepted(norm) is None:
        return None
    return linear(_norm(norm, x), lm_head)


def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, is_causal: bool, scale: float | None, bias,
         dropout: float, softcap: float | None, return_weights: bool) -> torch.Tensor | None:
    """The attention core for one query of one sequence over the KV cache (every key visible): the
    native kernel, y as [1, H, 1, d]; None otherwise."""
    if (mask is not None or bias is not None or dropout or softcap is not None or return_weights or q.dim() != 4
            or q.shape[2] != 1
            or not fp32_cpu_inference(q, k, v)):
        return None
    d = q.shape[-1]
    y = kernels.decode_attention(q, k, v, d ** -0.5 if scale is None else float(scale))
    return None if y is None else y.view(1, q.shape[1], 1, d)
