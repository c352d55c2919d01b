"""`prepare --out` follows the output rule (llmkit.outputs): it replaces (or reuses) earlier prepared
data, but a folder that holds a model, a tokenizer, a run or other files is refused unless `force`,
and a refusal leaves every byte as it was; it checks the parent is writable before tokenizing, and
removes the temp folders a killed run left."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import llmkit.data.prepare as P
from llmkit.data.prepare import open_prepared, prepare
from llmkit.errors import UserError

from data_helpers import word_tokenizer, write

DEAD_PID = (1 << 22) + 12345  # above Linux's largest pid_max: never a live process


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) by relative path, with its sha256."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run(tmp_path, tok, out, text="the cat sat on the mat", **kw):
    return prepare([write(tmp_path / "src" / "a.txt", text)], tok, out, workers=1, progress=False, **kw)


def a_model(folder: Path) -> Path:
    import torch

    from llmkit.config import ModelConfig
    from llmkit.model_io import save_model
    from llmkit.models.decoder import DecoderLM

    torch.manual_seed(0)
    return save_model(DecoderLM(ModelConfig.from_preset("tiny", vocab_size=100)), folder)


def a_run(folder: Path) -> Path:
    write(folder / "train_config.json", json.dumps({"max_steps": 10}))
    write(folder / "metrics.jsonl", '{"step": 1, "loss": 4.0}\n')
    return folder


HOLDERS = {
    "model": (a_model, "a model (config.json, model.safetensors)"),
    "tokenizer": (lambda f: word_tokenizer(f, 50), "a tokenizer (tokenizer.json)"),
    "run": (a_run, "a training run (train_config.json, metrics.jsonl)"),
    "other": (lambda f: write(f / "notes.md", "keep me").parent, "1 other file(s), e.g. notes.md"),
}


@pytest.mark.parametrize("what", sorted(HOLDERS))
def test_a_folder_holding_other_work_is_refused_and_left_byte_identical(tmp_path, small_tok, what):
    make, words = HOLDERS[what]
    out = make(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds") as e:
        run(tmp_path, small_tok, out)
    message = str(e.value)
    assert words in message and "--force" in message and "\n" not in message
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "tok-small"]  # no temp left beside it


@pytest.mark.parametrize("what", sorted(HOLDERS))
def test_force_replaces_it_with_prepared_data(tmp_path, small_tok, what):
    out = HOLDERS[what][0](tmp_path / "out")
    s = run(tmp_path, small_tok, out, force=True)
    assert not s.reused and s.documents == 1 and len(np.asarray(open_prepared(out))) == 7
    assert not (out / "train_config.json").exists() and not (out / "model.safetensors").exists()


def test_earlier_prepared_data_is_reused_or_replaced_without_force(tmp_path, small_tok):
    out, src = tmp_path / "out", write(tmp_path / "a.txt", "the cat sat on the mat")
    assert not prepare([src], small_tok, out, workers=1, progress=False).reused
    assert prepare([src], small_tok, out, workers=1, progress=False).reused  # same sources: nothing to do
    s = run(tmp_path, small_tok, out, text="a dog sat")  # other sources: prepared again, in place
    assert not s.reused and len(np.asarray(open_prepared(out))) == 4


def test_a_file_in_place_of_the_folder_is_refused_even_with_force(tmp_path, small_tok):
    out = write(tmp_path / "out", "a file")
    for force in (False, True):
        with pytest.raises(UserError, match="is a file, not a folder"):
            run(tmp_path, small_tok, out, force=force)
    assert out.read_text() == "a file"


def test_an_unwritable_parent_is_refused_before_tokenizing(tmp_path, small_tok, monkeypatch):
    def never(*a, **k):
        raise AssertionError("tokenizing started before the output was known to be writable")

    monkeypatch.setattr(P, "_prepare_into", never)
    blocker = write(tmp_path / "blocker", "a file where a folder should be")
    with pytest.raises(UserError, match=r"cannot write --out .*blocker"):
        run(tmp_path, small_tok, blocker / "sub" / "out")


def test_stale_temps_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, small_tok):
    dead = tmp_path / f".out.{DEAD_PID}.0badc0de.tmp"
    write(dead / "shard-00000.bin", b"\x00" * 16)
    live = tmp_path / f".out.{os.getppid()}.0000beef.tmp"  # our parent: a live process
    live.mkdir()
    run(tmp_path, small_tok, tmp_path / "out")
    assert not dead.exists() and live.is_dir()


def test_a_failed_prepare_keeps_the_earlier_data_and_leaves_no_temp(tmp_path, small_tok):
    out = tmp_path / "out"
    run(tmp_path, small_tok, out)
    before = snapshot(out)
    bad = write(tmp_path / "bad.jsonl", '{"text": "the cat"}\n{"text": null}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field 'text' is null"):
        prepare([bad], small_tok, out, workers=1, progress=False)
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_temp_folder_carries_the_pid(tmp_path, small_tok, monkeypatch):
    seen = []
    real = P._prepare_into

    def spy(tmp, *a, **k):
        seen.append(tmp.name)
        return real(tmp, *a, **k)

    monkeypatch.setattr(P, "_prepare_into", spy)
    run(tmp_path, small_tok, tmp_path / "out")
    assert seen and seen[0].startswith(f".out.{os.getpid()}.") and seen[0].endswith(".tmp")


def test_a_tokenizer_folder_used_as_out_is_not_overwritten(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", 50)
    before = snapshot(tok)
    with pytest.raises(UserError, match="a tokenizer"):
        run(tmp_path, tok, tok)
    assert snapshot(tok) == before
