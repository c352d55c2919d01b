"""SIGTERM (what a scheduler sends before it kills) is handled like Ctrl-C: the step in progress ends
(a checkpoint being written is finished), the steps done are checkpointed, the process exits
with 143 (128 + 15) and one line, and --resume continues bit for bit. A second signal stops at
once and writes no checkpoint of the step it cut short."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import test_loop
from test_loop import _cli, train_losses

from llmkit.cli.main import main
from llmkit.training.checkpoint import list_checkpoints
from llmkit.training.metrics import MetricsLog

corpus = test_loop.corpus  # the fixture
SMALL = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2"]  # later flags win: a faster model


def _cli_flags(corpus: Path, out: Path) -> list[str]:
    return [*test_loop._cli_flags(corpus, out), *SMALL]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[int, float]:
    """The train losses of the uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = _cli(*_cli_flags(corpus, out))
    assert done.wait() == 0, done.stderr.read()
    return train_losses(out)


def paused_in_checkpoint_20(corpus: Path, out: Path, seconds: float) -> subprocess.Popen:
    """A training process stopped (LLMKIT_TEST_CKPT_PAUSE) in the middle of writing checkpoint 20."""
    victim = _cli(*_cli_flags(corpus, out), env={"LLMKIT_TEST_CKPT_PAUSE": f"20:{seconds}"})
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob(".step-0000020.*.tmp/model.safetensors")):
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read() if victim.poll() else "timeout"
        time.sleep(0.05)
    return victim


def temps(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if p.name.endswith(".tmp")]


def check_exit_code(code: int) -> None:
    assert code == 143  # 128 + SIGTERM, as schedulers expect


def test_sigterm_finishes_the_step_checkpoints_it_and_resume_is_exact(corpus, reference, tmp_path):
    run = tmp_path / "cut"
    victim = paused_in_checkpoint_20(corpus, run, seconds=3.0)
    victim.send_signal(signal.SIGTERM)
    code, err = victim.wait(timeout=120), victim.stderr.read()
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert [p.name for p in list_checkpoints(run)] == ["step-0000010", "step-0000020"]
    logged = [r["step"] for r in MetricsLog.read(run / "metrics.jsonl") if r["event"] == "train"]
    assert logged[-1] == 20  # the checkpoint is of the last step done
    assert temps(run) == []
    assert main([*_cli_flags(corpus, run), "--resume"]) == 0  # in this process: no second start-up
    assert train_losses(run) == reference
    check_exit_code(code)


def test_a_second_sigterm_stops_at_once_and_keeps_the_previous_checkpoint(corpus, reference, tmp_path):
    run = tmp_path / "cut"
    victim = paused_in_checkpoint_20(corpus, run, seconds=60)
    victim.send_signal(signal.SIGTERM)  # held until the step ends ...
    time.sleep(0.5)
    victim.send_signal(signal.SIGTERM)  # ... unless a second one insists
    code, err = victim.wait(timeout=30), victim.stderr.read()
    assert "Traceback" not in err, err
    assert [p.name for p in list_checkpoints(run)] == ["step-0000010"]
    assert temps(run) == []  # the half-written checkpoint 20 was removed
    assert main([*_cli_flags(corpus, run), "--resume"]) == 0  # in this process: no second start-up
    assert train_losses(run) == reference
    check_exit_code(code)
