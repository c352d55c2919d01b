"""Bindings for the native causal attention used in training (attention.c): a register-tiled
forward that keeps the softmax probabilities P, and the backward that uses them.

Why: for short sequences (nanoGPT-sized training on a CPU) PyTorch's flash attention spends most of
its time on per-block calls rather than arithmetic; this kernel runs each (sequence, head) as one
problem (benchmarks/train_throughput.py). Keeping P costs T^2 floats per head, so `fits` declines
long sequences. Tensors come as [B, T, heads, d] views with any batch / time / head strides and a
contiguous last dim, e.g. slices of a fused q/k/v projection's output.
"""
from __future__ import annotations

import ctypes

import torch

from llmkit.kernels import _empty, build

MAX_T = 512  # longest sequence taken: at 1024 flash attention wins (L2 no longer holds a head)
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


def _functions() -> list:
    if not _lib:
        lib = build.load("native")
        fns = [None, None]
        if lib is not None:
            fns = [getattr(lib, "llmkit_attn_train_fwd"), getattr(lib, "llmkit_attn_train_bwd")]
            for fn in fns:
                fn.argtypes, fn.restype = [ctypes.POINTER(AttnTable)], _L
            if not lib.llmkit_attn_parallel() and torch.get_num_threads() > 1:
                fns = [None, None]  # built without OpenMP: one thread would lose to flash attention
        _lib.extend(fns)
    return _lib


def reset() -> None:
    _lib.clear()
    _templates.clear()


def fits(B: int, T: int, H: int, KV: int, d: int) -> bool:
    """The kernel is built here and takes this problem: H a multiple of KV, 2 <= T <= MAX_T, d a
    multiple of 8, P within MAX_P_BYTES."""
    if KV <= 0 or H % KV or not 2 <= T <= MAX_T or d % 8 or B * H * T * ((T + 15) // 16 * 16) * 4 > MAX_P_BYTES:
        return False
    return _functions()[0] is not None


def _strides(x: torch.Tensor) -> "ctypes.Array":
    return _S3(x.stride(0), x.stride(1), x.stride(2))


_templates: dict[tuple, AttnTable] = {}  # (shapes, strides, scale) -> a table with every size and stride set


def _template(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> AttnTable:
    """The table's sizes and strides for q [B, T, H, d], k, v [B, T, KV, d], y and dy [B, T, H, d]
    contiguous; pointers and gradient strides unset. Cached: building a ctypes structure field by
    field costs ~15 us, a copy ~1 us."""
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), scale)
    table = _templates.get(key)
    if table is None:
        B, T, H, d = q.shape
        heads = _S3(T * H * d, H * d, d)
        table = AttnTable(q_s=_strides(q), k_s=_strides(k), v_s=_strides(v), y_s=heads, dy_s=heads, B=B, T=T, H=H,
                          KV=k.shape[2], d=d, Tp=(T + 15) // 16 * 16, scale=scale)
        if len(_templates) > 64:
            _templates.clear()
        _templates[key] = table
    return AttnTable.from_buffer_copy(table)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, T, H, d] contiguous, P [B, H, T, Tp]) = causal softmax(scale q k^T) v, for views
    q [B, T, H, d], k, v [B, T, KV, d] of fp32 CPU memory whose last dim is contiguous."""
    table = _template(q, k, v, scale)
    B, T, H, d = q.shape
    y = _empty(B, T, H, d)
    probs = _empty(B, H, T, table.Tp)
    table.q, table.k, table.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    table.y, table.P = y.data_ptr(), probs.data_ptr()
    _functions()[0](ctypes.byref(table))
    return y, probs


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor, dy: torch.Tensor,
             scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Write the gradients of `forward`'s inputs into dq [B, T, H, d], dk, dv [B, T, KV, d] (views
    with contiguous last dims, fully overwritten) from dy [B, T, H, d] (made contiguous)."""
    if not dy.is_contiguous():
        dy = dy.contiguous()
    table = _template(q, k, v, scale)
    table.q, table.k, table.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    table.dq, table.dk, table.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    table.dq_s, table.dk_s, table.dv_s = _strides(dq), _strides(dk), _strides(dv)
    table.P, table.dy = probs.data_ptr(), dy.data_ptr()
    _functions()[1](ctypes.byref(table))
