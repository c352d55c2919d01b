"""Native CPU kernels, built on first use (see `build.py`); PyTorch's kernels are the fallback.

`gemv` is the matrix-vector product behind batch-1 decoding on CPU: it reads the weight once with
every core, where MKL's sgemv reaches about one core's bandwidth.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from llmkit.kernels import build

_threads: int | None = None  # threads for native kernels; None = torch.get_num_threads()
_call_lock = threading.Lock()  # the kernel's thread pool serves one call at a time


def _gemv_lib():
    lib = build.load("gemv")
    if lib is not None and not getattr(lib, "_typed", False):
        lib.llmkit_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        lib.llmkit_gemv.restype = ctypes.c_int
        lib.max_rows = lib.llmkit_max_rows()
        lib._typed = True
    return lib


def available() -> bool:
    return _gemv_lib() is not None


def status() -> str:
    """One line for `llmkit info`: whether native kernels run here, and why not."""
    if available():
        return f"native CPU kernels: yes (gemv, {num_threads()} threads, cache {build.cache_dir()})"
    return f"native CPU kernels: no ({build.why_not('gemv')}); using PyTorch's"


def num_threads() -> int:
    return _threads or torch.get_num_threads()


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run native kernels with n threads inside the block (decoding keeps torch itself on one)."""
    global _threads
    before, _threads = _threads, n
    try:
        yield
    finally:
        _threads = before


def gemv_eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `gemv` can compute F.linear(x, weight, bias): fp32 on CPU, at most 8 rows, contiguous,
    no autograd (the kernel has no backward), not inside torch.compile."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
            and x.dim() >= 1 and 0 < x.numel() <= 8 * weight.shape[1] and x.shape[-1] == weight.shape[1]
            and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and not torch.compiler.is_compiling() and _gemv_lib() is not None)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x with at most 8 rows, through the native kernel.

    Callers check `gemv_eligible` first; shapes are checked here because a wrong one would read
    out of bounds instead of raising.
    """
    lib = _gemv_lib()
    n, k = weight.shape
    if x.shape[-1] != k or (bias is not None and (bias.shape != (n,) or not bias.is_contiguous())):
        raise ValueError(f"gemv: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)} do not fit")
    m = x.numel() // k
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    with _call_lock:
        rc = lib.llmkit_gemv(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                             y.data_ptr(), m, n, k, num_threads())
    if rc != 0:
        raise ValueError(f"gemv: unsupported shape x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y
