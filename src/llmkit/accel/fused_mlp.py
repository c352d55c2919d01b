"""The GELU MLP and SwiGLU (llmkit.nn.mlp) for CPU training as one autograd Function each, with the
backward by hand, the block's pre-norm and residual add folded in (the block's sublayer seam).

Why: autograd recomputes the activation's transcendental functions in the backward and writes
activation-sized buffers that first have to be faulted in; the native kernels (kernels/gelu.c,
kernels/swiglu.c) write the derivatives in the forward's own pass, so the backward is one or two
in-place multiplies (benchmarks/train_throughput.py). Without the kernels the same arithmetic runs
as PyTorch ops. The backward is once-differentiable: a second derivative (create_graph) or a
torch.func transform runs the modules.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit import kernels
from llmkit.accel.fused import input_grads, linear_into, normed_rows, prenorm, training_ready
from llmkit.nn.mlp import GeluMLP, GeluTanhMLP, SwiGLU


class _GeluMLPFunction(torch.autograd.Function):
    """down(GELU(up(x))) with a hand-written backward.

    Why: autograd recomputes erf and exp in the backward (gelu_backward) and writes the result into
    a fresh activation-sized buffer ([tokens, d_ff], 1.5 MB per layer at nanoGPT's CPU shape) that
    first has to be faulted in. Here the native kernel (kernels/gelu.c) writes gelu'(h) over h in
    the forward's own pass, so the backward is one in-place multiply over the down projection's
    input gradient, which nothing else holds. Without the kernel, PyTorch's gelu_backward runs in
    place there instead (then gradients are bit-identical to autograd's).
    `normed`, `residual`: see `residual`.
    """

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, residual, w_up, b_up, w_down, b_down, approximate):
        rows, norm_saved = normed_rows(x, norm_w, normed)
        h = F.linear(rows, w_up, b_up)
        a = kernels.gelu_with_grad(h, approximate)  # native: h now holds gelu'(h)
        ctx.derivative = a is not None
        if a is None:
            a = F.gelu(h, approximate=approximate)
        ctx.save_for_backward(rows, h, a, w_up, w_down, *norm_saved)
        ctx.approximate, ctx.residual = approximate, residual
        out = linear_into(a, w_down, b_down, x.shape[:-1])
        return out.add_(x) if residual else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, h, a, w_up, w_down, *norm_saved = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad  # frozen weights (partial fine-tuning) get no gradient computed
        da = g @ w_down
        d_w_down = g.t() @ a if need[7] else None
        d_b_down = g.sum(0) if need[8] else None
        if ctx.derivative:
            da.mul_(h)
        else:
            torch.ops.aten.gelu_backward.grad_input(da, h, approximate=ctx.approximate, grad_input=da)
        d_w_up = da.t() @ rows if need[5] else None
        d_b_up = da.sum(0) if need[6] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: da @ w_up, need[:3], grad, ctx.residual)
        return dx, d_norm_w, d_norm_b, None, None, d_w_up, d_b_up, d_w_down, d_b_down, None


class _SwiGLUFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with a hand-written backward.

    Why: autograd keeps gate, up and silu(gate), recomputes the sigmoid in the backward and makes
    three activation-sized passes there. The native kernel (kernels/swiglu.c) writes both partial
    derivatives over gate and up in the forward's pass, so the backward is two multiplies.
    Without it, the same arithmetic runs as PyTorch ops. `normed`, `residual`: see
    `residual`.
    """

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, residual, w_gate, b_gate, w_up, b_up, w_down, b_down):
        rows, norm_saved = normed_rows(x, norm_w, normed)
        gate, up = F.linear(rows, w_gate, b_gate), F.linear(rows, w_up, b_up)
        a = kernels.swiglu_with_grad(gate, up)  # native: gate, up now hold d a / d gate, d a / d up
        if a is None:
            s = torch.sigmoid(gate)
            silu = gate * s
            a = silu * up
            gate = up * s * (1 + gate * (1 - s))
            up = silu
        ctx.save_for_backward(rows, gate, up, a, w_gate, w_up, w_down, *norm_saved)
        ctx.residual = residual
        out = linear_into(a, w_down, b_down, x.shape[:-1])
        return out.add_(x) if residual else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, d_gate, d_up, a, w_gate, w_up, w_down, *norm_saved = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad
        da = g @ w_down
        d_w_down = g.t() @ a if need[9] else None
        d_b_down = g.sum(0) if need[10] else None
        dg = da * d_gate
        du = da.mul_(d_up)
        d_w_gate = dg.t() @ rows if need[5] else None
        d_b_gate = dg.sum(0) if need[6] else None
        d_w_up = du.t() @ rows if need[7] else None
        d_b_up = du.sum(0) if need[8] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: torch.addmm(dg @ w_gate, du, w_up), need[:3], grad,
                                             ctx.residual)
        return dx, d_norm_w, d_norm_b, None, None, d_w_gate, d_b_gate, d_w_up, d_b_up, d_w_down, d_b_down


def _weights(mlp: nn.Module) -> tuple:
    if type(mlp) is SwiGLU:
        return mlp.gate.weight, mlp.gate.bias, mlp.up.weight, mlp.up.bias, mlp.down.weight, mlp.down.bias
    return mlp.up.weight, mlp.up.bias, mlp.down.weight, mlp.down.bias, mlp.approximate


FUNCTIONS = {GeluMLP: _GeluMLPFunction, GeluTanhMLP: _GeluMLPFunction, SwiGLU: _SwiGLUFunction}


def residual(mlp: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x + mlp(norm(x)) with the norm's native kernel (and the add, unless dropout is active)
    folded into the MLP's Function; None where it does not apply (then the modules run): fp32 CPU
    training under eager autograd, a norm the kernels implement."""
    if not training_ready(x, mlp.up.weight):
        return None
    folded = prenorm(norm, x)
    if folded is None:
        return None
    add = not (mlp.training and mlp.dropout.p)
    out = FUNCTIONS[type(mlp)].apply(x, *folded, add, *_weights(mlp))
    return out if add else x + mlp.dropout(out)
