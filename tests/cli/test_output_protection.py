"""The output rule, parametrised over the verbs that write: a verb never replaces a model, tokenizer,
run or data set it did not create in this invocation unless given its flag (`--force`); refused, it
exits 2 with one line saying what is there and which flag replaces it, and every file is
byte-identical afterwards. With the flag it replaces the folder whole (no stale file stays beside
the new ones)."""
from __future__ import annotations

import shutil

import pytest
from cli_helpers import TINY, assert_one_line_error, run_cli, snapshot


@pytest.fixture
def holdings(tmp_path, run_dir):
    """Folders holding work of each kind a user would not want lost."""
    model = tmp_path / "converted"  # a model with no checkpoints (what `convert` writes)
    model.mkdir()
    for name in ("config.json", "model.safetensors", "char_tokenizer.json"):
        shutil.copy(run_dir / name, model / name)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    shutil.copy(run_dir / "char_tokenizer.json", tokenizer)
    old_run = tmp_path / "old-run"  # a run whose checkpoints were deleted
    shutil.copytree(run_dir, old_run, ignore=shutil.ignore_patterns("checkpoints"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("four years of work")
    return {"model": model, "tokenizer": tokenizer, "old run": old_run, "other files": notes, "run": run_dir}


def _train(corpus, out):
    return ["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "2", "--eval-every", "0"]


def _tokenizer_train(corpus, out):
    return ["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab-size", "300", "--out", str(out)]


def _convert(corpus, out, source):
    return ["convert", str(source), "--out", str(out)]


VERBS = {"train": _train, "tokenizer train": _tokenizer_train}
WORDS = {"model": "a model (config.json, model.safetensors)", "tokenizer": "a tokenizer (char_tokenizer.json)",
         "old run": "a training run (train_config.json, metrics.jsonl)", "other files": "1 other file(s), e.g. thesis.txt",
         "run": "a training run"}


@pytest.mark.parametrize("what", ["model", "tokenizer", "old run", "other files"])
@pytest.mark.parametrize("verb", VERBS)
def test_existing_work_is_not_replaced_without_the_flag(verb, what, capsys, corpus, holdings):
    target = holdings[what]
    before = snapshot(target)
    code, _, err = run_cli(capsys, *VERBS[verb](corpus, target))
    assert_one_line_error(code, err, WORDS[what])
    assert "--force" in err
    assert snapshot(target) == before


def test_a_run_with_checkpoints_is_not_replaced(capsys, corpus, holdings):
    target = holdings["run"]
    before = snapshot(target)
    for argv in (_train(corpus, target), _tokenizer_train(corpus, target)):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "Traceback" not in err, err
    assert snapshot(target) == before


@pytest.mark.parametrize("verb", VERBS)
def test_force_replaces_the_folder_whole(verb, capsys, corpus, holdings):
    target = holdings["model"]
    code, _, err = run_cli(capsys, *VERBS[verb](corpus, target), "--force")
    assert code == 0, err
    names = {p.name for p in target.iterdir()}
    if verb == "tokenizer train":  # a BPE tokenizer now, and no stale model or char vocabulary beside it
        assert "tokenizer.json" in names and not names & {"config.json", "model.safetensors", "char_tokenizer.json"}
    else:
        assert {"config.json", "model.safetensors", "train_config.json"} <= names


def test_convert_refuses_a_non_empty_out(capsys, holdings, tmp_path):
    target = holdings["other files"]
    before = snapshot(target)
    code, _, err = run_cli(capsys, "convert", str(holdings["model"]), "--out", str(target))
    assert_one_line_error(code, err, "--force")
    assert snapshot(target) == before


def test_an_empty_or_new_folder_is_fine(capsys, corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        code, _, err = run_cli(capsys, *_tokenizer_train(corpus, out))
        assert code == 0, err


def _finetune(corpus, out, base):
    return ["finetune", str(base), "--data", str(corpus), "--out", str(out), "--context-length", "32", "--batch-size",
            "4", "--eval-batches", "2", "--no-progress", "--max-steps", "2", "--eval-every", "0"]


@pytest.mark.parametrize("what", ["model", "tokenizer", "old run", "other files"])
def test_finetune_does_not_replace_existing_work_without_the_flag(what, capsys, corpus, holdings):
    """`llmkit finetune` is `train --init-from`: the same run-directory rule."""
    target = holdings[what]
    before = snapshot(target)
    code, _, err = run_cli(capsys, *_finetune(corpus, target, holdings["run"]))
    assert_one_line_error(code, err, WORDS[what])
    assert "--force" in err
    assert snapshot(target) == before


def test_merge_refuses_a_non_empty_out_and_writes_with_the_flag(capsys, corpus, holdings, tmp_path):
    adapter = tmp_path / "lora"
    code, _, err = run_cli(capsys, *_finetune(corpus, adapter, holdings["run"]))
    assert code == 0, err
    target = holdings["other files"]
    before = snapshot(target)
    merge = ["merge", str(holdings["run"]), "--adapter", str(adapter), "--out", str(target)]
    code, _, err = run_cli(capsys, *merge)
    assert_one_line_error(code, err, "--force")
    assert snapshot(target) == before
    code, _, err = run_cli(capsys, *merge, "--force")
    assert code == 0, err
    assert {p.name for p in target.iterdir()} >= {"config.json", "model.safetensors"}
    assert not (target / "thesis.txt").exists()
