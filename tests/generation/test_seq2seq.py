"""Encoder-decoder generation (llmkit.generation.seq2seq): batched rows equal single sources,
seeded sampling reproducible and batch-independent, the decoder-only settings refused, and
`llmkit generate` printing a T5's target (while chat refuses it). Parity of the ids with
transformers' generate is in tests/interop/test_t5.py."""
from __future__ import annotations

import string

import pytest
import torch

from llmkit.cli.main import main
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate, generate_batch, generate_tokens, stream_ids
from llmkit.generation.seq2seq import DecoderView
from llmkit.model_io import save_model
from llmkit.models.encoder_decoder import T5Model
from llmkit.models.kinds import config_from_preset
from llmkit.tokenizers.char import CharTokenizer

SOURCES = [[5, 6, 7, 8, 9, 1], [30, 31, 1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 1]]


def peaked_t5(vocab: int = 64, seed: int = 0) -> T5Model:
    """A tiny llmkit T5 with weights ~N(0, 0.3): random, with clear argmax decisions."""
    torch.manual_seed(seed)
    model = T5Model(config_from_preset("t5-tiny", vocab_size=vocab, n_decoder_layers=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return peaked_t5()


def test_batched_greedy_and_beam_rows_equal_single_sources(model):
    for settings in (dict(temperature=0.0), dict(num_beams=3)):
        cfg = GenerationConfig(max_new_tokens=10, **settings)
        rows = generate_batch(model, SOURCES, cfg)
        assert rows == [list(generate_tokens(model, s, cfg)) for s in SOURCES]
        assert all(0 < len(r) <= 10 for r in rows) and len({tuple(r) for r in rows}) > 1


def test_greedy_is_sampling_with_top_k_one(model):
    greedy = generate_batch(model, SOURCES, GenerationConfig(temperature=0.0, max_new_tokens=8))
    assert generate_batch(model, SOURCES, GenerationConfig(temperature=0.7, top_k=1, seed=3, max_new_tokens=8)) == greedy


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    cfg = GenerationConfig(temperature=1.5, top_p=0.95, seed=11, max_new_tokens=12)
    rows = generate_batch(model, SOURCES, cfg)
    assert rows == generate_batch(model, SOURCES, cfg)
    assert rows == [list(generate_tokens(model, s, cfg)) for s in SOURCES]
    greedy = generate_batch(model, SOURCES, GenerationConfig(temperature=0.0, max_new_tokens=12))
    assert rows != greedy  # a hot temperature leaves the argmax path somewhere


def test_decoder_view_runs_the_decoder_only_beam_search_with_the_memory_bound(model):
    source = torch.tensor([SOURCES[0]])
    with torch.no_grad():
        memory = model.encode(source)
        view = DecoderView(model, memory, None, 6)
        cache = view.make_cache(2)
        start = torch.zeros(2, 1, dtype=torch.long)
        first = view(start, cache=cache, logits_to_keep=1)
        full = model.decode(start, memory.expand(2, -1, -1))
    assert view.cfg.n_layers == 3 and view.cfg.context_length == 6
    assert torch.allclose(first, full, atol=1e-6) and cache.cross.computed == 3


@pytest.mark.parametrize("settings,message", [
    (dict(attention_sinks=4), "attention_sinks"), (dict(context_length=32), "context_length")])
def test_decoder_only_settings_are_refused(model, settings, message):
    with pytest.raises(UserError, match=message):
        list(generate_tokens(model, SOURCES[0], GenerationConfig(**settings)))
    with pytest.raises(UserError, match=message):
        generate_batch(model, SOURCES, GenerationConfig(**settings))
    with pytest.raises(UserError, match="draft"):
        list(generate_tokens(model, SOURCES[0], GenerationConfig(), draft=model))


def test_empty_and_out_of_vocabulary_sources_are_refused(model):
    with pytest.raises(UserError, match="empty source"):
        generate_batch(model, [[5, 1], []], GenerationConfig())
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        list(generate_tokens(model, [5, 64, 1], GenerationConfig()))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    tok = CharTokenizer.train(string.printable)
    path = tmp_path_factory.mktemp("t5model")
    save_model(peaked_t5(vocab=tok.vocab_size, seed=1), path, tokenizer=tok)
    return path, tok


def test_generate_cli_prints_the_target_of_the_source(capsys, t5_dir):
    path, tok = t5_dir
    from llmkit import load

    lm = load(path)
    source = tok.encode("hello") + [lm.model.cfg.eos_token_id]
    ids = list(generate_tokens(lm.model, source, GenerationConfig(temperature=0.0, max_new_tokens=15)))
    want = tok.decode([t for t in ids if t != lm.model.cfg.eos_token_id])
    assert main(["generate", str(path), "--prompt", "hello", "--greedy", "--max-new-tokens", "15"]) == 0
    out = capsys.readouterr().out
    assert out == want + "\n" and want  # the target only: the source is not echoed
    assert generate(lm.model, tok, "hello", GenerationConfig(temperature=0.0, max_new_tokens=15)) == want
    assert main(["generate", str(path), "--prompt", "hello", "--num-beams", "2", "--max-new-tokens", "6"]) == 0


def test_the_source_ends_with_one_eos_whether_or_not_the_tokenizer_appends_it(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from llmkit.generation.seq2seq import source_ids_of
    from llmkit.tokenizers.base import load_tokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(tmp_path)
    t.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t.save(str(tmp_path / "tokenizer.json"))
    appending = load_tokenizer(tmp_path)  # T5's tokenizer.json appends </s> itself
    assert source_ids_of(plain, "hello world", 1) == source_ids_of(appending, "hello world", 1) == [3, 4, 1]


def test_generate_cli_refuses_a_draft_model_and_chat_refuses_a_t5(capsys, t5_dir):
    path, tok = t5_dir
    assert main(["generate", str(path), "--prompt", "hi", "--draft", str(path)]) == 2
    assert "draft" in capsys.readouterr().err
    from llmkit import load

    with pytest.raises(UserError, match="encoder-decoder"):
        list(stream_ids(load(path).model, tok, tok.encode("hi"), GenerationConfig()))


def test_chat_refuses_a_t5_before_printing_a_prompt(capsys, t5_dir, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(t5_dir[0])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "encoder-decoder" in err and len(err.strip().splitlines()) == 1


def test_an_eos_reserved_past_the_tokenizer_stays_generatable():
    """A T5 trained with a character tokenizer has its pad and EOS ids past the tokenizer's vocabulary:
    text generation still forbids the ids no tokenizer decodes, but not the EOS that ends the output."""
    from llmkit.generation.generate import GenerationConfig, for_text

    tok = CharTokenizer.train("abc ")
    V = tok.vocab_size
    model = T5Model(config_from_preset("t5-tiny", vocab_size=V + 2, pad_token_id=V, eos_token_id=V + 1,
                                       decoder_start_token_id=V)).eval()
    assert tok.eos_id is None and for_text(model, tok, GenerationConfig()).vocab_limit == V + 2
    inside = T5Model(config_from_preset("t5-tiny", vocab_size=V + 8)).eval()  # EOS 1: a tokenizer id
    assert for_text(inside, tok, GenerationConfig()).vocab_limit == V
