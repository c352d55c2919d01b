"""batch_encode: padding to the longest row or to max_length, on either side, truncation, masks."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from llmkit.errors import UserError
from llmkit.tokenizers import CharTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def words() -> HFTokenizer:
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "a": 3, "b": 4, "c": 5, "d": 6}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<unk>", "<s>"])
    return HFTokenizer(backend, add_bos_token=True)


def test_right_padding_to_longest_with_mask(words):
    out = words.batch_encode(["a b c", "d"])
    assert out["input_ids"] == [[3, 4, 5], [6, 0, 0]]
    assert out["attention_mask"] == [[1, 1, 1], [1, 0, 0]]


def test_left_padding_keeps_tokens_at_the_end(words):
    out = words.batch_encode(["a b c", "d"], padding_side="left")
    assert out["input_ids"] == [[3, 4, 5], [0, 0, 6]]
    assert out["attention_mask"] == [[1, 1, 1], [0, 0, 1]]


def test_max_length_padding_and_truncation(words):
    out = words.batch_encode(["a b c d a b", "d"], padding="max_length", truncation=True, max_length=4)
    assert out["input_ids"] == [[3, 4, 5, 6], [6, 0, 0, 0]]
    assert out["attention_mask"] == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_no_padding_keeps_row_lengths(words):
    out = words.batch_encode(["a b", "c"], padding=False)
    assert out["input_ids"] == [[3, 4], [5]] and out["attention_mask"] == [[1, 1], [1]]


def test_add_special_tokens_applies_per_row(words):
    out = words.batch_encode(["a", "b c"], add_special_tokens=True)
    assert out["input_ids"] == [[2, 3, 0], [2, 4, 5]]


def test_return_tensors_pt_gives_long_tensors(words):
    out = words.batch_encode(["a b", "c"], return_tensors="pt", padding_side="left")
    assert out["input_ids"].dtype == torch.long
    assert torch.equal(out["input_ids"], torch.tensor([[3, 4], [0, 5]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1], [0, 1]]))


def test_ragged_tensors_are_user_error(words):
    with pytest.raises(UserError, match="padding"):
        words.batch_encode(["a b", "c"], padding=False, return_tensors="pt")


def test_truncation_without_max_length_is_user_error(words):
    with pytest.raises(UserError, match="max_length"):
        words.batch_encode(["a"], truncation=True)


def test_tokenizer_without_pad_needs_pad_id():
    tok = CharTokenizer("abc")
    with pytest.raises(UserError, match="pad"):
        tok.batch_encode(["abc", "a"])
    assert tok.batch_encode(["abc", "a"], pad_id=0)["input_ids"] == [[0, 1, 2], [0, 0, 0]]


def test_matches_transformers_padding(words):
    transformers = pytest.importorskip("transformers")
    copy = BackendTokenizer.from_str(words.backend.to_str())  # transformers changes padding settings in place
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=copy, pad_token="<pad>")
    texts = ["a b c d", "b", "c d"]
    for side in ("left", "right"):
        ref.padding_side = side
        expected = ref(texts, padding=True, add_special_tokens=False)
        got = words.batch_encode(texts, padding_side=side)
        assert got["input_ids"] == expected["input_ids"]
        assert got["attention_mask"] == expected["attention_mask"]
