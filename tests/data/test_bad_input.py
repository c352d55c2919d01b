"""Each kind of bad input stops with one clear UserError naming the problem and the fix."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmkit.data.prepare import check_vocab, open_prepared, prepare
from llmkit.data.sources import iter_documents
from llmkit.errors import UserError

from data_helpers import word_tokenizer, write


def run(tmp_path, tok, *sources, **kw):
    return prepare(list(sources), tok, tmp_path / "out", workers=1, progress=False, **kw)


def test_non_json_line_names_file_and_line(tmp_path, small_tok):
    bad = write(tmp_path / "a.jsonl", '{"text": "the cat"}\n\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:3: not JSON .*--skip-bad-records"):
        run(tmp_path, small_tok, bad)


def test_skip_bad_records_counts_what_it_skipped(tmp_path, small_tok):
    bad = write(tmp_path / "a.jsonl", '{"text": "the cat"}\nnope\n{"text": 3}\n[1]\n{"other": 1}\n{"text": "a dog"}\n')
    s = run(tmp_path, small_tok, bad, skip_bad_records=True)
    assert s.documents == 2 and s.skipped_records == 4 and s.skipped_examples[0].endswith("a.jsonl:2: not JSON (Expecting value at column 1)")


def test_missing_text_field_names_the_fields_that_exist(tmp_path, small_tok):
    src = write(tmp_path / "a.jsonl", json.dumps({"instruction": "x", "output": "y"}))
    with pytest.raises(UserError, match=r"no text field 'text'.*'instruction', 'output'.*--text-field"):
        run(tmp_path, small_tok, src)
    csv_src = write(tmp_path / "b.csv", "title,body\nx,y\n")
    with pytest.raises(UserError, match=r"'title', 'body'"):
        list(iter_documents([csv_src]))


def test_empty_corpus(tmp_path, small_tok):
    empty = write(tmp_path / "e.txt", "")
    with pytest.raises(UserError, match="empty corpus"):
        run(tmp_path, small_tok, empty)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no data files"):
        run(tmp_path, small_tok, tmp_path / "nothing")


def test_binary_and_non_utf8_and_missing_files(tmp_path, small_tok):
    with pytest.raises(UserError, match="looks binary"):
        run(tmp_path, small_tok, write(tmp_path / "b.txt", b"\x7fELF\x00\x01\x02"))
    with pytest.raises(UserError, match="not UTF-8.*offset 3"):
        run(tmp_path, small_tok, write(tmp_path / "l.txt", b"abc\xff\xfe"))
    with pytest.raises(UserError, match="data not found"):
        run(tmp_path, small_tok, tmp_path / "missing.txt")
    with pytest.raises(UserError, match="unknown data format '.docx'"):
        run(tmp_path, small_tok, write(tmp_path / "w.docx", "x"))


def test_tokenizer_without_eos_says_how_to_add_one(tmp_path):
    tok = word_tokenizer(tmp_path / "noeos", 50, eos=False)
    with pytest.raises(UserError, match="no EOS token.*--special-tokens"):
        run(tmp_path, tok, write(tmp_path / "a.txt", "the cat"))


def _prepared(tmp_path, tok):
    run(tmp_path, tok, write(tmp_path / "a.txt", "the cat sat on the mat " * 5), shard_tokens=8)
    return tmp_path / "out"


def test_shard_with_wrong_size_is_reported(tmp_path, small_tok):
    out = _prepared(tmp_path, small_tok)
    shard = out / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"shard-00001\.bin has 14 bytes but the index says 8 tokens"):
        open_prepared(out)


def test_missing_shard_is_reported(tmp_path, small_tok):
    out = _prepared(tmp_path, small_tok)
    (out / "shard-00002.bin").unlink()
    with pytest.raises(UserError, match="missing shard shard-00002.bin"):
        open_prepared(out)


def test_damaged_prepared_dir_is_rebuilt_not_reused(tmp_path, small_tok):
    out = _prepared(tmp_path, small_tok)
    (out / "shard-00000.bin").write_bytes(b"")
    s = run(tmp_path, small_tok, tmp_path / "a.txt", shard_tokens=8)
    assert not s.reused and len(np.asarray(open_prepared(out))) == 31


def test_vocab_too_big_for_the_model(tmp_path):
    check_vocab(50257, 50304)
    with pytest.raises(UserError, match="vocabulary of 50257 tokens but the model has only 32000"):
        check_vocab(50257, 32000)


def test_out_dir_with_other_files_is_refused(tmp_path, small_tok):
    write(tmp_path / "out" / "precious.txt", "keep me")
    with pytest.raises(UserError, match=r"already holds 1 other file\(s\), e\.g\. precious\.txt.*--force"):
        run(tmp_path, small_tok, write(tmp_path / "a.txt", "the cat"))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_not_prepared_dir_is_refused(tmp_path):
    with pytest.raises(UserError, match="not prepared data"):
        open_prepared(tmp_path)
