"""Streaming: pieces never split a multi-byte character (byte-level BPE emits partial UTF-8), they
reassemble to the full text, and stop strings end the text without leaking a prefix of themselves."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from llmkit.generation.generate import GenerationConfig, generate, stream
from llmkit.generation.streaming import TextStreamer, cut_at_stop
from llmkit.nn.kv_cache import KVCache

TEXT = "Snow ❄️ on 東京タワー, tea 🍵 and a crab 🦀 — naïve café 😀👍🏽 done."


class ScriptedLM(nn.Module):
    """A stand-in model whose greedy output is a fixed token script (then EOS), whatever the prompt."""

    def __init__(self, script: list[int], vocab: int, eos: int):
        super().__init__()
        self.cfg = SimpleNamespace(context_length=1024, vocab_size=vocab)
        self.script, self.eos = script + [eos], eos
        self.anchor = nn.Parameter(torch.zeros(1))
        self.prompt_len: int | None = None

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        return KVCache(1, batch_size, 1, max_len or 1024, 1, torch.float32, "cpu")

    def forward(self, idx: torch.Tensor, cache: KVCache, **_) -> torch.Tensor:
        if cache.pos == 0:
            self.prompt_len = idx.shape[1]
        cache.advance(idx.shape[1])
        n = cache.pos - self.prompt_len
        logits = torch.full((idx.shape[0], idx.shape[1], self.cfg.vocab_size), -1e4)
        logits[:, -1, self.script[min(n, len(self.script) - 1)]] = 0.0
        return logits


def earliest_pieces(tok, ids: list[int]) -> list[str]:
    """The pieces a streamer that holds nothing back longer than needed emits: after each token, the
    new whole characters of the decoded text (a trailing partial UTF-8 sequence decodes to U+FFFD)."""
    out, done = [], ""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k]).rstrip("\ufffd")
        if len(text) > len(done):
            out.append(text[len(done):])
            done = text
    return out


def test_byte_level_bpe_really_splits_these_characters(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode(TEXT)
    assert any("\ufffd" in gpt2_tokenizer.decode([i]) for i in ids)


def test_streamed_pieces_hold_only_whole_characters_and_reassemble(gpt2_tokenizer):
    streamer = TextStreamer(gpt2_tokenizer)
    ids = gpt2_tokenizer.encode(TEXT)
    pieces = [streamer.put(t) for t in ids] + [streamer.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT
    # each character as soon as its last byte arrives: not buffered until the end
    assert [p for p in pieces if p] == earliest_pieces(gpt2_tokenizer, ids)


def test_stream_from_a_model_reassembles_to_generate(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = ScriptedLM(tok.encode(TEXT), tok.vocab_size, tok.eos_id)
    cfg = GenerationConfig(max_new_tokens=200, temperature=0.0)
    pieces = list(stream(model, tok, "Weather:", cfg))
    assert pieces == earliest_pieces(tok, tok.encode(TEXT)) and len(pieces) > 20
    assert "".join(pieces) == TEXT == generate(model, tok, "Weather:", cfg)


def test_stop_string_ends_the_text_and_no_prefix_of_it_is_streamed(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = ScriptedLM(tok.encode(TEXT), tok.vocab_size, tok.eos_id)
    cfg = GenerationConfig(max_new_tokens=200, temperature=0.0, stop=["crab 🦀"])
    pieces = list(stream(model, tok, "x", cfg))
    assert "".join(pieces) == TEXT[:TEXT.index("crab 🦀")]
    assert not any("cr" in p for p in pieces)


def test_stop_string_that_never_completes_is_flushed_at_the_end(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = ScriptedLM(tok.encode("ends with cr"), tok.vocab_size, tok.eos_id)
    assert generate(model, tok, "x", GenerationConfig(temperature=0.0, stop=["crab"])) == "ends with cr"


def test_stop_token_ends_the_stream_and_is_not_printed(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ids = tok.encode(TEXT)
    model = ScriptedLM(ids, tok.vocab_size, tok.eos_id)
    cut = generate(model, tok, "x", GenerationConfig(temperature=0.0, stop_token_ids=[ids[4]]))
    assert cut == tok.decode(ids[:4])


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc STOP def END", ["END", "STOP"]) == "abc "
    assert cut_at_stop("nothing here", ["END"]) == "nothing here"


def test_continuation_keeps_the_space_sentencepiece_drops_at_a_text_start():
    import pytest
    from pathlib import Path
    from llmkit.tokenizers import load_tokenizer
    model_file = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
    if not model_file.is_file():
        pytest.skip("Llama 2 tokenizer not present")
    tok = load_tokenizer(model_file)
    ids = tok.encode("Once upon a time")
    streamer = TextStreamer(tok, context=ids[:1])
    pieces = [streamer.put(t) for t in ids[1:]] + [streamer.finish()]
    assert "".join(pieces) == " upon a time"
    assert tok.decode(ids[1:]) == "upon a time"  # what decoding the continuation alone gives


def test_long_streams_decode_a_bounded_window_per_token(gpt2_tokenizer):
    """Each token decodes a bounded window of ids (not the whole continuation), and the
    pieces still reassemble exactly, multi-byte characters and SentencePiece spacing included."""
    import pytest
    from pathlib import Path
    from llmkit.tokenizers import load_tokenizer

    tokenizers = [gpt2_tokenizer]
    sp = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
    if sp.is_file():
        tokenizers.append(load_tokenizer(sp))
    text = (TEXT + " Once upon a time, naïve café owners said 你好 🌧️. ") * 12
    for tok in tokenizers:
        longest = []
        real_decode = tok.decode
        tok.decode = lambda ids, _real=real_decode: longest.append(len(ids)) or _real(ids)
        try:
            ids = tok.encode(text)
            streamer = TextStreamer(tok, context=ids[:1])
            pieces = [streamer.put(t) for t in ids[1:]] + [streamer.finish()]
        finally:
            tok.decode = real_decode
        assert len(ids) > 300
        assert "".join(pieces) == real_decode(ids)[len(real_decode(ids[:1])):]
        assert all("\ufffd" not in p for p in pieces)
        # a cut inside a multi-byte character waits a few tokens to commit: still bounded, not O(len)
        assert max(longest) <= TextStreamer.ANCHOR + 3 * TextStreamer.WINDOW < len(ids) // 4
    if len(tokenizers) == 1:
        pytest.skip("SentencePiece tokenizer not present; byte-level BPE checked")
