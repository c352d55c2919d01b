"""Masked LM (BERT): the masking collator selects `rate` of the ordinary tokens and splits them
80/10/10, never touches special tokens, labels exactly the selected ones; whole-word masking keeps
words whole; NSP pairs are built and scored as BERT does; the task trains an encoder preset
through `llmkit train --objective mlm` below a stated loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from objective_helpers import prepared_task, train_on_shakespeare, write_small_corpus

from llmkit.objectives.mlm import IGNORE, mask_tokens, sentence_pair, word_join_tables, word_starts
from llmkit.tokenizers.char import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

N_SPECIAL = 4  # ids 0..3 play [CLS] [SEP] [MASK] [PAD] in the synthetic batches
MASK_ID = 2


def synthetic(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ordinary ids 4..999 with special ids at the row ends and sprinkled inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(N_SPECIAL, 1000, (rows, cols), generator=g)
    ids[:, 0], ids[:, -1] = 0, 1
    sprinkle = torch.rand(rows, cols, generator=g) < 0.05
    ids[sprinkle] = 3
    return ids, ids < N_SPECIAL


def test_selection_rate_and_the_80_10_10_split_on_100k_tokens():
    ids, special = synthetic(100, 1000)
    random_ids = torch.arange(N_SPECIAL, 1000)
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(1), mask_id=MASK_ID, random_ids=random_ids,
                                 maskable=~special)
    selected = labels != IGNORE
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    n = selected.sum().item()
    masked = (selected & (inputs == MASK_ID)).sum().item() / n
    kept = (selected & (inputs == ids)).sum().item() / n
    replaced = (selected & (inputs != ids) & (inputs != MASK_ID)).sum().item() / n
    # a random replacement draws the original token again 1 time in 996: it then counts as kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01, (masked, kept, replaced)
    assert ((inputs[selected & (inputs != MASK_ID)] >= N_SPECIAL)).all()  # random tokens are ordinary ones


def test_special_tokens_are_never_selected_nor_changed():
    ids, special = synthetic(50, 400, seed=2)
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(3), mask_id=MASK_ID,
                                 random_ids=torch.arange(N_SPECIAL, 1000), maskable=~special, rate=0.5)
    assert special.sum() > 1000
    assert (labels[special] == IGNORE).all()
    assert torch.equal(inputs[special], ids[special])


def test_labels_are_minus_100_exactly_where_not_selected():
    ids, special = synthetic(20, 500, seed=4)
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(5), mask_id=MASK_ID,
                                 random_ids=torch.arange(N_SPECIAL, 1000), maskable=~special)
    selected = labels != IGNORE
    assert torch.equal(labels[selected], ids[selected])  # the label of a selected token is its original id
    assert not ((inputs != ids) & ~selected).any()  # nothing outside the selection changed
    assert torch.equal(inputs[~selected], ids[~selected])


def test_whole_word_masking_masks_whole_words_only():
    text = "the quick brown fox jumps over the lazy dog\nand keeps running far away from here "
    tok = CharTokenizer.train(text)
    V = tok.vocab_size + 1  # one reserved [MASK] id past the characters
    left, right = word_join_tables(tok, V, [tok.vocab_size])
    ids = torch.tensor([tok.encode(text * 30)])
    starts = word_starts(ids, left, right)
    # the words word_starts finds are the whitespace-separated words (each whitespace char its own)
    groups = starts.long().cumsum(1)[0] - 1
    pieces: dict[int, str] = {}
    for g, i in zip(groups.tolist(), ids[0].tolist()):
        pieces[g] = pieces.get(g, "") + tok.decode([i])
    assert [p for p in pieces.values() if not p.isspace()] == (text * 30).split()
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(0), mask_id=tok.vocab_size,
                                 random_ids=torch.arange(tok.vocab_size), maskable=torch.ones_like(ids, dtype=torch.bool),
                                 starts=starts, rate=0.3)
    selected = (labels != IGNORE)[0]
    multi = 0
    for g in range(int(groups.max()) + 1):
        member = selected[groups == g]
        assert member.all() or not member.any(), g  # a word is selected whole or not at all
        multi += int(member.all() and len(member) > 1)
    assert multi > 20  # many multi-character words were selected (whole)


def test_wordpiece_continuations_join_their_word():
    from llmkit.tokenizers.train import train_tokenizer

    from llmkit.cli.demo import builtin_corpus

    tok = train_tokenizer("wordpiece", texts=[builtin_corpus()[:5000]], vocab_size=200, min_frequency=1,
                          special_tokens=["[UNK]", "[MASK]"])
    ids = tok.encode("unbelievable understanding of the kingdom")
    pieces = [tok.id_to_token(i) for i in ids]
    assert any(p.startswith("##") for p in pieces)
    left, right = word_join_tables(tok, tok.vocab_size, [tok.token_to_id("[MASK]")])
    starts = word_starts(torch.tensor([ids]), left, right)[0].tolist()
    assert starts == [not p.startswith("##") for p in pieces]


def test_sentence_pair_layout_and_token_types():
    a, b = torch.tensor([10, 11, 12]), torch.tensor([20, 21])
    ids, types = sentence_pair(a, b, cls_id=0, sep_id=1)
    assert ids.tolist() == [0, 10, 11, 12, 1, 20, 21, 1]
    assert types.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def _mlm_task(corpus, tmp_path, **options):
    return prepared_task(corpus, tmp_path, objective="mlm", preset="bert-tiny", context_length=32, **options)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("mlm"))


def test_nsp_batches_pair_a_with_its_continuation_half_the_time_and_loss_adds_nsp(small_corpus, tmp_path):
    task = _mlm_task(small_corpus, tmp_path, nsp=True)
    stream = torch.as_tensor(task.train_tokens[:].astype("int64"))
    cls_id, sep_id = task.special["[CLS]"], task.special["[SEP]"]
    batch = task.train_batch(0, 0, 64, 0, 1, 1)
    assert batch["input_ids"].shape == (64, 32)
    assert 0.3 < batch["nsp_labels"].float().mean() < 0.7
    for ids, labels, types, is_random in zip(batch["input_ids"], batch["labels"], batch["token_type_ids"],
                                             batch["nsp_labels"]):
        original = torch.where(labels != IGNORE, labels, ids)
        assert original[0] == cls_id and original[-1] == sep_id and (original == sep_id).sum() == 2
        cut = int((original == sep_id).nonzero()[0])
        assert (types[: cut + 1] == 0).all() and (types[cut + 1:] == 1).all()
        if not is_random:  # IsNext: A then B is one stretch of the stream
            text = torch.cat([original[1:cut], original[cut + 1:-1]])
            hits = (stream.unfold(0, len(text), 1) == text).all(1)
            assert hits.any()
    assert torch.equal(task.train_batch(0, 0, 64, 0, 1, 1)["input_ids"], batch["input_ids"])  # pure in (seed, step)
    model = task.build_model(torch.device("cpu")).eval()
    with torch.no_grad():
        loss, metrics = task.loss(model, batch)
        hidden = model.encode(batch["input_ids"], None, batch["token_type_ids"])
        mlm = F.cross_entropy(model.head(hidden).flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        nsp = F.cross_entropy(model.nsp_logits(model.pooled(hidden)), batch["nsp_labels"])
    assert loss.item() == pytest.approx(mlm.item() + nsp.item(), abs=1e-5)
    assert set(metrics) == {"mlm_accuracy", "mlm_loss", "nsp_loss", "nsp_accuracy"}


def test_rows_split_over_ranks_equal_the_whole_batch(small_corpus, tmp_path):
    """Masking is drawn per row of the global batch: 2 ranks x 4 rows give the 8 rows of 1 rank."""
    task = _mlm_task(small_corpus, tmp_path, whole_word_masking=True)
    whole = task.train_batch(5, 0, 8, 0, 1, 1)
    parts = [task.train_batch(5, 0, 4, r, 2, 1) for r in range(2)]
    for key in whole:
        assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))


def test_mlm_trains_bert_tiny_on_tinyshakespeare(shakespeare, tmp_path):
    start, final = train_on_shakespeare("mlm", "bert-tiny", shakespeare, tmp_path / "run")
    initial = math.log(start["vocab_size"])  # an untrained model is near uniform: ln 69 = 4.23
    assert final["val_loss"] < 3.6 < initial - 0.6, final
    assert final["val_mlm_accuracy"] > 0.05  # uniform guessing: 1 in 69


def test_perplexity_is_of_the_masked_tokens_only_when_nsp_adds_its_loss():
    """With NSP the loss is MLM + NSP; the logged perplexity is exp(MLM cross entropy), not of the sum."""
    import math

    from llmkit.objectives.mlm import MaskedLMTask

    assert MaskedLMTask.perplexity(None, 3.76, {"mlm_loss": 3.07, "nsp_loss": 0.69}) == pytest.approx(math.exp(3.07))
    assert MaskedLMTask.perplexity(None, 3.07, {"mlm_accuracy": 0.1}) == pytest.approx(math.exp(3.07))
