"""What a killed or failing writer leaves: temp files and folders of dead processes are removed at
the next start (those of live ones are left alone); a kill while an old checkpoint is deleted never
leaves half a `step-*`; a full disk mid-run is one line (exit 2) that leaves the earlier
checkpoints whole and no temp file; and each time the resumed run equals the uninterrupted one."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.cli.demo import builtin_corpus
from llmkit.cli.main import main
from llmkit.training.checkpoint import list_checkpoints, load_checkpoint
from llmkit.training.config import build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog, plot_loss_curve

SETTINGS = dict(preset="tiny", n_layers=1, d_model=32, n_heads=2, context_length=16, batch_size=4, max_steps=30,
                warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=10, eval_batches=1, log_every=1, ckpt_every=10,
                dropout=0.1, progress=False)
FLAGS = [part for key, value in SETTINGS.items() if key != "progress"
         for part in ("--" + key.replace("_", "-"), str(value))] + ["--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:20_000], encoding="utf-8")
    return path


def argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(out), *FLAGS, *extra]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[int, float]:
    """The train losses of the uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(argv(corpus, out)) == 0
    return train_losses(out)


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsLog.read(run / "metrics.jsonl") if r["event"] == "train"}


def temps(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def interrupted_at(corpus: Path, out: Path, step: int) -> None:
    """The run stopped (Ctrl-C) after `step`, which it checkpointed."""
    def stop(at, record):
        if at == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(build_train_config(data=str(corpus), out=str(out), **SETTINGS), callbacks=[stop])


def test_a_start_removes_what_dead_writers_left_and_resumes_exactly(corpus, reference, tmp_path):
    run = tmp_path / "run"
    interrupted_at(corpus, run, 10)
    ckpts = run / "checkpoints"
    dead, live = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = [run / f".model.safetensors.{dead}.x.tmp", run / f".metrics.jsonl.{dead}.y.tmp",
                ckpts / f".step-0000020.{dead}.z.tmp", ckpts / f".tmp-step-0000020-{dead}",
                ckpts / f".step-0000000.{dead}.w.tmp"]  # the last: an old checkpoint renamed away to be deleted
        left[0].write_bytes(b"half a safetensors file")
        left[1].write_text('{"event": "tra')
        for folder in left[2:]:
            shutil.copytree(ckpts / "step-0000010", folder)
        (left[3] / "trainer_state.pt").unlink()  # half written
        alive = run / f".model.safetensors.{live.pid}.v.tmp"  # a writer still at work: not touched
        alive.write_bytes(b"being written")
        assert main(argv(corpus, run, "--resume")) == 0
        assert temps(run) == [alive]
    finally:
        live.kill()
        live.wait()
    assert train_losses(run) == reference
    assert [p.name for p in list_checkpoints(run)] == ["step-0000020", "step-0000030"]


DIE_WHILE_DELETING = """
import os, shutil, sys
from pathlib import Path
from llmkit.cli.main import main

rmtree = shutil.rmtree

def die_halfway(path, *args, **kwargs):
    path = Path(path)
    if path.name.startswith(".step-0000010."):  # the old checkpoint, renamed away: delete one file, then die
        (path / "model.safetensors").unlink()
        os._exit(137)
    return rmtree(path, *args, **kwargs)

shutil.rmtree = die_halfway
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_half_checkpoint(corpus, reference, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE_WHILE_DELETING)
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), *argv(corpus, run, "--keep-checkpoints", "1")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 137, done.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run)] == ["step-0000020"]  # whole, and the only one listed
    [half] = temps(run)
    assert half.name.startswith(".step-0000010.") and not (half / "model.safetensors").exists()
    load_checkpoint(run / "checkpoints" / "step-0000020")
    assert main(argv(corpus, run, "--resume", "--keep-checkpoints", "1")) == 0
    assert temps(run) == []
    assert train_losses(run) == reference


def _no_space(path) -> None:
    Path(path).write_bytes(b"the first bytes")  # a half-written file, as a full disk leaves
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("writer", ["safetensors", "torch.save", "best model"])
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_earlier_checkpoints(writer, capsys, corpus, reference,
                                                                          tmp_path, monkeypatch):
    import llmkit.model_io

    run = tmp_path / "run"
    save_file, save = llmkit.model_io.save_file, torch.save

    def failing_save_file(tensors, path, *args, **kwargs):
        inside = Path(path).parent.name
        if (writer == "safetensors" and inside.startswith(".step-0000020.")) or \
                (writer == "best model" and Path(path).parent == run and len(train_losses(run)) >= 20):
            _no_space(path)
        return save_file(tensors, path, *args, **kwargs)

    def failing_torch_save(obj, f, *args, **kwargs):
        path = Path(getattr(getattr(f, "f", None), "name", f))  # model_io.save_torch passes a file wrapper
        if writer == "torch.save" and path.parent.name.startswith(".step-0000020."):
            _no_space(path)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(llmkit.model_io, "save_file", failing_save_file)
    monkeypatch.setattr(torch, "save", failing_torch_save)
    capsys.readouterr()
    code = main(argv(corpus, run))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: cannot access ") and "No space left on device" in err and "intact" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-0000010"]
    _, state = load_checkpoint(run / "checkpoints" / "step-0000010")
    assert state["step"] == 10
    assert temps(run) == []
    MetricsLog.read(run / "metrics.jsonl")  # every line whole
    monkeypatch.undo()
    assert main(argv(corpus, run, "--resume")) == 0
    assert train_losses(run) == reference


def test_a_metrics_line_that_fails_to_write_is_cut_off_again(tmp_path, monkeypatch):
    import llmkit.training.metrics as metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log(event="train", step=1, loss=1.0)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    write = os.write

    def half_then_full(fd, data):
        write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(OSError):
        log.log(event="train", step=2, loss=0.5)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_a_torn_last_metrics_line_is_left_out_when_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "tra')  # killed mid-line
    assert MetricsLog.read(path) == [{"event": "train", "step": 1}]


def test_a_loss_plot_that_fails_to_write_leaves_no_temp(tmp_path, monkeypatch):
    import matplotlib.figure

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log(event="train", step=1, loss=1.0)
    log.log(event="train", step=2, loss=0.5)

    def no_space(self, fname, *args, **kwargs):
        _no_space(fname)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    with pytest.raises(OSError):
        plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
