"""Native CPU kernels: the matrix-vector kernel equals F.linear, the layers route to it only where it
applies, and everything still works without it."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F

from llmkit import kernels
from llmkit.config import ModelConfig
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.kernels import build
from llmkit.models.decoder import DecoderLM
from llmkit.nn.linear import Linear

needs_native = pytest.mark.skipif(not kernels.available(), reason=f"no native kernels: {build.why_not('gemv')}")
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
        y = kernels.gemv(x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_native
def test_gemv_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        kernels.gemv(torch.randn(1, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.gemv(torch.randn(1, 4), torch.randn(3, 4), torch.randn(2))


@needs_native
def test_linear_routes_only_inference_rows_to_kernel(monkeypatch):
    calls = []
    real = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    layer = Linear(64, 96)
    one_row, many_rows = torch.randn(1, 1, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(one_row), F.linear(one_row, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        assert len(calls) == 1
        layer(many_rows)  # 32 rows: a matrix product, PyTorch's kernel
        layer(one_row.to(torch.float64).to(torch.float32).transpose(0, 1))  # still contiguous 1 row: kernel
        assert len(calls) == 2
        layer.double()(one_row.double())  # fp64: PyTorch
        assert len(calls) == 2
    layer.float()
    out = layer(one_row.requires_grad_())  # autograd needs PyTorch's backward
    out.sum().backward()
    assert len(calls) == 2 and layer.weight.grad is not None


@needs_native
def test_decoding_with_and_without_kernel_agrees(monkeypatch):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_preset("tiny")).eval()
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0)
    monkeypatch.setenv("LLMKIT_NATIVE", "0")
    build.reset()
    try:
        without = list(generate_tokens(model, [1, 2, 3], cfg))
        assert not kernels.available() and "LLMKIT_NATIVE=0" in kernels.status()
    finally:
        monkeypatch.delenv("LLMKIT_NATIVE")
        build.reset()
    assert kernels.available() and "yes" in kernels.status()
    calls = []
    real = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    assert list(generate_tokens(model, [1, 2, 3], cfg)) == without and calls


def _child_gemv(queue):
    x, w = torch.randn(1, 300), torch.randn(999, 300)
    with kernels.threads(2), torch.no_grad():
        queue.put(torch.allclose(kernels.gemv(x, w), x @ w.t(), rtol=1e-4, atol=1e-4))


@needs_native
def test_kernel_pool_survives_fork():
    with kernels.threads(2), torch.no_grad():  # start the pool in the parent first
        kernels.gemv(torch.randn(1, 300), torch.randn(999, 300))
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
            ok = all(torch.allclose(kernels.gemv(xs[i], w), xs[i] @ w.t(), rtol=1e-4, atol=1e-4) for _ in range(50))
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
    build.reset()
    try:
        assert build.load("gemv") is None
        assert build.why_not("gemv")
        layer = Linear(8, 4)
        x = torch.randn(1, 8)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert not list((tmp_path / "cache").glob("**/*.tmp"))  # no half-written library left
    finally:
        build.reset()
