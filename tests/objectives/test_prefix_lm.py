"""Prefix LM on the decoder: with `prefix_lengths`, prefix positions see each other (a later prefix
token changes an earlier prefix position's logits) and never the continuation; a prefix of 0 or 1
is the causal model; the loss covers continuation tokens only; the task trains a decoder preset
through `llmkit train --objective prefix-lm` below a stated loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from objective_helpers import prepared_task, train_on_shakespeare, write_small_corpus

from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM
from llmkit.objectives.prefix_lm import IGNORE, prefix_split

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 50, 12


@pytest.fixture(scope="module")
def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig.from_preset("tiny", vocab_size=V, context_length=32)).eval()


def _ids(seed: int = 0, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (rows, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefix_tokens_see_each_other_and_never_the_continuation(model):
    x, n = _ids(), torch.tensor([5, 8])
    base = model(x, prefix_lengths=n)
    later_prefix = x.clone()
    later_prefix[0, 4] = (later_prefix[0, 4] + 1) % V  # the last prefix token of row 0
    changed = model(later_prefix, prefix_lengths=n)
    assert (changed[0, :4] - base[0, :4]).abs().max() > 1e-3  # earlier prefix positions read it
    assert torch.equal(changed[1], base[1])  # rows are independent
    continuation = x.clone()
    continuation[0, 5:] = (continuation[0, 5:] + 1) % V
    changed = model(continuation, prefix_lengths=n)
    assert torch.equal(changed[0, :5], base[0, :5])  # no prefix position sees the continuation
    assert (changed[0, 5:] - base[0, 5:]).abs().max() > 1e-3


@torch.no_grad()
def test_a_prefix_of_zero_or_one_token_is_the_causal_model(model):
    x = _ids(1)
    causal = model(x)
    for n in (0, 1):
        assert (model(x, prefix_lengths=torch.tensor([n, n])) - causal).abs().max() < 1e-5


@torch.no_grad()
def test_prefix_mask_combines_with_padding(model):
    """A padded key stays invisible in a prefix row: the real tokens' logits equal those of the
    row without its padding."""
    x, n = _ids(2, rows=1), torch.tensor([6])
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, T), torch.zeros(1, 3)], dim=1).long()
    full = model(padded, attention_mask=mask, prefix_lengths=n)
    assert (full[:, :T] - model(x, prefix_lengths=n)).abs().max() < 1e-5


def test_labels_cover_the_continuation_only():
    x = torch.arange(10).repeat(2, 1)
    y = x + 1
    labels = prefix_split(x, y, torch.tensor([3, 1]))
    # row 0: positions 0, 1 predict prefix tokens 1, 2 (seen bidirectionally): ignored; position 2
    # predicts the first continuation token 3
    assert labels[0].tolist() == [IGNORE, IGNORE, 3, 4, 5, 6, 7, 8, 9, 10]
    assert labels[1].tolist() == y[1].tolist()


def test_task_loss_is_cross_entropy_on_continuation_tokens(tmp_path):
    task = prepared_task(write_small_corpus(tmp_path), tmp_path, objective="prefix-lm", preset="tiny",
                         context_length=16)
    x, labels, n = task.train_batch(2, 0, 8, 0, 1, 1)
    assert ((1 <= n) & (n <= 15)).all() and len(set(n.tolist())) > 1
    kept = labels != IGNORE
    assert torch.equal(kept.sum(1), 16 - n + 1)  # targets from position n-1 on
    model = task.build_model(torch.device("cpu")).eval()
    with torch.no_grad():
        loss, _ = task.loss(model, (x, labels, n))
        logits = model(x, prefix_lengths=n)
    by_hand = F.cross_entropy(logits[kept], labels[kept])
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    halves = [task.train_batch(2, 0, 4, r, 2, 1) for r in range(2)]  # pure per row of the global batch
    assert torch.equal(torch.cat([h[2] for h in halves]), n)


def test_prefix_lm_trains_a_decoder_on_tinyshakespeare(shakespeare, tmp_path):
    start, final = train_on_shakespeare("prefix-lm", "tiny", shakespeare, tmp_path / "run")
    initial = math.log(start["vocab_size"])  # ln 65 = 4.17
    assert final["val_loss"] < 3.5 < initial - 0.6, final
