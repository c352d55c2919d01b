"""Causal self-attention for training through the native kernel (attention.c), as an autograd
Function: the forward keeps the softmax probabilities, the backward uses them.

Why: for short sequences (nanoGPT-sized training on a CPU) PyTorch's flash attention spends most of
its time on per-block calls rather than arithmetic; this kernel runs each (sequence, head) as one
register-tiled problem (benchmarks/train_throughput.py). For long sequences keeping P would cost
T^2 floats per head, so `causal_attention` declines and the caller uses SDPA.
"""
from __future__ import annotations

import ctypes

import torch

from llmkit import kernels
from llmkit.kernels import build
from llmkit.nn.fused import fp32_cpu_autograd, input_grads, normed_rows
from llmkit.nn.linear import linear_into
from llmkit.nn.positions import apply_rotary, rotate_half

MAX_T = 512  # longest sequence taken: P is B * H * T^2 floats; at 1024 flash attention wins (L2 no longer holds a head)
MAX_P_BYTES = 64 << 20  # largest P kept per layer
_P, _L = ctypes.c_void_p, ctypes.c_long
_S3 = _L * 3


class AttnTable(ctypes.Structure):
    """llmkit_attn in attention.c: pointers, then (batch, time, head) strides in floats."""
    _fields_ = [("q", _P), ("k", _P), ("v", _P), ("q_s", _S3), ("k_s", _S3), ("v_s", _S3),
                ("y", _P), ("y_s", _S3), ("P", _P), ("dy", _P), ("dy_s", _S3),
                ("dq", _P), ("dk", _P), ("dv", _P), ("dq_s", _S3), ("dk_s", _S3), ("dv_s", _S3),
                ("B", _L), ("T", _L), ("H", _L), ("KV", _L), ("d", _L), ("Tp", _L), ("scale", ctypes.c_float)]


_lib: list = []  # [forward, backward] once resolved, [] before, [None, None] if unavailable


def _functions():
    if not _lib:
        lib = build.load("native")
        fns = [None, None]
        if lib is not None:
            fns = [getattr(lib, "llmkit_attn_train_fwd"), getattr(lib, "llmkit_attn_train_bwd")]
            for fn in fns:
                fn.argtypes, fn.restype = [ctypes.POINTER(AttnTable)], _L
            parallel = lib.llmkit_attn_parallel()
            if not parallel and torch.get_num_threads() > 1:
                fns = [None, None]  # built without OpenMP: one thread would lose to flash attention
        _lib.extend(fns)
    return _lib


def reset() -> None:
    _lib.clear()


_templates: dict[tuple, AttnTable] = {}  # (shape, strides, H, KV) -> a table with every size and stride set


def _template(qkv: torch.Tensor, H: int, KV: int) -> AttnTable:
    """The table's sizes and strides for qkv [B, T, (H + 2 KV) * d] (last dim contiguous), the
    forward's y [B, T, H, d] and the backward's contiguous packed gradient and dy; pointers unset.
    Cached: building a ctypes structure field by field costs ~15 us, a copy ~1 us."""
    key = (qkv.shape, qkv.stride(), H, KV)
    table = _templates.get(key)
    if table is None:
        B, T, width = qkv.shape
        d = width // (H + 2 * KV)
        packed = _S3(qkv.stride(0), qkv.stride(1), d)
        dense = _S3(T * width, width, d)  # the contiguous gradient
        heads = _S3(T * H * d, H * d, d)  # y and dy
        table = AttnTable(q_s=packed, k_s=packed, v_s=packed, y_s=heads, dy_s=heads, dq_s=dense, dk_s=dense,
                          dv_s=dense, B=B, T=T, H=H, KV=KV, d=d, Tp=(T + 15) // 16 * 16, scale=d ** -0.5)
        if len(_templates) > 64:
            _templates.clear()
        _templates[key] = table
    return AttnTable.from_buffer_copy(table)


def _forward(qkv: torch.Tensor, H: int, KV: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, H, d], P [B, H, T, Tp]) by the native forward; qkv's last dim contiguous."""
    table = _template(qkv, H, KV)
    B, T, d = table.B, table.T, table.d
    y = kernels._empty(B, T, H, d)
    probs = kernels._empty(B, H, T, table.Tp)
    base, step = qkv.data_ptr(), d * 4
    table.q, table.k, table.v = base, base + H * step, base + (H + KV) * step
    table.y, table.P = y.data_ptr(), probs.data_ptr()
    _functions()[0](ctypes.byref(table))
    return y, probs


def _backward(qkv: torch.Tensor, probs: torch.Tensor, dy: torch.Tensor, H: int, KV: int) -> torch.Tensor:
    """The gradient for qkv, packed as qkv is but contiguous, from dy [B, T, H, d] (made contiguous)."""
    if not dy.is_contiguous():
        dy = dy.contiguous()
    table = _template(qkv, H, KV)
    grad = kernels._empty(*qkv.shape)
    base, gbase, step = qkv.data_ptr(), grad.data_ptr(), table.d * 4
    table.q, table.k, table.v = base, base + H * step, base + (H + KV) * step
    table.dq, table.dk, table.dv = gbase, gbase + H * step, gbase + (H + KV) * step
    table.P, table.dy = probs.data_ptr(), dy.data_ptr()
    _functions()[1](ctypes.byref(table))
    return grad


class _CausalAttention(torch.autograd.Function):
    """y = attention(qkv); the backward writes dq, dk, dv straight into one [B, T, (H + 2 KV) * d]
    gradient, the fused projection's layout, so nothing is concatenated."""

    @staticmethod
    def forward(ctx, qkv, H, KV):
        y, probs = _forward(qkv, H, KV)
        ctx.save_for_backward(qkv, probs)
        ctx.heads = H, KV
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        qkv, probs = ctx.saved_tensors
        return _backward(qkv, probs, dy, *ctx.heads), None, None


def _queries_and_keys(qkv: torch.Tensor, H: int, KV: int) -> torch.Tensor:
    """The query and key heads of a packed qkv [B, T, (H + 2 KV) * d] as one view [B, T, H + KV, d]."""
    B, T, width = qkv.shape
    d = width // (H + 2 * KV)
    return qkv.view(B, T, H + 2 * KV, d)[:, :, :H + KV]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (positions.apply_rotary) on x [B, T, heads, d], cos, sin [B or 1, 1, T, d]."""
    return apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)


def _rotate_back(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through `_rotate`, its transpose: g cos - rotate_half(g sin)."""
    g = g.transpose(1, 2)
    return (g * cos - rotate_half(g * sin)).transpose(1, 2)


class _PrenormAttention(torch.autograd.Function):
    """proj(attention(qkv(norm(x)))) for a pre-norm block's attention sublayer in one Function:
    the native norm (kernels/norm.c), both projections and the native attention, with the
    backward by hand. Why: the same kernels as the separate modules, without the graph nodes,
    views and separate norm pass between them (~0.1 ms a layer at nanoGPT's CPU shape)."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, w_qkv, b_qkv, w_proj, b_proj, H, KV, residual, rope):
        B, T, C = x.shape
        xn, norm_saved = normed_rows(x, norm_w, normed)
        qkv = linear_into(xn, w_qkv, b_qkv, (B, T))
        if rope is not None:  # rotate the queries and keys in place: the kernel reads them packed
            qk = _queries_and_keys(qkv, H, KV)
            qk.copy_(_rotate(qk, *rope))
        y, probs = _forward(qkv, H, KV)
        y2 = y.view(B * T, -1)
        out = linear_into(y2, w_proj, b_proj, (B, T))
        ctx.save_for_backward(xn, qkv, probs, y2, w_qkv, w_proj, *norm_saved)
        ctx.heads, ctx.residual, ctx.rope = (H, KV), residual, rope
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
        dqkv = _backward(qkv, probs, dy, H, KV)
        if ctx.rope is not None:  # back through the rotation (its transpose)
            dqk = _queries_and_keys(dqkv, H, KV)
            dqk.copy_(_rotate_back(dqk, *ctx.rope))
        dqkv = dqkv.view(B * T, -1)
        d_w_qkv = dqkv.t() @ xn if need[4] else None
        d_b_qkv = dqkv.sum(0) if need[5] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: dqkv @ w_qkv, need[:3], grad, ctx.residual)
        return dx, d_norm_w, d_norm_b, None, d_w_qkv, d_b_qkv, d_w_proj, d_b_proj, None, None, None, None


def wanted(qkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> bool:
    """Whether `causal_attention` takes a fused projection output like `qkv` [B, T, (H + 2 KV) * d]:
    a training-sized problem (autograd on, not under torch.compile or a torch.func transform, no
    autocast, fp32 on CPU, 2 <= T <= MAX_T, d a multiple of 8, P within MAX_P_BYTES), with the
    kernel built here."""
    if not qkv.requires_grad or qkv.dim() != 3 or not fp32_cpu_autograd(qkv):
        return False
    return _fits(*qkv.shape, n_heads, n_kv_heads)


def _fits(B: int, T: int, width: int, n_heads: int, n_kv_heads: int) -> bool:
    """The kernel is built here and takes this shape (see `wanted`)."""
    if n_kv_heads <= 0 or n_heads % n_kv_heads or width % (n_heads + 2 * n_kv_heads):
        return False
    d = width // (n_heads + 2 * n_kv_heads)
    if not 2 <= T <= MAX_T or d % 8 or B * n_heads * T * ((T + 15) // 16 * 16) * 4 > MAX_P_BYTES:
        return False
    return _functions()[0] is not None


def prenorm_wanted(x: torch.Tensor, w_qkv: torch.Tensor, w_proj: torch.Tensor, n_heads: int, n_kv_heads: int) -> bool:
    """Whether `prenorm_attention` takes this sublayer: x [B, T, C] and both projection weights
    fp32 on CPU, something requiring a gradient, and a shape `wanted` would take for its qkv."""
    if x.dim() != 3 or not fp32_cpu_autograd(x, w_qkv, w_proj):
        return False
    if not (x.requires_grad or w_qkv.requires_grad or w_proj.requires_grad):
        return False
    return _fits(x.shape[0], x.shape[1], w_qkv.shape[0], n_heads, n_kv_heads)


def causal_attention(qkv: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v as y [B, T, H, d] (contiguous), differentiable, for
    a problem `wanted` accepts. qkv [B, T, (H + 2 KV) * d]: queries, then keys, then values (the
    fused projection's output), H a multiple of KV; its last dim need not be contiguous."""
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    return _CausalAttention.apply(qkv, n_heads, n_kv_heads)


def prenorm_attention(x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor | None, normed: tuple,
                      w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, w_proj: torch.Tensor,
                      b_proj: torch.Tensor | None, n_heads: int, n_kv_heads: int, residual: bool,
                      rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """proj(causal_attention(qkv(norm(x)))) [B, T, C] (plus x where `residual`), differentiable in
    x, the norm's weight and bias and both projections, for a sublayer `prenorm_wanted` accepts;
    `normed` is kernels.norm_forward's (y, mean, rstd) for x under that norm (nn/fused.prenorm)."""
    return _PrenormAttention.apply(x, norm_w, norm_b, normed, w_qkv, b_qkv, w_proj, b_proj, n_heads, n_kv_heads,
                                   residual, rope)
