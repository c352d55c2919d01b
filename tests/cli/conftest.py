"""Fixtures the CLI tests share: a small English corpus and one tiny trained run (session-wide:
trained once, never modified by a test — tests that change a run copy it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.cli.demo import builtin_corpus
from llmkit.cli.main import main

from cli_helpers import TINY


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(builtin_corpus()[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def run_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "20", "--eval-every", "10",
                 "--ckpt-every", "10"])
    assert code == 0
    return out
