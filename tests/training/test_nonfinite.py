"""NaN/inf in training: a step whose loss or gradient norm is not finite leaves the weights as they
were and training goes on; `max_nonfinite_steps` of them in a row (or a NaN validation loss, or
weights that overflowed) stop the run with exit code 3 and one line naming the step, the lr and the
last good checkpoint, and nothing with bad weights is saved. The in-a-row count survives a resume,
and under DDP every rank takes the same decision."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.cli.demo import builtin_corpus
from llmkit.cli.main import main
from llmkit.errors import TrainingDiverged
from llmkit.objectives.clm import CausalLMTask
from llmkit.training.checkpoint import list_checkpoints
from llmkit.training.config import build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog

TINY = dict(preset="tiny", n_layers=1, d_model=32, n_heads=2, context_length=16, batch_size=4, max_steps=20,
            warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=0, eval_batches=1, log_every=1, ckpt_every=5,
            progress=False, dropout=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:20_000], encoding="utf-8")
    return path


def config(corpus: Path, out: Path, **kw):
    return build_train_config(data=str(corpus), out=str(out), **{**TINY, **kw})


def cli_flags(corpus: Path, out: Path, **kw) -> list[str]:
    flags = ["train", "--data", str(corpus), "--out", str(out)]
    for key, value in {**TINY, **kw}.items():
        flag = "--" + key.replace("_", "-")
        flags += ([flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)])
    return flags


class Patched:
    """The causal-LM task with a NaN training loss at `nan_steps` (1-based, as logged; the validation
    loss instead when `eval`), remembering the model it ran."""

    nan_steps: set[int] = set()
    eval = False
    model: torch.nn.Module | None = None
    step = 0


@pytest.fixture
def patched(monkeypatch) -> type[Patched]:
    train_batch, loss = CausalLMTask.train_batch, CausalLMTask.loss

    def patched_batch(self, step, *args, **kwargs):
        Patched.step = step + 1
        return train_batch(self, step, *args, **kwargs)

    def patched_loss(self, model, batch):
        Patched.model = model
        value, metrics = loss(self, model, batch)
        if Patched.step in Patched.nan_steps and model.training != Patched.eval:
            value = value * float("nan")  # NaN gradients too
        return value, metrics

    monkeypatch.setattr(CausalLMTask, "train_batch", patched_batch)
    monkeypatch.setattr(CausalLMTask, "loss", patched_loss)
    monkeypatch.setattr(Patched, "nan_steps", set())
    monkeypatch.setattr(Patched, "eval", False)
    return Patched


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in MetricsLog.read(run / "metrics.jsonl") if r["event"] == kind]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in events(run, "train")}


def assert_saved_weights_finite(run: Path) -> None:
    files = list(run.rglob("*.safetensors"))
    assert files
    for path in files:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def diverged_cli(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith("error: training diverged: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_huge_lr_and_weight_decay_stop_with_code_3_keeping_the_last_good_checkpoint(capsys, corpus, tmp_path):
    run = tmp_path / "run"  # AdamW scales the weights by (1 - lr * wd) = -999 a step: they overflow in a few
    err = diverged_cli(capsys, cli_flags(corpus, run, lr=10.0, min_lr=0.0, weight_decay=100.0, warmup_steps=0))
    assert "lower --weight-decay or --lr" in err
    last = list_checkpoints(run)[-1]
    assert f"the last good checkpoint is {last} (resume with --resume)" in err
    assert_saved_weights_finite(run)
    assert events(run, "diverged")[0]["checkpoint"] == str(last)


def test_one_nan_step_is_skipped_and_training_goes_on(corpus, tmp_path, patched):
    patched.nan_steps = {7}
    weights = {}

    def keep_weights(step, record):
        if step in (6, 7, 8):
            weights[step] = {k: v.clone() for k, v in patched.model.state_dict().items()}

    result = train(config(corpus, tmp_path / "run"), callbacks=[keep_weights])
    assert result.steps == 20
    assert all(torch.equal(weights[6][k], weights[7][k]) for k in weights[6])  # step 7 changed nothing
    assert not all(torch.equal(weights[7][k], weights[8][k]) for k in weights[7])  # step 8 trained again
    [skipped] = events(tmp_path / "run", "nonfinite")
    assert skipped["step"] == 7 and skipped["loss"] == "nan" and skipped["in_a_row"] == 1
    losses = train_losses(tmp_path / "run")
    assert math.isnan(losses[7]) and all(math.isfinite(v) for s, v in losses.items() if s != 7)
    assert_saved_weights_finite(tmp_path / "run")


def test_nan_steps_not_in_a_row_do_not_stop_the_run(corpus, tmp_path, patched):
    patched.nan_steps = {4, 6, 8, 10}
    result = train(config(corpus, tmp_path / "run", max_nonfinite_steps=2, log_every=5))
    assert result.steps == 20
    trains = events(tmp_path / "run", "train")  # the means leave the skipped steps out
    assert [r.get("skipped_steps") for r in trains] == [1, 3, None, None]
    assert all(math.isfinite(r["loss"]) for r in trains)


def test_nan_for_max_steps_in_a_row_stops_with_code_3(capsys, corpus, tmp_path, patched):
    patched.nan_steps = {12, 13, 14}
    run = tmp_path / "run"
    err = diverged_cli(capsys, cli_flags(corpus, run))
    assert "the loss was nan for 3 steps in a row at step 14 (lr " in err
    assert "lower --lr or raise --warmup-steps" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-0000010'} (resume with --resume)" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-0000005", "step-0000010"]
    assert [e["step"] for e in events(run, "nonfinite")] == [12, 13]
    assert events(run, "diverged")[0]["step"] == 14
    assert not (run / "model.safetensors").exists()  # no evaluation: the model is only saved at the end
    assert_saved_weights_finite(run)


def test_max_nonfinite_steps_1_stops_at_the_first(capsys, corpus, tmp_path, patched):
    patched.nan_steps = {3}
    err = diverged_cli(capsys, cli_flags(corpus, tmp_path / "run", max_nonfinite_steps=1))
    assert "the loss was nan at step 3 (lr " in err and "no checkpoint was written before it" in err
    assert list_checkpoints(tmp_path / "run") == []


def test_a_nan_validation_loss_stops_and_keeps_the_best_model(capsys, corpus, tmp_path, patched):
    run = tmp_path / "run"
    patched.nan_steps, patched.eval = {10}, True
    err = diverged_cli(capsys, cli_flags(corpus, run, eval_every=5))
    assert "the validation loss was nan at step 10" in err
    assert [e["step"] for e in events(run, "eval")] == [5]
    assert_saved_weights_finite(run)  # the step-5 model is the run's model
    assert [p.name for p in list_checkpoints(run)] == ["step-0000005"]


def test_weights_that_overflow_are_never_saved(corpus, tmp_path, patched):
    def overflow(step, record):  # as a finite step with a huge update can
        if step == 9:
            with torch.no_grad():
                next(patched.model.parameters()).fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match="the weights were no longer finite after step 10"):
        train(config(corpus, tmp_path / "run", max_nonfinite_steps=5), callbacks=[overflow])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000005"]
    assert_saved_weights_finite(tmp_path / "run")


def test_the_in_a_row_count_survives_a_resume(corpus, tmp_path, patched):
    patched.nan_steps = {10, 11, 12}

    def stop_at_10(step, record):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(corpus, tmp_path / "run", ckpt_every=0), callbacks=[stop_at_10])
    with pytest.raises(TrainingDiverged, match="for 3 steps in a row at step 12"):
        train(config(corpus, tmp_path / "run", resume=True))


def test_resume_with_skipped_steps_in_the_log_window_is_exact(corpus, tmp_path, patched):
    patched.nan_steps = {6}
    train(config(corpus, tmp_path / "full", log_every=4, dropout=0.1))

    def stop_at_7(step, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(corpus, tmp_path / "cut", log_every=4, dropout=0.1), callbacks=[stop_at_7])
    train(config(corpus, tmp_path / "cut", log_every=4, dropout=0.1, resume=True))
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")  # window 5..8 holds the skip
    assert events(tmp_path / "cut", "train")[1]["skipped_steps"] == 1


NAN_ON_RANK_1 = """
import os, sys
import torch
from llmkit.objectives.clm import CausalLMTask
from llmkit.cli.main import main

train_batch, loss = CausalLMTask.train_batch, CausalLMTask.loss
state = {}

def patched_batch(self, step, micro, batch_size, rank, world, grad_accum):
    state["step"] = step + 1
    return train_batch(self, step, micro, batch_size, rank, world, grad_accum)

def patched_loss(self, model, batch):
    value, metrics = loss(self, model, batch)
    if model.training and state["step"] == 4 and int(os.environ.get("RANK", "1")) == 1:
        value = value + float("nan")  # a NaN loss with finite gradients: only this rank can tell
    return value, metrics

CausalLMTask.train_batch, CausalLMTask.loss = patched_batch, patched_loss
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_ddp_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(corpus, tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = cli_flags(corpus, tmp_path / "one", batch_size=8, max_steps=8)
    single = subprocess.run([sys.executable, str(script), *flags], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    flags = cli_flags(corpus, tmp_path / "two", batch_size=4, max_steps=8)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), *flags], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0's own loss was finite at step 4, yet it skipped the update too: the runs stay equal
    assert [e["step"] for e in events(tmp_path / "two", "nonfinite")] == [4]
    one, both = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == both.keys() and len(one) == 8
    for step in one:
        if step != 4:
            assert both[step] == pytest.approx(one[step], abs=2e-5), step
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["max_nonfinite_steps"] == 3
