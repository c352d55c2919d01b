"""Native CPU kernels: the matrix-vector kernel equals F.linear, the layers route to it only where it
applies, and everything still works without it."""
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
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.kernels import build, train_attention
from llmkit.models.decoder import DecoderLM
from llmkit.nn.linear import Linear
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


@needs_native
def test_linear_routes_only_inference_rows_to_kernel(monkeypatch):
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a: calls.append(a[0].numel() // 64 <= 8) or real(*a))
    layer = Linear(64, 96)
    one_row, many_rows = torch.randn(1, 1, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(one_row), F.linear(one_row, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        assert calls == [True]
        layer(many_rows)  # 32 rows: a matrix product, not even offered to the kernel
        assert calls == [True]
    out = layer(one_row.requires_grad_())  # autograd: offered, declined, PyTorch's backward works
    out.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(out, F.linear(one_row, layer.weight, layer.bias))



@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or os.environ.get("LLMKIT_NATIVE") == "0",
                    reason="no C compiler here, or native kernels switched off")
def test_sources_compile_where_a_compiler_exists():
    """A compile error must fail here, not turn every native test into a skip."""
    kernels.reset()
    assert kernels.available(), kernels.status()

@needs_native
def test_decoding_with_and_without_kernel_agrees(monkeypatch):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_preset("tiny")).eval()
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0)
    monkeypatch.setenv("LLMKIT_NATIVE", "0")
    kernels.reset()
    try:
        without = list(generate_tokens(model, [1, 2, 3], cfg))
        assert not kernels.available() and "LLMKIT_NATIVE=0" in kernels.status()
    finally:
        monkeypatch.delenv("LLMKIT_NATIVE")
        kernels.reset()
    assert kernels.available() and "yes" in kernels.status()
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a: calls.append(1) or real(*a))
    assert list(generate_tokens(model, [1, 2, 3], cfg)) == without and calls


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
        layer = Linear(8, 4)
        x = torch.randn(1, 8)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
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
        qkv = torch.randn(2, 21, 3 * 2 * 16, generator=g, requires_grad=True)
        assert train_attention.wanted(qkv, 2, 2)
        y = train_attention.causal_attention(qkv, 2, 2)
        q, k, v = qkv.view(2, 21, 6, 16).split(2, dim=2)
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True).transpose(1, 2)
        dy = torch.randn(y.shape, generator=g)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(y, qkv, dy)[0], torch.autograd.grad(ref, qkv, dy)[0],
                                   rtol=1e-5, atol=2e-5)
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
