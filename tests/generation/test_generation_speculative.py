"""Speculative decoding: greedy output is the target's greedy output token for token; sampled output
follows the target's distribution (checked by total-variation distance over many seeds)."""
from __future__ import annotations

import itertools

import pytest
import torch

from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.generation.speculative import accept_drafts, speculative_tokens

PROMPTS = [[3, 9, 12, 40], [5], [11, 22, 33, 44, 55, 60, 1, 2, 8]]


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_target_greedy(tiny_target_and_draft, k):
    target, draft = tiny_target_and_draft
    for prompt in PROMPTS:
        cfg = GenerationConfig(max_new_tokens=30, temperature=0.0, num_draft_tokens=k)
        assert list(speculative_tokens(target, draft, prompt, cfg)) == list(generate_tokens(target, prompt, cfg))


def test_speculative_greedy_with_the_target_as_its_own_draft_accepts_everything(tiny_target_and_draft):
    target, _ = tiny_target_and_draft
    cfg = GenerationConfig(max_new_tokens=25, temperature=0.0, num_draft_tokens=4)
    assert list(generate_tokens(target, PROMPTS[0], cfg, draft=target)) == list(generate_tokens(target, PROMPTS[0], cfg))


def test_speculative_greedy_with_penalties_equals_target_greedy(tiny_target_and_draft):
    target, draft = tiny_target_and_draft
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.0, repetition_penalty=1.8, num_draft_tokens=3)
    assert list(speculative_tokens(target, draft, PROMPTS[2], cfg)) == list(generate_tokens(target, PROMPTS[2], cfg))


def test_speculative_greedy_stops_at_the_context_length(tiny_target_and_draft):
    target, draft = tiny_target_and_draft
    ctx = target.cfg.context_length
    cfg = GenerationConfig(max_new_tokens=3 * ctx, temperature=0.0, num_draft_tokens=5)
    out = list(speculative_tokens(target, draft, PROMPTS[0], cfg))
    assert len(out) == ctx - len(PROMPTS[0]) + 1
    assert out == list(generate_tokens(target, PROMPTS[0], cfg))[:len(out)]


def test_accept_rule_output_follows_the_target_distribution():
    """Many independent trials of one round with fixed p and q: every emitted position is p-distributed."""
    g = torch.Generator().manual_seed(0)
    V, k, N = 6, 3, 40000
    p = (torch.randn(k + 1, V, generator=g) * 1.5).softmax(-1)
    q = (torch.randn(k, V, generator=g) * 1.5).softmax(-1)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], 1)
    n, nxt = accept_drafts(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, g)
    first = torch.where(n > 0, drafts[:, 0], nxt)
    assert tv(torch.bincount(first, minlength=V) / N, p[0]) < 0.015
    assert tv(q[0], p[0]) > 0.2  # the draft really is a different distribution
    reached = n >= 1  # second emitted token exists for these trials
    second = torch.where(n[reached] > 1, drafts[reached, 1], nxt[reached])
    assert tv(torch.bincount(second, minlength=V) / int(reached.sum()), p[1]) < 0.02


def test_speculative_sampling_follows_the_target_two_token_distribution():
    """End to end with real models: the joint law of the first two tokens over 1500 seeds equals the
    target's, computed exactly; the draft's own law is far from it."""
    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM

    V = 5
    shape = dict(vocab_size=V, context_length=16, d_model=16, n_heads=2, mlp="swiglu", norm="rmsnorm",
                 position="rope", bias=False, init_std=0.5)
    torch.manual_seed(0)
    target, draft = DecoderLM(ModelConfig(n_layers=2, **shape)).eval(), DecoderLM(ModelConfig(n_layers=1, **shape)).eval()
    prompt = [1, 3]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = torch.stack([p1[a] * target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(V)])
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
        draft_joint = torch.stack([q1[a] * draft(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(V)])
    counts = torch.zeros(V, V)
    runs = 1500
    for seed in range(runs):
        cfg = GenerationConfig(max_new_tokens=2, seed=seed, num_draft_tokens=2)
        a, b = speculative_tokens(target, draft, prompt, cfg)
        counts[a, b] += 1
    assert tv(exact.flatten(), draft_joint.flatten()) > 0.2
    assert tv(counts.flatten() / runs, exact.flatten()) < 0.06
