"""The encoder kind (llmkit.models.encoder): bidirectional in training and eval mode, padding never
changes real tokens, packed execution equals padded, heads have their shapes, presets their sizes,
save/load round-trips (tied MLM decoder stored once), and a classifier learns a toy task."""
from __future__ import annotations

import pytest
import torch

from llmkit.errors import UserError
from llmkit.model_io import load_model, save_model
from llmkit.models.encoder import ENCODER_PRESETS, Encoder, EncoderConfig, pool
from llmkit.models.kinds import config_from_preset, get_kind, require_text_generation

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=50, context_length=32, n_layers=2, d_model=32, n_heads=4, dropout=0.0)


def tiny(**overrides) -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**{**TINY, **overrides}))


def batch(B: int = 3, T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and a right-padded mask: row lengths T, T-4, 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 4:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("block", ["post_norm", "pre_norm"])
@pytest.mark.parametrize("training", [True, False])
def test_a_later_token_changes_earlier_outputs(block, training):
    """Bidirectional: changing the last token moves the first token's state, in training mode and
    in eval mode (where causal fast paths could otherwise stand in)."""
    model = tiny(block=block).train(training)
    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] % 49) + 1
    with torch.set_grad_enabled(training):
        a, b = model(ids), model(changed)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    one = torch.randint(1, 50, (1, 1))  # one token: every key is itself
    assert model(one).shape == (1, 1, 32)


@pytest.mark.parametrize("block", ["post_norm", "pre_norm"])
def test_padding_does_not_change_real_tokens(block):
    """Each row alone equals its padded row of a batch, at its real positions (1e-5)."""
    model = tiny(block=block).eval()
    ids, mask = batch()
    with torch.no_grad():
        together = model(ids, mask)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n])
            assert (alone[0] - together[row, :n]).abs().max() < 1e-5


@pytest.mark.parametrize("block", ["post_norm", "pre_norm"])
def test_packed_execution_equals_padded_on_real_tokens(block):
    """encode(packed=True) computes real tokens only: same states there (1e-5), zeros at padding;
    also in training mode with gradients flowing."""
    model = tiny(block=block).eval()
    ids, mask = batch()
    with torch.no_grad():
        padded, packed = model.encode(ids, mask), model.encode(ids, mask, packed=True)
    real = mask.bool()
    assert (padded[real] - packed[real]).abs().max() < 1e-5
    assert packed[~real].abs().max() == 0
    model.train()
    loss = model.encode(ids, mask, packed=True)[real].pow(2).mean()
    loss.backward()
    assert model.tok_emb.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0


def test_heads_give_their_shapes_and_tied_decoder():
    ids, mask = batch()
    tt = torch.zeros_like(ids)
    tt[:, 5:] = 1
    mlm = tiny(head="masked-lm")
    assert mlm(ids, mask, tt).shape == (3, 10, 50)
    assert mlm.head.decoder.weight is mlm.tok_emb.weight
    assert tiny(head="sequence-classification", num_labels=3)(ids, mask).shape == (3, 3)
    assert tiny(head="token-classification", num_labels=5)(ids, mask).shape == (3, 10, 5)
    nsp = tiny(head="masked-lm", nsp=True).eval()
    hidden = nsp.encode(ids, mask, tt)
    assert hidden.shape == (3, 10, 32) and nsp.pooled(hidden).abs().max() <= 1  # tanh pooler
    assert nsp.nsp_logits(nsp.pooled(hidden)).shape == (3, 2)
    # token types are an input: changing them changes the states
    assert (nsp.encode(ids, mask, torch.zeros_like(ids)) - hidden).abs().max() > 1e-4


def test_sentence_pooling_ignores_padding():
    ids, mask = batch()
    model = tiny(normalize=True).eval()
    with torch.no_grad():
        emb = model.sentence_embedding(ids, mask)
        alone = model.sentence_embedding(ids[2:3, :3])
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    assert (emb[2] - alone[0]).abs().max() < 1e-5
    hidden = torch.tensor([[[1.0, 4.0], [3.0, 0.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert pool(hidden, m, "mean", False).tolist() == [[2.0, 2.0]]
    assert pool(hidden, m, "max", False).tolist() == [[3.0, 4.0]]
    assert pool(hidden, m, "cls", False).tolist() == [[1.0, 4.0]]


def test_roberta_positions_start_after_the_pad_id():
    model = tiny(pad_token_id=1, position_offset=2)
    ids = torch.tensor([[5, 6, 7, 1, 1]])
    assert model.position_ids(ids).tolist() == [[2, 3, 4, 1, 1]]
    assert model.cfg.max_positions == 30


def test_presets_have_their_published_sizes():
    from llmkit.interop.hf import _skipping_init  # sizes only: no init, no resident memory

    with _skipping_init():
        base = Encoder(config_from_preset("bert-base", head="masked-lm"))
        minilm = Encoder(config_from_preset("minilm-l6"))
    assert 109e6 < sum(p.numel() for p in base.parameters()) < 111e6  # "BERT-base, 110M"
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216  # all-MiniLM-L6-v2 with its pooler
    assert set(ENCODER_PRESETS) == {"bert-tiny", "bert-mini", "bert-base", "minilm-l6"}
    assert get_kind("encoder").presets is ENCODER_PRESETS


def test_bad_configs_are_one_line_errors():
    for bad in (dict(head="qa"), dict(nsp=True, pooler=False), dict(pooling="sum"), dict(sliding_window=4),
                dict(position="alibi"), dict(pad_token_id=50), dict(type_vocab_size=-1),
                dict(max_seq_length=64)):
        with pytest.raises(UserError):
            EncoderConfig(**{**TINY, **bad})
    with pytest.raises(UserError, match="unknown encoder keys"):
        EncoderConfig.from_dict({**TINY, "bogus": 1})
    with pytest.raises(UserError, match="next-sentence"):
        tiny().nsp_logits(torch.zeros(1, 32))
    with pytest.raises(UserError, match="positions"):
        tiny()(torch.ones(1, 40, dtype=torch.long))


def test_save_load_round_trip_and_generation_refuses(tmp_path):
    model = tiny(head="masked-lm", nsp=True).eval()
    ids, mask = batch()
    save_model(model, tmp_path / "m")
    from safetensors import safe_open

    stored = set(safe_open(str(tmp_path / "m" / "model.safetensors"), "pt").keys())
    assert "head.decoder.weight" not in stored and "tok_emb.weight" in stored  # tied: stored once
    back = load_model(tmp_path / "m")
    assert isinstance(back, Encoder) and back.cfg == model.cfg
    assert back.head.decoder.weight is back.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(back(ids, mask), model(ids, mask))
    with pytest.raises(UserError, match="does not generate text"):
        require_text_generation(back)
    assert back.flops_per_token(16) > 6 * back.num_params(exclude_embeddings=True)


def test_a_tiny_classifier_learns_a_separable_task():
    """Label = whether token 7 occurs in the sequence: 100 AdamW steps bring the loss below 0.05
    (chance is ln 2 = 0.69; measured 0.003)."""
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**{**TINY, "head": "sequence-classification", "num_labels": 2, "dropout": 0.0}))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    for step in range(100):
        ids = torch.randint(8, 50, (32, 8), generator=g)
        labels = torch.randint(0, 2, (32,), generator=g)
        where = torch.randint(1, 8, (32,), generator=g)
        ids[labels == 1, where[labels == 1]] = 7
        ids[:, 0] = 2  # a [CLS]-like first token the pooler reads
        loss = torch.nn.functional.cross_entropy(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
