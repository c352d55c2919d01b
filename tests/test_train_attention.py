"""The native training attention (kernels/attention.c via kernels/train_attention.py): outputs and
gradients equal PyTorch's SDPA for every head layout and awkward size, inside whole models too,
the result does not depend on the thread count, and it steps aside wherever it does not apply."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from llmkit import kernels
from llmkit.config import ModelConfig
from llmkit.kernels import build, train_attention
from llmkit.models.decoder import DecoderLM

pytestmark = [pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                 reason="no C compiler on this machine"),
              pytest.mark.skipif(not kernels.available(), reason=f"no native kernels: {build.why_not('native')}")]


def sdpa_reference(qkv: torch.Tensor, H: int, KV: int) -> torch.Tensor:
    B, T, width = qkv.shape
    q, k, v = qkv.view(B, T, H + 2 * KV, width // (H + 2 * KV)).split([H, KV, KV], dim=2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=H != KV)
    return y.transpose(1, 2)


def native_and_reference(B, T, H, KV, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (H + 2 * KV) * d, generator=g) * scale).requires_grad_()
    assert train_attention.wanted(qkv, H, KV)
    y = train_attention.causal_attention(qkv, H, KV)
    dy = torch.randn(y.shape, generator=g)
    (grad,) = torch.autograd.grad(y, qkv, dy)
    y_ref = sdpa_reference(qkv, H, KV)
    (grad_ref,) = torch.autograd.grad(y_ref, qkv, dy)
    return (y, grad), (y_ref, grad_ref)


@pytest.mark.parametrize("B,T,H,KV,d", [
    (12, 64, 4, 4, 32),   # the nanoGPT CPU shape
    (3, 37, 4, 2, 16),    # grouped-query, T not a multiple of 4, 8 or 16
    (2, 5, 6, 1, 8),      # multi-query, fewer tokens than one tile
    (1, 130, 2, 2, 64),   # T past a multiple of 16 by 2
    (2, 64, 4, 4, 24),    # head dim not a multiple of 16
    (1, 512, 2, 1, 40),   # the longest sequence taken
    (2, 2, 1, 1, 8),      # the shortest
])
def test_equals_sdpa_forward_and_backward(B, T, H, KV, d):
    (y, grad), (y_ref, grad_ref) = native_and_reference(B, T, H, KV, d)
    assert y.shape == (B, T, H, d) and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=2e-5)


def test_large_scores_stay_exact():
    """Scores in the hundreds: the softmax subtracts each row's maximum, nothing overflows."""
    (y, grad), (y_ref, grad_ref) = native_and_reference(2, 33, 2, 2, 16, scale=12.0)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-3)


def test_same_bits_with_one_thread_or_two():
    """Each (sequence, head) is one task whatever the thread count: results are bit-identical."""
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            (y, grad), _ = native_and_reference(4, 50, 4, 2, 32, seed=3)
            out.append((y, grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_strided_input():
    """A qkv whose rows are not adjacent (a slice of a wider tensor) is read through its strides."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 20, 200, generator=g, requires_grad=True)
    qkv = wide[:, :, 8:8 + 3 * 2 * 16]
    y = train_attention.causal_attention(qkv, 2, 2)
    torch.testing.assert_close(y, sdpa_reference(qkv, 2, 2), rtol=1e-5, atol=1e-5)


def test_declines_what_it_does_not_cover():
    ok = torch.randn(2, 16, 96, requires_grad=True)
    assert train_attention.wanted(ok, 2, 2)
    with torch.no_grad():
        assert not train_attention.wanted(ok, 2, 2)  # inference: SDPA keeps no T x T matrix
    assert not train_attention.wanted(ok.detach(), 2, 2)
    assert not train_attention.wanted(ok.double(), 2, 2)
    assert not train_attention.wanted(torch.randn(2, 16, 3 * 2 * 12, requires_grad=True), 2, 2)  # d = 12
    assert not train_attention.wanted(torch.randn(1, train_attention.MAX_T + 1, 48, requires_grad=True), 2, 2)
    assert not train_attention.wanted(torch.randn(2, 1, 96, requires_grad=True), 2, 2)  # one token
    assert not train_attention.wanted(ok, 3, 2)  # heads not a multiple of KV heads


VARIANTS = {
    "gpt2": dict(mlp="gelu", position="learned"),
    "llama-gqa-rope": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=2, bias=False),
    "multi-query": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=1, bias=False),
}


def grads(model: DecoderLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def count_kernel_calls(monkeypatch) -> list[int]:
    """Calls of the attention kernel's Functions: alone, or within the pre-norm sublayer."""
    calls: list[int] = []
    for fn in (train_attention._CausalAttention, train_attention._PrenormAttention):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_gradients_equal_sdpa(variant, monkeypatch):
    """A training step's every parameter gradient is the same through the kernel as through SDPA."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=40, n_layers=2, d_model=64, n_heads=4, **VARIANTS[variant])
    model = DecoderLM(cfg)
    ids = torch.randint(0, 64, (3, 33))
    calls = count_kernel_calls(monkeypatch)
    native = grads(model, ids)
    assert len(calls) == cfg.n_layers
    monkeypatch.setattr(train_attention, "_fits", lambda *a: False)  # SDPA, as modules
    reference = grads(model, ids)
    for name in reference:
        torch.testing.assert_close(native[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_not_used_with_dropout_padding_or_window(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 64, (2, 20))
    base = dict(vocab_size=64, context_length=32, n_layers=1, d_model=32, n_heads=2)
    DecoderLM(ModelConfig(**base, dropout=0.1)).train()(ids).sum().backward()
    DecoderLM(ModelConfig(**base, sliding_window=8))(ids).sum().backward()
    DecoderLM(ModelConfig(**base))(ids, attention_mask=torch.ones(2, 20, dtype=torch.long)).sum().backward()
    assert calls == []
    DecoderLM(ModelConfig(**base, dropout=0.1)).eval()(ids).sum().backward()  # eval: dropout is off
    DecoderLM(ModelConfig(**base, sliding_window=32))(ids).sum().backward()  # window wider than T
    assert len(calls) == 2
