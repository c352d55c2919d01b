"""Beam search returns exactly what transformers' beam search returns on the same weights, across
beam counts, length penalties and early stopping, with and without the stop token being reached."""
from __future__ import annotations

import pytest
import torch

from generation_constants import EOS
from llmkit.generation.beam import beam_search
from llmkit.generation.generate import GenerationConfig, generate_tokens

CASES = [
    dict(num_beams=2, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=1.0, early_stopping=True),
    dict(num_beams=3, length_penalty=0.5, early_stopping=False),
    dict(num_beams=5, length_penalty=2.0, early_stopping=True),
]
PROMPTS = [[3, 9, 12, 40], [5, 17], [11, 22, 33, 44, 55, 60]]


def hf_beams(hf, prompt, max_new, eos, **kw) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                      eos_token_id=eos, **kw)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def likely_stop(model, prompt) -> int:
    """A stop id that beams will meet: the 4th token of the greedy continuation (random models
    rarely produce a fixed EOS, and then the finishing path would go untested)."""
    return list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=4, temperature=0.0)))[-1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_beam_search_equals_transformers_beam_search(pair, case):
    hf, model = pair
    for prompt in PROMPTS:
        for max_new, eos in ((6, EOS), (20, EOS), (20, likely_stop(model, prompt))):
            ours = beam_search(model, prompt, GenerationConfig(max_new_tokens=max_new, **case), eos_id=eos).tokens
            assert ours == hf_beams(hf, prompt, max_new, eos, **case), (prompt, max_new, eos)


def test_beam_search_reaches_the_stop_token_in_these_cases(pair):
    """Guard for the test above: the stop-token path is really exercised."""
    _, model = pair
    ended = []
    for case in CASES:
        for p in PROMPTS:
            eos = likely_stop(model, p)
            result = beam_search(model, p, GenerationConfig(max_new_tokens=20, **case), eos_id=eos)
            ended.append(result.tokens[-1] == eos and len(result.tokens) < 20)
    assert sum(ended) >= len(ended) // 2


def test_one_beam_is_greedy_search_and_more_beams_never_score_worse(llama_pair):
    _, model = llama_pair
    prompt = PROMPTS[0]
    greedy = list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=10, temperature=0.0)))
    assert beam_search(model, prompt, GenerationConfig(max_new_tokens=10, num_beams=1)).tokens == greedy

    def logprob(tokens: list[int]) -> float:
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            lp = model(ids)[0, len(prompt) - 1:-1].log_softmax(-1)
        return float(lp.gather(-1, ids[0, len(prompt):, None]).sum())

    beam = beam_search(model, prompt, GenerationConfig(max_new_tokens=10, num_beams=4, length_penalty=0.0)).tokens
    assert logprob(beam) >= logprob(greedy) - 1e-5


def test_generate_tokens_uses_beam_search_when_num_beams_is_set(llama_pair):
    _, model = llama_pair
    cfg = GenerationConfig(max_new_tokens=12, num_beams=3)
    assert list(generate_tokens(model, PROMPTS[1], cfg, eos_id=EOS)) == beam_search(model, PROMPTS[1], cfg, EOS).tokens
