"""Logits processors: every draw stays inside the set a filter keeps, penalties move the logits the
documented way, and each processor equals transformers' processor of the same name."""
from __future__ import annotations

import pytest
import torch

from llmkit.generation import sampling
from llmkit.generation.generate import GenerationConfig
from llmkit.generation.sampling import History, build_processors

V, DRAWS = 50, 4000


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, V, generator=g) * 2.0)


def draws(filtered: torch.Tensor, n: int = DRAWS) -> set[int]:
    """The distinct tokens drawn from softmax(filtered) in n draws (one batched multinomial)."""
    g = torch.Generator().manual_seed(1)
    probs = filtered.softmax(-1).expand(n, -1)
    return set(torch.multinomial(probs, 1, generator=g).flatten().tolist())


def test_samples_never_fall_outside_the_top_k(logits):
    allowed = set(logits.topk(5).indices.flatten().tolist())
    got = draws(sampling.top_k_filter(logits, 5))
    assert got <= allowed and len(got) == 5


def test_samples_never_fall_outside_the_top_p_nucleus(logits):
    probs = logits.softmax(-1).flatten()
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = set(), 0.0
    for t in order:  # the smallest prefix of the ranking whose mass reaches p
        nucleus.add(t)
        mass += float(probs[t])
        if mass >= 0.7:
            break
    got = draws(sampling.top_p_filter(logits, 0.7))
    assert got <= nucleus and len(got) == len(nucleus)


def test_samples_never_fall_below_min_p_times_the_top_probability(logits):
    probs = logits.softmax(-1).flatten()
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    got = draws(sampling.min_p_filter(logits, 0.2))
    assert got <= allowed and len(got) == len(allowed)


def test_typical_sampling_keeps_the_tokens_closest_to_the_entropy(logits):
    logp = logits.log_softmax(-1).flatten()
    entropy = -(logp.exp() * logp).sum()
    distance = (-logp - entropy).abs()
    kept = set(torch.nonzero(sampling.typical_filter(logits, 0.5).flatten() > float("-inf")).flatten().tolist())
    # whatever is kept is closer to the entropy than whatever is dropped
    assert max(float(distance[t]) for t in kept) <= min(float(distance[t]) for t in set(range(V)) - kept)
    assert draws(sampling.typical_filter(logits, 0.5)) <= kept


def test_combined_filters_keep_the_intersection(logits):
    cfg = GenerationConfig(top_k=10, top_p=0.8, min_p=0.05, temperature=0.7)
    processed = build_processors(cfg)(logits.clone(), None)
    top10 = set(logits.topk(10).indices.flatten().tolist())
    assert draws(processed) <= top10


def test_greedy_ignores_warpers_and_takes_the_argmax(logits):
    cfg = GenerationConfig(temperature=0.0, top_k=3, top_p=0.1)
    out = sampling.sample(build_processors(cfg)(logits, None), 0.0)
    assert int(out) == int(logits.argmax())


def test_repetition_penalty_lowers_every_seen_token_and_nothing_else():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = sampling.repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_frequency_penalty_grows_with_the_count_and_presence_penalty_does_not():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    torch.testing.assert_close(sampling.frequency_penalty(logits, counts, 0.5), torch.tensor([[0.0, -0.5, -1.5, 0.0]]))
    torch.testing.assert_close(sampling.presence_penalty(logits, counts, 0.5), torch.tensor([[0.0, -0.5, -0.5, 0.0]]))


def test_history_counts_generated_tokens_and_marks_prompt_tokens_seen():
    prompt = torch.tensor([[0, 3, 5, 5]])
    mask = torch.tensor([[0, 1, 1, 1]])  # the leading 0 is padding
    h = History.start(prompt, 8, mask)
    assert h.seen[0].nonzero().flatten().tolist() == [3, 5]
    h.add(torch.tensor([3]))
    h.add(torch.tensor([3]))
    assert h.counts[0, 3] == 2 and h.counts.sum() == 2


@pytest.mark.parametrize("name, ours, theirs", [
    ("top_k", dict(top_k=7), ("TopKLogitsWarper", dict(top_k=7))),
    ("top_p", dict(top_p=0.6), ("TopPLogitsWarper", dict(top_p=0.6))),
    ("min_p", dict(min_p=0.1), ("MinPLogitsWarper", dict(min_p=0.1))),
    ("typical", dict(typical_p=0.6), ("TypicalLogitsWarper", dict(mass=0.6))),
    ("temperature", dict(temperature=0.7), ("TemperatureLogitsWarper", dict(temperature=0.7))),
    ("repetition", dict(repetition_penalty=1.5), ("RepetitionPenaltyLogitsProcessor", dict(penalty=1.5))),
])
def test_each_processor_equals_the_transformers_processor(name, ours, theirs):
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g) * 2
    prompt = torch.randint(0, V, (3, 6), generator=g)
    ref = getattr(transformers, theirs[0])(**theirs[1])(prompt, logits.clone())
    history = History.start(prompt, V)
    out = build_processors(GenerationConfig(**ours))(logits.clone(), history)
    torch.testing.assert_close(out, ref)
