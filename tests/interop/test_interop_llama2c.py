"""Real pretrained weights: llama2.c's stories260K reproduces llama2.c's reference output, through
the loader, the convert CLI, llmkit.load, and a Hugging Face export."""
from __future__ import annotations

import argparse

import pytest
import torch

from interop_helpers import transformers
import llmkit
from llmkit.cli import convert as convert_cli
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.interop.llama2c import interleaved_to_half, load_llama2c
from llmkit.tokenizers.base import load_tokenizer

# llama2.c test_all.py expected output (greedy, from BOS), as far as ../shared/data/models/SOURCE.md
# quotes it; ids from the same file.
REFERENCE = ('Once upon a time, there was a little girl named Lily. She loved to play outside in the park. '
             'One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n'
             'Lily\'s mom said, "Lily, let\'s go to the park." Lily was sad and didn\'t know what to do.')
REFERENCE_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
BOS = 1


def _greedy(model, steps: int = 199) -> list[int]:
    """llama2.c's `run -t 0 -n 200`: BOS at position 0, then 199 argmax tokens."""
    return list(generate_tokens(model, [BOS], GenerationConfig(max_new_tokens=steps, temperature=0)))


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert_cli.register(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def test_stories260k_greedy_from_bos_reproduces_llama2c_reference(stories):
    model = load_llama2c(stories / "stories260K.bin")
    tok = load_tokenizer(stories / "tok512.model")
    ids = _greedy(model)
    assert ids[:len(REFERENCE_IDS)] == REFERENCE_IDS
    assert len(ids) == 199
    assert tok.decode(ids).startswith(REFERENCE)


def test_interleaved_to_half_turns_adjacent_pair_rope_into_rotate_half():
    """Rotating adjacent pairs of W x equals rotate-half of (P W) x, with P the row permutation."""
    torch.manual_seed(0)
    hd, heads, d = 8, 2, 6
    w, x = torch.randn(heads * hd, d), torch.randn(d)
    theta = torch.rand(hd // 2)
    y = (w @ x).view(heads, hd // 2, 2)
    a, b = y[..., 0], y[..., 1]
    pairs = torch.stack([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1).view(heads, hd)
    z = (interleaved_to_half(w, heads) @ x).view(heads, hd)
    c, s = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
    half = z * c + torch.cat([-z[:, hd // 2:], z[:, :hd // 2]], -1) * s
    # same numbers, in the permuted channel order
    assert torch.allclose(interleaved_to_half(pairs.reshape(-1, 1), heads).view(heads, hd), half, atol=1e-6)


def test_convert_cli_writes_an_llmkit_dir_that_llmkit_load_runs_to_the_reference(stories, tmp_path, capsys):
    out = tmp_path / "stories"
    assert _cli(str(stories / "stories260K.bin"), "--tokenizer", str(stories / "tok512.model"),
                "--out", str(out)) == 0
    assert "llama2c -> llmkit" in capsys.readouterr().out
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    lm = llmkit.load(out)
    assert lm.generate("", max_new_tokens=199, temperature=0).startswith(REFERENCE)


def test_stories260k_exported_to_hf_matches_in_transformers_and_loads_back(stories, tmp_path):
    out = tmp_path / "hf"
    assert _cli(str(stories / "stories260K.bin"), "--tokenizer", str(stories / "tok512.model"),
                "--to", "hf", "--out", str(out)) == 0
    ours = load_llama2c(stories / "stories260K.bin")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[BOS] + REFERENCE_IDS])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    ref = hf.generate(torch.tensor([[BOS]]), max_new_tokens=40, do_sample=False)[0, 1:].tolist()
    assert ref[:15] == REFERENCE_IDS
    lm = llmkit.load(out)  # a Hugging Face directory, loaded directly
    assert lm.generate("", max_new_tokens=199, temperature=0).startswith(REFERENCE)


def test_llmkit_load_of_a_llama2c_file_takes_the_tokenizer_beside_it_or_says_to_convert(stories, tmp_path):
    lm = llmkit.load(stories / "stories260K.bin")  # tok512.model beside it: loads with it
    assert lm.tokenizer.vocab_size == 512 and lm.generate("Once", max_new_tokens=3, temperature=0)
    alone = tmp_path / "stories260K.bin"
    alone.symlink_to(stories / "stories260K.bin")
    with pytest.raises(UserError, match="llmkit convert .*--tokenizer"):
        llmkit.load(alone)


def test_truncated_llama2c_file_names_both_sizes(stories, tmp_path):
    bad = tmp_path / "cut.bin"
    bad.write_bytes((stories / "stories260K.bin").read_bytes()[:500_000])
    with pytest.raises(UserError, match="500000 bytes but its header implies 1056540"):
        load_llama2c(bad)
