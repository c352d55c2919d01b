"""Hugging Face T5 / Flan-T5 (v1.1) / LongT5 folders in and T5 folders out, against transformers on
tiny random models: logits of a padded source batch, greedy and beam-search ids of `generate`,
and export reloaded by transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit import load
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens
from llmkit.interop.hf import export_hf, load_hf
from llmkit.models.kinds import kind_of_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
SOURCES = [[5, 6, 7, 8, 9, 10, 1], [11, 12, 13, 1], [20, 21, 22, 23, 24, 25, 26, 27, 1]]
TOL = 1e-4


def _peaked(model, seed: int) -> None:
    """Weights ~N(0, 0.2) and norms ~1 +- 0.1: random, but with clear argmax decisions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.2 if p.dim() > 1 else 1.0 + noise * 0.1)


def save_random(kind: str, folder: Path) -> Path:
    """A tiny random transformers model saved to `folder`: "v1" (ReLU, tied, scaled head), "v11"
    (gated-GELU, a separate lm_head.weight stored, tie_word_embeddings false: Flan-T5's layout) or
    "longt5" (transient-global encoder, gated-GELU)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
    if kind == "longt5":
        cfg = transformers.LongT5Config(**common, encoder_attention_type="transient-global", local_radius=3,
                                        global_block_size=4, feed_forward_proj="gated-gelu")
        model = transformers.LongT5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.T5Config(**common, feed_forward_proj="relu" if kind == "v1" else "gated-gelu")
        model = transformers.T5ForConditionalGeneration(cfg)
    _peaked(model, 1)
    model.save_pretrained(folder)
    if kind == "v11":  # transformers 5 always ties a fresh model: write the separate head as Flan-T5 ships it
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        state["lm_head.weight"] = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(2)) * 0.2
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config.pop("scale_decoder_outputs", None)
        config["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["v1", "v11", "longt5"])
def pair(request, tmp_path_factory):
    folder = save_random(request.param, tmp_path_factory.mktemp(request.param))
    cls = (transformers.LongT5ForConditionalGeneration if request.param == "longt5"
           else transformers.T5ForConditionalGeneration)
    return request.param, folder, cls.from_pretrained(folder).eval(), load_hf(folder)


def padded(sources):
    ids = torch.zeros(len(sources), max(map(len, sources)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sources):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def test_loaded_model_matches_transformers_logits_on_a_padded_batch(pair):
    kind, _, ref, ours = pair
    assert kind_of_model(ours).name == "t5"
    tied = kind != "v11"  # LongT5 ties by default, as T5 v1.0 does
    assert ours.cfg.tie_embeddings == tied and ours.cfg.scale_decoder_output == tied
    if kind == "v11":  # the stored head is used, not the embedding
        assert not torch.equal(ref.lm_head.weight, ref.shared.weight)
    ids, mask = padded(SOURCES)
    tgt = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(ids, mask, tgt)
    real = mask.bool().any(1)
    assert real.all() and (got - want).abs().max() < TOL * max(1.0, want.abs().max().item())


def _greedy_ref(ref, sources, new, eos):
    ids, mask = padded(sources)
    out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=new,
                       eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, 1:].tolist():  # drop the decoder start token; cut after EOS
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def test_greedy_ids_equal_transformers_generate(pair):
    _, _, ref, ours = pair
    free = _greedy_ref(ref, SOURCES, 12, ours.cfg.eos_token_id)
    assert generate_batch(ours, SOURCES, GenerationConfig(temperature=0, max_new_tokens=12)) == free
    # an EOS the outputs do reach: rows stop at different steps, the ended ones pad
    eos = free[2][4]
    want = _greedy_ref(ref, SOURCES, 12, eos)
    got = generate_batch(ours, SOURCES, GenerationConfig(temperature=0, max_new_tokens=12), eos_id=eos)
    assert got == want and any(len(r) < 12 for r in got)


def test_beam_search_ids_equal_transformers(pair):
    _, _, ref, ours = pair
    for source in SOURCES:
        out = ref.generate(input_ids=torch.tensor([source]), do_sample=False, num_beams=3, max_new_tokens=10)
        want = out[0, 1:].tolist()
        want = want[:want.index(1) + 1] if 1 in want else want
        got = list(generate_tokens(ours, source, GenerationConfig(num_beams=3, max_new_tokens=10)))
        assert got == want


def test_export_reloads_in_transformers_with_equal_logits(pair, tmp_path):
    kind, _, _, ours = pair
    out = export_hf(ours, None, tmp_path / "out")
    cls = (transformers.LongT5ForConditionalGeneration if kind == "longt5"
           else transformers.T5ForConditionalGeneration)
    back = cls.from_pretrained(out).eval()
    ids, mask = padded(SOURCES)
    tgt = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ours(ids, mask, tgt)
        got = back(input_ids=ids, attention_mask=mask, decoder_input_ids=tgt).logits
    assert (got - want).abs().max() < TOL * max(1.0, want.abs().max().item())
    again = load_hf(out)  # and llmkit reads its own export back exactly
    assert again.cfg == ours.cfg
    with torch.no_grad():
        assert torch.equal(again(ids, mask, tgt), want)


def test_llmkit_load_finds_the_t5_kind(pair):
    _, folder, _, _ = pair
    lm = load(folder)
    assert lm.kind.name == "t5" and lm.tokenizer is None
    assert lm.generate_ids(SOURCES[0], max_new_tokens=5, temperature=0) == \
        generate_batch(lm.model, SOURCES[:1], GenerationConfig(temperature=0, max_new_tokens=5))[0]


def test_bad_folders_are_one_line_errors(tmp_path):
    folder = save_random("v1", tmp_path / "t5")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(UserError, match="feed_forward_proj"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "longt5",
                                                    "encoder_attention_type": "local"}))
    with pytest.raises(UserError, match="transient-global"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(UserError, match="lacks tensor"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**config, "d_ff": 48}))
    with pytest.raises(UserError, match="shape"):
        load_hf(folder)
