"""Attention masks against explicit Python loops, and the sliding window through the model: a window
of w lets the query at absolute position p see exactly keys p-w+1..p, so with one layer the logits
at t depend on tokens t-w+1..t and on nothing before. Shifting the window by one, in either
direction, fails here (not only in the transformers comparisons)."""
from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.models import DecoderLM
from llmkit.nn.masks import causal_mask, combine, padding_mask


def loop_mask(q_len: int, kv_len: int, offset: int, window: int | None) -> list[list[bool]]:
    """mask[i][j]: query i (at absolute position offset + i) may see key j"""
    out = []
    for i in range(q_len):
        p = offset + i
        lo = 0 if window is None else max(0, p - window + 1)
        out.append([lo <= j <= p for j in range(kv_len)])
    return out


@pytest.mark.parametrize("q_len, kv_len, offset", [(1, 1, 0), (5, 5, 0), (3, 8, 5), (1, 10, 9), (4, 6, 0)])
@pytest.mark.parametrize("window", [None, 1, 2, 3, 7, 100])
def test_causal_mask_equals_the_loop(q_len, kv_len, offset, window):
    got = causal_mask(q_len, kv_len, offset, window)
    assert got.dtype == torch.bool and got.shape == (q_len, kv_len)
    assert got.tolist() == loop_mask(q_len, kv_len, offset, window)


@pytest.mark.parametrize("window", [1, 2, 4, 6])
def test_window_w_sees_exactly_the_last_w_keys(window):
    T = 12
    mask = causal_mask(T, T, 0, window)
    for i in range(T):
        assert torch.nonzero(mask[i]).flatten().tolist() == list(range(max(0, i - window + 1), i + 1))
    assert (mask.sum(-1)[window - 1:] == window).all()  # once the sequence is long enough: w keys each


def test_window_at_least_the_length_is_plain_causal_and_window_one_is_the_diagonal():
    assert torch.equal(causal_mask(9, 9, 0, 9), causal_mask(9, 9))
    assert torch.equal(causal_mask(9, 9, 0, 50), torch.ones(9, 9).tril().bool())
    assert torch.equal(causal_mask(9, 9, 0, 1), torch.eye(9, dtype=torch.bool))
    assert not torch.equal(causal_mask(9, 9, 0, 8), causal_mask(9, 9))  # 8 < 9 does cut


def test_padding_mask_and_combine():
    am = torch.tensor([[0, 1, 1], [1, 1, 1]])
    pad = padding_mask(am)
    assert pad.shape == (2, 1, 1, 3) and pad.dtype == torch.bool
    assert pad[:, 0, 0].tolist() == [[False, True, True], [True, True, True]]
    causal = causal_mask(3, 3)
    both = combine(causal, None, pad)
    assert both.shape == (2, 1, 3, 3)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                assert bool(both[b, 0, i, j]) == (j <= i and bool(am[b, j]))
    assert combine(None, None) is None
    assert combine(None, causal) is causal


# --- through the model ------------------------------------------------------------------------

def one_layer(window: int | None, position: str = "rope", seed: int = 0) -> DecoderLM:
    cfg = ModelConfig(vocab_size=64, context_length=64, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2,
                      mlp="swiglu", norm="rmsnorm", position=position, bias=False, sliding_window=window)
    torch.manual_seed(seed)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that every key's influence is visible
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def _same_weights(model: DecoderLM, window: int | None) -> DecoderLM:
    other = one_layer(window, model.cfg.position)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_window_covering_the_sequence_equals_full_attention(position):
    T = 16
    full = one_layer(None, position)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    ones = torch.ones(2, T, dtype=torch.long)  # a padding mask makes the model build its mask explicitly
    with torch.no_grad():
        ref = full(ids)
        for window in (T, T + 5):
            windowed = _same_weights(full, window)
            torch.testing.assert_close(windowed(ids), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(windowed(ids, attention_mask=ones), ref, rtol=1e-5, atol=1e-5)
        # and a window shorter than the sequence does change the logits
        assert (_same_weights(full, T - 1)(ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("window", [1, 3, 5])
def test_logits_at_t_depend_on_exactly_the_tokens_in_the_window(window):
    """One layer: changing the token at j changes the logits at t exactly for j <= t <= j + w - 1."""
    T = 14
    model = one_layer(window)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (1, T), generator=g)
    with torch.no_grad():
        base = model(ids)[0]
        for j in (0, 2, 6):
            changed = ids.clone()
            changed[0, j] = (ids[0, j] + 17) % 64
            diff = (model(changed)[0] - base).abs().amax(-1)  # [T]
            for t in range(T):
                if j <= t <= j + window - 1:
                    assert diff[t] > 1e-3, f"w={window}: token {j} must reach position {t}"
                else:
                    assert diff[t] < 1e-6, f"w={window}: token {j} must not reach position {t} (diff {diff[t]:.2e})"


@pytest.mark.parametrize("window", [2, 5])
def test_windowed_decoding_through_the_cache_equals_the_full_forward(window):
    """Query at absolute position p = cache offset + i: the window moves with the offset."""
    T = 16
    model = one_layer(window)
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1)
        steps = [model(ids[:, :4], cache=cache)]  # a prefill, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(4, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
