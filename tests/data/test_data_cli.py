"""`llmkit data prepare` end to end through the verb module (and through `llmkit` once wired)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from llmkit.cli import data as cli
from llmkit.data.prepare import open_prepared
from llmkit.errors import UserError
from llmkit.tokenizers import load_tokenizer

from data_helpers import write


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmkit")
    cli.register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


def test_cli_prepare_writes_shards_and_reports(tmp_path, small_tok, capsys):
    src = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"body": t}) for t in ["the cat", "a dog sat"]))
    args = parse(["data", "prepare", str(src), "--tokenizer", str(small_tok), "--out", str(tmp_path / "out"),
                  "--text-field", "body", "--workers", "2", "--shard-tokens", "3"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and "2 documents, 7 tokens (uint16" in out and "3 shard(s)" in out
    tok = load_tokenizer(small_tok)
    want = tok.encode("the cat") + [tok.eos_id] + tok.encode("a dog sat") + [tok.eos_id]
    np.testing.assert_array_equal(np.asarray(open_prepared(tmp_path / "out")), want)
    assert cli.run(args) == 0 and capsys.readouterr().out.startswith("reused")


def test_cli_skip_bad_records_prints_the_count(tmp_path, small_tok, capsys):
    src = write(tmp_path / "a.jsonl", '{"text": "the cat"}\n{bad\n')
    argv = ["data", "prepare", str(src), "--tokenizer", str(small_tok), "--out", str(tmp_path / "o"), "--workers", "1"]
    with pytest.raises(UserError, match="a.jsonl:2"):
        cli.run(parse(argv))
    assert cli.run(parse(argv + ["--skip-bad-records"])) == 0
    assert "skipped 1 bad record(s)" in capsys.readouterr().out


def test_llmkit_data_prepare_exits_2_on_bad_input(tmp_path, small_tok):
    from llmkit.cli.main import VERBS

    assert "data" in VERBS
    bad = write(tmp_path / "a.jsonl", "{nope\n")
    r = subprocess.run([sys.executable, "-m", "llmkit", "data", "prepare", str(bad), "--tokenizer", str(small_tok),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a.jsonl:1: not JSON" in r.stderr
