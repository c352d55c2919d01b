"""Decoder classification heads: logits equal transformers' Llama/GPT-2 sequence and token
classifiers on tiny random models with the same weights; pooling ignores padding; the state dict
rebuilds the classifier."""
from __future__ import annotations

import os

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.models.decoder_heads import (DecoderForSequenceClassification, DecoderForTokenClassification,
                                         last_token_index)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PAD = 0
_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
CONFIGS = {
    "llama": lambda n: transformers.LlamaConfig(**_SMALL, num_labels=n),
    "gpt2": lambda n: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                              bos_token_id=1, eos_token_id=2, pad_token_id=PAD, num_labels=n),
}
SEQ = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
TOK = {"llama": "LlamaForTokenClassification", "gpt2": "GPT2ForTokenClassification"}


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _pair(family: str, kind: dict, num_labels: int, tmp_path):
    """(transformers classifier, llmkit DecoderLM with the same body weights)."""
    from llmkit.interop.hf import load_hf

    torch.manual_seed(0)
    ref = _randomize(getattr(transformers, kind[family])(CONFIGS[family](num_labels)))
    causal = transformers.AutoModelForCausalLM.from_config(ref.config)
    prefix = ref.base_model_prefix
    getattr(causal, prefix).load_state_dict(getattr(ref, prefix).state_dict())
    causal.save_pretrained(tmp_path / family, safe_serialization=True)
    return ref, load_hf(tmp_path / family).eval()


def _right_padded(lengths: list[int], T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n:] = PAD
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequence_logits_match_transformers_with_right_padding(family, tmp_path):
    ref, base = _pair(family, SEQ, 3, tmp_path)
    ours = DecoderForSequenceClassification(base, 3, pooling="last", pad_id=PAD).eval()
    with torch.no_grad():
        ours.score.weight.copy_(ref.score.weight)
        ids, mask = _right_padded([12, 7, 3], 12)
        want = ref(input_ids=ids, attention_mask=mask).logits
        got_mask = ours(ids, attention_mask=mask)
        got_pad = ours(ids)  # no mask: the pad id marks padding, as transformers reads it
    torch.testing.assert_close(got_mask, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_pad, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_logits_match_transformers(family, tmp_path):
    ref, base = _pair(family, TOK, 5, tmp_path)
    ours = DecoderForTokenClassification(base, 5).eval()
    with torch.no_grad():
        head = getattr(ref, "score", None) or ref.classifier  # GPT-2 calls it classifier
        ours.score.weight.copy_(head.weight)
        ours.score.bias.copy_(head.bias)
        ids, mask = _right_padded([10, 6], 10)
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def _tiny_decoder(seed: int = 0, **kw) -> DecoderLM:
    cfg = ModelConfig(**{**dict(vocab_size=50, context_length=32, n_layers=2, d_model=32, n_heads=4), **kw})
    torch.manual_seed(seed)
    return DecoderLM(cfg).eval()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_does_not_change_a_row(pooling):
    model = DecoderForSequenceClassification(_tiny_decoder(), 2, pooling=pooling, pad_id=PAD).eval()
    ids = torch.randint(1, 50, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = (padded != PAD).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask), model(ids), atol=1e-5, rtol=0)


def test_mean_pooling_is_the_mean_of_the_real_tokens_states():
    model = DecoderForSequenceClassification(_tiny_decoder(), 2, pooling="mean", pad_id=PAD).eval()
    ids, mask = torch.randint(1, 50, (2, 8)), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
        want = torch.stack([hidden[0].mean(0), hidden[1, :5].mean(0)]) @ model.score.weight.T
        torch.testing.assert_close(model(ids, attention_mask=mask), want, atol=1e-6, rtol=0)


def test_last_token_index_handles_left_and_right_padding():
    real = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    assert last_token_index(real).tolist() == [2, 4, 4]


def test_lm_head_is_gone_and_the_state_dict_rebuilds_the_classifier():
    model = DecoderForSequenceClassification(_tiny_decoder(tie_embeddings=True, final_softcap=30.0), 3, pad_id=PAD)
    keys = set(model.state_dict())
    assert "score.weight" in keys and not any("lm_head" in k for k in keys)
    assert model.cfg.tie_embeddings is False and model.cfg.final_softcap is None
    rebuilt = DecoderForSequenceClassification(DecoderLM(model.cfg), **model.head_config())
    rebuilt.load_state_dict(model.state_dict())  # strict: the same keys
    ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids), model.eval()(ids), atol=0, rtol=0)
    assert model.flops_per_token(8) > 0 and model.num_params() == sum(p.numel() for p in model.parameters())


def test_bad_pooling_and_non_decoder_are_user_errors():
    with pytest.raises(UserError, match="pooling"):
        DecoderForSequenceClassification(_tiny_decoder(), 2, pooling="cls")
    with pytest.raises(UserError, match="DecoderLM"):
        DecoderForSequenceClassification(torch.nn.Linear(2, 2), 2)


def test_a_saved_classifier_loads_back_as_itself(tmp_path):
    """Kind "decoder-classifier": config.json holds the body's and the head's settings; load_model
    rebuilds the same class with the same outputs."""
    from llmkit.config import ModelConfig
    from llmkit.model_io import save_model, load_model

    cfg = ModelConfig(vocab_size=50, context_length=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                      position="rope", norm="rmsnorm", mlp="swiglu", d_ff=48, bias=False)
    x = torch.randint(1, 50, (2, 7))
    for model in (DecoderForSequenceClassification(DecoderLM(cfg), 3, pooling="mean", pad_id=0,
                                                   id2label={"0": "neg", "1": "neu", "2": "pos"}),
                  DecoderForTokenClassification(DecoderLM(cfg), 5)):
        model.eval()
        out = tmp_path / type(model).__name__
        save_model(model, out)
        again = load_model(out)
        assert type(again) is type(model) and again.head_config() == model.head_config()
        with torch.no_grad():
            assert torch.equal(again(x), model(x))
