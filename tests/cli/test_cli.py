"""Every CLI verb end to end in a temporary directory, and each bad input: one line, exit code 2,
no traceback, nothing already written lost."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.cli.demo import builtin_corpus
from cli_helpers import run_cli, snapshot

from llmkit.cli.main import build_parser


def test_help_lists_every_verb_and_option_defaults(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for verb in ("train", "generate", "demo", "presets"):
        assert verb in out
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "--max-steps" in out and "(default: 2000)" in out and "--resume" in out
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert "--top-p" in out and "--min-p" in out and "--repetition-penalty" in out and "--stop" in out


def test_python_dash_m_llmkit_works_like_the_console_script():
    done = subprocess.run([sys.executable, "-m", "llmkit", "presets"], capture_output=True, text=True)
    assert done.returncode == 0 and "llama-small" in done.stdout and "124.44M" in done.stdout


def test_train_writes_a_complete_run_directory(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "model.safetensors", "char_tokenizer.json", "metrics.jsonl", "loss.png",
            "checkpoints", "train_config.json"} <= names


def test_generate_streams_text_and_greedy_is_deterministic(capsys, run_dir):
    first = run_cli(capsys, "generate", str(run_dir), "--prompt", "The ", "--greedy", "--max-new-tokens", "30")
    second = run_cli(capsys, "generate", str(run_dir), "--prompt", "The ", "--greedy", "--max-new-tokens", "30")
    assert first[0] == 0 and first[1] == second[1]
    assert first[1].startswith("The ") and len(first[1].rstrip("\n")) == 4 + 30
    sampled = run_cli(capsys, "generate", str(run_dir), "--prompt", "a", "--temperature", "1.0", "--top-k", "5",
                      "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "20")
    assert sampled[0] == 0 and len(sampled[1].rstrip("\n")) == 21


def test_info_prints_parameters_per_component(capsys, run_dir):
    code, out, _ = run_cli(capsys, "info", str(run_dir))
    assert code == 0 and "attn" in out and "mlp" in out and "KV cache" in out and "total" in out
    assert "native CPU kernels:" in out


def test_train_from_recipe_with_flag_override(capsys, corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {corpus}\npreset: tiny\ncontext_length: 32\nbatch_size: 4\nmax_steps: 50\n"
                      "eval_every: 0\neval_batches: 1\nckpt_every: 0\nprogress: false\n")
    code, out, err = run_cli(capsys, "train", "--recipe", str(recipe), "--out", str(tmp_path / "r"), "--max-steps", "3")
    assert code == 0, err
    assert "trained 3 steps" in out


def test_demo_trains_saves_and_prints_a_sample(capsys, corpus, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--data", str(corpus), "--out", str(tmp_path / "demo"),
                             "--max-steps", "10", "--sample-tokens", "20", "--no-progress")
    assert code == 0, err
    assert "--- sample" in out and (tmp_path / "demo" / "model.safetensors").is_file()


def test_builtin_demo_corpus_is_real_english_text():
    text = builtin_corpus()
    assert len(text) > 300_000 and "The \"assert\" statement" in text


BAD = {
    "missing data file": (["train", "--data", "{tmp}/nope.txt", "--out", "{tmp}/o"], "data not found"),
    "empty data file": (["train", "--data", "{tmp}/empty.txt", "--out", "{tmp}/o"], "is empty"),
    "unknown preset": (["train", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "gpt5"], "unknown preset 'gpt5'"),
    "unknown recipe key": (["train", "--recipe", "{tmp}/bad.yaml", "--out", "{tmp}/o"], "unknown keys ['max_stepz']"),
    "non-numeric flag": (["train", "--data", "{corpus}", "--max-steps", "many"], "must be an integer >= 1 and <= 2147483647, got 'many'"),
    "prompt outside vocabulary": (["generate", "{run}", "--prompt", "\u263a\u263a"], "outside the character vocabulary"),
    "prompt longer than context": (["generate", "{run}", "--prompt", "{long}"], "context is 32"),
    "directory without a model": (["generate", "{tmp}"], "config.json"),
    "missing run directory": (["generate", "{tmp}/nowhere"], "nowhere"),
    "existing run without --resume": (["train", "--data", "{corpus}", "--out", "{run}"], "pass --resume"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_one_clear_line_and_exit_code_2(case, capsys, tmp_path, corpus, run_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.yaml").write_text("max_stepz: 3\n")
    argv, words = BAD[case]
    argv = [a.format(tmp=tmp_path, corpus=corpus, run=run_dir, long="a" * 40) for a in argv]
    before = snapshot(run_dir)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err
    assert "Traceback" not in err
    assert snapshot(run_dir) == before  # nothing already written is lost or changed


def test_corrupted_weights_are_reported_and_left_untouched(capsys, tmp_path, run_dir):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(capsys, "generate", str(broken), "--prompt", "a")
    assert code == 2 and "truncated or corrupt" in err and err.count("\n") == 1
    assert len(weights.read_bytes()) == 100


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llmkit", "train", "--data", str(tmp_path / "x.txt")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: data not found") and "Traceback" not in done.stderr


def test_every_registered_verb_has_help(capsys):
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb in verbs:
        code, out, _ = run_cli(capsys, verb, "--help")
        assert code == 0 and "usage: llmkit " + verb in out
