"""The run directory's output rule: a new run refuses a folder that holds anything unless --force,
which empties it first (never when the data lies inside); a folder this invocation created is its
own; every option is checked against the data and the checkpoint before any file changes, so a
rejected resume leaves the run byte-identical and a rejected new run leaves nothing behind."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmkit import outputs
from llmkit.cli.demo import builtin_corpus
from llmkit.cli.main import main
from llmkit.training.checkpoint import latest_checkpoint
from llmkit.training.config import build_train_config
from llmkit.training.loop import train

TINY = ["--preset", "tiny", "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--context-length", "16",
        "--batch-size", "4", "--eval-batches", "1", "--eval-every", "0", "--max-steps", "4", "--warmup-steps", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:20_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A finished 4-step run (never changed: tests copy it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


@pytest.mark.parametrize("holding", ["converted model", "tokenizer", "old run without checkpoints"])
def test_a_new_run_refuses_a_folder_that_holds_work(holding, capsys, corpus, trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = {"converted model": ["config.json", "model.safetensors"], "tokenizer": ["char_tokenizer.json"],
             "old run without checkpoints": ["train_config.json", "metrics.jsonl", "char_tokenizer.json",
                                             "config.json", "model.safetensors"]}[holding]
    for name in files:
        shutil.copy(trained / name, out / name)
    before = snapshot(out)
    code, err = train_cli(capsys, "--data", str(corpus), "--out", str(out), *TINY)
    one_line_error(code, err, "already holds", "--force")
    assert snapshot(out) == before


def test_force_empties_the_folder_before_the_new_run(capsys, corpus, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    (out / "tokenizer.json").write_text("{}")  # a stale BPE tokenizer a char run must not leave beside its own
    (out / "notes").mkdir()
    (out / "notes" / "n.txt").write_text("x")
    code, err = train_cli(capsys, "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "2", "--force")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "tokenizer.json" not in names and "notes" not in names
    assert latest_checkpoint(out).name == "step-0000002"  # the old run's step-4 is gone
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]


def test_force_refuses_a_folder_that_holds_the_data(capsys, corpus, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    shutil.copy(corpus, out / "corpus.txt")
    before = snapshot(out)
    code, err = train_cli(capsys, "--data", str(out / "corpus.txt"), "--out", str(out), *TINY, "--force")
    one_line_error(code, err, "lies inside --out", "--force would empty")
    assert snapshot(out) == before


def test_resume_and_force_together_are_refused(capsys, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    before = snapshot(out)
    code, err = train_cli(capsys, "--out", str(out), "--resume", "--force", "--no-progress")
    one_line_error(code, err, "--resume", "--force")
    assert snapshot(out) == before


def test_a_folder_created_by_this_invocation_is_its_own(capsys, corpus, tmp_path):
    out = tmp_path / "demo"  # what `llmkit demo` does: a fresh folder with its corpus written first
    out.mkdir()
    shutil.copy(corpus, out / "corpus.txt")
    outputs.mark_created(out)  # the mark lasts for this invocation: the API call below, as in demo's run()
    result = train(build_train_config(data=str(out / "corpus.txt"), out=str(out), preset="tiny", context_length=32,
                                      batch_size=4, max_steps=2, eval_batches=2, progress=False))
    assert result.steps == 2 and (out / "model.safetensors").is_file()
    assert (out / "corpus.txt").read_bytes() == corpus.read_bytes()


@pytest.mark.parametrize("flags, words", [
    (["--n-layers", "3"], "n_layers is 1 there, not 3"),
    (["--d-model", "48", "--n-heads", "2"], "d_model is 32 there, not 48"),
    (["--n-heads", "4"], "n_heads is 2 there, not 4"),
])
def test_a_rejected_resume_changes_no_file_and_a_plain_resume_still_works(flags, words, capsys, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    before = snapshot(out)
    code, err = train_cli(capsys, "--out", str(out), "--resume", "--max-steps", "6", *flags, "--no-progress")
    one_line_error(code, err, words)
    assert snapshot(out) == before  # train_config.json included: the rejected value is not stored
    code, err = train_cli(capsys, "--out", str(out), "--resume", "--max-steps", "6", "--no-progress")
    assert code == 0, err
    assert latest_checkpoint(out).name == "step-0000006"


def test_a_rejected_new_run_leaves_nothing_behind(capsys, tmp_path, corpus):
    small = tmp_path / "small.txt"
    small.write_text("just a few characters")  # the tokenizer trains; then the data is too small for a window
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        code, err = train_cli(capsys, "--data", str(small), "--out", str(out), *TINY)
        one_line_error(code, err, "data too small")
    assert not (tmp_path / "new").exists()
    assert list(empty.iterdir()) == []
    code, err = train_cli(capsys, "--data", str(corpus), "--out", str(empty), *TINY, "--max-steps", "2")
    assert code == 0, err  # the failed start left no tokenizer that would need --force


def test_a_bad_model_option_is_refused_before_force_empties_the_folder(capsys, corpus, trained, tmp_path):
    out = copy_run(trained, tmp_path)
    before = snapshot(out)
    code, err = train_cli(capsys, "--data", str(corpus), "--out", str(out), *TINY, "--n-heads", "3", "--force")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(out) == before


def test_an_unwritable_out_is_one_line_before_any_work(capsys, corpus, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = train_cli(capsys, "--data", str(corpus), "--out", str(blocker / "run"), *TINY)
    one_line_error(code, err, "cannot write --out")
