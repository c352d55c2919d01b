"""Native CPU kernels as bindings (llmkit.kernels, kernels/train_attention.py): each equals PyTorch's
arithmetic, declines what it does not cover, survives fork and concurrent callers, builds portably,
and everything still works without it. Where the fast paths use them: tests/accel/."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F

from llmkit import kernels
from llmkit.config import ModelConfig
from llmkit.kernels import build, train_attention
from llmkit.models.decoder import DecoderLM
from llmkit.training.optim import AdamW, clip_grad_norm_

needs_native = pytest.mark.skipif(not kernels.available(), reason=f"no native kernels: {build.why_not('native')}")
pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine")


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n,k,bias", [(1, 2304, 768, True), (1, 7, 13, False), (3, 37, 130, True),
                                         (8, 5000, 64, False), (2, 1, 1, True), (1, 1000, 3001, False)])
def test_gemv_equals_linear(threads, m, n, k, bias):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    with kernels.threads(threads), torch.no_grad():
        y = kernels.linear(x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_native
def test_kernels_decline_what_they_do_not_cover():
    w = torch.randn(3, 4)
    with torch.no_grad():
        assert kernels.linear(torch.randn(1, 4), w) is not None
        assert kernels.linear(torch.randn(1, 5), w) is None  # wrong width
        assert kernels.linear(torch.randn(1, 4), w, torch.randn(2)) is None  # wrong bias
        assert kernels.linear(torch.randn(9, 4), w) is None  # more than MAX_ROWS rows
        assert kernels.linear(torch.randn(4, 1).t(), w) is not None
        assert kernels.linear(torch.randn(4, 2).t()[:1], w) is None  # not contiguous
        assert kernels.linear(torch.randn(1, 4, dtype=torch.float64), w.double()) is None
        assert kernels.rms_norm(torch.randn(1, 5), torch.ones(4), 1e-6) is None
        assert kernels.rope(torch.randn(1, 2, 2, 4), torch.ones(4), torch.ones(4)) is None  # two positions
    assert kernels.linear(torch.randn(1, 4), w) is None  # autograd on


@needs_native
def test_rms_norm_and_rope_equal_pytorch():
    from llmkit.nn.norms import RMSNorm
    from llmkit.nn.positions import RotaryPositions, rotate_half
    norm = RMSNorm(576, 1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(1, 1, 576) * 3
    rope = RotaryPositions(ModelConfig.from_preset("llama-small"))
    cos, sin = rope(torch.tensor([37]), 38)
    q = torch.randn(1, 1, 9, 64).transpose(1, 2)  # [B, H, T, d] as attention makes it
    with torch.no_grad():
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, 1e-5),
                                   F.rms_norm(x, (576,), None, 1e-5) * norm.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm(x), F.rms_norm(x, (576,), None, 1e-5) * norm.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kernels.rope(q, cos, sin), q * cos + rotate_half(q) * sin, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or os.environ.get("LLMKIT_NATIVE") == "0",
                    reason="no C compiler here, or native kernels switched off")
def test_sources_compile_where_a_compiler_exists():
    """A compile error must fail here, not turn every native test into a skip."""
    kernels.reset()
    assert kernels.available(), kernels.status()


def _child_gemv(queue):
    x, w = torch.randn(1, 300), torch.randn(999, 300)
    with kernels.threads(2), torch.no_grad():
        queue.put(torch.allclose(kernels.linear(x, w), x @ w.t(), rtol=1e-4, atol=1e-4))


@needs_native
def test_kernel_pool_survives_fork():
    with kernels.threads(2), torch.no_grad():  # start the pool in the parent first
        assert kernels.linear(torch.randn(1, 300), torch.randn(999, 300)) is not None
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_gemv, args=(queue,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and queue.get(timeout=5)


@needs_native
def test_concurrent_callers_get_their_own_results():
    w = torch.randn(2048, 256)
    xs = [torch.randn(1, 256) for _ in range(4)]
    results: dict[int, bool] = {}

    def work(i):
        with torch.no_grad():
            ok = all(torch.allclose(kernels.linear(xs[i], w), xs[i] @ w.t(), rtol=1e-4, atol=1e-4) for _ in range(50))
        results[i] = ok

    with kernels.threads(2):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {0: True, 1: True, 2: True, 3: True}


def test_build_failure_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    kernels.reset()
    try:
        assert not kernels.available() and "no C compiler" not in kernels.status()
        assert build.why_not("native") and "no-such-compiler" in kernels.status()
        x, w = torch.randn(1, 8), torch.randn(4, 8)
        with torch.no_grad():
            assert kernels.linear(x, w) is None and kernels.rms_norm(x, torch.ones(8), 1e-6) is None
        assert kernels.norm_forward(x, torch.ones(8), None, 1e-5, False) is None
        assert not train_attention.fits(2, 16, 2, 2, 16)
        # a model still decodes (every fast path declines) and equals its full recomputation
        torch.manual_seed(0)
        model = DecoderLM(ModelConfig.from_preset("tiny")).eval()
        ids = torch.randint(0, 256, (1, 10))
        with torch.no_grad():
            full = model(ids)
            cache = model.make_cache(1)
            model(ids[:, :4], cache=cache)
            steps = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(4, 10)], 1)
        assert cache.native[2] is None
        torch.testing.assert_close(steps, full[:, 4:], rtol=1e-4, atol=1e-5)
        assert not list((tmp_path / "cache").glob("**/*.tmp"))  # no half-written library left
    finally:
        monkeypatch.undo()
        kernels.reset()


@needs_native
def test_unwritable_cache_folder_falls_back_to_temp(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLMKIT_CACHE", str(blocker / "cache"))  # mkdir under a file fails
    kernels.reset()
    try:
        assert kernels.available(), kernels.status()
        with torch.no_grad():
            assert kernels.linear(torch.randn(1, 16), torch.randn(8, 16)) is not None
    finally:
        monkeypatch.undo()
        kernels.reset()


def test_portable_path_without_avx2_equals_pytorch(tmp_path):
    """The kernels' non-AVX2 branch (other CPUs): built with a generic -march, then used by a model
    through the normal dispatch for every linear layer and a whole native decoding step."""
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the generic flag below is x86-64's")
    compiler = shutil.which("cc") or shutil.which("gcc")
    flags = [f if f != "-march=native" else "-march=x86-64" for f in build.FLAGS]
    build._compile(build.HERE / "native.c", tmp_path / "native.so", compiler, flags)
    kernels.reset()
    build._loaded["native"] = ctypes.CDLL(str(tmp_path / "native.so"))
    real_adamw = kernels.adamw
    try:
        g = torch.Generator().manual_seed(0)
        w, x, b = torch.randn(1001, 333, generator=g), torch.randn(3, 333, generator=g), torch.randn(1001, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
        torch.manual_seed(0)
        model = DecoderLM(ModelConfig.from_preset("tiny", mlp="swiglu", norm="rmsnorm", position="rope")).eval()
        ids = torch.randint(0, 256, (1, 20), generator=g)
        with torch.no_grad():
            full = model(ids)
            cache = model.make_cache(1)
            model(ids[:, :5], cache=cache)
            steps = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(5, 20)], 1)
        assert cache.native[2] is not None
        torch.testing.assert_close(steps, full[:, 5:], rtol=1e-4, atol=1e-5)
        # the training attention's scalar branch, forward and backward, against SDPA
        qkv = torch.randn(2, 21, 3 * 2 * 16, generator=g)
        assert train_attention.fits(2, 21, 2, 2, 16)
        (y, dqkv), (ref, ref_dqkv) = train_attention_and_sdpa(qkv, 2, 2, torch.randn(2, 21, 2, 16, generator=g))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dqkv, ref_dqkv, rtol=1e-5, atol=2e-5)
        # GELU with its derivative (scalar libm branch), both forms
        for approximate in ("none", "tanh"):
            h = torch.linspace(-9, 9, 1001).requires_grad_()
            ref = F.gelu(h, approximate=approximate)
            out = h.detach().clone()
            torch.testing.assert_close(kernels.gelu_with_grad(out, approximate), ref.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out, torch.autograd.grad(ref.sum(), h)[0], rtol=1e-5, atol=3e-6)
        # SwiGLU with its derivatives (scalar libm branch)
        gate, up = torch.linspace(-20, 20, 1001), torch.randn(1001, generator=g)
        gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
        ref = F.silu(gr) * ur
        a = kernels.swiglu_with_grad(gate, up)
        torch.testing.assert_close(a, ref.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip((gate, up), torch.autograd.grad(ref.sum(), (gr, ur))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # the training norms' scalar branch (d = 37: no 8-float blocks), LayerNorm and RMSNorm
        x, w, b, dy = (torch.randn(s, generator=g) for s in ((5, 37), (37,), (37,), (5, 37)))
        for center in (True, False):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            ref = F.layer_norm(xr, (37,), wr, b, 1e-5) if center else F.rms_norm(xr, (37,), wr, 1e-5)
            y, mean, rstd = kernels.norm_forward(x, w, b if center else None, 1e-5, center)
            torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-5)
            dx, dw, _ = kernels.norm_backward(x, w, mean, rstd, dy, (True, True, False))
            for got, want in zip((dx, dw), torch.autograd.grad(ref, (xr, wr), dy)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the optimizer step's scalar branch: clipping and AdamW against PyTorch's
        ours = [torch.randn(s, generator=g).requires_grad_() for s in ((37,), (13, 5))]
        ref = [p.detach().clone().requires_grad_() for p in ours]
        opts = AdamW(ours, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
        native_calls = []
        kernels.adamw = lambda *a: native_calls.append(1) or real_adamw(*a)
        for _ in range(3):
            for p, q in zip(ours, ref):
                p.grad = torch.randn(p.shape, generator=g) * 5
                q.grad = p.grad.clone()
            torch.testing.assert_close(clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(ref, 1.0))
            opts[0].step()
            opts[1].step()
        assert len(native_calls) == 2  # the first step creates the state: PyTorch's
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    finally:
        kernels.adamw = real_adamw
        kernels.reset()


# --- the training attention's bindings (kernels/train_attention.py) -----------------------------

def train_attention_and_sdpa(qkv: torch.Tensor, H: int, KV: int, dy: torch.Tensor, scale: float | None = None):
    """((y, d qkv) by train_attention.forward / backward, the same by SDPA and autograd) for q, k, v
    read as [B, T, heads, d] views of a packed [B, T, (H + 2 KV) d] projection."""
    B, T, width = qkv.shape
    d = width // (H + 2 * KV)
    s = d ** -0.5 if scale is None else scale
    q, k, v = qkv.view(B, T, H + 2 * KV, d).split([H, KV, KV], dim=2)
    y, probs = train_attention.forward(q, k, v, s)
    dqkv = torch.full_like(qkv, float("nan"))  # the backward overwrites every element
    dq, dk, dv = dqkv.view(B, T, H + 2 * KV, d).split([H, KV, KV], dim=2)
    train_attention.backward(q, k, v, probs, dy, s, dq, dk, dv)
    ref_in = qkv.clone().requires_grad_()
    rq, rk, rv = (t.transpose(1, 2) for t in ref_in.view(B, T, H + 2 * KV, d).split([H, KV, KV], dim=2))
    ref = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True, scale=s, enable_gqa=H != KV).transpose(1, 2)
    (ref_dqkv,) = torch.autograd.grad(ref, ref_in, dy)
    return (y, dqkv), (ref.detach(), ref_dqkv)


@needs_native
@pytest.mark.parametrize("B,T,H,KV,d,scale", [(2, 37, 4, 2, 16, None), (1, 16, 2, 1, 8, 1.0), (3, 2, 1, 1, 24, 0.3)])
def test_train_attention_bindings_equal_sdpa(B, T, H, KV, d, scale):
    """forward keeps P [B, H, T, Tp] and returns y [B, T, H, d] contiguous; backward writes every
    element of dq, dk, dv through their strides; both equal SDPA's with any scale."""
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, (H + 2 * KV) * d, generator=g)
    dy = torch.randn(B, T, H, d, generator=g).transpose(1, 2).contiguous().transpose(1, 2)  # not contiguous
    assert train_attention.fits(B, T, H, KV, d)
    (y, dqkv), (ref, ref_dqkv) = train_attention_and_sdpa(qkv, H, KV, dy, scale)
    assert y.shape == (B, T, H, d) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not dqkv.isnan().any()
    torch.testing.assert_close(dqkv, ref_dqkv, rtol=1e-5, atol=2e-5)


@needs_native
def test_train_attention_fits_only_what_the_kernel_takes():
    assert train_attention.fits(2, 16, 4, 2, 16)
    assert train_attention.fits(1, train_attention.MAX_T, 2, 1, 40)
    assert not train_attention.fits(1, train_attention.MAX_T + 1, 2, 1, 40)  # too long
    assert not train_attention.fits(2, 1, 4, 2, 16)  # one token
    assert not train_attention.fits(2, 16, 3, 2, 16)  # heads not a multiple of KV heads
    assert not train_attention.fits(2, 16, 4, 0, 16)
    assert not train_attention.fits(2, 16, 4, 2, 12)  # head dim not a multiple of 8
    assert not train_attention.fits(4096, 512, 16, 16, 64)  # P past MAX_P_BYTES
    train_attention.reset()  # forgets the resolved functions: resolved again on use
    assert train_attention.fits(2, 16, 4, 2, 16)
