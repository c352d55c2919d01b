"""prepare -> open_prepared gives exactly the in-memory token stream, in the right dtype, reused on re-run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmkit.data import prepare as P
from llmkit.data.prepare import open_prepared, prepare
from llmkit.data.tokens import WindowSampler, train_val_split
from llmkit.tokenizers import load_tokenizer

from data_helpers import word_tokenizer, write


def in_memory_stream(tokenizer, documents: list[str]) -> np.ndarray:
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer.encode(doc) + [tokenizer.eos_id]
    return np.array(ids)


def test_prepared_stream_equals_tokenizing_in_memory_with_eos(tmp_path, gpt2_dir, shakespeare, monkeypatch):
    monkeypatch.setattr(P, "PIECE_CHARS", 50_000)  # cut the 1 MB play into ~20 pieces at safe newlines
    monkeypatch.setattr(P, "CHUNK_CHARS", 200_000)
    records = [{"text": "First record.\n\n\n  With  spaces "}, {"text": "Émoji 🙂 <|endoftext|> inside"}, {"text": "x"}]
    jsonl = write(tmp_path / "r.jsonl", "\n".join(json.dumps(r) for r in records))
    s = prepare([shakespeare, jsonl], gpt2_dir, tmp_path / "out", workers=2, shard_tokens=70_000, progress=False)
    tok = load_tokenizer(gpt2_dir)
    want = in_memory_stream(tok, [shakespeare.read_text(encoding="utf-8")] + [r["text"] for r in records])
    got = np.asarray(open_prepared(tmp_path / "out"))
    assert s.documents == 4 and s.tokens == len(want) and s.shards == -(-len(want) // 70_000)
    np.testing.assert_array_equal(got, want)
    assert len(want) == 338_025 + 1 + sum(len(tok.encode(r["text"])) + 1 for r in records)


def test_fast_engine_is_chosen_for_gpt2_when_tiktoken_exists(tmp_path, gpt2_dir, shakespeare):
    pytest.importorskip("tiktoken")
    s = prepare([shakespeare], gpt2_dir, tmp_path / "out", workers=1, progress=False)
    assert s.engine == "tiktoken"


def test_uint16_when_vocab_fits_else_uint32(tmp_path):
    docs = write(tmp_path / "d.txt", "the cat sat on a mat w65600 w3")
    for vocab, dtype in ((65_536, "uint16"), (65_700, "uint32")):
        tok_dir = word_tokenizer(tmp_path / f"tok{vocab}", vocab)
        s = prepare([docs], tok_dir, tmp_path / f"out{vocab}", workers=1, progress=False)
        arr = open_prepared(tmp_path / f"out{vocab}")
        assert s.dtype == dtype and arr.dtype == np.dtype(dtype)
        tok = load_tokenizer(tok_dir)
        np.testing.assert_array_equal(np.asarray(arr), in_memory_stream(tok, [docs.read_text()]))


def test_slices_across_shard_boundaries_match_the_flat_stream(tmp_path, small_tok):
    words = ["the", "cat", "sat", "on", "a", "mat", "dog"]
    docs = [" ".join(words[(i * 3 + j) % 7] for j in range(i % 11 + 1)) for i in range(60)]
    folder = tmp_path / "docs"
    for i, d in enumerate(docs):
        write(folder / f"{i:03d}.txt", d)
    prepare([folder], small_tok, tmp_path / "out", workers=2, shard_tokens=7, progress=False)
    view = open_prepared(tmp_path / "out")
    flat = np.asarray(view)
    # every shard full (7 tokens) but the last: the writer splits documents across shard edges
    sizes = [sh["tokens"] for sh in view.index["shards"]]
    assert len(sizes) == -(-len(flat) // 7) > 30 and sizes[:-1] == [7] * (len(sizes) - 1) and 1 <= sizes[-1] <= 7
    for lo, hi in [(0, 7), (5, 9), (6, 30), (13, 14), (0, len(flat)), (len(flat) - 3, len(flat))]:
        np.testing.assert_array_equal(np.asarray(view[lo:hi]), flat[lo:hi])
    inner = view[3:-4][2:20]  # views of views stay lazy and keep offsets
    assert len(inner) == 18 and type(inner) is type(view)
    np.testing.assert_array_equal(np.asarray(inner, dtype=np.int64), flat[5:23])
    assert view[-1] == flat[-1] and view[8] == flat[8]


def test_train_val_split_and_window_sampler_work_on_lazy_views(tmp_path, gpt2_dir, shakespeare):
    prepare([shakespeare], gpt2_dir, tmp_path / "out", shard_tokens=50_000, workers=1, progress=False)
    tokens = open_prepared(tmp_path / "out")
    train, val = train_val_split(tokens, 0.1, 64)
    assert isinstance(train, type(tokens)) and len(train) + len(val) == len(tokens)
    flat = np.asarray(tokens)
    a = WindowSampler(train, 64, seed=3).batch(step=5, micro=0, batch_size=8)
    b = WindowSampler(train, 64, seed=3).batch(step=5, micro=0, batch_size=8)
    ref = WindowSampler(flat[: len(train)], 64, seed=3).batch(step=5, micro=0, batch_size=8)
    for x, y, z in zip(a, b, ref):
        assert (x == y).all() and (x == z).all()


def test_rerun_on_same_inputs_reuses_without_tokenizing(tmp_path, small_tok, monkeypatch):
    src = write(tmp_path / "a.txt", "the cat sat")
    first = prepare([src], small_tok, tmp_path / "out", workers=1, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    def boom(batch):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(P, "encode_chunk", boom)
    again = prepare([src], small_tok, tmp_path / "out", workers=1, progress=False)
    assert again.reused and not first.reused and again.tokens == first.tokens
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes


def test_changed_source_is_prepared_again(tmp_path, small_tok):
    src = write(tmp_path / "a.txt", "the cat sat")
    prepare([src], small_tok, tmp_path / "out", workers=1, progress=False)
    write(src, "the cat sat on the mat")
    s = prepare([src], small_tok, tmp_path / "out", workers=1, progress=False)
    assert not s.reused and s.tokens == 7


def test_failed_prepare_keeps_the_earlier_result(tmp_path, small_tok):
    good = write(tmp_path / "a.txt", "the cat sat")
    prepare([good], small_tok, tmp_path / "out", workers=1, progress=False)
    before = np.asarray(open_prepared(tmp_path / "out")).copy()
    bad = write(tmp_path / "b.jsonl", '{"text": "the dog"}\nnot json\n')
    with pytest.raises(P.UserError):
        prepare([good, bad], small_tok, tmp_path / "out", workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(open_prepared(tmp_path / "out")), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # temp dir cleaned


def test_prepared_dir_carries_its_tokenizer(tmp_path, small_tok):
    prepare([write(tmp_path / "a.txt", "the cat")], small_tok, tmp_path / "out", workers=1, progress=False)
    assert P.is_prepared(tmp_path / "out") and not P.is_prepared(tmp_path)
    assert load_tokenizer(tmp_path / "out").encode("the cat") == load_tokenizer(small_tok).encode("the cat")
