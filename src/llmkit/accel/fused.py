"""Folding a pre-norm block's pieces into one autograd Function for CPU training: the norm (native
kernels), the sublayer and the residual add, for the attention (accel/fused_attention.py), the MLPs
(accel/fused_mlp.py) and, here, the final norm with the LM head. This module holds the pieces the
Functions share.

Why: a separate norm costs a graph node and PyTorch's layer_norm pair (~130 us in a nanoGPT-sized
step) where the native kernels take ~45 us; inside one Function neither they nor the add need a
node of their own (benchmarks/train_throughput.py)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmkit import kernels
from llmkit.accel import declared
from llmkit.accel.guards import fp32_cpu_autograd, global_hooks_absent
from llmkit.nn import seams
from llmkit.nn.linear import Linear


def linear_into(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lead: tuple) -> torch.Tensor:
    """rows @ weight^T (+ bias) as a fresh [*lead, out] tensor, not a view: a Function's output
    that is a view of its own result cannot be edited in place afterwards (logits.div_, a hook
    steering a block's output), which the modules' outputs can."""
    out = torch.empty(*lead, weight.shape[0], dtype=rows.dtype, device=rows.device)
    flat = out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(rows, weight.t(), out=flat)
    else:
        torch.addmm(bias, rows, weight.t(), out=flat)
    return out


def prenorm(norm: nn.Module, x: torch.Tensor) -> tuple | None:
    """(weight, bias, (y, mean, rstd)) of llmkit's LayerNorm / RMSNorm over x by the native kernel,
    for a Function to fold in (its backward then runs kernels.norm_backward); None where the norm
    is another module, hooked, or the kernel declines x."""
    center = declared.norm_accepted(norm)
    if center is None or not x.is_contiguous():
        return None
    bias = norm.bias if center else None
    stats = kernels.norm_forward(x, norm.weight, bias, norm.eps, center)
    return None if stats is None else (norm.weight, bias, stats)


def normed_rows(x: torch.Tensor, norm_w: torch.Tensor | None, normed: tuple | None) -> tuple:
    """(rows the sublayer reads [tokens, C], tensors its backward needs for the norm): x's rows and
    () without a folded norm; the normalised rows and (x rows, weight, mean, rstd) with one."""
    rows = x.reshape(-1, x.shape[-1])
    if normed is None:
        return rows, ()
    return normed[0].view(rows.shape), (rows, norm_w, normed[1], normed[2])


def input_grads(norm_saved: tuple, rows_grad: Callable[[], torch.Tensor], need: tuple[bool, bool, bool],
                grad: torch.Tensor, residual: bool) -> tuple:
    """(dx, d norm weight, d norm bias) for a folded sublayer's input x [*, C], each only where
    `need` asks: `rows_grad()` is the gradient of the rows it read (computed only if needed),
    carried back through the folded norm (`norm_saved` from `normed_rows`), plus the output's
    gradient `grad` where the Function added the residual."""
    dx = d_norm_w = d_norm_b = None
    if norm_saved and any(need):
        dx, d_norm_w, d_norm_b = kernels.norm_backward(*norm_saved, rows_grad(), need)
    elif need[0]:
        dx = rows_grad()
    if dx is not None:
        dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        if residual:
            dx.add_(grad)
    return dx, d_norm_w, d_norm_b


def training_ready(*tensors: torch.Tensor) -> bool:
    """A folded Function may run: no global hooks, eager autograd outside autocast, fp32 CPU."""
    return global_hooks_absent() and fp32_cpu_autograd(*tensors)


class _PrenormLinear(torch.autograd.Function):
    """linear(norm(x)) with the native norm and the backward by hand (the final norm and LM head)."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, weight, bias):
        rows, norm_saved = normed_rows(x, norm_w, normed)
        out = linear_into(rows, weight, bias, x.shape[:-1])
        ctx.save_for_backward(rows, weight, *norm_saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, weight, *norm_saved = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, norm_w, norm_b, normed, weight, bias
        g = grad.reshape(-1, grad.shape[-1])
        d_weight = g.t() @ rows if need[4] else None
        d_bias = g.sum(0) if need[5] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: g @ weight, need[:3], grad, False)
        return dx, d_norm_w, d_norm_b, None, d_weight, d_bias


def normed_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """linear(norm(x)) as one autograd Function for training (a decoder's final norm and LM head),
    or None where it does not apply: autograd recording outside autocast, fp32 on CPU, something
    requiring a gradient."""
    w = linear.weight
    if not training_ready(w, x) or not (x.requires_grad or w.requires_grad):
        return None
    folded = prenorm(norm, x)
    return None if folded is None else _PrenormLinear.apply(x, *folded, w, linear.bias)


HEAD = seams.FastPath("folded final norm + LM head (training)", normed_linear, {Linear: declared.LINEAR})
