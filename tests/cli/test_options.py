"""Every option has a rule: a value outside it is refused before anything runs or is written, with
one line naming the option, what it must be and what it got (exit 2, no traceback). Parametrised
over the verbs; each case also checks that no output folder appeared."""
from __future__ import annotations

import pytest
from cli_helpers import assert_one_line_error, run_cli, snapshot

TRAIN = ["train", "--data", "{corpus}", "--out", "{tmp}/out"]
GEN = ["generate", "{run}", "--prompt", "a"]
TOK = ["tokenizer", "train", "{corpus}", "--out", "{tmp}/out"]
PREP = ["data", "prepare", "{corpus}", "--tokenizer", "{run}", "--out", "{tmp}/out"]

BAD = {
    # train: values that used to pass and fail deep inside (or train on nonsense)
    "lr nan": (TRAIN + ["--lr", "nan"], "--lr: must be a finite number > 0"),
    "lr inf": (TRAIN + ["--lr", "inf"], "--lr: must be a finite number"),
    "lr 1e30": (TRAIN + ["--lr", "1e30"], "<= 10, got '1e30'"),
    "weight decay nan": (TRAIN + ["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0"),
    "beta1 2": (TRAIN + ["--beta1", "2"], "--beta1: must be a finite number >= 0 and < 1, got '2'"),
    "beta2 negative": (TRAIN + ["--beta2", "-0.1"], "--beta2"),
    "seed -1": (TRAIN + ["--seed", "-1"], "--seed: must be an integer >= 0"),
    "seed huge": (TRAIN + ["--seed", "99999999999999999999999"], "--seed: must be an integer >= 0 and <= 4294967295"),
    "batch size huge": (TRAIN + ["--batch-size", "1000000000"], "--batch-size: must be an integer >= 1 and <= 1048576"),
    "batch that cannot fit in memory": (TRAIN + ["--batch-size", "1000000"], "--batch-size 1000000 cannot fit"),
    "max steps 0": (TRAIN + ["--max-steps", "0"], "--max-steps: must be an integer >= 1"),
    "max steps float": (TRAIN + ["--max-steps", "5.5"], "--max-steps: must be an integer"),
    "dropout 1": (TRAIN + ["--dropout", "1"], "--dropout: must be a finite number >= 0 and < 1"),
    "val fraction 1": (TRAIN + ["--val-fraction", "1"], "--val-fraction"),
    "grad clip nan": (TRAIN + ["--grad-clip", "nan"], "--grad-clip"),
    "min lr above lr": (TRAIN + ["--lr", "0.001", "--min-lr", "0.01"], "min_lr (0.01) must not exceed lr (0.001)"),
    "tokenizer kind": (TRAIN + ["--tokenizer", "sentencepiece"], "--tokenizer: must be one of char, bpe"),
    "dtype": (TRAIN + ["--dtype", "fp64"], "--dtype: must be one of auto, fp32, bf16, fp16"),
    "device cuda without a GPU": (TRAIN + ["--device", "cuda"], "no CUDA GPU is visible"),
    "vocab size huge": (TRAIN + ["--vocab-size", "1000000000"], "--vocab-size"),
    "unknown task": (TRAIN + ["--task", "telepathy"], "unknown task 'telepathy'"),
    # generate / chat share the decoding options
    "frequency penalty nan": (GEN + ["--frequency-penalty", "nan"], "--frequency-penalty: must be a finite number"),
    "temperature negative": (GEN + ["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    "top-k negative": (GEN + ["--top-k", "-1"], "--top-k"),
    "top-p 0": (GEN + ["--top-p", "0"], "--top-p: must be a finite number > 0 and <= 1"),
    "num beams 0": (GEN + ["--num-beams", "0"], "--num-beams: must be an integer >= 1"),
    "max new tokens negative": (GEN + ["--max-new-tokens", "-5"], "--max-new-tokens"),
    "generation seed negative": (GEN + ["--seed", "-1"], "--seed"),
    "stop token id negative": (GEN + ["--stop-token-id", "-3"], "--stop-token-id"),
    "temperature that overflows": (GEN + ["--temperature", "1e-45"], "temperature must be 0 (greedy) or at least"),
    "stop token id outside the vocabulary": (GEN + ["--stop-token-id", "99999"], "stop token id 99999 is outside"),
    "generate on cuda without a GPU": (GEN + ["--device", "cuda"], "no CUDA GPU is visible"),
    "generate device typo": (GEN + ["--device", "gpu"], "--device: must be cpu, cuda or cuda:N"),
    "chat repetition penalty 0": (["chat", "{run}", "--repetition-penalty", "0"], "--repetition-penalty"),
    # tokenizer train (a huge vocabulary was a Rust panic, exit -6)
    "tokenizer vocab huge": (TOK + ["--vocab-size", "1000000000"], "--vocab-size: must be an integer >= 1 and <= 4194304"),
    "tokenizer vocab 0": (TOK + ["--vocab-size", "0"], "--vocab-size"),
    "tokenizer min frequency -1": (TOK + ["--vocab-size", "300", "--min-frequency", "-1"], "--min-frequency: must be an integer >= 0"),
    "tokenizer special tokens empty": (TOK + ["--vocab-size", "300", "--special-tokens", ",,,"], "has an empty name"),
    "tokenizer special tokens repeated": (TOK + ["--vocab-size", "300", "--special-tokens", "a,a"], "'a' twice"),
    "tokenizer missing file": (["tokenizer", "train", "{tmp}/nope.txt", "--vocab-size", "300", "--out", "{tmp}/out"], "nope.txt"),
    # data prepare
    "prepare workers 0": (PREP + ["--workers", "0"], "--workers: must be an integer >= 1"),
    "prepare shard tokens 0": (PREP + ["--shard-tokens", "0"], "--shard-tokens"),
    "prepare missing tokenizer": (["data", "prepare", "{corpus}", "--tokenizer", "{tmp}/none", "--out", "{tmp}/out"], "none"),
    # demo, convert
    "demo max steps 0": (["demo", "--out", "{tmp}/out", "--max-steps", "0"], "--max-steps"),
    "demo sample tokens negative": (["demo", "--out", "{tmp}/out", "--sample-tokens", "-1"], "--sample-tokens"),
    "convert dtype": (["convert", "{run}", "--out", "{tmp}/out", "--dtype", "fp64"], "--dtype"),
    "convert missing source": (["convert", "{tmp}/nothing", "--out", "{tmp}/out"], "nothing"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_value_outside_its_rule_is_one_line_and_writes_nothing(case, capsys, tmp_path, corpus, run_dir):
    argv, words = BAD[case]
    argv = [a.format(tmp=tmp_path, corpus=corpus, run=run_dir) for a in argv]
    before = snapshot(run_dir)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "out").exists()  # checked before anything was created
    assert snapshot(run_dir) == before


def test_every_numeric_flag_of_every_verb_refuses_nan(capsys, tmp_path, corpus, run_dir):
    """A sweep over the parser itself: every numeric option of every verb has a rule and refuses
    `nan` (so a new `type=int` option without a rule fails this test)."""
    import argparse

    from llmkit.cli.main import build_parser
    from llmkit.options import Rule

    def parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, path + (name,))

    checked = 0
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.type not in (int, float), f"llmkit {' '.join(path)} {flag} has no rule (type={action.type})"
            rule = getattr(action.type, "__self__", None)
            if not isinstance(rule, Rule) or rule.type not in (int, float):
                continue
            try:
                parser.parse_known_args([flag, "nan"])
            except SystemExit as e:
                assert e.code == 2
                _, err = capsys.readouterr()
                assert flag in err and "nan" in err, (path, flag, err)
                checked += 1
                continue
            raise AssertionError(f"llmkit {' '.join(path)} {flag} nan was accepted")
    assert checked >= 30


def test_python_callers_get_the_same_rules():
    """`TrainConfig(...)` and `GenerationConfig(...).validate()` check like the flags do."""
    from llmkit.errors import UserError
    from llmkit.generation.generate import GenerationConfig
    from llmkit.training.config import TrainConfig

    with pytest.raises(UserError, match="lr must be a finite number > 0"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(UserError, match="max_steps must be an integer"):
        TrainConfig(max_steps=True)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    with pytest.raises(UserError, match="frequency_penalty"):
        GenerationConfig(frequency_penalty=float("nan")).validate()
    with pytest.raises(UserError, match="stop_token_ids"):
        GenerationConfig(stop_token_ids=[-1]).validate()


@pytest.mark.parametrize("flags, words", [
    (["--context-length", "64"], "context_length is 32 there, not 64"),
    (["--tokenizer", "bpe"], "tokenizer is 'char' there, not 'bpe'"),
])
def test_resume_refuses_a_changed_model_or_tokenizer(flags, words, capsys, tmp_path, run_dir):
    """What the checkpoints are (the model's shape, the tokenizer) stays as the run was set up."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--max-steps", "30", *flags)
    assert_one_line_error(code, err, words)
    assert snapshot(run) == before
