"""Bindings for the native CPU kernels (C sources in this folder, built on first use by
`build.py`). This package imports nothing else from llmkit: `llmkit.accel` decides where a kernel
stands in for PyTorch; PyTorch's kernels are the fallback everywhere.

`linear` runs a matrix-vector product that reads the weight once with every core, where MKL's sgemv
reaches about one core's bandwidth. `rms_norm`, `rope` and `decode_attention` replace PyTorch
composites whose dispatch costs far more than their arithmetic on a single row. Each returns None unless it applies: a few
contiguous fp32 rows on CPU without autograd, outside torch.compile, which is exactly a decoding
step; callers then run PyTorch's version. The checks are inlined and ordered cheapest first,
because at batch 1 a layer's whole budget is a few microseconds of Python.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from llmkit.kernels import build

MAX_ROWS = 8  # rows one call takes (gemv.c's MAX_ROWS)
_F32 = torch.float32
_P, _L = ctypes.c_void_p, ctypes.c_long
# symbol -> (library, argument types, result type)
# One library (native.c includes every kernel): one thread pool serves every caller.
_SIGNATURES = {
    "llmkit_gemv": ("native", [_P] * 4 + [_L] * 3 + [ctypes.c_int], ctypes.c_int),
    "llmkit_rms_norm": ("native", [_P] * 3 + [_L] * 2 + [ctypes.c_float], None),
    "llmkit_rope": ("native", [_P] * 4 + [_L] * 2, None),
    "llmkit_decode_attention": ("native", [_P] * 5 + [_L] * 5 + [ctypes.c_float], None),
    "llmkit_decode_token": ("native", [_P, _L, _L] + [_P] * 4 + [ctypes.c_int], ctypes.c_int),
    "llmkit_decode_scratch": ("native", [_P], _L),
    "llmkit_gelu_with_grad": ("native", [_P, _P, _L, ctypes.c_int], None),
    "llmkit_swiglu_with_grad": ("native", [_P, _P, _P, _L], None),
    "llmkit_norm_fwd": ("native", [_P] * 6 + [_L, _L, ctypes.c_float, ctypes.c_int], None),
    "llmkit_norm_bwd": ("native", [_P] * 8 + [_L, _L, ctypes.c_int], _L),
    "llmkit_clip_grad_norm": ("native", [_L, _P, _P, ctypes.c_double], ctypes.c_double),
    "llmkit_adamw": ("native", [_L] + [_P] * 6 + [ctypes.c_double] * 5, None),
}
_fns: dict[str, Any] = {}  # symbol -> ctypes function, or None where its library did not build
_threads: int | None = None  # threads for native kernels; None = torch.get_num_threads()
_call_lock = threading.Lock()  # the matrix-vector kernel's thread pool serves one call at a time


def _resolve(symbol: str):
    """Load the symbol's library (building it if needed) once; None if it is not available."""
    if symbol not in _fns:
        lib_name, args, res = _SIGNATURES[symbol]
        lib = build.load(lib_name)
        fn = None
        if lib is not None:
            fn = getattr(lib, symbol)
            fn.argtypes, fn.restype = args, res
        _fns[symbol] = fn
    return _fns[symbol]


def reset() -> None:
    """Forget loaded kernels and build results (tests switch LLMKIT_NATIVE)."""
    from llmkit.kernels import train_attention

    _fns.clear()
    train_attention.reset()
    build.reset()


def available() -> bool:
    return all(_resolve(symbol) is not None for symbol in _SIGNATURES)


def status() -> str:
    """One line for `llmkit info`: whether native kernels run here, and why not."""
    if available():
        return f"native CPU kernels: yes (decode step, gemv, rms_norm, rope, decode attention, training attention, GELU, SwiGLU, norms and optimizer step; {num_threads()} threads; cache {build.cache_dir()})"
    reason = build.why_not("native")
    return f"native CPU kernels: no ({reason}); using PyTorch's"


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


def _empty(*shape: int) -> torch.Tensor:
    """A buffer a kernel writes fp32 into: on the CPU in fp32 whatever the default dtype or device."""
    return torch.empty(*shape, dtype=_F32, device="cpu")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a subclass (DTensor: one shard of a weight) never runs here


def _ok(x: torch.Tensor) -> bool:
    """A plain fp32 CPU tensor, contiguous, no autograd, not being traced by torch.compile."""
    return (type(x) in _PLAIN and x.dtype is _F32 and x.is_cpu and x.is_contiguous() and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for x of at most MAX_ROWS rows through the native kernel, or None."""
    fn = _fns["llmkit_gemv"] if "llmkit_gemv" in _fns else _resolve("llmkit_gemv")
    if fn is None or not _ok(x) or weight.dim() != 2:
        return None
    n, k = weight.shape
    if (x.dim() == 0 or x.shape[-1] != k or not 0 < x.numel() <= MAX_ROWS * k or not _flat_f32(weight)
            or (bias is not None and (not _flat_f32(bias)
                                      or bias.shape != (n,)))):
        return None
    y = _empty(*x.shape[:-1], n)
    with _call_lock:
        fn(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
           x.numel() // k, n, k, _threads or torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim for a few rows, or None."""
    fn = _fns["llmkit_rms_norm"] if "llmkit_rms_norm" in _fns else _resolve("llmkit_rms_norm")
    if fn is None or not _ok(x):
        return None
    d = weight.shape[0]
    if (x.dim() == 0 or x.shape[-1] != d or not 0 < x.numel() <= MAX_ROWS * d or not _flat_f32(weight)):
        return None
    y = torch.empty_like(x)  # x is contiguous: so is y
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x * cos + rotate_half(x) * sin for x [B, H, T, d] at one position (B * T == 1), or None."""
    fn = _fns["llmkit_rope"] if "llmkit_rope" in _fns else _resolve("llmkit_rope")
    if fn is None or x.dim() != 4 or x.shape[0] * x.shape[2] != 1 or not _ok(x):
        return None
    d = x.shape[-1]
    if (d % 2 or x.numel() > 64 * MAX_ROWS * d or cos.numel() != d or sin.numel() != d
            or cos.dtype is not _F32 or sin.dtype is not _F32 or not cos.is_cpu or not sin.is_cpu
            or not cos.is_contiguous() or not sin.is_contiguous()):
        return None
    y = _empty(*x.shape)
    fn(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), x.numel() // d, d)
    return y


def gelu_with_grad(x: torch.Tensor, approximate: str) -> torch.Tensor | None:
    """GELU of x for training: returns gelu(x) and overwrites x with gelu'(x), in one pass that
    shares the transcendental work (gelu.c); or None (x untouched) where it does not apply:
    contiguous fp32 on CPU, not under torch.compile. `approximate`: "none" or "tanh"."""
    fn = _fns["llmkit_gelu_with_grad"] if "llmkit_gelu_with_grad" in _fns else _resolve("llmkit_gelu_with_grad")
    if (fn is None or x.dtype is not _F32 or not x.is_cpu or not x.is_contiguous() or approximate not in ("none", "tanh")
            or torch.compiler.is_compiling()):
        return None
    y = torch.empty_like(x)
    fn(x.data_ptr(), y.data_ptr(), x.numel(), approximate == "tanh")
    return y


def swiglu_with_grad(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """SwiGLU's activation for training: returns silu(g) * u and overwrites g, u with its partial
    derivatives d/dg and d/du, in one pass sharing the sigmoid (swiglu.c); or None (nothing
    touched) where it does not apply: g, u contiguous fp32 on CPU of one shape, not under
    torch.compile."""
    fn = _fns["llmkit_swiglu_with_grad"] if "llmkit_swiglu_with_grad" in _fns else _resolve("llmkit_swiglu_with_grad")
    if (fn is None or g.shape != u.shape or not _flat_f32(g) or not _flat_f32(u) or torch.compiler.is_compiling()):
        return None
    a = torch.empty_like(g)
    fn(g.data_ptr(), u.data_ptr(), a.data_ptr(), g.numel())
    return a


def norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                 center: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """LayerNorm (center) or RMSNorm of x's rows for training (norm.c): (y, mean, rstd), the
    statistics kept for `norm_backward`; or None where it does not apply: x, weight and bias
    contiguous fp32 on CPU with weight (and bias) of x's last size, not under torch.compile."""
    fn = _fns["llmkit_norm_fwd"] if "llmkit_norm_fwd" in _fns else _resolve("llmkit_norm_fwd")
    if fn is None or x.dim() == 0 or torch.compiler.is_compiling():
        return None
    d = x.shape[-1]
    if (not _flat_f32(x) or not _flat_f32(weight) or weight.shape != (d,)
            or (bias is not None and (not _flat_f32(bias) or bias.shape != (d,))) or x.numel() == 0):
        return None
    rows = x.numel() // d
    y = torch.empty_like(x)
    mean = _empty(rows) if center else None
    rstd = _empty(rows)
    fn(x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), _ptr(mean), rstd.data_ptr(), rows, d, eps, center)
    return y, mean, rstd


def norm_backward(x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                  dy: torch.Tensor, need: tuple[bool, bool, bool]) -> tuple:
    """(dx, dw, db) for `norm_forward`'s x, weight, statistics and the output gradient dy (made
    contiguous here), each only where `need` asks (else None)."""
    dy = dy.contiguous()
    d = x.shape[-1]
    dx = torch.empty_like(x) if need[0] else None
    dw = _empty(d) if need[1] else None
    db = _empty(d) if need[2] else None
    if _resolve("llmkit_norm_bwd")(x.data_ptr(), weight.data_ptr(), _ptr(mean), rstd.data_ptr(), dy.data_ptr(), _ptr(dx),
                                   _ptr(dw), _ptr(db), x.numel() // d, d, mean is not None) != 0:
        raise MemoryError("the norm backward could not allocate its per-thread partial sums")
    return dx, dw, db


def _flat_f32(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN and t.dtype is _F32 and t.is_cpu and t.is_contiguous() and t.layout is torch.strided


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (_P * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (_L * len(tensors))(*[t.numel() for t in tensors])


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> float | None:
    """The L2 norm of all `grads` together, scaling them in place by max_norm / (norm + 1e-6) where
    that is below 1 (torch.nn.utils.clip_grad_norm_'s rule), in one call (optimizer.c); or None
    (nothing touched) unless every gradient is a contiguous fp32 CPU tensor."""
    fn = _fns["llmkit_clip_grad_norm"] if "llmkit_clip_grad_norm" in _fns else _resolve("llmkit_clip_grad_norm")
    if fn is None or not grads or not all(_flat_f32(g) for g in grads) or torch.compiler.is_compiling():
        return None
    return fn(len(grads), _pointers(grads), _sizes(grads), max_norm)


def adamw_ready(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor]) -> bool:
    """Whether `adamw` takes these: the kernel is built, every tensor is contiguous fp32 on CPU,
    gradient and moments have their parameter's size, each step is one float."""
    fn = _fns["llmkit_adamw"] if "llmkit_adamw" in _fns else _resolve("llmkit_adamw")
    if fn is None or torch.compiler.is_compiling():
        return False
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        n = p.numel()
        if not (_flat_f32(p) and _flat_f32(g) and _flat_f32(m) and _flat_f32(v) and _flat_f32(s)
                and g.numel() == n and m.numel() == n and v.numel() == n and s.numel() == 1):
            return False
    return True


def adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: float, beta1: float, beta2: float,
          eps: float, weight_decay: float) -> None:
    """One AdamW step over one parameter group in one call (optimizer.c), incrementing each step
    count; only for tensors `adamw_ready` accepted (it reads raw pointers)."""
    if params:
        _fns["llmkit_adamw"](len(params), _pointers(params), _pointers(grads), _pointers(exp_avgs),
                             _pointers(exp_avg_sqs), _pointers(steps), _sizes(params), lr, beta1, beta2, eps,
                             weight_decay)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor | None:
    """softmax(scale q k^T) v (scale None: 1 / sqrt(d)) for one query position, as [1, 1, H * d] (the layout the output
    projection takes), or None. q [1, H, 1, d]; k, v [1, KV, S, d] with rows of d contiguous floats
    (slices of the KV cache); every cached position is visible (no mask, no window)."""
    fn = _fns["llmkit_decode_attention"] if "llmkit_decode_attention" in _fns else _resolve("llmkit_decode_attention")
    if fn is None or q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != 1 or not _ok(q):
        return None
    _, H, _, d = q.shape
    KV, S = k.shape[1], k.shape[2]
    if (k.shape != v.shape or k.shape[0] != 1 or k.shape[3] != d or KV == 0 or H % KV or S == 0
            or k.dtype is not _F32 or v.dtype is not _F32 or not k.is_cpu or not v.is_cpu
            or k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != d):
        return None
    out = _empty(1, 1, H * d)
    scores = _empty(S)
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), scores.data_ptr(), H, KV, S, d, k.stride(1),
       d ** -0.5 if scale is None else scale)
    return out


# --- a whole decoding step (decode.c) ----------------------------------------------------------

LAYER_FIELDS = ("norm1_w", "norm1_b", "qkv_w", "qkv_b", "proj_w", "proj_b", "norm2_w", "norm2_b",
                "up_w", "up_b", "gate_w", "gate_b", "down_w", "down_b", "k_cache", "v_cache")
MODEL_FIELDS = ("tok_emb", "norm_w", "norm_b", "head_w", "head_b")
SIZE_FIELDS = ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_len", "window")
NORMS = {"layernorm": 0, "rmsnorm": 1}
MLPS = {"gelu": 0, "gelu_tanh": 1, "swiglu": 2}


class LayerTable(ctypes.Structure):
    _fields_ = [(name, _P) for name in LAYER_FIELDS]


class DecoderTable(ctypes.Structure):
    _fields_ = ([(name, _L) for name in ("n_layers", *SIZE_FIELDS, "norm", "mlp", "vocab")]
                + [("eps", ctypes.c_float), ("layers", ctypes.POINTER(LayerTable))]
                + [(name, _P) for name in MODEL_FIELDS] + [("scratch", _P)])


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecoderStep:
    """A whole batch-1 decoding step in one native call (`llmkit_decode_token`): embedding, every
    layer, final norm and LM head for one token.

    `model` maps MODEL_FIELDS and `layers` (one dict per layer) map LAYER_FIELDS to contiguous fp32
    CPU tensors or None (absent biases, the gate of a non-gated MLP). The tensors are referenced,
    not copied: the table stays valid while they are neither replaced nor resized, which is the
    lifetime of one KV cache.
    """

    def __init__(self, sizes: dict[str, int], norm: str, mlp: str, eps: float, model: dict[str, Any],
                 layers: list[dict[str, Any]]):
        fn = _resolve("llmkit_decode_token")
        if fn is None:
            raise RuntimeError("native kernels are not available")
        self._fn = fn
        self._tensors = [t for table in (model, *layers) for t in table.values() if t is not None]  # keep alive
        self._layers = (LayerTable * len(layers))(*(
            LayerTable(*(_ptr(layer.get(f)) for f in LAYER_FIELDS)) for layer in layers))
        self.vocab = model["head_w"].shape[0]
        self.table = DecoderTable(n_layers=len(layers), norm=NORMS[norm], mlp=MLPS[mlp], vocab=self.vocab, eps=eps,
                                  layers=self._layers, **{f: _ptr(model.get(f)) for f in MODEL_FIELDS},
                                  **{f: sizes[f] for f in SIZE_FIELDS})
        self._scratch = _empty(_resolve("llmkit_decode_scratch")(ctypes.byref(self.table)))
        self.table.scratch = self._scratch.data_ptr()
        self._ref = ctypes.byref(self.table)

    def __call__(self, token: int, pos: int, pos_row: torch.Tensor | None = None,
                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [1, 1, vocab] for `token` at position `pos` (its key and value enter the cache).
        pos_row: the additive position embedding of `pos`; cos, sin: its rotary angles; each
        d_model / head_dim contiguous fp32 floats, or None."""
        logits = _empty(1, 1, self.vocab)
        with _call_lock:
            err = self._fn(self._ref, token, pos, _ptr(pos_row), _ptr(cos), _ptr(sin), logits.data_ptr(),
                           _threads or torch.get_num_threads())
        if err == 2:
            raise IndexError(f"token id {token} is outside the vocabulary (size {self.vocab})")
        if err:
            raise ValueError(f"KV cache full: position {pos} >= max_len {self.table.max_len}")
        return logits
