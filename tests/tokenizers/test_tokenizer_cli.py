"""`llmkit tokenizer train|encode|decode|stats` end to end through argparse, as cli/main.py runs it."""
from __future__ import annotations

import argparse
import io

import pytest

from llmkit.cli import tokenizer as cli
from llmkit.errors import UserError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmkit")
    cli.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_slice):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(shakespeare_slice, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_train_encode_decode_round_trip(tmp_path, corpus, capsys, kind):
    out = tmp_path / "tok"
    assert run(["tokenizer", "train", "--kind", kind, "--vocab-size", "600", str(corpus), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert run(["tokenizer", "encode", str(out), "--text", "to be or not to be"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids and all(i.isdigit() for i in ids)
    assert run(["tokenizer", "decode", str(out), *ids]) == 0
    assert capsys.readouterr().out == "to be or not to be\n"


def test_encode_reads_stdin_and_decode_reads_stdin(gpt2_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world"))
    run(["tokenizer", "encode", str(gpt2_dir / "vocab.json")])
    assert capsys.readouterr().out == "15496 995\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("15496, 995\n"))
    run(["tokenizer", "decode", str(gpt2_dir)])
    assert capsys.readouterr().out == "Hello world\n"


def test_train_with_custom_special_tokens_and_lowercase(tmp_path, corpus, capsys):
    out = tmp_path / "wp"
    run(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "500", "--lowercase",
         "--special-tokens", "[PAD],[UNK],[CLS],[SEP],[MASK]", str(corpus), "--out", str(out)])
    assert "'unk': 1" in capsys.readouterr().out
    run(["tokenizer", "encode", str(out), "--text", "HELLO", "--tokens"])
    assert "'[UNK]'" not in capsys.readouterr().out


def test_stats_prints_table_with_rates_and_top_tokens(gpt2_dir, corpus, capsys):
    assert run(["tokenizer", "stats", str(gpt2_dir), str(corpus)]) == 0
    out = capsys.readouterr().out
    for label in ("tokens per word", "bytes per token", "unknown-token rate", "rank"):
        assert label in out
    assert len([line for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]) == 20


def test_stats_counts_unknown_tokens(tmp_path, bert_tokenizer_json, capsys):
    path = tmp_path / "t.txt"
    path.write_text("hello 😀 world 😀\n", encoding="utf-8")
    from llmkit.tokenizers import load_tokenizer

    stats = cli.corpus_stats(load_tokenizer(bert_tokenizer_json), [path.read_text(encoding="utf-8")])
    assert stats["unk_rate"] == pytest.approx(0.5)
    assert stats["tokens_per_word"] == pytest.approx(1.0)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        run(["tokenizer", "train", "--help"])
    assert "(default: 2)" in capsys.readouterr().out


def test_train_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run(["tokenizer", "train", "--vocab-size", "300", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])


def test_train_binary_file_is_user_error(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="binary"):
        run(["tokenizer", "train", "--vocab-size", "300", str(blob), "--out", str(tmp_path / "o")])


def test_stats_binary_file_is_user_error(tmp_path, gpt2_dir):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(UserError, match="binary"):
        run(["tokenizer", "stats", str(gpt2_dir), str(blob)])


def test_encode_missing_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run(["tokenizer", "encode", str(tmp_path / "none"), "--text", "x"])


def test_decode_bad_ids_are_user_errors(gpt2_dir):
    with pytest.raises(UserError, match="integers"):
        run(["tokenizer", "decode", str(gpt2_dir), "12", "abc"])
    with pytest.raises(UserError, match="outside the vocabulary"):
        run(["tokenizer", "decode", str(gpt2_dir), "99999999"])
