"""The decoding-time paths at the block's seams (accel/decode.py): for a few rows without autograd
(a batch of sequences, beams, a short draft: where the whole-model step declines) each sublayer and
the LM head run the native kernels, give the reference's logits within float rounding, and are
offered nothing else (many rows, autograd); decoding without any kernel gives the same tokens."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from accel_helpers import NEEDS_KERNELS, perturbed, reference
from llmkit import kernels
from llmkit.accel import decode
from llmkit.config import ModelConfig
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.models.decoder import DecoderLM
from llmkit.nn import seams
from llmkit.nn.linear import Linear
from llmkit.nn.norms import RMSNorm

pytestmark = NEEDS_KERNELS

BASE = dict(vocab_size=96, context_length=48, n_layers=2, d_model=48, n_heads=4)
VARIANTS = {
    "gpt2": dict(mlp="gelu_tanh"),
    "llama-gqa": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=2, bias=False),
    "mistral-window": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=2, bias=False, sliding_window=5),
    "gelu-sinusoidal-mqa": dict(position="sinusoidal", n_kv_heads=1),
}


def make(variant: str) -> DecoderLM:
    torch.manual_seed(0)
    return perturbed(DecoderLM(ModelConfig(**BASE, **VARIANTS[variant])).eval())


def cached_logits(model: DecoderLM, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = model.make_cache(ids.shape[0], model.cfg.context_length)
    with torch.no_grad():
        model(ids[:, :prefill], cache=cache)
        return torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])], 1)


@pytest.fixture
def kernel_linears(monkeypatch) -> Counter:
    """Which modules' linear maps went through the decoding paths' native matrix-vector product:
    module name -> calls (filled once a model is named with `.names`)."""
    seen: Counter = Counter()
    seen.names = {}
    real_linear, real_kernel = decode.linear, kernels.linear
    ran = []

    def kernel(*args):
        y = real_kernel(*args)
        ran.append(y is not None)
        return y

    def linear(x, layer):
        ran.clear()
        y = real_linear(x, layer)
        if ran == [True]:
            seen[seen.names.get(id(layer), "?")] += 1
        return y

    monkeypatch.setattr(decode, "linear", linear)
    monkeypatch.setattr(kernels, "linear", kernel)
    return seen


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_batch_of_three_decodes_through_the_sublayer_paths(variant, kernel_linears):
    """Batch 3: the whole-model step declines, every block's attention and MLP sublayer and the
    LM head run the native kernels for each new token, and the logits equal the reference's (and
    a full recomputation's)."""
    model = make(variant)
    kernel_linears.names = {id(m): name for name, m in model.named_modules()}
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    prefill = 5
    steps = ids.shape[1] - prefill
    got = cached_logits(model, ids, prefill)
    layers = ["attn.qkv", "attn.proj", "mlp.up", "mlp.down"] + (["mlp.gate"] if model.cfg.mlp == "swiglu" else [])
    want_calls = {f"blocks.{i}.{name}": steps for i in range(model.cfg.n_layers) for name in layers}
    assert dict(kernel_linears) == {**want_calls, "lm_head": steps}  # the prefill's 15 rows: not offered
    with reference():
        want = cached_logits(model, ids, prefill)
        with torch.no_grad():
            full = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, full[:, prefill:], rtol=1e-4, atol=1e-5)


def test_one_sequence_with_a_rescaled_attention_takes_the_decoding_core(monkeypatch):
    """Batch 1 where the whole-model step declines (a scale it does not compute): the sublayer paths
    and the native one-query attention run, with that scale."""
    model = make("llama-gqa")
    for block in model.blocks:
        block.attn.scale = 0.05
    cores = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: cores.append(a[3]) or real(*a))
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    got = cached_logits(model, ids, 4)
    assert cores == [0.05] * (model.cfg.n_layers * 8)
    with reference():
        want = cached_logits(model, ids, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_only_inference_rows_are_offered_to_the_kernel(monkeypatch):
    """At the LM head's seam: a few rows without autograd go to the kernel; many rows, or autograd,
    never reach it (the matrix product, or the folded training Function, runs), same numbers."""
    rows = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a: rows.append(a[0].numel() // a[0].shape[-1]) or real(*a))
    torch.manual_seed(0)
    norm, head = RMSNorm(64), Linear(64, 96)
    one_row, many_rows = torch.randn(1, 1, 64), torch.randn(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(seams.normed_head(norm, head, one_row), head(norm(one_row)), rtol=1e-5, atol=1e-6)
        assert rows == [1]
        torch.testing.assert_close(seams.normed_head(norm, head, many_rows), head(norm(many_rows)))
        assert rows == [1]  # 32 rows: a matrix product, not even offered to the kernel
    x = one_row.clone().requires_grad_()
    out = seams.normed_head(norm, head, x)  # autograd: not offered; the backward works
    out.sum().backward()
    assert rows == [1] and head.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(out, F.linear(norm(one_row), head.weight, head.bias), rtol=1e-5, atol=1e-6)


def test_decoding_with_and_without_kernel_agrees(monkeypatch):
    """LLMKIT_NATIVE=0 builds no kernel: every path declines and the tokens are the same."""
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
    with reference():
        assert list(generate_tokens(model, [1, 2, 3], cfg)) == without


def test_the_decoding_core_equals_sdpa_and_declines_the_rest():
    """decode.core: one query of one sequence over every cached key, any scale; anything else
    (a mask, a bias, dropout, weights asked for, several queries or sequences, autograd) declines."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 16, generator=g)
    cache_k, cache_v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(2))
    k, v = cache_k[:, :, :23], cache_v[:, :, :23]  # the filled prefix of a cache, as attention reads it

    def core(q=q, **kw):
        args = dict(mask=None, is_causal=False, scale=None, bias=None, dropout=0.0, softcap=None, return_weights=False)
        return decode.core(q, k, v, **{**args, **kw})

    with torch.no_grad():
        for scale in (None, 0.3):
            y = core(scale=scale)
            want = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
            assert y is not None and y.shape == (1, 4, 1, 16)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        assert core(mask=torch.ones(1, 23, dtype=torch.bool)) is None
        assert core(bias=torch.zeros(1, 23)) is None
        assert core(dropout=0.1) is None
        assert core(softcap=5.0) is None
        assert core(return_weights=True) is None
        assert core(q=torch.randn(1, 4, 2, 16)) is None  # two queries
        assert core(q=q.double()) is None
    assert core() is None  # autograd on
