"""Generation past the context length: positions go on (they do not restart at 0) where the
position kind defines them there, so greedy ids equal transformers' generate on a Llama whose
max_position_embeddings is shorter than prompt + output, and every kind that extrapolates (RoPE,
ALiBi, sinusoidal, none) decodes through the cache as full recomputation picks; learned positions
slide as before and refuse a longer context_length; `llmkit generate --context-length` lets a
model trained shorter take a longer prompt, with one warning line for unscaled RoPE."""
from __future__ import annotations

import string

import pytest
import torch

from llmkit.cli.main import main
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens
from llmkit.model_io import save_model
from llmkit.models.decoder import DecoderLM

CTX, VOCAB = 16, 64
PROMPT = [3, 9, 12, 40, 5, 22]


def greedy(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (peaked weights: std 0.3, so argmax is never a near-tie)
    saved with max_position_embeddings 16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
                                   rms_norm_eps=1e-5, initializer_range=0.3, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=None, pad_token_id=0)
    path = tmp_path_factory.mktemp("llama16")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def test_greedy_past_the_context_equals_transformers_generate(hf_llama_dir):
    """6 prompt + 26 new tokens on a 16-position Llama: transformers keeps counting positions
    (16..31), and so does llmkit; restarting at 0 (the old slide) gives other ids."""
    import transformers

    from llmkit.api import load_model_any

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_llama_dir).eval()
    ours = load_model_any(hf_llama_dir).eval()
    assert ours.cfg.context_length == CTX
    n = 26
    want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)[0, len(PROMPT):].tolist()
    assert list(generate_tokens(ours, PROMPT, greedy(n))) == want
    assert generate_batch(ours, [PROMPT, PROMPT[:2]], greedy(n))[0] == want
    slid = list(generate_tokens(ours, PROMPT, greedy(n, context_length=CTX)))  # the old behaviour: a sliding window
    assert len(slid) == n and slid != want


def tiny(position: str, **kw) -> DecoderLM:
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=VOCAB, context_length=CTX, n_layers=2, d_model=32, n_heads=4, mlp="swiglu",
                      norm="rmsnorm", position=position, bias=False, init_std=0.3, **kw)
    return DecoderLM(cfg).eval()


def recomputed_greedy(model: DecoderLM, prompt: list[int], n: int) -> list[int]:
    """Greedy by running the whole sequence again for every token (no cache, positions 0..len-1)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("position", ["rope", "alibi", "sinusoidal", "none"])
def test_each_extrapolating_kind_decodes_past_the_context_as_recomputation(position):
    model = tiny(position)
    n = 34  # 6 + 34 = 40 positions on a 16-position model
    out = list(generate_tokens(model, PROMPT, greedy(n)))
    assert out == recomputed_greedy(model, PROMPT, n)
    assert len(set(out)) >= 3  # not a constant run that any position scheme would give


def test_learned_positions_slide_and_refuse_a_longer_context():
    model = tiny("learned")
    assert len(list(generate_tokens(model, PROMPT, greedy(40)))) == 40  # slides, as before
    with pytest.raises(UserError, match="past this model's 16 positions"):
        list(generate_tokens(model, PROMPT, greedy(4, context_length=32)))
    with pytest.raises(UserError, match="context is 16"):
        list(generate_tokens(model, list(range(20)), greedy(4)))


def test_context_length_admits_a_longer_prompt_and_bounds_the_window():
    model = tiny("alibi")
    prompt = list(range(1, 25))  # 24 tokens on a 16-position model
    with pytest.raises(UserError, match="context is 16"):
        list(generate_tokens(model, prompt, greedy(4)))
    out = list(generate_tokens(model, prompt, greedy(8, context_length=32)))
    assert out == recomputed_greedy(model, prompt, 8)  # 24 + 8 fits the window: no slide
    assert len(list(generate_tokens(model, prompt, greedy(30, context_length=28)))) == 30  # slides past 28
    with pytest.raises(UserError, match="sampling and greedy decoding only"):
        list(generate_tokens(model, prompt, greedy(4, context_length=32, num_beams=2)))


def test_a_cache_that_would_not_fit_is_one_clear_error(monkeypatch):
    import llmkit.generation.decode_loop as decode_loop

    monkeypatch.setattr(decode_loop, "free_memory", lambda device: 1 << 20)
    with pytest.raises(UserError, match="lower max_new_tokens, or set context_length"):
        list(generate_tokens(tiny("rope"), PROMPT, greedy(1 << 20)))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from llmkit.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(string.printable)
    dirs = {}
    for position in ("rope", "learned"):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, context_length=CTX, position=position)
        dirs[position] = save_model(DecoderLM(cfg), tmp_path_factory.mktemp(position), tokenizer=tok)
    return dirs


def test_cli_context_length_generates_past_training_with_one_warning(model_dirs, capsys):
    prompt = "the quick brown fox jumps"  # 25 characters on a 16-position model
    argv = ["generate", str(model_dirs["rope"]), "--prompt", prompt, "--greedy", "--max-new-tokens", "10"]
    assert main(argv) == 2
    assert "context is 16" in capsys.readouterr().err
    assert main(argv + ["--context-length", "40"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt) and len(out) > len(prompt) + 1
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "extrapolates" in warnings[0] and "16" in warnings[0]
    assert main(["generate", str(model_dirs["learned"]), "--prompt", "ab", "--context-length", "40"]) == 2
    assert "learned" in capsys.readouterr().err
