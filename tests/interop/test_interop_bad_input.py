"""Each bad input gives one UserError line that names the problem and the fix; convert never
leaves a half-written output behind."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from llmkit.cli import convert as convert_cli
from llmkit.errors import UserError
from llmkit.interop import dtypes, load_hf
from llmkit.interop.convert import convert
from llmkit.interop.dtypes import parse_dtype


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture_names_the_supported_families(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"], tmp_path / "xlnet")
    (d / "config.json").write_text(json.dumps({"model_type": "xlnet", "architectures": ["XLNetLMHeadModel"]}))
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert "unsupported architecture XLNetLMHeadModel" in _one_line(err)
    from llmkit.interop.families import FAMILIES, supported
    assert f"families {supported()}" in str(err.value) and all(name in str(err.value) for name in FAMILIES)


def test_index_pointing_to_a_missing_shard_names_the_file(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert f"points to missing file(s) {victim.name}" in _one_line(err)


def test_missing_shard_without_an_index_is_named(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path / "m")
    (d / "model.safetensors.index.json").unlink()
    victim = sorted(d.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert f"shard {victim.name} is missing" in _one_line(err)


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 80  # the weights have 96
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape (96, 64) but config.json implies (80, 64)" \
        in _one_line(err)


def test_truncated_safetensors_file_is_reported_as_corrupt(hf_dirs, tmp_path):
    d = _copy(hf_dirs["gpt2"], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert "truncated or corrupt" in _one_line(err) and "model.safetensors" in str(err.value)


def test_directory_without_weights_says_what_is_missing(hf_dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(hf_dirs["qwen2"] / "config.json", d)
    with pytest.raises(UserError, match=r"no \*\.safetensors weights"):
        load_hf(d)


def test_unknown_dtype_string_lists_the_valid_ones(hf_dirs):
    with pytest.raises(UserError, match="unknown dtype 'fp8': use one of fp32, bf16, fp16"):
        load_hf(hf_dirs["gpt2"], dtype="fp8")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is None


def test_dtype_the_machine_cannot_run_is_refused_before_loading(hf_dirs, monkeypatch):
    monkeypatch.setattr(dtypes, "_can_run", lambda dtype, device: dtype != torch.float16)
    with pytest.raises(UserError, match="cannot compute in fp16 on cpu: load with dtype fp32"):
        load_hf(hf_dirs["gpt2"], dtype="fp16")


def test_extra_tensors_mean_the_config_does_not_describe_the_weights(hf_dirs, tmp_path):
    d = _copy(hf_dirs["qwen2"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["num_hidden_layers"] = 1
    config["layer_types"] = config["layer_types"][:1]  # one per layer, or transformers refuses the file too
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"tensors llmkit would not use \(model\.layers\.1\."):
        load_hf(d)


# --- convert ---------------------------------------------------------------------------------

def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    convert_cli.register(parser.add_subparsers())
    return parser.parse_args(["convert", *argv])


def test_convert_refuses_a_non_empty_out_unless_forced(hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty: .*--force"):
        convert(hf_dirs["gpt2"], out)
    assert (out / "keep.txt").exists()
    args = _cli_args(str(hf_dirs["gpt2"]), "--out", str(out), "--force")
    assert args.func(args) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_failed_convert_leaves_no_output_and_no_temp_folder(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    (src / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    with pytest.raises(UserError, match="unsupported architecture"):
        convert(src, tmp_path / "out", to="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_export_failure_midway_removes_the_partial_folder(hf_dirs, tmp_path, monkeypatch):
    from llmkit.interop import convert as convert_mod

    def boom(*a, **k):
        raise UserError("disk full")
    monkeypatch.setattr(convert_mod, "save_model", boom)
    with pytest.raises(UserError, match="disk full"):
        convert(hf_dirs["gpt2"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_convert_hf_to_llmkit_and_back_keeps_the_logits(hf_dirs, tmp_path):
    from llmkit.model_io import load_model
    convert(hf_dirs["mistral"], tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "hf", to="hf", dtype="fp32")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mistral"
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        a, b = load_hf(hf_dirs["mistral"])(ids), load_model(tmp_path / "native")(ids)
        c = load_hf(tmp_path / "hf")(ids)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_family_flag_without_hf_target_is_refused(hf_dirs, tmp_path):
    with pytest.raises(UserError, match="--family only applies to --to hf"):
        convert(hf_dirs["gpt2"], tmp_path / "o", family="gpt2")


def test_cli_user_errors_exit_2_through_main(hf_dirs, tmp_path, capsys):
    from llmkit.cli import main as cli_main
    assert "convert" in cli_main.VERBS
    assert cli_main.main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
