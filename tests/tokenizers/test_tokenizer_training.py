"""Trained tokenizers: requested vocabulary size, lossless round trips, unsplittable special
tokens, save -> load_tokenizer round trips, and clear errors for bad corpora."""
from __future__ import annotations

import pytest

from llmkit.errors import UserError
from llmkit.tokenizers import (
    DEFAULT_SPECIAL_TOKENS,
    CharTokenizer,
    HFTokenizer,
    load_tokenizer,
    train_tokenizer,
)

LOSSLESS = ("bpe", "unigram")  # byte-level BPE and byte-fallback Unigram represent any text


@pytest.fixture(scope="module")
def trained(shakespeare_slice) -> dict[str, HFTokenizer]:
    return {kind: train_tokenizer(kind, texts=[shakespeare_slice], vocab_size=800) for kind in ("bpe", "wordpiece", "unigram")}


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_vocab_size_is_at_most_requested(trained, kind):
    tok = trained[kind]
    assert tok.vocab_size <= 800
    # 150k characters are enough to fill 800 entries: BPE and WordPiece do exactly, Unigram's pruning
    # may stop a little short (a trainer ignoring vocab_size, or stopping at the alphabet, fails)
    assert tok.vocab_size == 800 if kind != "unigram" else tok.vocab_size >= 760


def test_bpe_vocab_size_is_exactly_requested(trained):
    assert trained["bpe"].vocab_size == 800


@pytest.mark.parametrize("kind", LOSSLESS)
def test_lossless_kinds_round_trip_any_text(trained, kind, multi_text):
    tok = trained[kind]
    for text in [multi_text, "", " lead", "trail  ", "\n\n\t", "<|user|>hi<|end|>"]:
        assert tok.decode(tok.encode(text)) == text


def test_wordpiece_round_trips_seen_lowercase_words(shakespeare_slice):
    tok = train_tokenizer("wordpiece", texts=[shakespeare_slice], vocab_size=800, lowercase=True)
    assert tok.decode(tok.encode("First Citizen: before we proceed")) == "first citizen : before we proceed"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_special_tokens_are_never_split(trained, kind):
    tok = trained[kind]
    for special in DEFAULT_SPECIAL_TOKENS:
        idx = tok.token_to_id(special)
        assert tok.encode(special) == [idx]
        assert idx in tok.encode(f"word{special}word")
    assert tok.special_tokens.keys() >= {"bos", "eos", "pad", "unk", "mask"}


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_decoder_tokenizers_add_no_bos_as_training_never_saw_one(trained, kind):
    """Decoders train on eos-separated documents, and generation encodes prompts with
    add_special_tokens=True: a bos there would be a token the model never saw."""
    tok = trained[kind]
    assert tok.bos_id is not None
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")
    assert tok.encode_prompt("hello") == tok.encode("hello")


def test_wordpiece_add_special_tokens_wraps_in_bos_eos(trained):
    tok = trained["wordpiece"]
    assert tok.encode("hello", add_special_tokens=True) == [tok.bos_id, *tok.encode("hello"), tok.eos_id]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_save_then_load_tokenizer_round_trips(trained, kind, tmp_path, multi_text):
    tok = trained[kind]
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.encode(multi_text, add_special_tokens=True) == tok.encode(multi_text, add_special_tokens=True)
    assert back.special_tokens == tok.special_tokens
    assert back.chat_template == tok.chat_template is not None


def test_char_kind_trains_and_round_trips(tmp_path):
    tok = train_tokenizer("char", texts=["hello world"], vocab_size=0)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 8
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).decode(tok.encode("low word")) == "low word"


def test_bpe_trains_from_files(tmp_path, shakespeare_slice):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_slice, encoding="utf-8")
    tok = train_tokenizer("bpe", files=[path], vocab_size=500)
    assert tok.vocab_size == 500 and tok.decode(tok.encode(shakespeare_slice[:500])) == shakespeare_slice[:500]


def test_custom_special_tokens_get_roles_from_their_spelling(shakespeare_slice):
    tok = train_tokenizer("wordpiece", texts=[shakespeare_slice], vocab_size=500,
                          special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert set(tok.special_tokens) == {"pad", "unk", "cls", "sep", "mask"}
    assert tok.pad_id == 0 and tok.unk_id == 1


def test_normalization_and_lowercase_apply(shakespeare_slice):
    tok = train_tokenizer("bpe", texts=[shakespeare_slice], vocab_size=400, normalization="nfkc", lowercase=True)
    assert tok.decode(tok.encode("ＨＥＬＬＯ ﬁ")) == "hello fi"


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_kind_is_user_error():
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        train_tokenizer("morse", texts=["x"], vocab_size=100)


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        train_tokenizer("bpe", files=[tmp_path / "missing.txt"], vocab_size=300)


def test_binary_file_is_user_error(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="binary"):
        train_tokenizer("bpe", files=[path], vocab_size=300)


def test_non_utf8_file_is_user_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        train_tokenizer("bpe", files=[path], vocab_size=300)


def test_empty_corpus_is_user_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        train_tokenizer("bpe", files=[path], vocab_size=300)


def test_wordpiece_without_unk_is_user_error():
    with pytest.raises(UserError, match="unknown token"):
        train_tokenizer("wordpiece", texts=["a b c"], vocab_size=100, special_tokens=["<s>"])


def test_vocab_too_small_is_user_error():
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer("unigram", texts=["a b c"], vocab_size=100)
