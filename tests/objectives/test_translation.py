"""The translation task: pure batches, padding that the loss never sees, greedy decoding that is
the model's argmax, a tiny run on Multi30k pairs that learns (the recipe's test BLEU is benchmarks/translation_bleu.py:
its full run takes ~10-30 minutes)."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch

from llmkit.errors import UserError
from llmkit.objectives.translation import (IGNORE, TranslationTask, collate, corpus_bleu, encode_side,
                                           evaluate_bleu, greedy_decode, read_pairs, target_cross_entropy,
                                           train_rows)
from llmkit.training.config import TrainConfig, build_train_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]

WORDS = "a man dog cat runs sits on the red blue green house street ball woman child big small".split()


def _synthetic_folder(folder: Path, n: int = 120) -> Path:
    """A toy parallel corpus: the 'German' side is the English words reversed and upper-cased."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("val", 16)):
        en, de = [], []
        for _ in range(count):
            k = int(torch.randint(2, 9, (1,), generator=g))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
            en.append(" ".join(words))
            de.append(" ".join(w.upper() for w in reversed(words)))
        (folder / f"{split}.en.txt").write_text("\n".join(en) + "\n", encoding="utf-8")
        (folder / f"{split}.de.gz").write_bytes(gzip.compress(("\n".join(de) + "\n").encode()))
    return folder


def _task(data: Path, run_dir: Path, **options) -> TranslationTask:
    cfg = TrainConfig(task="translation", preset="t5-tiny", data=str(data), tokenizer="bpe", vocab_size=300,
                      device="cpu", **options)
    task = TranslationTask(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    task.prepare(run_dir)
    task.setup(run_dir)
    return task


def test_train_batches_are_a_pure_function_of_seed_step_micro_rank(tmp_path):
    data = _synthetic_folder(tmp_path / "data")
    a, b = _task(data, tmp_path / "a"), _task(data, tmp_path / "b")  # built apart: nothing shared
    for args in [(0, 0, 4, 0, 1, 1), (7, 1, 4, 1, 2, 2), (40, 0, 8, 0, 1, 1)]:
        x, y = a.train_batch(*args), b.train_batch(*args)
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert not torch.equal(a.train_batch(1, 0, 4, 0, 1, 1)["labels"][:, :3],
                           a.train_batch(2, 0, 4, 0, 1, 1)["labels"][:, :3])
    # 2 ranks x 2 micro-steps x 4 rows are the rows of 1 rank x 16, in micro-major order
    split = [r for micro in range(2) for rank in range(2) for r in train_rows(5, 120, 3, micro, 4, rank, 2, 2)]
    assert split == train_rows(5, 120, 3, 0, 16, 0, 1, 1)
    # one epoch (120 pairs, 8 per step) visits every pair exactly once
    epoch = [r for step in range(15) for r in train_rows(5, 120, step, 0, 8, 0, 1, 1)]
    assert sorted(epoch) == list(range(120))
    assert epoch != sorted(epoch)


def test_collate_pads_labels_with_ignore_and_masks_the_source_padding(tmp_path):
    task = _task(_synthetic_folder(tmp_path / "data"), tmp_path / "run")
    batch = task.train_batch(0, 0, 6, 0, 1, 1)
    eos, pad = task.specials["<|eos|>"], task.specials["<|pad|>"]
    for row in range(6):
        n_src = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, n_src - 1] == eos and (batch["input_ids"][row, n_src:] == pad).all()
        real = batch["labels"][row] != IGNORE
        n_tgt = int(real.sum())
        assert real[:n_tgt].all() and batch["labels"][row, n_tgt - 1] == eos
    assert (batch["labels"] == IGNORE).any() and (batch["attention_mask"] == 0).any()


def test_padding_changes_neither_the_loss_nor_its_tokens(tmp_path):
    """The loss of a padded batch is the token-weighted mean of each pair's own (unpadded) loss,
    and whatever ids sit under the source padding do not matter."""
    task = _task(_synthetic_folder(tmp_path / "data"), tmp_path / "run", dropout=0.0)
    model = task.build_model(torch.device("cpu")).eval()
    batch = task.train_batch(0, 0, 5, 0, 1, 1)
    with torch.no_grad():
        loss, _ = task.loss(model, batch)
        total, tokens = 0.0, 0
        for row in range(5):
            n_src, n_tgt = int(batch["attention_mask"][row].sum()), int((batch["labels"][row] != IGNORE).sum())
            one = {"input_ids": batch["input_ids"][row:row + 1, :n_src],
                   "attention_mask": batch["attention_mask"][row:row + 1, :n_src],
                   "labels": batch["labels"][row:row + 1, :n_tgt]}
            total += task.loss(model, one)[0].item() * n_tgt
            tokens += n_tgt
        noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        noisy_loss, _ = task.loss(model, noisy)
    assert abs(loss.item() - total / tokens) < 1e-5
    assert abs(noisy_loss.item() - loss.item()) < 1e-6
    assert math.isclose(loss.item(), math.log(task.specials.model_vocab_size), rel_tol=0.5)  # an untrained model


def test_cross_entropy_skips_ignored_labels_and_counts_accuracy():
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 9.0, -9.0]]])
    labels = torch.tensor([[0, 2, IGNORE]])
    loss, metrics = target_cross_entropy(logits, labels)
    expected = (torch.logsumexp(logits[0, 0], 0) - 5.0 + torch.logsumexp(logits[0, 1], 0) - 0.0) / 2
    assert abs(loss.item() - expected.item()) < 1e-6
    assert metrics["token_accuracy"].item() == 0.5


def test_greedy_decode_is_the_argmax_of_teacher_forcing(tmp_path):
    task = _task(_synthetic_folder(tmp_path / "data"), tmp_path / "run", dropout=0.0)
    model = task.build_model(torch.device("cpu")).eval()
    batch = task.train_batch(0, 0, 3, 0, 1, 1)
    cfg = model.cfg
    ids = greedy_decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    with torch.no_grad():
        for row, out in enumerate(ids):
            src = batch["input_ids"][row:row + 1, :int(batch["attention_mask"][row].sum())]
            dec = torch.tensor([[cfg.decoder_start_token_id, *out]])
            argmax = model(src, decoder_input_ids=dec).argmax(-1)[0].tolist()
            assert argmax[:len(out)] == out
            if len(out) < 6:  # stopped early: the next argmax is eos
                assert argmax[len(out)] == cfg.eos_token_id


def test_bad_data_is_a_user_error(tmp_path):
    data = _synthetic_folder(tmp_path / "data")
    with pytest.raises(UserError, match="not a folder"):
        TranslationTask(TrainConfig(task="translation", preset="t5-tiny", data=str(data / "train.en.txt")))
    with pytest.raises(UserError, match="trains t5 models"):
        TranslationTask(TrainConfig(task="translation", preset="baby-gpt", data=str(data)))
    (data / "val.de.gz").unlink()
    with pytest.raises(UserError, match="val.de"):
        _task(data, tmp_path / "run")
    (data / "val.en.txt").unlink()
    (data / "train.de.gz").write_bytes(gzip.compress(b"EIN\n"))
    with pytest.raises(UserError, match="aligned"):
        _task(data, tmp_path / "run2")


def _multi30k_subset(shared: Path, out: Path, n_train: int, n_val: int) -> Path:
    src = shared / "translation" / "multi30k"
    if not (src / "train.en.gz").is_file():
        pytest.skip("multi30k is not present")
    out.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        for lang in ("en", "de"):
            lines = gzip.decompress((src / f"{split}.{lang}.gz").read_bytes()).decode().splitlines()[:n]
            (out / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def test_a_tiny_run_on_300_multi30k_pairs_learns(shared_data, tmp_path):
    """t5-tiny, 60 steps of 16 pairs (~3 epochs of 300 pairs): the training loss (mean of the last
    10 steps) falls from ln(512) = 6.24 to below 5.5 (measured: 4.99), the validation loss (32
    held-out pairs) below 5.7 (measured: 5.14)."""
    from llmkit.training.loop import train

    data = _multi30k_subset(shared_data, tmp_path / "data", 300, 32)
    cfg = build_train_config(None, task="translation", preset="t5-tiny", data=str(data), out=str(tmp_path / "run"),
                             tokenizer="bpe", vocab_size=512, batch_size=16, max_steps=60, lr=3e-3, warmup_steps=10,
                             eval_every=0, eval_batches=2, log_every=10, progress=False, device="cpu", ckpt_every=0)
    result = train(cfg)
    assert result.train_loss < 5.5, result
    assert result.val_loss < 5.7, result


def test_bleu_is_sacrebleu_corpus_bleu():
    refs = ["Ein Mann fährt Fahrrad .", "Zwei Hunde spielen im Schnee ."]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["Katze", "Baum"], refs) == pytest.approx(0.0)


def test_a_run_ends_with_bleu_on_the_test_split_in_its_log(tmp_path):
    """With a test split in the data, the run's last log line is a `final` event whose BLEU is the
    saved model's (evaluate_run on the same folder)."""
    import json

    from llmkit.objectives.translation import evaluate_run
    from llmkit.training.loop import train

    data = _synthetic_folder(tmp_path / "data", n=60)
    for lang, name in (("en", "val.en.txt"), ("de", "val.de.gz")):  # the test split: a copy of val
        (data / name.replace("val", "test")).write_bytes((data / name).read_bytes())
    cfg = build_train_config(None, task="translation", preset="t5-tiny", data=str(data), out=str(tmp_path / "run"),
                             tokenizer="char", batch_size=8, max_steps=6, eval_every=0, eval_batches=1,
                             progress=False, device="cpu", ckpt_every=0)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("event") == "final"]
    assert len(final) == 1 and final[0]["bleu_split"] == "test" and final[0]["bleu_pairs"] == 16
    assert 0.0 <= final[0]["bleu"] <= 100.0
    assert final[0]["bleu"] == pytest.approx(evaluate_run(tmp_path / "run")["bleu"])
