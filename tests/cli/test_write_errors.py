"""Full disks and read-only folders: every verb that writes answers with one line naming the path
and the cause (exit 2, no traceback), leaves no temp file behind and changes nothing that was there.

A full disk is a real kernel limit: the verb runs in a child process whose file-size limit
(RLIMIT_FSIZE) is too small for its output, so every writer (Python, safetensors' Rust, torch)
meets EFBIG exactly where a full disk gives ENOSPC. A read-only folder is chmod for a normal user
and the immutable attribute (chattr +i) for root, whom permissions do not stop."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import TINY, assert_one_line_error, run_cli, snapshot


@pytest.fixture
def bpe_tokenizer(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    from llmkit.cli.main import main

    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    return out


def _verbs(corpus, run_dir, bpe, out) -> dict[str, list[str]]:
    return {
        "train": ["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "2", "--eval-every", "0"],
        "tokenizer train": ["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out)],
        "convert": ["convert", str(run_dir), "--out", str(out)],
        "convert to hf": ["convert", str(run_dir), "--to", "hf", "--out", str(out)],
        "data prepare": ["data", "prepare", str(corpus), "--tokenizer", str(bpe), "--out", str(out), "--workers", "1",
                         "--quiet"],
        "demo": ["demo", "--data", str(corpus), "--out", str(out), "--max-steps", "2", "--no-progress"],
        "finetune": ["finetune", str(run_dir), "--data", str(corpus), "--out", str(out), "--context-length", "32",
                     "--batch-size", "4", "--max-steps", "2", "--eval-every", "0", "--no-progress"],
    }


VERBS = ["train", "tokenizer train", "convert", "convert to hf", "data prepare", "demo", "finetune"]
# the file-size limit for each case: 2 kB stops the first sizeable write; 600 kB lets the tiny
# model's weights (~400 kB) through and stops torch.save of the trainer state (weights + AdamW moments)
LIMITS = {**{verb: 2048 for verb in VERBS}, "train, at the trainer state": 600_000}


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def _small_file_limit(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("verb", LIMITS)
def test_a_full_disk_is_one_line_and_leaves_no_temp_files(verb, tmp_path, corpus, run_dir, bpe_tokenizer):
    out = tmp_path / "disk" / "out"
    out.parent.mkdir()
    argv = _verbs(corpus, run_dir, bpe_tokenizer, out)[verb.split(",")[0]]
    done = subprocess.run([sys.executable, "-m", "llmkit", *argv], capture_output=True, text=True, timeout=300,
                          preexec_fn=_small_file_limit(LIMITS[verb]), env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    err = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("warning: "))
    assert_one_line_error(done.returncode, err + "\n", "free some space")
    assert _leftovers(out.parent) == []


def _make_read_only(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only")


def _make_writable(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    made: list[Path] = []

    def make(folder: Path) -> Path:
        _make_read_only(folder)
        made.append(folder)
        return folder
    yield make
    for folder in made:
        _make_writable(folder)


@pytest.mark.parametrize("verb", VERBS)
def test_a_read_only_folder_is_one_line_and_nothing_is_created(verb, capsys, tmp_path, corpus, run_dir,
                                                               bpe_tokenizer, read_only):
    parent = tmp_path / "locked"
    parent.mkdir()
    (parent / "keep.txt").write_text("mine")
    read_only(parent)
    code, _, err = run_cli(capsys, *_verbs(corpus, run_dir, bpe_tokenizer, parent / "out")[verb])
    assert_one_line_error(code, err, str(parent))
    assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"]


def test_resuming_a_read_only_run_changes_nothing(capsys, tmp_path, run_dir, read_only):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    read_only(run)
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--max-steps", "30", "--no-progress")
    assert_one_line_error(code, err, str(run))
    assert snapshot(run) == before
