"""Recipes are typed data, checked key by key before anything runs: a wrong type, a value out of
range, an unknown or non-string key, a file that is not YAML text, or a folder: one line naming the
recipe and the key, exit 2, no run folder created."""
from __future__ import annotations

import pytest
from cli_helpers import assert_one_line_error, run_cli

BAD = {
    "binary bytes": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
    "integer key": (b"1: 2\n", "keys must be option names, got 1"),
    "a list where a mapping belongs": (b"- max_steps\n- 3\n", "must be a mapping of option: value, got a list"),
    "a scalar": (b"hello\n", "must be a mapping"),
    "max_steps text": (b"max_steps: abc\n", "max_steps must be an integer >= 1"),
    "max_steps float": (b"max_steps: 5.5\n", "max_steps must be an integer >= 1 and <= 2147483647, got float 5.5"),
    "max_steps bool": (b"max_steps: true\n", "got bool True"),
    "data number": (b"data: 42\n", "data must be a string, got int 42"),
    "out null": (b"out: null\n", "out must be a string, got nothing (null)"),
    "lr nan": (b"lr: .nan\n", "lr must be a finite number > 0"),
    "lr text": (b"lr: fast\n", "lr must be a finite number"),
    "progress text": (b"progress: sometimes\n", "progress must be true or false"),
    "model list": (b"model: [1, 2]\n", "model must be a mapping"),
    "model bad field": (b"model: {n_kv_heads: many}\n", "n_kv_heads"),
    "unknown key": (b"max_stepz: 3\n", "unknown keys ['max_stepz']"),
    "invalid yaml": (b"a: [1, 2\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_recipe_is_one_line_naming_the_key(case, capsys, tmp_path, corpus):
    body, words = BAD[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(body)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe), "--data", str(corpus), "--out", str(out),
                           "--no-progress", "--max-steps", "2") if "max_steps" not in case else \
        run_cli(capsys, "train", "--recipe", str(recipe), "--data", str(corpus), "--out", str(out), "--no-progress")
    assert_one_line_error(code, err, words)
    if case not in ("model bad field", "model list"):  # those name the model section, not the file
        assert "r.yaml" in err or "recipe" in err, err
    assert not out.exists()


def test_a_folder_given_as_recipe(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--recipe", str(tmp_path), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "is a folder: pass a YAML file")


def test_yaml_exponents_and_integers_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-3` as a string and `2` as an integer: both are fine for a float option."""
    from llmkit.training.config import build_train_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nmin_lr: 0\nweight_decay: 1\n")
    cfg = build_train_config(recipe)
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay) == (1e-3, 0.0, 1.0)
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.min_lr, cfg.weight_decay))


def test_flags_win_over_the_recipe_and_are_checked_too(capsys, tmp_path, corpus):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 3\n")
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe), "--data", str(corpus), "--out",
                           str(tmp_path / "out"), "--max-steps", "-1")
    assert_one_line_error(code, err, "--max-steps")


def test_a_recipe_that_is_not_a_regular_file_or_nests_without_end(capsys, tmp_path):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    for recipe, words in ((fifo, "is not a regular file"), ("/dev/zero", "is not a regular file"),
                          (deep, "nests too deeply")):
        code, _, err = run_cli(capsys, "train", "--recipe", str(recipe), "--out", str(tmp_path / "out"))
        assert_one_line_error(code, err, words)
