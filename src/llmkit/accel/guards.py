"""What every fast path asks before it stands in for the reference code: no hook that must see the
modules run, autograd recording eagerly (not torch.compile, not a torch.func transform), no
autocast, plain fp32 CPU tensors (never a tensor subclass: a DTensor shard of FSDP2 or tensor
parallelism is not the whole weight a kernel reads). The private torch state these questions need is read here only, each
read guarded: where a torch version lacks it, the answer is the one that makes fast paths step
aside, so results never depend on it."""
from __future__ import annotations

import torch

try:
    from torch._C._functorch import peek_interpreter_stack as _functorch_stack
except ImportError:  # pragma: no cover - a torch without it: assume a transform may be running
    def _functorch_stack() -> object:
        return True


def global_hooks_absent() -> bool:
    """No global module forward / backward hook is registered (those must see every module run)."""
    try:
        from torch.nn.modules import module as m
        return not (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                    or m._global_backward_pre_hooks)
    except AttributeError:  # pragma: no cover
        return False


def eager_autograd() -> bool:
    """Autograd is recording and neither torch.compile nor a torch.func transform (vmap, grad:
    per-sample gradients) is tracing: those must see every op, so a hand-written autograd Function
    may not stand in for a chain of PyTorch ops."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and _functorch_stack() is None


PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_fp32_cpu(t: torch.Tensor) -> bool:
    """A plain tensor (no subclass such as DTensor) of fp32 on the CPU."""
    return type(t) in PLAIN and t.dtype is torch.float32 and t.is_cpu


def fp32_cpu_autograd(*tensors: torch.Tensor) -> bool:
    """What every folded training Function needs: eager autograd recording, no autocast, and these
    tensors plain fp32 on the CPU."""
    return (eager_autograd() and not torch.is_autocast_enabled("cpu") and all(plain_fp32_cpu(t) for t in tensors))


def fp32_cpu_inference(*tensors: torch.Tensor) -> bool:
    """What the decoding kernels need: no autograd, not under torch.compile, no autocast, these
    tensors fp32 on the CPU."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and all(plain_fp32_cpu(t) for t in tensors))
