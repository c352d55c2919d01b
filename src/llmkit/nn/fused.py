"""Folding a pre-norm block's pieces into one autograd Function for CPU training: the norm (native
kernels), the sublayer and the residual add, for the attention (kernels/train_attention.py), the
MLPs (nn/mlp.py) and the final norm with the LM head (here). The rules for when that may happen
(only llmkit's own modules, with nothing that has to see them run as themselves) and the pieces
the Functions share live here."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from llmkit import kernels
from llmkit.nn.linear import Linear, linear_into
from llmkit.nn.norms import LayerNorm, RMSNorm
from llmkit.utils import eager_autograd

NATIVE_NORMS = {LayerNorm: True, RMSNorm: False}  # norm module -> whether it centres (LayerNorm)


def fp32_cpu_autograd(*tensors: torch.Tensor) -> bool:
    """What every folded Function needs: eager autograd recording (not torch.compile or torch.func),
    no autocast, and these tensors fp32 on the CPU."""
    return (eager_autograd() and not torch.is_autocast_enabled("cpu")
            and all(t.dtype is torch.float32 and t.is_cpu for t in tensors))


def unhooked(*modules: nn.Module) -> bool:
    """Nothing that would have to see these modules run: no module or global hook, and no forward
    set on the instance (an ablation's patch)."""
    if module_globals._has_any_global_hook():
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   or "forward" in vars(m) for m in modules)


def own_forward(module: nn.Module, cls: type) -> bool:
    """module runs `cls`'s forward: not a subclass that overrides it, not patched on the instance."""
    return type(module).forward is cls.forward and "forward" not in vars(module)


def plain_linears(*modules: nn.Module) -> bool:
    """Exactly llmkit's Linear with no hooks: an adapter or quantized replacement, or a hook that
    inspects or edits a projection, must run as the module it is (never silently bypassed)."""
    return all(type(m) is Linear for m in modules) and unhooked(*modules)


def prenorm(norm: nn.Module, x: torch.Tensor) -> tuple | None:
    """(weight, bias, (y, mean, rstd)) of llmkit's LayerNorm / RMSNorm over x by the native kernel,
    for a Function to fold in (its backward then runs kernels.norm_backward); None where the norm
    is another module, hooked, or the kernel declines x."""
    center = NATIVE_NORMS.get(type(norm))
    if center is None or not unhooked(norm) or not x.is_contiguous():
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
    or None where it does not apply (then the caller runs the modules): autograd recording
    outside autocast, llmkit's own modules without hooks, fp32 on CPU."""
    w = linear.weight
    if not fp32_cpu_autograd(w) or not plain_linears(linear) or not (x.requires_grad or w.requires_grad):
        return None
    folded = prenorm(norm, x)
    return None if folded is None else _PrenormLinear.apply(x, *folded, w, linear.bias)
