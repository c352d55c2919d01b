"""Text generation never picks the padding rows of an embedding larger than the tokenizer's
vocabulary: no tokenizer can decode them. Id-level generation (`generate_tokens`, which the
transformers parity tests use) is unchanged unless `vocab_limit` is set."""
from __future__ import annotations

import torch

from llmkit.config import ModelConfig
from llmkit.generation.generate import GenerationConfig, generate, generate_tokens
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers.char import CharTokenizer


def padded_model() -> tuple[DecoderLM, CharTokenizer]:
    tok = CharTokenizer.train("abcdefgh \n")
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=32, context_length=16, n_layers=1, d_model=16, n_heads=2)).eval()

    def favour_padding(module, args, logits):  # a padding id becomes the most likely token everywhere
        logits = logits.clone()
        logits[..., tok.vocab_size + 3] += 100.0
        return logits
    model.lm_head.register_forward_hook(favour_padding)
    return model, tok


def test_padding_ids_win_without_the_limit_and_never_with_it():
    model, tok = padded_model()
    ids = list(generate_tokens(model, tok.encode("ab"), GenerationConfig(max_new_tokens=8, temperature=0.0)))
    assert any(i >= tok.vocab_size for i in ids)  # the trap is real
    for settings in (dict(temperature=0.0), dict(temperature=1.0, seed=0), dict(num_beams=3)):
        text = generate(model, tok, "ab", GenerationConfig(max_new_tokens=8, **settings))
        assert len(text) == 8 and set(text) <= set(tok.chars), (settings, text)
    limited = GenerationConfig(max_new_tokens=8, temperature=0.0, vocab_limit=tok.vocab_size)
    assert all(i < tok.vocab_size for i in generate_tokens(model, tok.encode("ab"), limited))
