"""CLIP's BPE (llmkit.tokenizers.clip), built from OpenAI's released merge list, gives the ids of
transformers' CLIPTokenizer built from vocab.json + merges.txt derived from the same file."""
from __future__ import annotations

import gzip

import pytest

from conftest import MULTI_SCRIPT, data_file
from llmkit.errors import UserError
from llmkit.tokenizers import load_tokenizer
from llmkit.tokenizers.clip import (BOS, ENV_VAR, EOS, VOCAB_SIZE, CLIPTokenizer, bytes_to_unicode, clip_tokenizer,
                                    find_vocab_file, read_merges, write_vocab_files)

TEXTS = [
    "a photo of the digit 7.",
    "A PHOTO of a Cat's toy; they'll say: \"it's 10:30!!\"",
    "don't WON'T I'm we've you'd she'll",
    "12345 3.14159 1,000,000 2024-01-31 $5.00 50% 1st 2nd",
    "café naïve résumé Ünïcödé Ångström — ÇA VA?",
    "日本語のテキスト 你好，世界 Привет мир مرحبا",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 ✨",
    "   leading,\t\ttabs\n\nnewlines\r\n  and trailing   ",
    "ＦＵＬＬＷＩＤＴＨ ﬁ ligature e\u0301 (decomposed é)",
    "e-mail: foo@bar.com #hashtag <html> x**2 {}[]",
    "<|startoftext|>special<|endoftext|> inside text",
    "",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    MULTI_SCRIPT,
]


@pytest.fixture(scope="module")
def merge_list():
    return data_file("tokenizers", "clip", "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def tok(merge_list) -> CLIPTokenizer:
    return clip_tokenizer(merge_list)


@pytest.fixture(scope="module")
def reference(merge_list, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab, merges = write_vocab_files(tmp_path_factory.mktemp("clip_vocab"), merge_list)
    return transformers.CLIPTokenizer(vocab=str(vocab), merges=str(merges))


def test_vocabulary_is_clips_49408_tokens(tok, merge_list):
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    assert tok.id_to_token(49406) == BOS and tok.id_to_token(49407) == EOS
    symbols = list(bytes_to_unicode().values())
    assert tok.token_to_id("!") == 0 and tok.token_to_id(symbols[-1]) == 255  # the byte symbols first
    assert tok.token_to_id("!</w>") == 256  # then the same with the end-of-word mark
    with gzip.open(merge_list, "rt", encoding="utf-8") as f:
        f.readline()
        first = f.readline().split()
    assert tok.token_to_id("".join(first)) == 512  # then one token per merge, in order


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_equal_transformers_clip_tokenizer(tok, reference, add_special_tokens):
    for text in TEXTS:
        want = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert tok.encode(text, add_special_tokens=add_special_tokens) == want, text


def test_known_ids_of_a_caption(tok):
    # openai/CLIP's simple_tokenizer: "a photo of the digit 7." -> these ids between start and end of text
    assert tok.encode("a photo of the digit 7.", add_special_tokens=True) == [
        49406, 320, 1125, 539, 518, 27472, 278, 269, 49407]


def test_decode_equals_transformers(tok, reference):
    for text in TEXTS[:10]:
        ids = reference(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text
    assert tok.decode(tok.encode("")) == ""


def test_batch_pads_with_end_of_text(tok, reference):
    texts = ["a photo of the digit 7.", "a blurry photo of the number 1 2 3."]
    ours = tok.batch_encode(texts, add_special_tokens=True)
    want = reference(texts, padding=True)
    assert ours["input_ids"] == want["input_ids"] and ours["attention_mask"] == want["attention_mask"]


def test_saved_tokenizer_loads_back_with_the_same_ids(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CLIPTokenizer)
    for text in TEXTS:
        assert again.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
    assert again.decode(again.encode("Hello, World")) == "hello , world"
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_merge_list_is_found_through_the_environment(merge_list, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(merge_list))
    assert find_vocab_file() == merge_list


def test_a_file_that_is_not_the_merge_list_is_refused(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version\na b\nc d e\n")
    with pytest.raises(UserError, match="not CLIP's merge list"):
        read_merges(bad)
    (tmp_path / "plain.gz").write_text("not gzip")
    with pytest.raises(UserError, match="cannot read"):
        read_merges(tmp_path / "plain.gz")


def test_saved_tokenizer_reads_in_transformers_with_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tok.encode(text, add_special_tokens=True), text
    assert theirs.pad_token == theirs.eos_token == EOS
