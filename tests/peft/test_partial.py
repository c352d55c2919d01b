"""Full and partial fine-tuning and feature extraction (llmkit.peft.partial): the trainable
parameters are the expected ones (counted by construction) on decoders, encoders, a decoder
classifier, a T5 and a ViT; gradual unfreezing thaws one block per N steps from the top, as a pure
function of the step; layer-wise lr decay gives each group decay^(n - i); the weight-decay split
equals the training loop's; frozen parameters do not move under AdamW; partial fine-tuning learns;
bad options are refused with a UserError."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.models.decoder_heads import DecoderForSequenceClassification
from llmkit.models.encoder import Encoder, EncoderConfig
from llmkit.models.encoder_decoder import T5Model
from llmkit.models.kinds import config_from_preset
from llmkit.models.vit import ViT, ViTConfig
from llmkit.peft import count_parameters, get_method
from llmkit.peft.partial import find_layout, lr_scale, parse_layers, parameter_depths
from llmkit.training.optim import param_groups as loop_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
N = 4  # blocks of the tiny models


def decoder(tied: bool = False, n_layers: int = N) -> DecoderLM:
    torch.manual_seed(0)
    kw = dict(position="rope", mlp="swiglu", norm="rmsnorm", bias=False) if not tied else {}
    return DecoderLM(ModelConfig(vocab_size=64, context_length=32, n_layers=n_layers, d_model=32, n_heads=4,
                                 tie_embeddings=tied, dropout=0.0, **kw))


def encoder(**kw) -> Encoder:
    torch.manual_seed(0)
    base = dict(vocab_size=50, context_length=32, n_layers=N, d_model=32, n_heads=4, dropout=0.0,
                head="sequence-classification", num_labels=3)
    return Encoder(EncoderConfig(**{**base, **kw}))


def numel(*modules: torch.nn.Module) -> int:
    """Parameters of these modules, shared ones once."""
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


def method(name: str, **opts):
    return get_method(name)(opts)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- what trains ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [decoder, lambda: decoder(tied=True), encoder])
def test_full_trains_every_parameter_with_the_default_groups(build):
    model = build()
    for p in model.parameters():
        p.requires_grad_(False)
    m = method("full")
    assert m.apply(model) is model
    trainable, total = count_parameters(model)
    assert trainable == total == numel(model)
    assert m.param_groups(model, 0.1) is None and not m.saves_adapter


@pytest.mark.parametrize("spec,blocks", [("last:2", [2, 3]), ("first:1", [0]), ("1-2", [1, 2]),
                                         ("0,3", [0, 3]), ("last:1, 0-1", [0, 1, 3]), ("last:4", [0, 1, 2, 3])])
def test_train_layers_trains_those_blocks_the_final_norm_and_the_head(spec, blocks):
    model = decoder()
    method("partial", train_layers=spec).apply(model)
    expected = numel(*(model.blocks[i] for i in blocks), model.norm, model.lm_head)
    assert count_parameters(model) == (expected, numel(model))
    assert parse_layers(spec, N) == blocks


def test_train_layers_on_an_encoder_trains_its_classifier_and_pooler():
    post = encoder()  # BERT's post-norm stack: no final norm
    method("partial", train_layers="last:1").apply(post)
    assert count_parameters(post)[0] == numel(post.blocks[-1], post.pooler, post.head)
    pre = encoder(block="pre_norm")
    method("partial", train_layers="last:1").apply(pre)
    assert count_parameters(pre)[0] == numel(pre.blocks[-1], pre.norm, pre.pooler, pre.head)
    assert not any(n.startswith(("tok_emb", "emb_norm", "pos", "type_emb")) for n in trainable_names(pre))


def test_a_tied_lm_head_trains_the_embedding_it_shares():
    model = decoder(tied=True)
    method("partial", train_layers="last:1").apply(model)
    assert model.tok_emb.weight.requires_grad  # it is the head's weight
    assert count_parameters(model)[0] == numel(model.blocks[-1], model.norm, model.tok_emb)
    assert not model.pos.weight.requires_grad


def test_freeze_and_unfreeze_patterns():
    model = decoder()
    method("partial", freeze="tok_emb,blocks.0.*,blocks.1").apply(model)
    assert count_parameters(model)[0] == numel(model) - numel(model.tok_emb, model.blocks[0], model.blocks[1])
    model = decoder()
    method("partial", train_layers="last:1", unfreeze="blocks.0.attn.*").apply(model)
    assert count_parameters(model)[0] == numel(model.blocks[3], model.norm, model.lm_head, model.blocks[0].attn)
    model = decoder()  # unfreeze wins over freeze
    method("partial", freeze="blocks.*", unfreeze="blocks.2.mlp.*").apply(model)
    assert count_parameters(model)[0] == numel(model) - numel(*model.blocks) + numel(model.blocks[2].mlp)


def test_feature_extraction_trains_only_the_head():
    model = decoder()
    method("feature-extraction").apply(model)
    assert trainable_names(model) == {"lm_head.weight"}
    enc = encoder()
    method("feature-extraction").apply(enc)
    assert count_parameters(enc)[0] == numel(enc.pooler, enc.head)
    base = decoder()
    clf = DecoderForSequenceClassification(base, num_labels=3)
    method("feature-extraction").apply(clf)
    assert trainable_names(clf) == {"score.weight"}


def test_a_decoder_classifier_is_partially_trained_through_its_body():
    clf = DecoderForSequenceClassification(decoder(), num_labels=3)
    layout = find_layout(clf)
    assert layout.body == "model." and layout.n == N
    method("partial", train_layers="last:2").apply(clf)
    assert count_parameters(clf)[0] == numel(clf.model.blocks[2], clf.model.blocks[3], clf.model.norm, clf.score)


def test_a_t5_is_one_stack_encoder_then_decoder():
    torch.manual_seed(0)
    t5 = T5Model(config_from_preset("t5-tiny", tie_embeddings=False))
    layout = find_layout(t5)
    assert layout.layers == ("encoder.0", "encoder.1", "decoder.0", "decoder.1")
    depths = parameter_depths(t5, layout)
    assert {depths[n] for n in depths if n.startswith("encoder_norm")} == {2}  # with the last encoder layer
    method("partial", train_layers="last:1").apply(t5)
    assert count_parameters(t5)[0] == numel(t5.decoder[1], t5.decoder_norm, t5.lm_head)
    t5 = T5Model(config_from_preset("t5-tiny", tie_embeddings=False))
    method("partial", train_layers="first:2").apply(t5)  # the whole encoder, with its final norm
    assert count_parameters(t5)[0] == numel(t5.encoder, t5.encoder_norm, t5.decoder_norm, t5.lm_head)


def test_a_vit_trains_its_head_and_top_blocks():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, d_model=32, n_layers=3, n_heads=4))
    method("partial", train_layers="last:1").apply(vit)
    assert count_parameters(vit)[0] == numel(vit.blocks[2], vit.norm, vit.head)


# --- gradual unfreezing --------------------------------------------------------------------------------

def test_gradual_unfreezing_thaws_one_block_every_n_steps_from_the_top():
    model = decoder()
    m = method("full", gradual_unfreeze=3)
    m.apply(model)
    top = {"norm.weight", "lm_head.weight"}
    blocks = [{n for n, _ in model.named_parameters() if n.startswith(f"blocks.{i}.")} for i in range(N)]
    expected = {0: top | blocks[3], 2: top | blocks[3], 3: top | blocks[3] | blocks[2],
                8: top | blocks[3] | blocks[2] | blocks[1], 9: top | set().union(*blocks),
                11: top | set().union(*blocks), 12: {n for n, _ in model.named_parameters()},
                1000: {n for n, _ in model.named_parameters()}}
    assert trainable_names(model) == expected[0]  # apply leaves step 0's set
    for step in (12, 3, 1000, 0, 9, 2, 8, 11):  # any order: a pure function of the step (exact resume)
        m.on_step(model, step)
        assert trainable_names(model) == expected[step], step
        fresh, other = decoder(), method("full", gradual_unfreeze=3)
        other.apply(fresh)
        other.on_step(fresh, step)
        assert trainable_names(fresh) == expected[step]


def test_gradual_unfreezing_stays_inside_the_partial_selection():
    model = decoder()
    m = method("partial", train_layers="last:2", gradual_unfreeze=5)
    m.apply(model)
    assert count_parameters(model)[0] == numel(model.blocks[3], model.norm, model.lm_head)
    m.on_step(model, 5)
    assert count_parameters(model)[0] == numel(model.blocks[2], model.blocks[3], model.norm, model.lm_head)
    m.on_step(model, 10_000)
    assert count_parameters(model)[0] == numel(model.blocks[2], model.blocks[3], model.norm, model.lm_head)


# --- learning rates and weight decay ------------------------------------------------------------------

def test_layer_lr_decay_scales_each_depth():
    d = 0.5
    model = decoder(tied=False)
    m = method("full", layer_lr_decay=d)
    m.apply(model)
    groups = m.param_groups(model, 0.1)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale_of) == sum(1 for _ in model.parameters())  # every parameter once
    for i, block in enumerate(model.blocks):
        assert {scale_of[id(p)] for p in block.parameters()} == {d ** (N - i)}
    assert scale_of[id(model.tok_emb.weight)] == d ** (N + 1)
    assert scale_of[id(model.lm_head.weight)] == scale_of[id(model.norm.weight)] == 1.0
    assert lr_scale(0, N, d) == d ** (N + 1) and lr_scale(N + 1, N, d) == 1.0


@pytest.mark.parametrize("build", [decoder, lambda: decoder(tied=True), encoder,
                                   lambda: encoder(head="masked-lm", tie_embeddings=True, block="pre_norm")])
def test_the_weight_decay_split_is_the_training_loops(build):
    model = build()
    m = method("full", layer_lr_decay=0.8)
    m.apply(model)
    ours = m.param_groups(model, 0.1)
    loop = loop_param_groups(model, 0.1)
    decayed = {id(p) for g in ours if g["weight_decay"] == 0.1 for p in g["params"]}
    kept = {id(p) for g in ours if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {id(p) for p in loop[0]["params"]} and kept == {id(p) for p in loop[1]["params"]}


def test_frozen_parameters_do_not_move_under_adamw():
    """AdamW with weight decay on the method's groups: parameters outside the selection and those
    not yet thawed stay bit-identical; the trained ones move."""
    torch.manual_seed(0)
    model = decoder()
    m = method("partial", train_layers="last:2", freeze="blocks.3.mlp.*", gradual_unfreeze=2, layer_lr_decay=0.7)
    m.apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = m.param_groups(model, 0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ids = torch.randint(0, 64, (2, 16))
    for step in range(2):  # blocks.2 is still frozen at steps 0 and 1
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_scale"]
        m.on_step(model, step)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if n.startswith(("blocks.3.attn", "blocks.3.norm", "norm.", "lm_head"))}


def test_partial_fine_tuning_learns():
    """Only the top block and head train on a repeating sequence: the loss falls well below chance."""
    torch.manual_seed(0)
    model = decoder(n_layers=2)
    m = method("partial", train_layers="last:1", layer_lr_decay=0.5)
    m.apply(model)
    opt = torch.optim.AdamW(m.param_groups(model, 0.0), lr=3e-2)
    seq = torch.arange(32) % 8 + 3
    ids = seq[None].repeat(4, 1)
    losses = []
    for step in range(60):
        for g in opt.param_groups:
            g["lr"] = 3e-2 * g["lr_scale"]
        m.on_step(model, step)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.3, (losses[0], losses[-1])
    assert not model.blocks[0].attn.qkv.weight.requires_grad


@pytest.mark.skipif(not (DATA / "models" / "stories260K" / "stories260K.bin").is_file(),
                    reason="../shared/data/models/stories260K is not present")
def test_train_layers_on_stories260k():
    from llmkit.model_io import load_pretrained

    model = load_pretrained(DATA / "models" / "stories260K" / "stories260K.bin")
    method("partial", train_layers="last:2").apply(model)
    heads = numel(model.norm, model.lm_head)
    assert count_parameters(model)[0] == numel(model.blocks[3], model.blocks[4]) + heads


# --- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts,words", [
    (dict(train_layers="last:5"), "out of range"), (dict(train_layers="0-4"), "out of range"),
    (dict(train_layers="7"), "out of range"), (dict(freeze="layers.*"), "matches no parameter"),
    (dict(train_layers="last:1", unfreeze="blocks.9.*"), "matches no parameter"),
    (dict(freeze="*"), "every parameter is frozen"),
    (dict(train_layers="last:1", freeze="blocks.3,norm,lm_head"), "every parameter is frozen"),
])
def test_partial_refuses_options_that_do_not_fit_the_model(opts, words):
    with pytest.raises(UserError, match=words):
        method("partial", **opts).apply(decoder())


@pytest.mark.parametrize("name,opts,words", [
    ("partial", {}, "needs --train-layers or --freeze"), ("partial", dict(unfreeze="lm_head"), "give one of them"),
    ("partial", dict(train_layers="last2"), "is not last:K"),
    ("partial", dict(train_layers="last:0"), "names no block"),
    ("partial", dict(train_layers="3-1"), "is empty"), ("partial", dict(train_layers=" , "), "names no block"),
    ("partial", dict(freeze="a,,b"), "empty pattern"), ("full", dict(layer_lr_decay=0.0), r"not in \(0, 1\]"),
    ("full", dict(layer_lr_decay=1.5), r"not in \(0, 1\]"), ("full", dict(gradual_unfreeze=-1), "whole number"),
])
def test_nonsense_options_are_refused_before_anything_is_built(name, opts, words):
    with pytest.raises(UserError, match=words):
        method(name, **opts)


def test_feature_extraction_needs_a_head_and_layer_options_need_blocks():
    with pytest.raises(UserError, match="has none"):
        method("feature-extraction").apply(encoder(head="none"))
    with pytest.raises(UserError, match="no layer stack"):
        method("full", gradual_unfreeze=2).apply(torch.nn.Linear(3, 3))
    with pytest.raises(UserError, match="needs a model with blocks"):
        method("partial", train_layers="last:1").apply(torch.nn.Sequential(torch.nn.Linear(3, 3)))
