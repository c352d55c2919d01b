"""What the accel tests share: running the pure reference code (every seam emptied, then filled
again whatever happens) and counting the folded Functions' calls."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import shutil

import pytest
import torch

from llmkit import accel, kernels
from llmkit.accel import fused, fused_attention, fused_mlp
from llmkit.kernels import build

# for modules whose every test needs the native kernels built here
NEEDS_KERNELS = [pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine"),
                 pytest.mark.skipif(not kernels.available(), reason=f"no native kernels: {build.why_not('native')}")]


@contextmanager
def reference() -> Iterator[None]:
    """Inside the block no fast path is registered: nn/, models/ and training/ run as written."""
    accel.unregister()
    try:
        yield
    finally:
        accel.register()


FUNCTIONS = {"attention": [fused_attention._PrenormAttention], "core": [fused_attention._CoreAttention],
             "mlp": [fused_mlp._GeluMLPFunction, fused_mlp._SwiGLUFunction], "head": [fused._PrenormLinear]}


def count_functions(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """A list that gets the name ("attention", "core", "mlp", "head") of each folded autograd
    Function applied from now on (all four kinds unless `names` picks some)."""
    calls: list[str] = []
    for name in names or FUNCTIONS:
        for fn in FUNCTIONS[name]:
            real = fn.apply
            monkeypatch.setattr(fn, "apply", lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The model with non-trivial norms and biases, so that a swapped weight or bias cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model
