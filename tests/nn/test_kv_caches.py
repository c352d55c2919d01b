"""The rolling KV cache (Mistral's ring buffer) and the attention-sink cache (StreamingLLM).

Exactness: decoding through a rolling cache gives the logits of a full forward with the sliding mask
at every step, over 3x the window, for any chunking of the input (prefill chunks longer than the
window included), for mixed sliding / full layers (Gemma 2), batched, left padded, through beam
search and speculative decoding. Memory: the buffers are allocated once and do not depend on how
long generation runs. A sink cache decoding token by token equals the Longformer mask (window plus
global leading tokens), and with the window covering everything it equals the plain cache."""
from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.generation.beam import beam_search
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens
from llmkit.models import DecoderLM
from llmkit.nn.kv_cache import KVCache, RollingKVCache, sink_cache

W = 5  # the sliding window of every model here


def model(layer_types: list[str] | None = None, window: int | None = W, seed: int = 0, ctx: int = 64,
          **kw) -> DecoderLM:
    n_layers = len(layer_types) if layer_types else 2
    cfg = ModelConfig(vocab_size=64, context_length=ctx, n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2,
                      mlp="swiglu", norm="rmsnorm", position="rope", bias=False, sliding_window=window,
                      layer_types=layer_types, **kw)
    torch.manual_seed(seed)
    m = DecoderLM(cfg).eval()
    with torch.no_grad():  # peaked weights: every key's influence shows, argmax decisions are no near-ties
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


def rolling(m: DecoderLM, batch: int = 1, max_len: int = 64, slack: int = 0) -> RollingKVCache:
    return RollingKVCache(m.cfg, batch, max_len, torch.float32, "cpu", slack=slack)


def plain(m: DecoderLM, batch: int = 1, max_len: int = 64) -> KVCache:
    c = m.cfg
    return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, torch.float32, "cpu")


def greedy_through(m: DecoderLM, cache, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, S + steps], the logits at every one of those positions) decoding greedily."""
    logits = [m(prompt, cache=cache)]
    ids = prompt
    for _ in range(steps):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        logits.append(m(nxt, cache=cache))
    return ids, torch.cat(logits, 1)


@pytest.mark.parametrize("slack", [0, 3])
@pytest.mark.parametrize("prompt_len", [1, 3, 2 * W + 1])
def test_greedy_decoding_over_three_windows_equals_the_full_forward(slack, prompt_len):
    m = model(["sliding", "sliding"])
    prompt = torch.randint(0, 64, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, logits = greedy_through(m, rolling(m, 2, slack=slack), prompt, 3 * W + 2)
        torch.testing.assert_close(logits, m(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks", [[7, 1, 1, 9, 1, 11], [3, 2, 2, 23], [30]])
def test_any_chunking_equals_the_full_forward(chunks):
    """Chunks longer than the window in the middle of a sequence: each query still sees its window."""
    m = model(["sliding", "full", "sliding"])
    ids = torch.randint(0, 64, (2, sum(chunks)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache, out, p = rolling(m, 2, slack=1), [], 0
        for n in chunks:
            out.append(m(ids[:, p:p + n], cache=cache))
            p += n
        torch.testing.assert_close(torch.cat(out, 1), m(ids), rtol=1e-4, atol=1e-5)


def test_memory_is_flat_past_the_window():
    """The buffers are allocated once: the same bytes after 3 windows of decoding as before, the
    same for a max_len of 100 or 10000, and a decoding step attends to window + slack keys."""
    m = model(["sliding", "sliding"])
    small, large = rolling(m, max_len=100, slack=2), rolling(m, max_len=10_000, slack=2)
    c = m.cfg
    ring_bytes = 2 * c.n_layers * 1 * c.n_kv_heads * (W + 2) * c.head_dim * 4
    assert small.nbytes == large.nbytes == ring_bytes
    assert large.bytes_per_token == 0 and plain(m).bytes_per_token > 0
    with torch.no_grad():
        greedy_through(m, large, torch.tensor([[1, 2, 3]]), 3 * W)
    assert large.nbytes == ring_bytes and large.pos == 3 + 3 * W
    k, _ = large.update(0, torch.zeros(1, c.n_kv_heads, 1, c.head_dim), torch.zeros(1, c.n_kv_heads, 1, c.head_dim))
    assert k.shape[2] == W + 2


def test_gemma2_style_alternating_layers_decode_equals_recompute_and_only_full_layers_grow():
    m = model(["sliding", "full", "sliding", "full"])
    cache = rolling(m, 1, max_len=64, slack=0)
    sizes = sorted((len(g.layers), g.size) for g in cache.groups)
    assert sizes == [(2, W), (2, 64)]  # two rings of the window, two full-length buffers
    assert cache.bytes_per_token == plain(m).bytes_per_token // 2
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids, logits = greedy_through(m, cache, prompt, 4 * W)
        torch.testing.assert_close(logits, m(ids), rtol=1e-4, atol=1e-5)


def test_make_cache_picks_the_rolling_cache_only_where_it_saves_memory():
    assert type(model(["sliding", "full"]).make_cache(1, 64)) is RollingKVCache
    assert type(model(["sliding", "sliding"]).make_cache(1, 64)) is KVCache  # uniform, within the context: the native step's
    assert type(model(["sliding", "sliding"]).make_cache(1, 200)) is RollingKVCache  # past the context: flat memory
    assert type(model(None).make_cache(1, 200)) is RollingKVCache  # sliding_window alone means every layer slides
    assert type(model(None).make_cache(1, 64)) is KVCache
    assert type(model(["sliding", "full"]).make_cache(1, W + RollingKVCache.SLACK)) is KVCache  # ring >= max_len
    assert type(model(None, window=None).make_cache(1, 64)) is KVCache
    sparse = model(["sparse", "full"], sparse={"window": 4, "global_tokens": 2})
    assert type(sparse.make_cache(1, 64)) is RollingKVCache


def test_reset_and_reorder():
    m = model(["sliding", "full"])
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = rolling(m, 3)
        m(ids[:, :12], cache=cache)
        cache.reset()
        torch.testing.assert_close(m(ids, cache=cache), m(ids), rtol=1e-4, atol=1e-5)
        cache = rolling(m, 3)
        m(ids[:, :15], cache=cache)
        cache.reorder(torch.tensor([2, 2, 0]))  # row 0 continues row 2, row 2 continues row 0
        got = m(ids[[2, 2, 0], 15:], cache=cache)
        torch.testing.assert_close(got, m(ids[[2, 2, 0]])[:, 15:], rtol=1e-4, atol=1e-5)


def test_crop_rolls_back_within_the_slack_and_refuses_beyond():
    m = model(["sliding", "full"])
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = rolling(m, slack=2)
        m(ids[:, :20], cache=cache)
        m(ids[:, 20:23], cache=cache)  # three drafts in place (n <= slack + 1), two rejected
        cache.crop(21)
        torch.testing.assert_close(m(ids[:, 21:], cache=cache), m(ids)[:, 21:], rtol=1e-4, atol=1e-5)
        with pytest.raises(UserError, match="cannot roll back.*num_draft_tokens"):
            cache.crop(30 - 4)


# --- through llmkit.generation -------------------------------------------------------------------

def _with_plain_cache(m: DecoderLM) -> DecoderLM:
    twin = model(m.cfg.layer_types, m.cfg.sliding_window)
    twin.load_state_dict(m.state_dict())
    twin.make_cache = lambda batch, max_len=None, dtype=None: plain(twin, batch, max_len or twin.cfg.context_length)
    return twin


@pytest.fixture
def small_slack(monkeypatch):
    monkeypatch.setattr(RollingKVCache, "SLACK", 1)  # the ring wraps many times within the context


def test_beam_search_with_the_rolling_cache_equals_the_plain_cache(small_slack):
    m = model(["sliding", "full"])
    cfg = GenerationConfig(max_new_tokens=40, num_beams=3)
    assert type(m.make_cache(3, 64)) is RollingKVCache
    with torch.no_grad():
        got = beam_search(m, [3, 9, 12], cfg)
        ref = beam_search(_with_plain_cache(m), [3, 9, 12], cfg)
    assert len(got.tokens) == 40 and got.tokens == ref.tokens and got.score == pytest.approx(ref.score, abs=1e-4)


def test_batched_left_padded_generation_with_the_rolling_cache_equals_the_plain_cache(small_slack):
    m = model(["sliding", "full", "sliding"])
    prompts = [[3, 9, 12, 40, 5, 6, 7, 8], [5], [11, 22, 33]]
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.0)
    assert type(m.make_cache(3, 64)) is RollingKVCache
    got = generate_batch(m, prompts, cfg)
    assert [len(r) for r in got] == [40] * 3
    assert got == generate_batch(_with_plain_cache(m), prompts, cfg)


def test_speculative_decoding_with_rolling_caches_equals_greedy(small_slack):
    target, draft = model(["sliding", "full"], seed=0), model(["sliding", "full"], seed=1)
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.0, num_draft_tokens=2)
    assert type(target.make_cache(1, 64)) is RollingKVCache
    assert list(generate_tokens(target, [3, 9, 12], cfg, draft=draft)) == list(generate_tokens(target, [3, 9, 12], cfg))


# --- attention sinks -----------------------------------------------------------------------------

def test_sink_cache_decoding_equals_the_longformer_mask():
    """Sinks 2 + window 4 at original positions, token by token = global_tokens 2, window 4."""
    n_sink, window = 2, 4
    m = model(None, window=None)
    twin = model(["sparse", "sparse"], window=None, sparse={"window": window, "global_tokens": n_sink})
    twin.load_state_dict(m.state_dict())
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = sink_cache(m.cfg, 2, n_sink, window)
        steps = torch.cat([m(ids[:, t:t + 1], cache=cache) for t in range(24)], 1)
        torch.testing.assert_close(steps, twin(ids), rtol=1e-4, atol=1e-5)
        assert (steps - m(ids)).abs().max() > 1e-3  # and it is not full attention


def test_sink_cache_streams_past_three_cache_sizes_in_bounded_memory():
    n_sink, window = 2, 6
    m = model(None, window=None, ctx=16)
    cache = sink_cache(m.cfg, 1, n_sink, window)
    before = cache.nbytes
    assert before == 2 * 2 * 2 * (n_sink + window) * 8 * 4  # 2 (k, v) x layers x KV heads x slots x d x fp32
    with torch.no_grad():
        ids, logits = greedy_through(m, cache, torch.tensor([[1, 2, 3]]), 3 * (n_sink + window))
    assert cache.nbytes == before and cache.pos == 3 + 3 * (n_sink + window) > m.cfg.context_length
    assert torch.isfinite(logits).all()


def test_sink_cache_covering_everything_equals_the_plain_cache():
    m = model(["sliding", "full"])
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = sink_cache(m.cfg, 2, 4, 26, max_len=64)  # 4 sinks + 26 recent: every position of 30
        got = torch.cat([m(ids[:, :9], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(9, 30)], 1)
        ref_cache = plain(m, 2)
        ref = torch.cat([m(ids[:, :9], cache=ref_cache)] + [m(ids[:, t:t + 1], cache=ref_cache) for t in range(9, 30)], 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_sink_cache_refuses_bad_sizes():
    with pytest.raises(UserError, match="n_sink must be >= 0 and window >= 1"):
        sink_cache(model().cfg, 1, 2, 0)
