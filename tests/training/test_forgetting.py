"""Forgetting: perplexity on the base model's text equals transformers' loss on the same windows and
does not depend on batching; replay swaps a deterministic share of rows (a pure function of seed,
step and global row, the same however the batch is split) for true next-token windows, and replay
during fine-tuning keeps the original text's perplexity lower than fine-tuning without it."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.tokenizers.char import CharTokenizer
from llmkit.training.forgetting import (ReplayMixer, forgetting_report, perplexity, replayed_count, sample_tokens,
                                        text_tokens, window_nll)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("the cat sat on the mat. a dog ran to the sun and back again; the end of a long day came.\n" * 12)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "base.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random tiny HF Llama (vocab 128) and llmkit's copy of it."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from llmkit.interop.hf import load_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp("hf") / "llama"
    hf.save_pretrained(directory)
    return hf, load_hf(directory).eval()


def test_perplexity_equals_transformers_loss_on_the_same_windows(hf_and_ours, text_file):
    hf, ours = hf_and_ours
    tok = CharTokenizer.train(TEXT)
    context, max_tokens = 16, 150  # 9 whole windows and one of 6 predictions
    ppl = perplexity(ours, tok, text_file, context=context, max_tokens=max_tokens, batch_size=4)
    ids = torch.tensor(tok.encode(TEXT)[: max_tokens + 1])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, max_tokens, context):
            window = ids[start: min(start + context + 1, max_tokens + 1)][None]
            n = window.shape[1] - 1
            total += hf(input_ids=window, labels=window).loss.item() * n  # HF shifts the labels itself
            count += n
    assert count == max_tokens
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size_and_restores_training_mode(hf_and_ours, text_file):
    _, ours = hf_and_ours
    tok = CharTokenizer.train(TEXT)
    ours.train()
    values = [perplexity(ours, tok, text_file, context=16, max_tokens=200, batch_size=b) for b in (1, 3, 64)]
    assert ours.training
    ours.eval()
    assert values[1] == pytest.approx(values[0], rel=1e-6) and values[2] == pytest.approx(values[0], rel=1e-6)
    assert perplexity(ours, tok, text_file, context=16, max_tokens=200, batch_size=3) == values[1]  # deterministic


def test_window_nll_scores_every_token_once():
    """A model that gives every id the same logit has NLL ln(V) per predicted token, for all of them."""
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            return torch.zeros(*idx.shape, 10) + self.w

    tokens = torch.arange(23) % 10
    nll, count = window_nll(Uniform(), tokens, context=5, batch_size=2)
    assert count == 22 and nll == pytest.approx(22 * math.log(10), rel=1e-6)


def test_sample_tokens_is_the_prefix_of_the_whole_encoding():
    tok_path = DATA / "tokenizers" / "gpt2"
    text = TEXT * 40
    tok = CharTokenizer.train(text)
    assert sample_tokens(tok, text, 100) == tok.encode(text)[:100]
    if tok_path.is_dir():
        from llmkit.tokenizers.base import load_tokenizer
        bpe = load_tokenizer(tok_path)
        assert sample_tokens(bpe, text, 300) == bpe.encode(text)[:300]
    assert len(sample_tokens(tok, "abc", 100)) == 3  # a short text: all of it


def test_stories260k_perplexity_on_a_story_is_far_below_uniform(tmp_path):
    model_path = DATA / "models" / "stories260K" / "stories260K.bin"
    if not model_path.is_file():
        pytest.skip("../shared/data/models/stories260K is not present")
    from llmkit.model_io import load_pretrained, pretrained_tokenizer

    model, tok = load_pretrained(model_path), pretrained_tokenizer(model_path)
    story = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big red ball. She ran to the ball and kicked it. Her mom said, \"Good job, Lily!\" "
             "Lily was very happy. They went home and ate a yummy cake.\n") * 4
    (tmp_path / "story.txt").write_text(story)
    ppl = perplexity(model, tok, tmp_path / "story.txt", context=64, max_tokens=256)
    shuffled = "".join(np.random.default_rng(0).permutation(list(story)))
    (tmp_path / "noise.txt").write_text(shuffled)
    noise = perplexity(model, tok, tmp_path / "noise.txt", context=64, max_tokens=256)
    # uniform over the 512 ids is ppl 512; measured 3.02 on the story, 5528 on its shuffled characters
    assert ppl < 5 and noise > 100, (ppl, noise)


def test_forgetting_report_ratio():
    assert forgetting_report(10.0, 12.5) == {"replay_ppl_before": 10.0, "replay_ppl_after": 12.5,
                                              "replay_ppl_ratio": 1.25}


# --- replay ----------------------------------------------------------------------------------------

def mixer(share=0.25, seed=3, n=500, **kw) -> ReplayMixer:
    return ReplayMixer(np.arange(1000, 1000 + n), share, seed, **kw)


def task_batch(rows=8, T=12):
    x = torch.arange(rows * T).view(rows, T) % 50
    return x, (x + 1) % 50


def test_replayed_share_is_exact_over_a_run_even_below_one_row_per_step():
    for share, rows in ((0.25, 8), (0.05, 4), (0.3, 7)):
        counts = [replayed_count(step, share, rows) for step in range(1000)]
        assert abs(sum(counts) - share * rows * 1000) <= 1
        assert max(counts) - min(counts) <= 1


def test_replayed_rows_are_true_next_token_windows_and_the_rest_unchanged():
    m = mixer(share=0.5)
    x, y = task_batch()
    mx, my = m.mix((x, y), step=7, micro=0)
    replaced = [r for r, _ in m.rows(7, 0, 8)]
    assert len(replaced) == 4
    for r in range(8):
        if r in replaced:
            assert torch.equal(my[r][:-1], mx[r][1:]) and mx[r][0] >= 1000  # a window of the replay ids
            assert torch.equal(my[r] - mx[r], torch.ones(12, dtype=torch.long))
        else:
            assert torch.equal(mx[r], x[r]) and torch.equal(my[r], y[r])
    assert torch.equal(x, task_batch()[0])  # the given batch is left as it was


def test_replay_is_a_pure_function_and_the_same_however_the_batch_is_split():
    m = mixer(share=0.375)
    x, y = task_batch(rows=8)
    whole = m.mix((x, y), step=5, micro=0)
    again = m.mix((x, y), step=5, micro=0)
    assert torch.equal(whole[0], again[0])
    # 2 ranks x 4 rows and 2 accumulation steps x 4 rows give the same global batch
    for world, accum in ((2, 1), (1, 2)):
        parts = []
        for micro in range(accum):
            for rank in range(world):
                first = (micro * world + rank) * 4
                parts.append(m.mix((x[first:first + 4], y[first:first + 4]), 5, micro, rank, world, accum)[0])
        assert torch.equal(torch.cat(parts), whole[0])
    assert not torch.equal(m.mix((x, y), step=6, micro=0)[0], whole[0])  # another step, other rows or windows


def test_share_zero_returns_the_batch_itself():
    batch = task_batch()
    assert mixer(share=0.0).mix(batch, 3, 0) is batch


def test_dict_batches_get_shifted_or_aligned_labels_and_full_attention():
    ids = torch.randint(0, 50, (4, 10))
    zeros = torch.zeros(4, 10, dtype=torch.long)
    batch = {"input_ids": ids, "labels": torch.full((4, 10), -100), "attention_mask": zeros.clone(),
             "position_ids": zeros.clone()}
    for shifted in (True, False):
        m = mixer(share=0.5, labels_shifted=shifted)
        out = m.mix(batch, 2, 0)
        for r, _ in m.rows(2, 0, 4):
            if shifted:
                assert torch.equal(out["labels"][r][:-1], out["input_ids"][r][1:])
            else:
                assert torch.equal(out["labels"][r], out["input_ids"][r])
            assert out["attention_mask"][r].eq(1).all()
            assert torch.equal(out["position_ids"][r], torch.arange(10))
        assert batch["labels"].eq(-100).all()


def test_bad_replay_inputs_are_refused_in_one_line():
    with pytest.raises(UserError, match="--replay"):
        ReplayMixer(np.arange(10), 1.0, 0)
    with pytest.raises(UserError, match="fewer than one window"):
        ReplayMixer(np.arange(5), 0.5, 0).mix(task_batch(rows=8, T=12), 0, 0)
    with pytest.raises(UserError, match="pixel_values"):
        mixer(share=0.5).mix({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3), "pixel_values": None}, 0, 0)
    with pytest.raises(UserError, match="drop --replay"):
        mixer(share=0.5).mix(torch.zeros(2, 3), 0, 0)


def test_from_text_tokenizes_like_the_training_stream(text_file):
    tok = CharTokenizer.train(TEXT)
    m = ReplayMixer.from_text(text_file, tok, 0.2, 0)
    assert m.tokens.tolist() == tok.encode(TEXT)
    assert text_tokens(tok, text_file, 10).tolist() == tok.encode(TEXT)[:10]


def test_replay_keeps_the_original_text_perplexity_lower_during_fine_tuning(tmp_path):
    """Pre-train a tiny model on text A, fine-tune it on text B with and without replaying A (share
    0.5): after fine-tuning, A's perplexity is lower with replay, and B is learnt either way."""
    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM

    text_a = ("the quick brown fox jumps over the lazy dog while a bird sings. " * 60)
    text_b = ("0123 4567 89 " * 300)
    tok = CharTokenizer.train(text_a + text_b)
    (tmp_path / "a.txt").write_text(text_a)
    (tmp_path / "b.txt").write_text(text_b)
    ids_a, ids_b = np.asarray(tok.encode(text_a)), np.asarray(tok.encode(text_b))
    T, B = 32, 8

    def windows(ids, step, seed):
        starts = np.random.default_rng([seed, step]).integers(0, len(ids) - T - 1, size=B)
        w = torch.from_numpy(np.stack([ids[s: s + T + 1] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def run(model, ids, steps, lr, replay=None):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for step in range(steps):
            batch = windows(ids, step, 1)
            if replay is not None:
                batch = replay.mix(batch, step, 0)
            x, y = batch
            loss = F.cross_entropy(model(x).view(-1, tok.vocab_size), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=T, n_layers=1, d_model=48, n_heads=4,
                      mlp="swiglu", norm="rmsnorm", position="rope", bias=False)
    base = DecoderLM(cfg)
    run(base, ids_a, 150, 1e-2)
    ppl_a0 = perplexity(base, tok, tmp_path / "a.txt", max_tokens=1024)
    after = {}
    for share in (0.0, 0.5):
        model = DecoderLM(cfg)
        model.load_state_dict(base.state_dict())
        run(model, ids_b, 80, 1e-2, ReplayMixer(ids_a, share, 0) if share else None)
        after[share] = (perplexity(model, tok, tmp_path / "a.txt", max_tokens=1024),
                        perplexity(model, tok, tmp_path / "b.txt", max_tokens=1024))
    assert ppl_a0 < 1.5, ppl_a0
    assert after[0.0][0] > 2 * ppl_a0, (ppl_a0, after)  # forgotten without replay
    assert after[0.5][0] < after[0.0][0] / 2, (ppl_a0, after)  # replay keeps A
    assert after[0.0][1] < 3.0 and after[0.5][1] < 3.0, after  # B is learnt either way (its period is 13 chars)
    # measured: A 1.057 before; after 80 steps on B: A 54586 without replay, 1.03 with; B 2.14 and 1.04


def test_a_prompt_tuned_model_is_scored_on_windows_that_leave_room_for_its_virtual_tokens(tmp_path, text_file):
    pytest.importorskip("llmkit.peft.prompt")
    import dataclasses

    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM
    from llmkit.peft import get_method
    from llmkit.training.config import TrainConfig
    from llmkit.training.forgetting import model_context

    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    base = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=1, d_model=32, n_heads=4,
                                 mlp="swiglu", norm="rmsnorm", position="learned", bias=False)).eval()
    opts = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, "virtual_tokens": 8}
    wrapped = get_method("prompt")(opts).apply(base)
    assert model_context(base) == 32 and model_context(wrapped) == 24
    ppl = perplexity(wrapped, tok, text_file, max_tokens=100)  # learned positions: 32 would not fit
    assert math.isfinite(ppl) and ppl > 1


def test_packed_dict_rows_become_one_segment():
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": torch.zeros(2, 6, dtype=torch.long),
             "segment_ids": torch.tensor([[1, 1, 2, 2, 3, 0], [1, 2, 2, 2, 0, 0]])}
    m = mixer(share=0.5)
    out = m.mix(batch, 0, 0)
    (r, _), = m.rows(0, 0, 2)
    assert out["segment_ids"][r].eq(1).all() and torch.equal(out["segment_ids"][1 - r], batch["segment_ids"][1 - r])
