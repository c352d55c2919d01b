"""The native training attention (kernels/attention.c, bound by kernels/train_attention.py) as the
attention core (accel/fused_attention.py `core`, at nn.attention.attend's seam) and as the folded
pre-norm sublayer (`residual`): outputs and gradients equal PyTorch's SDPA for every head layout and
awkward size, inside whole models too, the result does not depend on the thread count, and it steps
aside wherever it does not apply (a mask, a bias, non-causal, dropout, cross-attention, weights
asked for, a flag or attribute on the module it was not written for)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from accel_helpers import count_functions, reference
from llmkit import kernels
from llmkit.accel import fused_attention
from llmkit.config import ModelConfig
from llmkit.kernels import build, train_attention
from llmkit.models.decoder import DecoderLM
from llmkit.nn import seams
from llmkit.nn.attention import Attention, attend
from llmkit.nn.norms import LayerNorm

pytestmark = [pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                 reason="no C compiler on this machine"),
              pytest.mark.skipif(not kernels.available(), reason=f"no native kernels: {build.why_not('native')}")]


def packed_heads(qkv: torch.Tensor, H: int, KV: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, d], k, v [B, KV, T, d] as views of a packed [B, T, (H + 2 KV) d] projection, as
    Attention.split_heads makes them."""
    B, T, width = qkv.shape
    q, k, v = qkv.view(B, T, H + 2 * KV, width // (H + 2 * KV)).split([H, KV, KV], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def core(q, k, v, **kw):
    """fused_attention.core with attend's defaults: causal self-attention."""
    args = dict(mask=None, is_causal=True, scale=None, bias=None, dropout=0.0, softcap=None, return_weights=False)
    args.update(kw)
    return fused_attention.core(q, k, v, **args)


def sdpa(q, k, v, scale=None, is_causal=True):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def native_and_reference(B, T, H, KV, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (H + 2 * KV) * d, generator=g) * scale).requires_grad_()
    y = core(*packed_heads(qkv, H, KV))
    assert y is not None, "the kernel should take this"
    dy = torch.randn(y.shape, generator=g)
    (grad,) = torch.autograd.grad(y, qkv, dy)
    y_ref = sdpa(*packed_heads(qkv, H, KV))
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
    assert y.shape == (B, H, T, d) and y.transpose(1, 2).is_contiguous()  # [B, T, H, d] rows: proj reads them
    assert y.grad_fn.name() == "_CoreAttentionBackward"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scale", [None, 0.2, 1.0])
@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (3, 1)])
def test_separate_q_k_v_with_any_scale_equal_sdpa(H, KV, scale):
    """q, k, v as separate tensors (not views of one projection), T5-style scale 1.0 and others:
    outputs and the gradient of each equal SDPA's."""
    g = torch.Generator().manual_seed(7)
    B, T, d = 2, 29, 16
    q = torch.randn(B, H, T, d, generator=g).requires_grad_()
    k = torch.randn(B, KV, T, d, generator=g).requires_grad_()
    v = torch.randn(B, KV, T, d, generator=g).requires_grad_()
    y = core(q, k, v, scale=scale)
    assert y is not None and y.grad_fn.name() == "_CoreAttentionBackward"
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    y_ref = sdpa(q, k, v, scale=scale)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, grads_ref, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=name)
    # through the seam: attend runs the kernel and gives the same numbers
    y_seam, weights = attend(q, k, v, is_causal=True, scale=scale)
    assert weights is None and y_seam.grad_fn.name() == "_CoreAttentionBackward"
    torch.testing.assert_close(y_seam, y, rtol=0, atol=0)


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
    y = core(*packed_heads(qkv, 2, 2))
    assert y is not None
    torch.testing.assert_close(y, sdpa(*packed_heads(qkv, 2, 2)), rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, generator=g)
    (got,) = torch.autograd.grad(y, wide, dy)
    (want,) = torch.autograd.grad(sdpa(*packed_heads(qkv, 2, 2)), wide, dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_declines_what_it_does_not_cover():
    """Each a case the kernel was not written for: the core returns None and attend runs SDPA."""
    def qkv(B=2, T=16, H=2, KV=2, d=16, S=None, grad=True, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, T, d, generator=g, dtype=dtype)
        k, v = (torch.randn(B, KV, S or T, d, generator=g, dtype=dtype) for _ in range(2))
        return tuple(t.requires_grad_(grad) for t in (q, k, v))

    ok = qkv()
    assert core(*ok) is not None
    with torch.no_grad():
        assert core(*ok) is None  # inference: SDPA keeps no T x T matrix
    assert core(*qkv(grad=False)) is None
    assert core(*qkv(dtype=torch.float64)) is None
    assert core(*qkv(d=12)) is None  # head dim not a multiple of 8
    assert core(*qkv(T=train_attention.MAX_T + 1, B=1)) is None
    assert core(*qkv(T=1)) is None  # one token
    assert core(*qkv(H=3, KV=2)) is None  # heads not a multiple of KV heads
    # what attend's other arguments ask for
    T = ok[0].shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert core(*ok, mask=causal) is None  # a mask, even one equal to causality
    assert core(*ok, bias=torch.zeros(1, 2, T, T)) is None  # an additive bias (ALiBi, T5)
    assert core(*ok, is_causal=False) is None  # bidirectional (encoders)
    assert core(*ok, dropout=0.1) is None  # attention dropout
    assert core(*ok, softcap=5.0) is None  # soft-capped scores
    assert core(*ok, return_weights=True) is None  # the weights asked for
    assert core(*qkv(S=24)) is None  # cross-attention: keys of another length
    q, k, v = qkv(d=16)
    assert core(q.transpose(2, 3).contiguous().transpose(2, 3), k, v) is None  # head dim not contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert core(*ok) is None
    # and through attend each gives SDPA's (or the eager path's) numbers, not the kernel's
    q, k, v = ok
    for kw in (dict(mask=causal), dict(is_causal=False), dict(bias=torch.zeros(1, 2, T, T), is_causal=True)):
        y, _ = attend(q, k, v, **kw)
        assert "CoreAttention" not in y.grad_fn.name(), kw
    y, weights = attend(q, k, v, is_causal=True, return_weights=True)
    assert weights is not None and "CoreAttention" not in y.grad_fn.name()
    torch.testing.assert_close(y, sdpa(q, k, v), rtol=1e-5, atol=1e-5)


VARIANTS = {
    "gpt2": dict(mlp="gelu", position="learned"),
    "llama-gqa-rope": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=2, bias=False),
    "multi-query": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=1, bias=False),
}


def grads(model: DecoderLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def count_kernel_calls(monkeypatch) -> list[str]:
    """Calls of the attention kernel's Functions: the core, or the folded pre-norm sublayer."""
    return count_functions(monkeypatch, "attention", "core")


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_gradients_equal_sdpa(variant, monkeypatch):
    """A training step's every parameter gradient is the same through the kernel as through SDPA."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=40, n_layers=2, d_model=64, n_heads=4, **VARIANTS[variant])
    model = DecoderLM(cfg)
    ids = torch.randint(0, 64, (3, 33))
    calls = count_kernel_calls(monkeypatch)
    native = grads(model, ids)
    assert calls == ["attention"] * cfg.n_layers
    monkeypatch.setattr(train_attention, "fits", lambda *a: False)  # the kernel declines: SDPA, as modules
    calls.clear()
    reference_grads = grads(model, ids)
    assert calls == []
    for name in reference_grads:
        torch.testing.assert_close(native[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


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
    assert calls == ["attention", "attention"]


# --- the folded sublayer never bypasses a flag or attribute it was not written for ---------------

def attention_sublayer(cfg: ModelConfig, seed: int = 0) -> tuple[Attention, LayerNorm, torch.Tensor]:
    torch.manual_seed(seed)
    attn, norm = Attention(cfg, 0), LayerNorm(cfg.d_model)
    with torch.no_grad():
        for p in (*attn.parameters(), *norm.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    return attn, norm, torch.randn(3, 21, cfg.d_model)


def sublayer_grads(attn, norm, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
    attn.zero_grad(set_to_none=True)
    norm.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = seams.sublayer(attn, norm, x)
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin())
    return y.detach(), [x.grad, *(p.grad for p in (*attn.parameters(), *norm.parameters()))]


def sdpa_sublayer_grads(attn, norm, x, is_causal: bool, scale=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x + proj(SDPA(q, k, v)) written out from the modules' weights, with this causality."""
    attn.zero_grad(set_to_none=True)
    norm.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    B, T, _ = x.shape
    q, k, v = attn.split_heads(F.linear(norm(x), attn.qkv.weight, attn.qkv.bias))
    y = sdpa(q, k, v, scale=scale, is_causal=is_causal).transpose(1, 2).reshape(B, T, -1)
    y = x + F.linear(y, attn.proj.weight, attn.proj.bias)
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin())
    return y.detach(), [x.grad, *(p.grad for p in (*attn.parameters(), *norm.parameters()))]


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * (1 + w.abs().max().item()))


CFG = ModelConfig(vocab_size=64, context_length=32, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, qkv_bias=True)


def test_folded_sublayer_equals_sdpa_with_any_scale(monkeypatch):
    """What the fold does implement, scale included, it implements exactly."""
    calls = count_kernel_calls(monkeypatch)
    for scale in (None, 0.7):
        attn, norm, x = attention_sublayer(CFG)
        attn.scale = scale
        calls.clear()
        got = sublayer_grads(attn, norm, x)
        assert calls == ["attention"]
        assert_same(got, sdpa_sublayer_grads(attn, norm, x, is_causal=True, scale=scale))


def test_folded_sublayer_declines_non_causal_attention(monkeypatch):
    """Attention(causal=False) (an encoder's) is not causal attention: the fold and the core step
    aside and the gradients are SDPA's without the causal mask."""
    calls = count_kernel_calls(monkeypatch)
    attn, norm, x = attention_sublayer(CFG)
    attn.causal = False
    assert not seams.SUBLAYERS[Attention].accepts(attn)
    calls.clear()
    got = sublayer_grads(attn, norm, x)
    assert calls == []
    assert_same(got, sdpa_sublayer_grads(attn, norm, x, is_causal=False))
    causal = sdpa_sublayer_grads(attn, norm, x, is_causal=True)
    assert not torch.allclose(got[0], causal[0], atol=1e-3)  # the flag makes a difference to miss

    model = DecoderLM(ModelConfig(vocab_size=64, context_length=32, n_layers=2, d_model=32, n_heads=4))
    for block in model.blocks:
        block.attn.causal = False
    ids = torch.randint(0, 64, (2, 20))
    got = grads(model, ids)
    assert calls == []
    with reference():
        want = grads(model, ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_folded_sublayer_declines_an_attribute_it_does_not_know(monkeypatch):
    """An attribute a variant sets on an Attention instance (ALiBi slopes, a patched forward, a
    hook, weights asked for) makes the fold step aside: the modules run, with the same numbers
    as the reference where the attribute changes nothing."""
    calls = count_kernel_calls(monkeypatch)
    for change in ("alibi", "forward", "hook", "return_weights"):
        attn, norm, x = attention_sublayer(CFG)
        if change == "alibi":
            attn.alibi = torch.zeros(1)
        elif change == "forward":
            attn.forward = lambda *a, _attn=attn, **kw: Attention.forward(_attn, *a, **kw)
        elif change == "hook":
            attn.register_forward_hook(lambda *a: None)
        else:
            attn.return_weights = True
        assert not seams.SUBLAYERS[Attention].accepts(attn), change
        calls.clear()
        got = sublayer_grads(attn, norm, x)
        assert "attention" not in calls, change
        assert_same(got, sdpa_sublayer_grads(attn, norm, x, is_causal=True))
