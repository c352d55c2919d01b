"""Causal self-attention for CPU training through the native kernel (kernels/attention.c): as the
attention core (`core`, for q, k, v the module computed) and as a whole pre-norm sublayer
(`residual`: norm, fused q/k/v projection, RoPE, attention, output projection and the residual add
in one autograd Function with the backward by hand).

Why: for short sequences PyTorch's flash attention spends most of its time on per-block calls; the
kernel runs each (sequence, head) as one register-tiled problem, and the folded sublayer saves the
graph nodes, views and separate norm pass between the pieces (~0.1 ms a layer at nanoGPT's CPU
shape; benchmarks/train_throughput.py). Long sequences (P is T^2 floats per head), masks, biases,
dropout, cross-attention and non-causal attention go to SDPA.
"""
from __future__ import annotations

import torch
from torch import nn

from llmkit.accel.fused import input_grads, linear_into, normed_rows, prenorm, training_ready
from llmkit.accel.guards import fp32_cpu_autograd
from llmkit.kernels import _empty, train_attention as native
from llmkit.nn.positions import apply_rotary, rotate_half


def _scale(scale: float | None, d: int) -> float:
    return d ** -0.5 if scale is None else float(scale)


def _packed(qkv: torch.Tensor, H: int, KV: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, T, H, d], k, v [B, T, KV, d] as views of a packed [B, T, (H + 2 KV) d] tensor."""
    B, T, width = qkv.shape
    heads = qkv.view(B, T, H + 2 * KV, width // (H + 2 * KV))
    return heads[:, :, :H], heads[:, :, H:H + KV], heads[:, :, H + KV:]


class _CoreAttention(torch.autograd.Function):
    """y [B, H, T, d] = causal attention of q [B, H, T, d], k, v [B, KV, T, d] (views whose last dim
    is contiguous); the backward writes dq, dk, dv into one packed buffer."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y, probs = native.forward(qt, kt, vt, scale)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return y.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        q, k, v, probs = ctx.saved_tensors
        B, H, T, d = q.shape
        KV = k.shape[1]
        grad = _empty(B, T, (H + 2 * KV) * d)
        dq, dk, dv = _packed(grad, H, KV)
        native.backward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), probs, dy.transpose(1, 2),
                        ctx.scale, dq, dk, dv)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, is_causal: bool, scale: float | None, bias,
         dropout: float, softcap: float | None, return_weights: bool) -> torch.Tensor | None:
    """The attention core (nn.attention.attend) for causal self-attention in training: no mask,
    bias, dropout or weights; queries and keys of one length; autograd on; fp32 CPU; a shape the
    kernel takes. None otherwise."""
    if (not is_causal or mask is not None or bias is not None or dropout or softcap is not None or return_weights
            or q.dim() != 4
            or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or q.shape[0] != k.shape[0]
            or not (q.requires_grad or k.requires_grad or v.requires_grad) or not fp32_cpu_autograd(q, k, v)
            or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1):
        return None
    B, H, T, d = q.shape
    if not native.fits(B, T, H, k.shape[1], d):
        return None
    return _CoreAttention.apply(q, k, v, _scale(scale, d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (positions.apply_rotary) on x [B, T, heads, d], cos, sin [B or 1, 1, T, d]."""
    return apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)


def _rotate_back(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through `_rotate`, its transpose: g cos - rotate_half(g sin)."""
    g = g.transpose(1, 2)
    return (g * cos - rotate_half(g * sin)).transpose(1, 2)


class _PrenormAttention(torch.autograd.Function):
    """proj(attention(qkv(norm(x)))) (+ x) for a pre-norm block's attention sublayer: the native
    norm, both projections, RoPE in place in the packed qkv and the native attention, with the
    backward by hand."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, w_qkv, b_qkv, w_proj, b_proj, H, KV, scale, residual, rope):
        B, T, C = x.shape
        xn, norm_saved = normed_rows(x, norm_w, normed)
        qkv = linear_into(xn, w_qkv, b_qkv, (B, T))
        q, k, v = _packed(qkv, H, KV)
        if rope is not None:  # rotate the queries and keys in place: the kernel reads them packed
            qk = qkv.view(B, T, H + 2 * KV, -1)[:, :, :H + KV]
            qk.copy_(_rotate(qk, *rope))
        y, probs = native.forward(q, k, v, scale)
        y2 = y.view(B * T, -1)
        out = linear_into(y2, w_proj, b_proj, (B, T))
        ctx.save_for_backward(xn, qkv, probs, y2, w_qkv, w_proj, *norm_saved)
        ctx.heads, ctx.scale, ctx.residual, ctx.rope = (H, KV), scale, residual, rope
        return out.add_(x) if residual else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xn, qkv, probs, y2, w_qkv, w_proj, *norm_saved = ctx.saved_tensors
        H, KV = ctx.heads
        need = ctx.needs_input_grad  # x, norm_w, norm_b, normed, w_qkv, b_qkv, w_proj, b_proj
        B, T, C = grad.shape
        g = grad.reshape(B * T, C)
        d_w_proj = g.t() @ y2 if need[6] else None
        d_b_proj = g.sum(0) if need[7] else None
        dy = (g @ w_proj).view(B, T, H, -1)
        dqkv = _empty(*qkv.shape)
        native.backward(*_packed(qkv, H, KV), probs, dy, ctx.scale, *_packed(dqkv, H, KV))
        if ctx.rope is not None:  # back through the rotation (its transpose)
            dqk = dqkv.view(B, T, H + 2 * KV, -1)[:, :, :H + KV]
            dqk.copy_(_rotate_back(dqk, *ctx.rope))
        dqkv = dqkv.view(B * T, -1)
        d_w_qkv = dqkv.t() @ xn if need[4] else None
        d_b_qkv = dqkv.sum(0) if need[5] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: dqkv @ w_qkv, need[:3], grad, ctx.residual)
        return (dx, d_norm_w, d_norm_b, None, d_w_qkv, d_b_qkv, d_w_proj, d_b_proj) + (None,) * 5


def _rope_ok(rope: tuple[torch.Tensor, torch.Tensor] | None, head_dim: int) -> bool:
    """Angles the folded path rotates by: constant (no gradient), [B or 1, 1, T, d] for every channel
    of the head (not partial rotary)."""
    return rope is None or (not rope[0].requires_grad and not rope[1].requires_grad
                            and rope[0].dim() == 4 and rope[0].shape[1] == 1 and rope[0].shape[-1] == head_dim)


def residual(attn: nn.Module, norm: nn.Module, x: torch.Tensor, rope=None, mask=None, cache=None,
             bias=None) -> torch.Tensor | None:
    """x + attn(norm(x), rope) as one Function for CPU training, or None where it does not apply:
    no mask or cache (plain causal self-attention over the whole sequence), no attention dropout,
    fp32 CPU training under eager autograd, a norm the kernels implement, a shape the kernel takes."""
    w_qkv, w_proj = attn.qkv.weight, attn.proj.weight
    if (mask is not None or cache is not None or bias is not None or (attn.training and attn.dropout) or x.dim() != 3
            or not _rope_ok(rope, attn.head_dim)
            or not training_ready(x, w_qkv, w_proj) or not (x.requires_grad or w_qkv.requires_grad or w_proj.requires_grad)):
        return None
    H, KV, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if w_qkv.shape[0] != (H + 2 * KV) * d or not native.fits(x.shape[0], x.shape[1], H, KV, d):
        return None
    folded = prenorm(norm, x)
    if folded is None:
        return None
    add = not (attn.training and attn.resid_dropout.p)
    out = _PrenormAttention.apply(x, *folded, w_qkv, attn.qkv.bias, w_proj, attn.proj.bias, H, KV,
                                  _scale(attn.scale, d), add, rope)
    return out if add else x + attn.resid_dropout(out)
