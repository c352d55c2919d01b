"""Loaders of real tokenizer files equal their reference libraries, id for id."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmkit.errors import UserError
from llmkit.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer

TEXTS_EXTRA = ["", " ", "Hello world", "  leading and trailing  ", "\n", "a\tb\r\nc", "<|endoftext|> after"]


# -- GPT-2 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path) -> HFTokenizer:
    return load_tokenizer(gpt2_dir)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_dir: Path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(gpt2_dir / "gpt2.tiktoken"))
    return tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def test_gpt2_hello_world_matches_published_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("Hello, my dog is cute") == [15496, 11, 616, 3290, 318, 13779]
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256


def test_gpt2_equals_tiktoken_on_multiscript_text(gpt2, tiktoken_gpt2, multi_text):
    for text in [multi_text, *TEXTS_EXTRA[:-1]]:
        ids = gpt2.encode(text)
        assert ids == tiktoken_gpt2.encode_ordinary(text)
        assert gpt2.decode(ids) == tiktoken_gpt2.decode(ids) == text


def test_gpt2_equals_transformers_gpt2_tokenizer(gpt2, gpt2_dir, multi_text):
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    for text in [multi_text, *TEXTS_EXTRA]:
        ids = gpt2.encode(text)
        assert ids == ref.encode(text)
        assert gpt2.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False)


def test_gpt2_tinyshakespeare_has_338025_tokens(gpt2, shakespeare_text):
    assert len(gpt2.encode(shakespeare_text)) == 338_025


def test_gpt2_special_token_in_text_is_one_id(gpt2):
    assert gpt2.encode("a<|endoftext|>b") == gpt2.encode("a") + [50256] + gpt2.encode("b")


def test_gpt2_loads_from_vocab_json_path(gpt2_dir, multi_text, gpt2):
    tok = load_tokenizer(gpt2_dir / "vocab.json")
    assert tok.encode(multi_text) == gpt2.encode(multi_text)


# -- SentencePiece ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm():
    return pytest.importorskip("sentencepiece")


def _reference(spm, path: Path):
    return spm.SentencePieceProcessor(model_file=str(path))


def test_llama2_hello_world_bos_eos_match_published_ids(llama_model):
    tok = load_tokenizer(llama_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("Hello world", add_special_tokens=True) == [1, 15043, 3186]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 32000)


def test_llama2_equals_sentencepiece_and_round_trips(spm, llama_model, multi_text):
    tok, ref = load_tokenizer(llama_model), _reference(spm, llama_model)
    for text in [multi_text, *TEXTS_EXTRA]:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(tok.encode(multi_text)) == multi_text  # byte fallback + identity normaliser: lossless


def test_llama2_control_tokens_in_text_are_single_ids(llama_model):
    tok = load_tokenizer(llama_model)
    ids = tok.encode("Hi</s><s>there")
    assert 2 in ids and 1 in ids
    assert tok.decode(ids) == "Hi</s><s>there"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi there"  # "there" carries SentencePiece's ▁ prefix


def test_unigram_test_model_equals_sentencepiece(spm, unigram_model, multi_text):
    tok, ref = load_tokenizer(unigram_model.parent), _reference(spm, unigram_model)
    assert tok.encode("Hello world. Once upon a time.") == [151, 88, 21, 887, 6, 323, 135, 449, 11, 171, 6]
    for text in [multi_text, *TEXTS_EXTRA]:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids)


def test_sentencepiece_save_then_load_round_trips(tmp_path, llama_model, multi_text):
    tok = load_tokenizer(llama_model)
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, SentencePieceTokenizer)
    assert back.encode(multi_text, add_special_tokens=True) == tok.encode(multi_text, add_special_tokens=True)
    assert back.chat_template == tok.chat_template


# -- HF tokenizer.json -----------------------------------------------------------------------------
def test_bert_tokenizer_json_equals_transformers_bert(bert_tokenizer_json, multi_text):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(bert_tokenizer_json.parent)
    assert isinstance(tok, HFTokenizer)
    ref = transformers.BertTokenizerFast(tokenizer_file=str(bert_tokenizer_json))
    for text in [multi_text, *TEXTS_EXTRA, "word " * 300]:  # longer than the file's truncation of 128
        for special in (False, True):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.special_tokens == {"pad": 0, "unk": 100, "mask": 103, "cls": 101, "sep": 102}


def test_tokenizer_json_file_path_loads(bert_tokenizer_json):
    assert load_tokenizer(bert_tokenizer_json).encode("hello world") == [7592, 2088]


def test_gpt2_save_then_load_round_trips_as_tokenizer_json(tmp_path, gpt2, multi_text):
    gpt2.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    back = load_tokenizer(tmp_path)
    assert back.encode(multi_text) == gpt2.encode(multi_text)
    assert back.special_tokens == gpt2.special_tokens


def test_saved_directory_loads_in_transformers_autotokenizer(tmp_path, gpt2, multi_text):
    transformers = pytest.importorskip("transformers")
    gpt2.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ref.encode(multi_text) == gpt2.encode(multi_text)


def test_hf_directory_prefers_tokenizer_json_over_sentencepiece(tmp_path, llama_model, gpt2):
    gpt2.save(tmp_path)
    shutil.copy(llama_model, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_add_bos_token_config_prepends_bos(tmp_path, gpt2):
    gpt2.add_bos_token = True
    try:
        gpt2.save(tmp_path)
    finally:
        gpt2.add_bos_token = None
    back = load_tokenizer(tmp_path)
    assert back.encode("Hello world", add_special_tokens=True) == [50256, 15496, 995]
    assert back.encode("Hello world") == [15496, 995]


def test_chat_template_jinja_file_is_read(tmp_path, gpt2):
    gpt2.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


# -- bad input -------------------------------------------------------------------------------------
def test_missing_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_corrupt_sentencepiece_model_is_user_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json_is_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        load_tokenizer(tmp_path)


def test_unknown_file_type_is_user_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="not a tokenizer file"):
        load_tokenizer(path)
