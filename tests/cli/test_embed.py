"""`llmkit embed` end to end on a tiny random BERT with a WordPiece tokenizer: JSON lines equal to
`llmkit.embed`, a similarity table, files and stdin, --out files (.npy, .jsonl) that refuse to be
overwritten without --force, and bad input as one `error:` line with exit 2."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmkit
from llmkit.cli.main import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "stock", "market", "fell", "##s", "."]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A random 2-layer BertModel (mean pooling through modules.json) with a WordPiece tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from llmkit.tokenizers.hf import HFTokenizer

    out = tmp_path_factory.mktemp("embed") / "bert"
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(out)
    HFTokenizer(backend).save(out)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_json_lines_equal_to_the_library(bert_dir, capsys):
    texts = ["The cat sat on the mat.", "A dog ran.", "cats"]
    code, out, err = run(capsys, "embed", str(bert_dir), *sum((["--text", t] for t in texts), []))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == texts
    got = torch.tensor([r["embedding"] for r in rows])
    assert (got - llmkit.embed(bert_dir, texts)).abs().max() < 1e-5  # printed with 6 decimals


def test_similarity_table_and_files(bert_dir, tmp_path, capsys, monkeypatch):
    listing = tmp_path / "texts.txt"
    listing.write_text("the cat sat\n\nthe dog ran\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"the stock market fell\n")))
    code, out, err = run(capsys, "embed", str(bert_dir), "--text", "the cat sat", "--file", str(listing),
                         "--file", "-", "--similarity")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 + 4 and "#4" in lines[0]
    sims = [[float(x) for x in line.split("|")[1].split()] for line in lines[2:]]
    assert all(abs(sims[i][i] - 1) < 1e-3 for i in range(4))
    assert abs(sims[0][1] - 1) < 1e-3  # the same text twice (argument and file) is the same vector
    assert all(abs(sims[i][j] - sims[j][i]) < 1e-3 for i in range(4) for j in range(4))
    code, out, _ = run(capsys, "embed", str(bert_dir), "--text", "the cat", "--format", "table")
    assert code == 0 and out.startswith("the cat | norm ")


def test_out_files_and_the_overwrite_rule(bert_dir, tmp_path, capsys):
    npy, jsonl = tmp_path / "e.npy", tmp_path / "e.jsonl"
    assert run(capsys, "embed", str(bert_dir), "--text", "the cat", "--text", "a dog", "--out", str(npy))[0] == 0
    vectors = np.load(npy)
    assert vectors.shape == (2, 32)
    assert run(capsys, "embed", str(bert_dir), "--text", "the cat", "--text", "a dog", "--out", str(jsonl))[0] == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert np.abs(np.array([r["embedding"] for r in rows]) - vectors).max() < 1e-6
    code, _, err = run(capsys, "embed", str(bert_dir), "--text", "x", "--out", str(npy))
    assert code == 2 and "--force" in err and np.array_equal(np.load(npy), vectors)  # untouched
    assert run(capsys, "embed", str(bert_dir), "--text", "x", "--out", str(npy), "--force")[0] == 0
    assert np.load(npy).shape == (1, 32)


def test_bad_input_is_one_line_and_exit_2(bert_dir, tmp_path, capsys):
    from llmkit.model_io import save_model
    from llmkit.models.decoder import DecoderLM
    from llmkit.config import ModelConfig

    decoder = tmp_path / "decoder"
    save_model(DecoderLM(ModelConfig.from_preset("tiny")), decoder)
    cases = [
        (["embed", str(bert_dir)], "no text to embed"),
        (["embed", str(bert_dir), "--file", str(tmp_path / "missing.txt")], "not found"),
        (["embed", str(bert_dir), "--text", "a", "--similarity"], "2 or more"),
        (["embed", str(bert_dir), "--text", "a", "--out", str(tmp_path / "e.csv")], ".npy or .jsonl"),
        (["embed", str(tmp_path / "nowhere"), "--text", "a"], "does not exist"),
        (["embed", str(decoder), "--text", "a"], "need an encoder"),
        (["generate", str(bert_dir), "--prompt", "a"], "does not generate text"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_text_with_no_tokens_is_one_line(tmp_path, capsys):
    """A tokenizer that adds no special tokens gives an empty text no ids: refused, not a zero vector."""
    from llmkit.models.encoder import Encoder, EncoderConfig
    from llmkit.model_io import save_model
    from llmkit.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train("abc ")
    torch.manual_seed(0)
    save_model(Encoder(EncoderConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=16, n_heads=2,
                                     context_length=16, head="none")), tmp_path / "enc", tok)
    code, _, err = run(capsys, "embed", str(tmp_path / "enc"), "--text", "abc", "--text", "")
    assert code == 2 and "no tokens" in err and len(err.strip().splitlines()) == 1
