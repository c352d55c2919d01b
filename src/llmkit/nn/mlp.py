"""Position-wise feed-forward networks: the GELU MLP (GPT-2) and SwiGLU (Shazeer, "GLU Variants
Improve Transformer", 2020), as used by LLaMA."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit import kernels
from llmkit.nn.fused import own_forward, plain_linears, prenorm, unhooked
from llmkit.nn.linear import Linear, linear_into
from llmkit.utils import eager_autograd


class _GeluMLPFunction(torch.autograd.Function):
    """down(GELU(up(x))) with a hand-written backward.

    Why: autograd recomputes erf and exp in the backward (gelu_backward) and writes the result into
    a fresh activation-sized buffer ([tokens, d_ff], 1.5 MB per layer at nanoGPT's CPU shape) that
    first has to be faulted in. Here the native kernel (kernels/gelu.c) writes gelu'(h) over h in
    the forward's own pass, so the backward is one in-place multiply over the down projection's
    input gradient, which nothing else holds. Without the kernel, PyTorch's gelu_backward runs in
    place there instead (then gradients are bit-identical to autograd's).
    """

    @staticmethod
    def forward(ctx, x, w_up, b_up, w_down, b_down, approximate, norm_w=None, norm_b=None, normed=None,
                residual=False):
        """`normed`: where the block's pre-norm is folded in (GeluMLP.residual), kernels.norm_forward's
        (y, mean, rstd) for x, with the norm's weight and bias as norm_w, norm_b; x is then the
        residual stream itself, and the norm's backward runs here too. `residual`: return x + MLP."""
        x_rows = x.reshape(-1, x.shape[-1])
        rows, mean, rstd = x_rows, None, None
        if normed is not None:
            rows, mean, rstd = normed[0].view(x_rows.shape), normed[1], normed[2]
        h = F.linear(rows, w_up, b_up)
        a = kernels.gelu_with_grad(h, approximate)  # native: h now holds gelu'(h)
        ctx.derivative = a is not None
        if a is None:
            a = F.gelu(h, approximate=approximate)
        ctx.save_for_backward(rows, h, a, w_up, w_down, *((x_rows, norm_w, mean, rstd) if normed else ()))
        ctx.approximate, ctx.residual = approximate, residual
        out = linear_into(a, w_down, b_down, x.shape[:-1])
        return out.add_(x) if residual else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, h, a, w_up, w_down, *norm = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad  # frozen weights (partial fine-tuning) get no gradient computed
        da = g @ w_down
        d_w_down = g.t() @ a if need[3] else None
        d_b_down = g.sum(0) if need[4] else None
        if ctx.derivative:
            da.mul_(h)
        else:
            torch.ops.aten.gelu_backward.grad_input(da, h, approximate=ctx.approximate, grad_input=da)
        d_w_up = da.t() @ rows if need[1] else None
        d_b_up = da.sum(0) if need[2] else None
        dx = d_norm_w = d_norm_b = None
        if not norm and need[0]:
            dx = da @ w_up
        elif norm and (need[0] or need[6] or need[7]):
            dx, d_norm_w, d_norm_b = kernels.norm_backward(*norm, da @ w_up, (need[0], need[6], need[7]))
        dx = None if dx is None else dx.view(*grad.shape[:-1], w_up.shape[1])
        if ctx.residual and dx is not None:
            dx.add_(grad)
        return dx, d_w_up, d_b_up, d_w_down, d_b_down, None, d_norm_w, d_norm_b, None, None


class GeluMLP(nn.Module):
    approximate = "none"

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _function_applies(self, x: torch.Tensor) -> bool:
        return (eager_autograd() and not torch.is_autocast_enabled(x.device.type) and x.dtype == self.up.weight.dtype
                and plain_linears(self.up, self.down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up, self.down
        if self._function_applies(x):
            return self.dropout(_GeluMLPFunction.apply(x, up.weight, up.bias, down.weight, down.bias, self.approximate))
        return self.dropout(down(F.gelu(up(x), approximate=self.approximate)))

    def residual(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """x + self(norm(x)), the pre-norm block's residual sublayer, with the norm's native
        training kernel (and the residual add, unless dropout is active) folded into this MLP's
        autograd Function; or None where that does not apply (then the caller runs the modules).

        Why: a separate norm costs a graph node and PyTorch's layer_norm pair (~130 us in a
        nanoGPT-sized step) where the native kernels take ~45 us; inside the Function neither they
        nor the add need a node of their own. Only llmkit's own LayerNorm / RMSNorm without hooks."""
        applies = self._function_applies(x) and own_forward(self, GeluMLP) and unhooked(self, self.dropout)
        folded = prenorm(norm, x) if applies else None
        if folded is None:
            return None
        up, down = self.up, self.down
        add = not (self.training and self.dropout.p)
        out = _GeluMLPFunction.apply(x, up.weight, up.bias, down.weight, down.bias, self.approximate, *folded, add)
        return out if add else x + self.dropout(out)


class GeluTanhMLP(GeluMLP):
    """GPT-2's tanh approximation of GELU ("gelu_new" in transformers)."""

    approximate = "tanh"


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "gelu_tanh": GeluTanhMLP, "swiglu": SwiGLU}
