"""Logits processors: every draw stays inside the set a filter keeps, penalties move the logits the
documented way, and each processor equals transformers' processor of the same name."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.generation import sampling
from llmkit.generation.generate import GenerationConfig
from llmkit.generation.sampling import History, build_processors

V, DRAWS = 50, 4000
NEG = float("-inf")


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    """One peaked row (its top token holds most of the mass): for the greedy and top-k tests."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, V, generator=g) * 2.0)


@pytest.fixture(scope="module")
def spread() -> torch.Tensor:
    """[4, V] rows whose mass is spread over many tokens, so that top-p, min-p and typical sampling
    each keep several tokens (a filter keeping only the argmax would pass on a peaked row), in rows
    of different shapes; the token ids are in random order, so a sort that is not undone shows."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, V, generator=g) * torch.tensor([[0.7], [1.0], [1.0], [1.4]])


def _probs(row: torch.Tensor) -> list[float]:
    """softmax in float64, by hand"""
    vals = [float(v) for v in row.double()]
    top = max(vals)
    e = [math.exp(v - top) for v in vals]
    return [v / sum(e) for v in e]


def _keep_prefix(ranked: list[int], probs: list[float], mass: float) -> tuple[set[int], float]:
    """The shortest prefix of `ranked` whose probability reaches `mass` (the token that crosses it
    is kept), and how far the boundary is from a tie (so float32 rounding cannot flip it)."""
    kept, before = [], 0.0
    for t in ranked:
        if before >= mass:
            break
        kept.append(t)
        before += probs[t]
    margin = min(before - mass, mass - (before - probs[kept[-1]]))
    return set(kept), margin


def ref_top_p(row: torch.Tensor, p: float) -> tuple[set[int], float]:
    probs = _probs(row)
    return _keep_prefix(sorted(range(len(probs)), key=lambda t: -probs[t]), probs, p)


def ref_min_p(row: torch.Tensor, min_p: float) -> tuple[set[int], float]:
    probs = _probs(row)
    threshold = min_p * max(probs)
    return {t for t, q in enumerate(probs) if q >= threshold}, min(abs(q - threshold) for q in probs) / threshold


def ref_typical(row: torch.Tensor, mass: float) -> tuple[set[int], float]:
    probs = _probs(row)
    entropy = -sum(q * math.log(q) for q in probs)
    distance = [abs(-math.log(q) - entropy) for q in probs]
    ranked = sorted(range(len(probs)), key=lambda t: distance[t])
    kept, margin = _keep_prefix(ranked, probs, mass)
    gaps = sorted(distance)
    return kept, min(margin, min(b - a for a, b in zip(gaps, gaps[1:])))


def kept_set(filtered: torch.Tensor, original: torch.Tensor) -> set[int]:
    """The tokens a filter kept in one row; kept logits must be unchanged, the others -inf."""
    keep = filtered > NEG
    assert torch.equal(filtered[keep], original[keep])
    return set(torch.nonzero(keep).flatten().tolist())


def draws(filtered: torch.Tensor, n: int = DRAWS) -> set[int]:
    """The distinct tokens drawn from softmax(filtered) in n draws (one batched multinomial), one row."""
    g = torch.Generator().manual_seed(1)
    probs = filtered.softmax(-1).expand(n, -1)
    return set(torch.multinomial(probs, 1, generator=g).flatten().tolist())


def test_samples_never_fall_outside_the_top_k(logits):
    allowed = set(logits.topk(5).indices.flatten().tolist())
    got = draws(sampling.top_k_filter(logits, 5))
    assert got <= allowed and len(got) == 5


@pytest.mark.parametrize("name, fn, ref, value", [
    ("top_p", sampling.top_p_filter, ref_top_p, 0.7),
    ("top_p", sampling.top_p_filter, ref_top_p, 0.35),
    ("min_p", sampling.min_p_filter, ref_min_p, 0.2),
    ("min_p", sampling.min_p_filter, ref_min_p, 0.4),
    ("typical", sampling.typical_filter, ref_typical, 0.5),
    ("typical", sampling.typical_filter, ref_typical, 0.8),
])
def test_filter_keeps_exactly_the_reference_set_in_every_row(spread, name, fn, ref, value):
    """Against a computation by hand in float64 (sorted Python lists, not the filters' tensor ops):
    the exact kept set per row, filtered in one batch, with several tokens kept and several dropped."""
    out = fn(spread.clone(), value)
    assert out.shape == spread.shape
    for r in range(spread.shape[0]):
        want, margin = ref(spread[r], value)
        assert margin > 1e-4, f"row {r} is too close to a tie for float32 to decide"  # the fixture's, not the filter's
        assert 3 <= len(want) <= V - 3, f"{name}={value} keeps {len(want)} tokens of row {r}: not a discriminating case"
        assert kept_set(out[r], spread[r]) == want, f"{name}={value}, row {r}"
        # the filter also decides one row at a time
        assert kept_set(fn(spread[r:r + 1].clone(), value)[0], spread[r]) == want


def test_samples_never_fall_outside_the_kept_set(spread):
    for fn, value in ((sampling.top_p_filter, 0.7), (sampling.min_p_filter, 0.2), (sampling.typical_filter, 0.5)):
        row = spread[1:2]
        kept = kept_set(fn(row, value)[0], row[0])
        got = draws(fn(row, value), 20_000)
        assert got <= kept and len(got) >= len(kept) - 2  # nearly every kept token turns up


def test_filters_at_their_neutral_values_keep_everything(spread):
    assert torch.equal(sampling.top_p_filter(spread, 1.0), spread)
    assert torch.equal(sampling.min_p_filter(spread, 0.0), spread)
    assert torch.equal(sampling.typical_filter(spread, 1.0), spread)
    # at the other end each keeps its one best token (top-p, min-p: the argmax)
    assert [kept_set(sampling.top_p_filter(spread, 1e-6)[r], spread[r]) for r in range(4)] == \
        [{int(spread[r].argmax())} for r in range(4)]
    assert [kept_set(sampling.min_p_filter(spread, 1.0)[r], spread[r]) for r in range(4)] == \
        [{int(spread[r].argmax())} for r in range(4)]


def test_combined_filters_apply_in_order_each_to_what_the_last_kept(spread):
    """temperature, then top-k, then top-p over the top-k's renormalised distribution, then min-p:
    transformers' order. The reference chains the hand computations above."""
    cfg = GenerationConfig(top_k=12, top_p=0.6, min_p=0.25, temperature=0.7)
    processed = build_processors(cfg)(spread.clone(), None)
    for r in range(spread.shape[0]):
        row = spread[r] / 0.7
        top12 = set(row.topk(12).indices.tolist())
        row = row.masked_fill(~torch.isin(torch.arange(V), torch.tensor(sorted(top12))), NEG)
        nucleus, margin = ref_top_p(row, 0.6)
        assert margin > 1e-4 and 2 <= len(nucleus) < 12
        row = row.masked_fill(~torch.isin(torch.arange(V), torch.tensor(sorted(nucleus))), NEG)
        want, margin = ref_min_p(row, 0.25)
        assert margin > 1e-4
        got = set(torch.nonzero(processed[r] > NEG).flatten().tolist())
        assert got == want and len(want) >= 2, f"row {r}"
        torch.testing.assert_close(processed[r][sorted(got)], spread[r][sorted(got)] / 0.7)


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
    logits = torch.randn(3, V, generator=g)  # spread out: every filter keeps several tokens per row
    prompt = torch.randint(0, V, (3, 6), generator=g)
    ref = getattr(transformers, theirs[0])(**theirs[1])(prompt, logits.clone())
    history = History.start(prompt, V)
    out = build_processors(GenerationConfig(**ours))(logits.clone(), history)
    torch.testing.assert_close(out, ref)
    kept = (ref > NEG).sum(-1)
    assert (kept >= 3).all() and (name in ("temperature", "repetition") or (kept < V).all())
