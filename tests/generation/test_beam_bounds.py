"""Beam search is bounded before it allocates anything: at most one beam per vocabulary entry, and
the beams' KV cache and scores must fit in free memory; past either, one line naming the numbers
(once this request ran for hours: 100000 beams over a 65-token vocabulary)."""
from __future__ import annotations

import string
import subprocess
import sys

import pytest
import torch

from timeouts import deadline

import llmkit.generation.beam as beam
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.generation.decode_loop import free_memory
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.model_io import save_model
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers.char import CharTokenizer

VOCAB = 65


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DecoderLM(ModelConfig.from_preset("tiny", vocab_size=VOCAB, init_std=0.3)).eval()


def beams(model, n: int, max_new: int = 5) -> list[int]:
    return list(generate_tokens(model, [1, 2, 3], GenerationConfig(num_beams=n, max_new_tokens=max_new)))


def test_more_beams_than_the_vocabulary_is_one_line_naming_both(model):
    with deadline(10), pytest.raises(UserError, match=r"num_beams 1000 is more than the model's vocabulary of 65 "
                                                      r"tokens.*--num-beams 65 or fewer") as e:
        beams(model, 1000)
    assert "\n" not in str(e.value)


def test_as_many_beams_as_the_vocabulary_runs(model):
    with deadline(60):
        out = beams(model, VOCAB, max_new=4)
    assert 1 <= len(out) <= 4 and all(0 <= t < VOCAB for t in out)


def test_beams_that_do_not_fit_in_free_memory_are_refused(model, monkeypatch):
    need = beam.beam_memory(model, 16, 3 + 5)
    monkeypatch.setattr(beam, "free_memory", lambda device: need - 1)
    with deadline(10), pytest.raises(UserError, match=r"num_beams 16 over 8 positions needs about .* GiB \(KV cache "
                                                      r"and scores\) but cpu has .* GiB free.*--num-beams"):
        beams(model, 16)
    monkeypatch.setattr(beam, "free_memory", lambda device: need)
    assert beams(model, 16)


def test_beam_memory_counts_the_cache_and_the_scores(model):
    cfg = model.cfg
    one = beam.beam_memory(model, 1, 10)
    cache = 2 * cfg.n_layers * cfg.n_kv_heads * 10 * cfg.head_dim * 4
    assert one == 2 * cache + 4 * VOCAB * 4
    assert beam.beam_memory(model, 8, 10) == 8 * one  # linear in the beams


def test_free_memory_is_known_on_this_cpu():
    free = free_memory(torch.device("cpu"))
    assert free is None or 0 <= free < 1 << 50


def test_cli_more_beams_than_vocabulary_exits_2_quickly(tmp_path):
    tok = CharTokenizer.train(string.ascii_letters + " \n.,;:!?'-&$3")
    assert tok.vocab_size == VOCAB
    torch.manual_seed(0)
    save_model(DecoderLM(ModelConfig.from_preset("tiny", vocab_size=VOCAB)), tmp_path / "m", tokenizer=tok)
    for verb, extra, stdin in (("generate", ["--prompt", "Hi"], ""), ("chat", [], "Hi\n")):
        done = subprocess.run([sys.executable, "-m", "llmkit", verb, str(tmp_path / "m"), "--num-beams", "60000",
                               "--max-new-tokens", "5", *extra], input=stdin, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "num_beams 60000" in done.stderr and "vocabulary of 65" in done.stderr
