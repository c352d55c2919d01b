"""The optimizer step and gradient clipping in one native call each (kernels/optimizer.c), at the
seams of `llmkit.training.optim`.

Why: for a nanoGPT-sized model PyTorch's versions spend more on per-tensor bookkeeping than on
arithmetic (~1.4 ms a step for 52 tensors of 0.8M floats, most of it fixed cost;
benchmarks/train_throughput.py). The state stays PyTorch's, so checkpoints move freely between the
two; anything else (CUDA, other dtypes, amsgrad, maximize, capturable, differentiable, a tensor lr,
a grad scaler, torch.compile, a parameter's first step, a param-group key this was not written
for) runs PyTorch's own code.
"""
from __future__ import annotations

import torch

from llmkit import kernels

# AdamW param-group keys the native step implements: None = any value, else the one value it takes
GROUP_KEYS = {"params": None, "lr": None, "betas": None, "eps": None, "weight_decay": None, "foreach": None,
              "fused": None, "amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
              "decoupled_weight_decay": True}


def _group_ok(group: dict) -> bool:
    for key, value in group.items():
        if key not in GROUP_KEYS or (GROUP_KEYS[key] is not None and value is not GROUP_KEYS[key]):
            return False
    return not isinstance(group["lr"], torch.Tensor)


def adamw_step(opt: torch.optim.AdamW) -> bool:
    """One native call per param group; False (nothing touched) where any group or tensor needs
    PyTorch's step, including a parameter's first step, so that its state is created by PyTorch's
    own rule (device, dtype of `step`) and the native step only ever reads it."""
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return False
    work = []
    for group in opt.param_groups:
        if not _group_ok(group):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        if not all(states) or any(p.grad.is_sparse for p in params):
            return False
        moments = [[state[k] for state in states] for k in ("exp_avg", "exp_avg_sq", "step")]
        grads = [p.grad for p in params]
        if not kernels.adamw_ready(params, grads, *moments):
            return False
        work.append((group, params, grads, moments))
    for group, params, grads, (m, v, steps) in work:  # every group qualifies
        beta1, beta2 = group["betas"]
        kernels.adamw(params, grads, m, v, steps, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        # written through raw pointers: tell autograd, so a graph that saved a parameter and is
        # used after this step raises as it does after PyTorch's in-place update
        torch.autograd.graph.increment_version(params + m + v + steps)
    return True


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> float | None:
    """The norm of all gradients, scaling them in place where it exceeds max_norm (PyTorch's rule),
    in one call; None (nothing touched) unless every gradient is a contiguous fp32 CPU tensor."""
    norm = kernels.clip_grad_norm(grads, max_norm)
    if norm is not None and not max_norm / (norm + 1e-6) >= 1.0:  # scaled in place through raw pointers
        torch.autograd.graph.increment_version(grads)
    return norm
