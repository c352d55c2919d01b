"""Bad input found by a hostile sweep of the readers: each is one UserError line (exit 2 from the
CLI), never a traceback and never a silent wrong answer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.cli.main import main
from llmkit.errors import UserError
from llmkit.tokenizers.train import train_tokenizer

TEXT = "the cat sat on the mat. a dog sat on a log.\n" * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bpe")
    train_tokenizer("bpe", texts=[TEXT], vocab_size=300).save(d)
    return d


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# 1. damaged .xz / .bz2 inputs
@pytest.mark.parametrize("name", ["a.txt.xz", "a.txt.bz2", "a.jsonl.xz", "a.csv.bz2", "a.csv.xz"])
def test_damaged_compressed_input_is_one_line(bpe_dir, tmp_path, capsys, name):
    src = tmp_path / name
    src.write_text("nope\n")
    line = _cli_error(capsys, ["data", "prepare", "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "o"), str(src)])
    assert str(src) in line and "damaged or truncated" in line
    assert not (tmp_path / "o").exists()


# 2. --out holding an input
def test_prepare_refuses_out_holding_the_input_even_with_force(bpe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    src = out / "corpus.txt"
    src.write_text(TEXT)
    (out / "other.txt").write_text("keep")
    before = _tree(out)
    line = _cli_error(capsys, ["data", "prepare", "--tokenizer", str(bpe_dir), "--out", str(out), "--force", str(src)])
    assert "holds the input" in line and "choose another --out" in line
    assert _tree(out) == before


def test_prepare_refuses_out_holding_an_input_folder(bpe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    (out / "texts").mkdir(parents=True)
    (out / "texts" / "a.txt").write_text(TEXT)
    before = _tree(out)
    line = _cli_error(capsys, ["data", "prepare", "--tokenizer", str(bpe_dir), "--out", str(out), "--force",
                               str(out / "texts")])
    assert "holds the input" in line
    assert _tree(out) == before


# 3 and 4. HF folders: a corrupt index, a model_type llmkit does not support
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    d = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("weight_map", [5, [1, 2], {"a": 5}, "x", {"model.embed_tokens.weight": "../outside.safetensors"}])
def test_corrupt_safetensors_index_is_one_line(hf_llama, tmp_path, weight_map):
    from llmkit.interop.hf import load_hf

    d = _copy(hf_llama, tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError) as err:
        load_hf(d)
    assert "model.safetensors.index.json" in _one_line(err)


def test_unsupported_model_type_is_refused_whatever_architectures_says(hf_llama, tmp_path, capsys):
    d = _copy(hf_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "xlnet"
    (d / "config.json").write_text(json.dumps(cfg))
    line = _cli_error(capsys, ["convert", str(d), "--out", str(tmp_path / "o")])
    from llmkit.interop.families import supported
    assert "'xlnet'" in line and supported() in line
    assert not (tmp_path / "o").exists()


def test_missing_model_type_falls_back_to_architectures(hf_llama, tmp_path):
    from llmkit.interop.families import family_of

    assert family_of({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    with pytest.raises(UserError):
        family_of({"model_type": "bert", "architectures": ["LlamaForCausalLM"]})


# 5. convert with a tokenizer whose ids the model has no rows for
def test_convert_refuses_a_tokenizer_larger_than_the_model(hf_llama, bpe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    line = _cli_error(capsys, ["convert", str(hf_llama), "--out", str(out), "--tokenizer", str(bpe_dir)])
    assert "vocab_size 64" in line and "produces token ids up to" in line
    assert not out.exists()
    assert not list(tmp_path.glob(".o.*"))


def test_check_vocab_still_importable_from_api():
    from llmkit import api, model_io

    assert api.check_vocab is model_io.check_vocab and api.max_token_id is model_io.max_token_id


# 6. corrupt char tokenizer files
@pytest.mark.parametrize("content", [[1, 2], {"kind": "char"}, {"chars": "abc"}, {"chars": ["ab", "c"]},
                                     {"chars": ["a", 1]}, {"chars": ["a", "b", "a"]}, {"chars": []}, 5])
def test_corrupt_char_tokenizer_is_one_line(tmp_path, content):
    from llmkit.tokenizers.char import CharTokenizer

    (tmp_path / "char_tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as err:
        CharTokenizer.load(tmp_path)
    assert "char_tokenizer.json" in _one_line(err)


# 7. vocabulary sizes below what the trainer keeps anyway
def test_bpe_vocab_size_below_the_byte_alphabet_is_refused(tmp_path):
    with pytest.raises(UserError) as err:
        train_tokenizer("bpe", texts=[TEXT], vocab_size=20, special_tokens=["<|eos|>"])
    assert "bpe vocab_size must be at least 257 (256 byte tokens + 1 special tokens)" in _one_line(err)
    assert train_tokenizer("bpe", texts=[TEXT], vocab_size=257, special_tokens=["<|eos|>"]).vocab_size == 257


def test_bpe_vocab_size_cli(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    line = _cli_error(capsys, ["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab-size", "20",
                               "--out", str(tmp_path / "t")])
    assert "bpe vocab_size must be at least" in line
    assert not (tmp_path / "t").exists()


def test_wordpiece_vocab_size_below_the_alphabet_is_refused():
    with pytest.raises(UserError) as err:
        train_tokenizer("wordpiece", texts=[TEXT], vocab_size=12, special_tokens=["[UNK]"])
    assert "wordpiece vocab_size must be at least" in _one_line(err)


def test_a_model_stored_in_fp16_runs_as_stored(tmp_path):
    """Weights saved in fp16 load as fp16 with every buffer (the RoPE tables) in fp16 too: the
    same model as loading with dtype=fp16, not a float32 query meeting a half-precision key."""
    import torch

    from llmkit.config import ModelConfig
    from llmkit.generation.generate import GenerationConfig, generate_tokens
    from llmkit.model_io import load_model, save_model
    from llmkit.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=32, context_length=16, n_layers=1, d_model=16, n_heads=2)).half()
    save_model(model, tmp_path / "m")
    as_stored, cast = load_model(tmp_path / "m"), load_model(tmp_path / "m", dtype=torch.float16)
    assert {b.dtype for b in as_stored.buffers() if b.is_floating_point()} <= {torch.float16}
    greedy = GenerationConfig(max_new_tokens=6, temperature=0.0)
    assert list(generate_tokens(as_stored, [1, 2, 3], greedy)) == list(generate_tokens(cast, [1, 2, 3], greedy))
