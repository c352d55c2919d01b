"""The decoding loop: greedy is deterministic and equals transformers' greedy; seeds reproduce;
stop tokens end generation; a left-padded batch equals its rows decoded one by one."""
from __future__ import annotations

import pytest
import torch

from generation_constants import EOS
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens

PROMPTS = [[3, 9, 12, 40], [5], [11, 22, 33, 44, 55, 60, 1, 2, 8], [30, 31]]


def greedy(n: int = 24, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0.0, **kw)


def test_greedy_generation_is_deterministic(pair):
    _, model = pair
    runs = [list(generate_tokens(model, PROMPTS[0], greedy())) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 24


def test_greedy_tokens_equal_transformers_greedy(pair):
    hf, model = pair
    for prompt in PROMPTS[:3]:
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert list(generate_tokens(model, prompt, greedy(24))) == ref


def test_same_seed_same_sample_and_other_seed_differs(llama_pair):
    _, model = llama_pair
    cfg = lambda s: GenerationConfig(max_new_tokens=20, seed=s, top_p=0.95)
    a, b, c = (list(generate_tokens(model, PROMPTS[0], cfg(s))) for s in (1, 1, 2))
    assert a == b and a != c


def test_stop_token_is_the_last_token_generated(llama_pair):
    _, model = llama_pair
    free = list(generate_tokens(model, PROMPTS[2], greedy(24)))
    stop = free[5]
    out = list(generate_tokens(model, PROMPTS[2], greedy(24, stop_token_ids=[stop])))
    assert out == free[:free.index(stop) + 1]
    assert list(generate_tokens(model, PROMPTS[2], greedy(24), eos_id=stop)) == out


def test_repetition_and_frequency_penalties_reduce_repeats(llama_pair):
    _, model = llama_pair
    repeats = lambda toks: len(toks) - len(set(toks))
    plain = list(generate_tokens(model, PROMPTS[1], greedy(40)))
    for kw in (dict(repetition_penalty=3.0), dict(frequency_penalty=5.0), dict(presence_penalty=5.0)):
        assert repeats(list(generate_tokens(model, PROMPTS[1], greedy(40, **kw)))) < repeats(plain), kw


def test_generation_runs_past_the_context_by_sliding(llama_pair):
    _, model = llama_pair
    out = list(generate_tokens(model, PROMPTS[0], greedy(model.cfg.context_length + 10)))
    assert len(out) == model.cfg.context_length + 10


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(seed=5, top_k=10, repetition_penalty=1.3),
                                      dict(seed=7, min_p=0.05, frequency_penalty=0.4, presence_penalty=0.2)])
def test_each_row_of_a_left_padded_batch_equals_its_unbatched_result(pair, settings):
    _, model = pair
    cfg = GenerationConfig(max_new_tokens=16, **settings)
    batched = generate_batch(model, PROMPTS, cfg, eos_id=EOS)
    single = [list(generate_tokens(model, p, cfg, eos_id=EOS)) for p in PROMPTS]
    assert batched == single


def test_batch_rows_stop_independently_at_their_stop_token(llama_pair):
    _, model = llama_pair
    free = [list(generate_tokens(model, p, greedy(12))) for p in PROMPTS]
    stop = free[0][3]
    rows = generate_batch(model, PROMPTS, greedy(12, stop_token_ids=[stop]))
    for row, ref in zip(rows, free):
        assert row == (ref[:ref.index(stop) + 1] if stop in ref else ref)


@pytest.mark.parametrize("batched", [False, True])
def test_n_new_tokens_cost_one_prefill_and_n_minus_1_steps(pair, batched):
    """The logits after the last token are never needed: no forward pass computes them."""
    _, model = pair
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    try:
        if batched:
            rows = generate_batch(model, PROMPTS[:2], greedy(7))
            assert [len(r) for r in rows] == [7, 7]
        else:
            assert len(list(generate_tokens(model, PROMPTS[0], greedy(7)))) == 7
    finally:
        handle.remove()
    assert len(calls) == 7 and calls[1:] == [1] * 6
