"""The one attention core (`nn.attention.attend`): every variant is an argument, and the fused
(SDPA) and eager paths agree with an independent float64 reference built from the formula."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.nn.attention import attend, eager_attention


def reference(q, k, v, mask=None, is_causal=False, scale=None, bias=None, softcap=None):
    """softmax(softcap(scale q k^T) + bias, masked) v, one (batch, head, query) at a time in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, d = q.shape
    S, groups = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    s = 1 / math.sqrt(d) if scale is None else scale
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores = (k[b, h // groups] @ q[b, h, i]) * s
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                if bias is not None:
                    scores = scores + bias.double().expand(B, H, T, S)[b, h, i]
                keep = torch.ones(S, dtype=torch.bool)
                if mask is not None:
                    keep &= mask.expand(B, H, T, S)[b, h, i]
                if is_causal:
                    keep &= torch.arange(S) <= S - T + i
                scores = scores.masked_fill(~keep, float("-inf"))
                out[b, h, i] = scores.softmax(-1) @ v[b, h // groups]
    return out.float()


def tensors(T=5, S=None, H=4, KV=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return torch.randn(2, H, T, d, generator=g), torch.randn(2, KV, S, d, generator=g), torch.randn(2, KV, S, d, generator=g)


CASES = {
    "causal": dict(is_causal=True),
    "bidirectional": dict(),
    "unscaled (T5)": dict(scale=1.0),
    "additive bias (ALiBi / T5 relative)": dict(bias=torch.randn(1, 4, 5, 5)),
    "bias with causal mask": dict(bias=torch.randn(1, 4, 5, 5), is_causal=True),
    "soft-capped (Gemma 2)": dict(softcap=0.5, is_causal=True),
    "bool padding mask": dict(mask=torch.tensor([True, True, False, True, True])[None, None, None]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("weights", [False, True], ids=["fused", "eager"])
def test_attend_equals_the_formula(name, weights):
    q, k, v = tensors()
    kwargs = CASES[name]
    y, w = attend(q, k, v, return_weights=weights, **kwargs)
    torch.testing.assert_close(y, reference(q, k, v, **kwargs), rtol=1e-5, atol=1e-5)
    assert (w is not None) == weights
    if weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))


def test_cross_attention_reads_keys_of_another_length():
    q, k, v = tensors(T=3, S=7)
    y, _ = attend(q, k, v)
    torch.testing.assert_close(y, reference(q, k, v), rtol=1e-5, atol=1e-5)
    causal, _ = attend(q, k, v, is_causal=True)  # queries are the last 3 of 7 positions (a KV cache)
    torch.testing.assert_close(causal, reference(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_a_soft_cap_changes_large_scores_only():
    q, k, v = tensors()
    big = attend(q * 30, k, v, softcap=5.0)[0]
    assert not torch.allclose(big, attend(q * 30, k, v)[0], atol=1e-3)
    torch.testing.assert_close(attend(q * 1e-3, k, v, softcap=50.0)[0], attend(q * 1e-3, k, v)[0], rtol=1e-4, atol=1e-6)


def test_grouped_query_with_every_kv_head_equals_multi_head():
    q, k, v = tensors(KV=4)
    groups = tensors(KV=1)
    y_mha = attend(q, k, v, is_causal=True)[0]
    torch.testing.assert_close(y_mha, eager_attention(q, k, v, None, is_causal=True)[0], rtol=1e-5, atol=1e-6)
    # one KV head shared by all: the same as MHA with that head copied to every query head
    _, k1, v1 = groups
    torch.testing.assert_close(attend(q, k1, v1, is_causal=True)[0],
                               attend(q, k1.expand(2, 4, 5, 8), v1.expand(2, 4, 5, 8), is_causal=True)[0],
                               rtol=1e-5, atol=1e-6)
