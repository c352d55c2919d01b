"""Folders transformers and llmkit could read differently (issue #12): which weight files load, the
tie rule for a stored LM head, llama3 RoPE keys, and `convert` into or out of its own input.
Each case is checked against transformers 5 itself loading the same folder."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop_helpers import random_hf_model, random_llmkit_model, transformers
from llmkit.cli import convert as convert_cli
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.interop import export_hf, load_hf
from llmkit.interop.convert import convert
from llmkit.model_io import load_model
from llmkit.tokenizers import CharTokenizer, load_tokenizer

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def _reference(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()


def _max_diff(d: Path, ids: torch.Tensor = IDS) -> float:
    """Largest |llmkit - transformers| logit, both loading folder `d`."""
    with torch.no_grad():
        return (load_hf(d)(ids) - _reference(d)(ids).logits).abs().max().item()


def _logits_of(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _other_llama(tmp_path: Path, **save) -> Path:
    """The llama test model with other random weights (seed 1), saved to its own folder."""
    d = tmp_path / "other"
    random_hf_model("llama", seed=1).save_pretrained(d, safe_serialization=True, **save)
    return d


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


# --- 1a/1b: which files are the checkpoint -----------------------------------------------------

def test_model_safetensors_wins_over_stale_shards_and_index_as_in_transformers(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama"], tmp_path / "m")
    stale = _other_llama(tmp_path, max_shard_size="40KB")
    for f in stale.glob("model*"):  # shards and index of other weights beside the real model.safetensors
        shutil.copy(f, d)
    assert (d / "model.safetensors.index.json").is_file() and (d / "model.safetensors").is_file()
    assert _max_diff(d) < 1e-5
    assert torch.equal(_logits_of(load_hf(d)), _logits_of(load_hf(hf_dirs["llama"])))


def test_stray_safetensors_beside_model_safetensors_are_ignored_as_in_transformers(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama"], tmp_path / "m")
    # sorts after model.safetensors: a merge of every *.safetensors would let it win
    shutil.copy(_other_llama(tmp_path) / "model.safetensors", d / "zz-finetuned.safetensors")
    assert _max_diff(d) < 1e-5
    assert torch.equal(_logits_of(load_hf(d)), _logits_of(load_hf(hf_dirs["llama"])))


def test_an_index_reads_only_its_own_files_as_in_transformers(sharded_llama, tmp_path):
    d = shutil.copytree(sharded_llama, tmp_path / "m")
    shutil.copy(_other_llama(tmp_path) / "model.safetensors", d / "zz-other.safetensors")
    assert _max_diff(d) < 1e-5
    assert torch.equal(_logits_of(load_hf(d)), _logits_of(load_hf(sharded_llama)))


def test_transformers_weights_in_config_names_the_file_both_load(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama"], tmp_path / "m")
    shutil.copy(_other_llama(tmp_path) / "model.safetensors", d / "chosen.safetensors")
    _edit_config(d, transformers_weights="chosen.safetensors")
    assert _max_diff(d) < 1e-5
    assert torch.equal(_logits_of(load_hf(d)), _logits_of(load_hf(tmp_path / "other")))


def test_transformers_weights_outside_the_folder_is_refused(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama"], tmp_path / "m")
    _edit_config(d, transformers_weights="../elsewhere.safetensors")
    with pytest.raises(UserError, match=r"transformers_weights .*inside the model directory"):
        load_hf(d)


def test_only_unrecognised_safetensors_are_refused_naming_them_as_transformers_refuses(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama"], tmp_path / "m")
    (d / "model.safetensors").rename(d / "weights.safetensors")
    shutil.copy(_other_llama(tmp_path) / "model.safetensors", d / "backup.safetensors")
    with pytest.raises(UserError) as err:
        load_hf(d)
    message = str(err.value)
    assert "\n" not in message
    assert "backup.safetensors, weights.safetensors" in message and "neither model.safetensors nor" in message
    with pytest.raises(OSError):
        _reference(d)


def test_two_shard_sets_without_an_index_are_refused(sharded_llama, tmp_path):
    d = shutil.copytree(sharded_llama, tmp_path / "m")
    (d / "model.safetensors.index.json").unlink()
    other = _other_llama(tmp_path, max_shard_size="100KB")
    for f in other.glob("model-*.safetensors"):
        shutil.copy(f, d)
    with pytest.raises(UserError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf(d)


# --- 1c: tie_word_embeddings with a stored head ------------------------------------------------

def _with_head(src: Path, dst: Path, head) -> Path:
    """A copy of `src` whose checkpoint also stores lm_head.weight = head(embedding)."""
    d = shutil.copytree(src, dst)
    tensors = load_file(d / "model.safetensors")
    emb = next(v for k, v in tensors.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
    tensors["lm_head.weight"] = head(emb)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("name", ["llama3", "gpt2"])  # both configs say tie_word_embeddings
def test_tied_config_with_a_distinct_stored_head_keeps_the_head_like_transformers(name, hf_dirs, tmp_path):
    d = _with_head(hf_dirs[name], tmp_path / "m", lambda emb: emb + torch.randn_like(emb) * 0.1)
    with pytest.warns(UserWarning, match="stores a different lm_head.weight"):
        model = load_hf(d)
    ref = _reference(d)
    assert ref.lm_head.weight.data_ptr() != ref.get_input_embeddings().weight.data_ptr()  # transformers untied
    assert model.lm_head.weight is not model.tok_emb.weight and not model.cfg.tie_embeddings
    with torch.no_grad():
        assert (model(IDS) - ref(IDS).logits).abs().max().item() < 1e-5


def test_tied_config_with_an_equal_stored_head_stays_tied(hf_dirs, tmp_path, recwarn):
    d = _with_head(hf_dirs["llama3"], tmp_path / "m", lambda emb: emb.clone())
    model = load_hf(d)
    assert model.lm_head.weight is model.tok_emb.weight
    assert not [w for w in recwarn if "lm_head" in str(w.message)]
    assert _max_diff(d) < 1e-5


def test_tied_config_storing_only_the_head_uses_it_for_both_like_transformers(hf_dirs, tmp_path):
    d = _with_head(hf_dirs["llama3"], tmp_path / "m", lambda emb: emb.clone())
    tensors = load_file(d / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    assert _max_diff(d) < 1e-5


# --- 2: llama3 RoPE keys ------------------------------------------------------------------------

NATIVE_LLAMA = dict(vocab_size=128, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                    mlp="swiglu", norm="rmsnorm", position="rope", bias=False)
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # short original context: the test positions cross it


def test_llama3_rope_given_only_factor_is_refused_naming_the_missing_keys():
    """transformers has no defaults for these; llmkit's model refuses to guess them, before any export."""
    with pytest.raises(UserError) as err:
        ModelConfig(**NATIVE_LLAMA, rope_scaling={"type": "llama3", "factor": 8.0})
    assert "low_freq_factor, high_freq_factor, original_max_position_embeddings" in str(err.value)
    assert "\n" not in str(err.value)


def test_convert_of_an_incomplete_llama3_model_exits_2_and_leaves_nothing(tmp_path, capsys):
    """A config.json written before the keys were required (edited here) is refused on load."""
    import json

    from llmkit.cli import main as cli_main
    from llmkit.model_io import save_model
    native = save_model(random_llmkit_model(ModelConfig(**NATIVE_LLAMA, rope_scaling=LLAMA3)), tmp_path / "native")
    config = json.loads((native / "config.json").read_text())
    config["rope_scaling"] = {"type": "llama3", "factor": 8.0}
    (native / "config.json").write_text(json.dumps(config))
    assert cli_main.main(["convert", str(native), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "low_freq_factor" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]  # no output, no temp folder


def test_native_llama3_rope_exports_and_loads_in_transformers_with_equal_logits(tmp_path):
    model = random_llmkit_model(ModelConfig(**NATIVE_LLAMA, rope_scaling=LLAMA3))
    export_hf(model, None, tmp_path)
    with torch.no_grad():
        assert (model(IDS) - _reference(tmp_path)(IDS).logits).abs().max().item() < 1e-5
    # and the scaling matters at these positions: without it the logits differ
    plain = random_llmkit_model(ModelConfig(**NATIVE_LLAMA))
    with torch.no_grad():
        assert (model(IDS) - plain(IDS)).abs().max().item() > 1e-3


def test_hf_llama3_without_frequency_factors_is_refused_as_transformers_refuses(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama3"], tmp_path / "m")
    _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
    with pytest.raises(UserError, match="llama3 rope scaling lacks low_freq_factor, high_freq_factor"):
        load_hf(d)
    with pytest.raises(KeyError, match="low_freq_factor"):
        _reference(d)


def test_hf_llama3_without_original_length_takes_max_position_embeddings_like_transformers(hf_dirs, tmp_path):
    d = shutil.copytree(hf_dirs["llama3"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    rope = {k: v for k, v in config["rope_parameters"].items() if k != "original_max_position_embeddings"}
    _edit_config(d, rope_parameters=rope, max_position_embeddings=20)  # IDS (24) pass the 20
    assert load_hf(d).cfg.rope_scaling["original_max_position_embeddings"] == 20
    assert _max_diff(d) < 1e-5


# --- 4: convert must not overlap its input; the char tokenizer travels ------------------------

def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert_cli.register(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """A real llmkit training run with a character tokenizer (two steps of the tiny preset)."""
    from llmkit.cli.main import main
    root = tmp_path_factory.mktemp("charrun")
    corpus = root / "corpus.txt"
    corpus.write_text("once upon a time there was a tiny model.\n" * 200, encoding="utf-8")
    out = root / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--context-length", "16",
                 "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--no-progress"]) == 0
    assert (out / "char_tokenizer.json").is_file()
    return out


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_convert_refuses_an_out_that_overlaps_the_input_even_with_force(where, char_run, tmp_path):
    src = shutil.copytree(char_run, tmp_path / "run")
    out = {"same": src, "inside": src / "converted", "parent": tmp_path}[where]
    before = _snapshot(tmp_path)
    with pytest.raises(UserError) as err:
        convert(src, out, force=True)
    message = str(err.value)
    assert message.startswith(f"--out {out} is ") and "the input" in message
    assert message.endswith(": choose another folder") and "\n" not in message
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_convert_refuses_the_input_itself_through_another_spelling(char_run, tmp_path):
    src = shutil.copytree(char_run, tmp_path / "run")
    with pytest.raises(UserError, match="is the input"):
        convert(src, tmp_path / "run" / ".." / "run", force=True)


@pytest.mark.parametrize("to", ["llmkit", "hf"])
def test_converting_a_char_tokenizer_run_keeps_the_char_tokenizer(to, char_run, tmp_path):
    done = convert(char_run, tmp_path / "out", to=to)
    assert done.tokenizer
    tok, ref = load_tokenizer(tmp_path / "out"), load_tokenizer(char_run)
    assert isinstance(tok, CharTokenizer) and tok.chars == ref.chars
    back = load_model(tmp_path / "out") if to == "llmkit" else load_hf(tmp_path / "out")
    ids = torch.tensor([ref.encode("once upon a time")])
    with torch.no_grad():
        assert torch.equal(back(ids), load_model(char_run)(ids))


def test_cli_convert_of_a_char_run_does_not_say_the_tokenizer_is_missing(char_run, tmp_path, capsys):
    assert _cli(str(char_run), "--out", str(tmp_path / "out")) == 0
    assert "no tokenizer written" not in capsys.readouterr().out


def test_interrupted_convert_leaves_no_temp_folder(char_run, tmp_path, monkeypatch):
    from llmkit.interop import convert as convert_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(convert_mod, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(char_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_final_rename_restores_the_old_out(char_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_rename = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("disk full")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        convert(char_run, out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "old"
