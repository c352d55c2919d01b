"""`llmkit train --model FIELD=VALUE`: any ModelConfig field from the command line (over a recipe's
`model:` keys), values read as YAML; a bad field or value is one line, exit 2, nothing written."""
from __future__ import annotations

import json

from cli_helpers import TINY, assert_one_line_error, run_cli


def test_model_flags_set_fields_over_the_recipe(capsys, corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {block: sandwich, n_layers: 2, qk_norm: full}\n")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe), "--data", str(corpus), *TINY, "--max-steps", "2",
                           "--eval-every", "0", "--out", str(out), "--model", "block=parallel",
                           "--model", "attn_softcap=30",
                           "--model", "layer_types=[sliding, full]", "--model", "sliding_window=8")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block"] == "parallel" and cfg["qk_norm"] == "full" and cfg["n_layers"] == 2  # flag wins, recipe kept
    assert cfg["layer_types"] == ["sliding", "full"] and cfg["attn_softcap"] == 30.0


def test_a_bad_model_flag_is_one_line_and_writes_nothing(capsys, corpus, tmp_path):
    for flag, words in (("block=diagonal", "unknown block 'diagonal'"), ("blocksandwich", "expected FIELD=VALUE"),
                        ("colour=red", "unknown keys"), ("qk_norm=[", "not YAML")):
        out = tmp_path / flag.replace("=", "_").replace("[", "")
        code, _, err = run_cli(capsys, "train", "--data", str(corpus), *TINY, "--max-steps", "1", "--out", str(out),
                               "--model", flag)
        assert_one_line_error(code, err, words)
        assert not out.exists()
