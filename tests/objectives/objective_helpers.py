"""Helpers for the pre-training objective tests: a small corpus file, a task set up on it as the
training loop sets one up, and a short `llmkit train` run on tinyshakespeare that returns its
start and final evaluation records (each test states its own loss bound on them).

Imported as `from objective_helpers import ...` (pytest puts this test folder on sys.path)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.cli.main import main


def write_small_corpus(directory: Path, chars: int = 20_000) -> Path:
    """`directory`/corpus.txt: the first `chars` characters of the built-in demo corpus."""
    from llmkit.cli.demo import builtin_corpus

    path = directory / "corpus.txt"
    path.write_text(builtin_corpus()[:chars], encoding="utf-8")
    return path


def prepared_task(corpus: Path, out: Path, **options: Any) -> Any:
    """The task `options` select (objective, preset, context_length, ...) on `corpus`, after
    `prepare` and `setup` in `out`, as rank 0 of a run has it before the first step."""
    from llmkit.objectives import get_task
    from llmkit.training.config import build_train_config

    cfg = build_train_config(data=str(corpus), out=str(out), **options)
    task = get_task(cfg.task)(cfg)
    task.prepare(out)
    task.setup(out)
    return task


def train_on_shakespeare(objective: str, preset: str, data: Path, out: Path) -> tuple[dict, dict]:
    """Train `preset` with `objective` through the CLI for 40 steps of 16 windows of 32 tokens
    (lr 3e-3, 5 warm-up steps, 1% held out, evaluated once at the end on 2 batches); asserts exit
    code 0 and returns (the `start` record, the last `eval` record) of its metrics.jsonl."""
    code = main(["train", "--objective", objective, "--preset", preset, "--data", str(data), "--out", str(out),
                 "--context-length", "32", "--batch-size", "16", "--max-steps", "40", "--lr", "3e-3",
                 "--warmup-steps", "5", "--eval-every", "0", "--eval-batches", "2", "--val-fraction", "0.01",
                 "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    final = [r for r in records if r["event"] == "eval"][-1]
    return start, final
