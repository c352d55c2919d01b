"""Training tasks: the causal-LM loss is next-token cross entropy on windows of the token stream; a
task defined outside the package, once registered in TASKS, is trained (and resumed exactly) by the
unchanged loop; `task` is a validated option with a CLI flag; objectives/ never imports training/."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmkit.cli.demo import builtin_corpus
from llmkit.cli.main import main
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.objectives import TASKS, CausalLMTask, Task
from llmkit.training.config import build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:20_000], encoding="utf-8")
    return path


def test_causal_lm_loss_is_next_token_cross_entropy_by_hand(corpus, tmp_path):
    cfg = build_train_config(data=str(corpus), out=str(tmp_path), preset="tiny", context_length=16, dropout=0.0)
    task = TASKS["causal-lm"](cfg)
    assert isinstance(task, CausalLMTask)
    task.prepare(tmp_path)
    task.setup(tmp_path)
    x, y = task.train_batch(3, 0, 4, 0, 1, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    stream = np.asarray(task.tokens[:], dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(stream, 17)
    for row_x, row_y in zip(x, y):  # each row is a window of the stream, y its next tokens
        window = np.concatenate([row_x.numpy(), row_y[-1:].numpy()])
        assert (windows == window).all(axis=1).any()
        assert torch.equal(row_y[:-1], row_x[1:])

    model = task.build_model(torch.device("cpu")).eval()
    with torch.no_grad():
        loss, metrics = task.loss(model, (x, y))
        logits = model(x).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    by_hand = -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean()
    assert loss.shape == () and metrics == {}
    assert torch.equal(loss, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    # an untrained model is near uniform over the vocabulary: a sanity check on the by-hand value
    assert abs(loss.item() - math.log(task.tokenizer.vocab_size)) < 0.5


class SuccessorTask(Task):
    """A toy task no part of llmkit knows: random tokens in, each token's successor (mod V) out."""

    vocab = 16

    def setup(self, run_dir: Path) -> None:
        self.model_config = ModelConfig.from_preset(self.cfg.preset, **{**self.cfg.model_overrides(),
                                                                          "vocab_size": self.vocab})

    @property
    def tokens_per_example(self) -> int:
        return self.model_config.context_length

    @property
    def has_validation(self) -> bool:
        return True

    def _rows(self, key: list[int], batch_size: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(hash(tuple(key)) % 2**62)
        x = torch.randint(0, self.vocab, (batch_size, self.model_config.context_length), generator=gen)
        return {"x": x, "y": (x + 1) % self.vocab}

    def train_batch(self, step, micro, batch_size, rank, world, grad_accum):
        return self._rows([self.cfg.seed, 0, step, micro, rank], batch_size)

    def eval_batch(self, i, batch_size, rank, world):
        return self._rows([self.cfg.seed, 1, i, rank], batch_size)

    def loss(self, model, batch):
        logits = model(batch["x"]).float()
        loss = F.cross_entropy(logits.view(-1, self.vocab), batch["y"].reshape(-1))
        return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).float().mean()}


@pytest.fixture
def successor(monkeypatch):
    monkeypatch.setitem(TASKS, "toy-successor", SuccessorTask)
    return "toy-successor"


def toy_config(out: Path, **kw):
    base = dict(task="toy-successor", out=str(out), preset="tiny", context_length=8, batch_size=8, max_steps=40,
                warmup_steps=4, lr=3e-3, min_lr=3e-4, eval_every=20, eval_batches=2, log_every=5, ckpt_every=10,
                progress=False, dropout=0.1)
    return build_train_config(**{**base, **kw})


def test_a_registered_custom_task_is_trained_by_the_unchanged_loop(successor, tmp_path):
    result = train(toy_config(tmp_path / "run"))  # no --data: the task makes its own
    records = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    trains = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in trains] == list(range(5, 45, 5)) and [r["step"] for r in evals] == [20, 40]
    first, last = trains[0]["loss"], trains[-1]["loss"]
    assert first > 2.0  # ln(16) = 2.77 at the start
    assert last < first / 3, (first, last)  # measured 2.55 -> 0.35
    assert trains[-1]["accuracy"] > 0.9 and trains[0]["accuracy"] < 0.5  # the task's metric is logged
    assert evals[-1]["val_accuracy"] > 0.9 and result.val_loss == evals[-1]["val_loss"] < 0.5
    start = records[0]
    assert start["event"] == "start" and start["params"] > 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_custom_task_resumes_exactly_metrics_included(successor, tmp_path):
    train(toy_config(tmp_path / "full", max_steps=20, log_every=4))

    def interrupt_at_10(step, record):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_config(tmp_path / "cut", max_steps=20, log_every=4), callbacks=[interrupt_at_10])
    train(toy_config(tmp_path / "cut", max_steps=20, log_every=4, resume=True))
    keep = ("event", "step", "loss", "accuracy", "val_loss", "val_accuracy", "lr")

    def strip(path: Path) -> list[dict]:
        return [{k: r[k] for k in keep if k in r} for r in MetricsLog.read(path / "metrics.jsonl")]

    assert strip(tmp_path / "cut") == strip(tmp_path / "full")  # the window 9..12 straddles the cut


def test_task_option_is_validated_and_has_a_cli_flag(capsys):
    assert build_train_config().task == "causal-lm"
    with pytest.raises(UserError, match="unknown task 'mlm': choose one of causal-lm"):
        build_train_config(task="mlm")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--task" in capsys.readouterr().out


def test_objectives_do_not_import_training_cli_or_generation():
    """The layering rule, on objectives/' own imports (what the modules it uses import is their affair)."""
    import ast
    import llmkit.objectives

    imported = set()
    for path in Path(llmkit.objectives.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    assert "llmkit.objectives.task" in imported  # the walk sees the package's imports
    banned = [m for m in imported if m.split(".")[:2] in (["llmkit", "training"], ["llmkit", "cli"], ["llmkit", "generation"])]
    assert banned == []
