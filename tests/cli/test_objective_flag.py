"""`llmkit train --objective`: it sets the task; an objective that does not fit the preset's model
kind is refused in one line naming the objectives that fit the preset and the presets that fit the
objective (exit 2, nothing written); inconsistent --task, another objective's settings and
changed objective settings on --resume are refused the same way."""
from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, run_cli

from llmkit.errors import UserError
from llmkit.training.config import OBJECTIVES, build_train_config

TRAIN = ["train", "--data", "{corpus}", "--out", "{tmp}/out", "--no-progress"]

REFUSED = {
    "mlm on a decoder": (["--objective", "mlm", "--preset", "tiny"],
                         ["--objective mlm trains encoder models", "preset 'tiny' is a decoder",
                          "objectives for a decoder: clm, prefix-lm", "presets for mlm: ", "bert-tiny"]),
    "span on an encoder": (["--objective", "span", "--preset", "bert-tiny"],
                           ["objectives for an encoder: mlm", "presets for span: ", "t5-tiny"]),
    "clm on a t5": (["--objective", "clm", "--preset", "t5-tiny"], ["objectives for a t5: span, ul2", "presets for clm: "]),
    "task and objective disagree": (["--objective", "mlm", "--task", "prefix-lm", "--preset", "bert-tiny"],
                                    ["--objective mlm trains task 'masked-lm', not --task 'prefix-lm'"]),
    "task causal-lm given with mlm": (["--objective", "mlm", "--task", "causal-lm", "--preset", "bert-tiny"],
                                      ["not --task 'causal-lm'"]),
    "masked-lm task on a decoder": (["--task", "masked-lm", "--preset", "tiny"],
                                    ["task 'masked-lm' trains encoder models", "bert-tiny"]),
    "nsp without mlm": (["--nsp"], ["--nsp is a setting of task masked-lm", "(causal-lm) does not train"]),
    "noise density for mlm": (["--objective", "mlm", "--preset", "bert-tiny", "--noise-density", "0.3"],
                              ["--noise-density is a setting of task span-corruption"]),
    "mixture for span": (["--objective", "span", "--preset", "t5-tiny", "--ul2-mixture", "r=1"],
                         ["--ul2-mixture is a setting of task ul2"]),
    "bad mixture": (["--objective", "ul2", "--preset", "t5-tiny", "--ul2-mixture", "r=1,z=2"],
                    ["--ul2-mixture 'r=1,z=2': 'z=2' is not NAME=WEIGHT"]),
    "objective typo": (["--objective", "bert"], ["--objective: must be one of clm, mlm, prefix-lm, span, ul2"]),
    "mask rate 1": (["--objective", "mlm", "--preset", "bert-tiny", "--mask-rate", "1"], ["--mask-rate"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_misfit_objective_is_one_line_and_writes_nothing(case, capsys, tmp_path, corpus):
    extra, words = REFUSED[case]
    argv = [a.format(tmp=tmp_path, corpus=corpus) for a in TRAIN] + extra
    code, _, err = run_cli(capsys, *argv)
    for w in words:
        assert_one_line_error(code, err, w)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_sets_the_task(objective, tmp_path):
    preset = {"clm": "tiny", "prefix-lm": "tiny", "mlm": "bert-tiny", "span": "t5-tiny", "ul2": "t5-tiny"}[objective]
    cfg = build_train_config(data="x", out=str(tmp_path), objective=objective, preset=preset)
    assert cfg.task == OBJECTIVES[objective]
    same = build_train_config(data="x", out=str(tmp_path), objective=objective, task=OBJECTIVES[objective], preset=preset)
    assert same.task == cfg.task


def test_resume_keeps_the_objective_and_its_settings(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps(
        build_train_config(data="x", out=str(tmp_path), objective="mlm", preset="bert-tiny", mask_rate=0.2).to_dict()))
    resumed = build_train_config(out=str(tmp_path), resume=True)
    assert (resumed.task, resumed.objective, resumed.mask_rate) == ("masked-lm", "mlm", 0.2)
    with pytest.raises(UserError, match="mask_rate is 0.2 there, not 0.3"):
        build_train_config(out=str(tmp_path), resume=True, mask_rate=0.3)
    with pytest.raises(UserError, match="objective is 'mlm' there"):
        build_train_config(out=str(tmp_path), resume=True, objective="clm")


def test_resume_of_a_run_from_before_objectives_refuses_another_objective(tmp_path):
    old = build_train_config(data="x", out=str(tmp_path), preset="tiny").to_dict()
    del old["objective"]  # written before the option existed
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="its task is 'causal-lm', not 'prefix-lm'"):
        build_train_config(out=str(tmp_path), resume=True, objective="prefix-lm")


def test_python_callers_get_the_objective_settings_checked_too(tmp_path):
    with pytest.raises(UserError, match="the weight of r must be a finite number"):
        build_train_config(data="x", out=str(tmp_path), objective="ul2", preset="t5-tiny", ul2_mixture="r=lots")
