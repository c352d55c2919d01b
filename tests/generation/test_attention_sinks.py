"""Streaming generation with attention sinks (StreamingLLM, Xiao et al. 2023): `attention_sinks=N`
decodes past the context with a cache of fixed size (the first N positions plus the most recent
ones), equal to a full forward with that sparse mask, and refuses what it cannot stream."""
from __future__ import annotations

import importlib

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens, sample_tokens
from llmkit.models.decoder import DecoderLM

BASE = dict(vocab_size=48, context_length=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, mlp="swiglu",
            norm="rmsnorm", position="rope", bias=False)


def model(**kw) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**{**BASE, **kw})).eval()


def test_greedy_streaming_equals_the_sink_mask_recomputed_at_every_step():
    """3x the context, token by token: each greedy pick equals argmax of a full forward in which each
    position sees the first 2 positions and the last 14 (a longformer mask with 2 global tokens)."""
    m = model()
    prompt = [3, 7, 1, 9, 4]
    got = list(generate_tokens(m, prompt, GenerationConfig(max_new_tokens=43, temperature=0.0, attention_sinks=2)))
    reference = model(layer_types=["sparse", "sparse"], sparse={"pattern": "longformer", "window": 14,
                                                                 "global_tokens": 2})
    reference.load_state_dict(m.state_dict())
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(43):
            ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_the_cache_stays_the_same_size_however_long_it_streams(monkeypatch):
    g = importlib.import_module("llmkit.generation.generate")
    made, sizes = [], []
    original = g.streaming_cache
    monkeypatch.setattr(g, "streaming_cache", lambda *a: made.append(original(*a)) or made[-1])
    cfg = GenerationConfig(max_new_tokens=60, temperature=0.0, attention_sinks=4)
    for i, _ in enumerate(sample_tokens(model(), [1, 2, 3], cfg)):
        if i in (10, 30, 58):
            sizes.append(made[0].nbytes)
    assert len(made) == 1 and len(sizes) == 3 and len(set(sizes)) == 1, sizes
    assert made[0].pos > 3 * BASE["context_length"]


@pytest.mark.parametrize("kw, cfg, words", [
    (dict(position="learned"), dict(attention_sinks=2), "learned positions"),
    (dict(), dict(attention_sinks=16), "no room"),
    (dict(), dict(attention_sinks=2, num_beams=2), "sampling and greedy"),
])
def test_what_cannot_stream_is_refused_in_one_line(kw, cfg, words):
    with pytest.raises(UserError, match=words):
        list(generate_tokens(model(**kw), [1, 2, 3], GenerationConfig(max_new_tokens=4, **cfg)))


def test_batches_are_refused():
    with pytest.raises(UserError, match="one sequence at a time"):
        generate_batch(model(), [[1, 2], [3]], GenerationConfig(max_new_tokens=2, attention_sinks=2))
