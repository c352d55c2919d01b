"""Packed windows: a seeded permutation of non-overlapping windows, resumable from a position."""
from __future__ import annotations

import numpy as np
import pytest

from llmkit.data.packing import PackedWindows, Permutation, packed_windows


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_bijection(n):
    perm = Permutation(n, seed=7)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_permutation_depends_on_the_seed_only():
    a = [Permutation(500, 1)(i) for i in range(500)]
    assert a == [Permutation(500, 1)(i) for i in range(500)]
    assert a != [Permutation(500, 2)(i) for i in range(500)] and a != list(range(500))


def test_one_epoch_covers_every_token_once_with_eos_inside_windows():
    tokens = np.arange(1001) % 50  # pretend 0 is EOS: document ends fall inside windows
    windows = list(packed_windows(tokens, context_length=10, seed=0))
    assert len(windows) == 100 and all(w.shape == (11,) and w.dtype == np.int64 for w in windows)
    inputs = sorted(tuple(w[:-1]) for w in windows)
    assert inputs == sorted(tuple(tokens[i:i + 10]) for i in range(0, 1000, 10))


def test_resume_from_a_position_continues_the_same_order():
    tokens = np.arange(5000)
    full = list(packed_windows(tokens, 16, seed=42))
    resumed = list(packed_windows(tokens, 16, seed=42, start=123))
    assert len(resumed) == len(full) - 123
    assert all((a == b).all() for a, b in zip(full[123:], resumed))
    pw = PackedWindows(tokens, 16, seed=42)
    assert (pw.window(200) == full[200]).all() and len(pw) == len(full)


def test_packed_windows_read_prepared_shards_lazily(tmp_path):
    from data_helpers import word_tokenizer, write
    from llmkit.data.prepare import open_prepared, prepare

    tok = word_tokenizer(tmp_path / "tok", 100)
    prepare([write(tmp_path / "a.txt", "the cat sat on a mat " * 40)], tok, tmp_path / "out", workers=1,
            shard_tokens=13, progress=False)
    view = open_prepared(tmp_path / "out", max_open=2)
    flat = np.asarray(view)
    got = list(packed_windows(view, 8, seed=5))
    want = list(packed_windows(flat, 8, seed=5))
    assert len(got) == 30 and all((a == b).all() for a, b in zip(got, want))
    assert len(view._shards._open) <= 2  # at most max_open shards stay mapped
