"""The Vision Transformer: the patch embedding is unfold + matmul, attention is bidirectional (every
output depends on every patch), positions interpolate for other image sizes, the config keeps only
what a ViT has, presets have the paper's sizes, the FLOP count matches a counted forward pass, and
the kind saves and loads through `llmkit.load`."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit.errors import UserError
from llmkit.model_io import save_model
from llmkit.models.kinds import build_model, config_from_preset, kind_of_model, num_params
from llmkit.models.vit import PatchEmbedding, ViT, ViTConfig, interpolate_positions

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(image_size=8, patch_size=2, num_channels=3, num_labels=5, d_model=32, n_layers=2, n_heads=4)


def small_vit(**overrides) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**SMALL, **overrides})).eval()


def test_patch_embedding_equals_unfold_and_matmul():
    torch.manual_seed(0)
    emb = PatchEmbedding(image_size=12, patch_size=4, num_channels=3, d_model=16)
    pixels = torch.randn(2, 3, 12, 12)
    patches = F.unfold(pixels, kernel_size=4, stride=4).transpose(1, 2)  # [B, 9, C*4*4], row-major patches
    by_hand = patches @ emb.proj.weight.reshape(16, -1).T + emb.proj.bias
    out = emb(pixels)
    assert out.shape == (2, 9, 16)
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=1e-5)


def test_patch_embedding_refuses_wrong_channels():
    emb = PatchEmbedding(8, 2, 1, 16)
    with pytest.raises(UserError, match="1 channel"):
        emb(torch.randn(1, 3, 8, 8))


def test_every_output_depends_on_every_patch():
    """Not causal: changing the last patch changes the [CLS] output and every patch's output."""
    model = small_vit()
    pixels = torch.randn(1, 3, 8, 8)
    changed = pixels.clone()
    changed[..., 6:, 6:] += 1.0  # the last 2x2 patch only
    with torch.no_grad():
        diff = (model.features(changed) - model.features(pixels)).abs().amax(-1)[0]
    assert diff.shape == (17,)
    assert (diff > 1e-4).all(), diff


def test_positions_interpolate_bicubically_and_keep_cls():
    torch.manual_seed(0)
    pos = torch.randn(1 + 16, 8)
    assert interpolate_positions(pos, 4, 4, 4) is pos
    bigger = interpolate_positions(pos, 4, 6, 5)
    assert bigger.shape == (1 + 30, 8)
    torch.testing.assert_close(bigger[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(30, 8)
    torch.testing.assert_close(bigger[1:], want)


def test_another_image_size_runs_with_interpolated_positions():
    model = small_vit()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 12, 10))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_mean_pooling_and_no_head():
    model = small_vit(pooling="mean", num_labels=0)
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        hidden = model.features(pixels)
        torch.testing.assert_close(model(pixels), hidden[:, 1:].mean(1))


def test_flops_per_token_match_a_counted_forward_pass():
    """6 FLOPs per weight and token plus the attention (the PaLM count) = 3 x the forward pass's
    matmul and convolution FLOPs (forward + backward), counted by torch, plus the 6 per token that
    the count gives each bias and norm weight (torch counts only the products)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = small_vit()
    pixels = torch.randn(1, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            model(pixels)
    tokens = model.cfg.num_patches + 1
    vectors = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1 and n != "cls_token")
    assert model.flops_per_token(tokens) * tokens == pytest.approx(3 * counter.get_total_flops() + 6 * vectors * tokens,
                                                                   rel=1e-3)


def test_presets_have_the_papers_sizes():
    with torch.device("meta"):
        base = build_model(config_from_preset("vit-base"))
        tiny = build_model(config_from_preset("vit-tiny"))
    assert num_params(base) == 86_567_656  # ViT-B/16 with a 1000-way head: 86M
    assert 5.6e6 < num_params(tiny) < 5.8e6  # ViT-Ti/16 (DeiT-tiny): 5.7M
    digits = config_from_preset("vit-digits")
    assert (digits.image_size, digits.patch_size, digits.num_channels, digits.num_labels) == (8, 2, 1, 10)
    assert digits.context_length == 17 and digits.causal is False


def test_config_json_keeps_only_vit_fields_and_round_trips(tmp_path):
    model = small_vit(id2label={str(i): f"class{i}" for i in range(5)}, image_mean=[0.1, 0.2, 0.3])
    save_model(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architecture"] == "vit" and d["model_type"] == "llmkit"
    assert not {"vocab_size", "context_length", "position", "rope_base", "moe"} & set(d)
    lm = llmkit.load(tmp_path)
    assert kind_of_model(lm.model).name == "vit" and lm.tokenizer is None
    assert lm.model.cfg.labels() == [f"class{i}" for i in range(5)]
    assert lm.model.cfg.image_mean == [0.1, 0.2, 0.3]
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(pixels), model(pixels), atol=0, rtol=0)


@pytest.mark.parametrize("fields, words", [
    (dict(position="rope"), "position is a decoder field"),
    (dict(moe={"n_experts": 2}), "moe is a decoder field"),
    (dict(patch_size=16), "larger than image_size"),
    (dict(id2label={"0": "a"}), "one name for each"),
    (dict(image_std=[1.0]), "3 number"),
    (dict(pooling="max"), "pooling"),
])
def test_bad_configs_are_one_line(fields, words):
    with pytest.raises(UserError, match=words):
        ViTConfig(**{**SMALL, **fields})


def test_derived_fields_are_refused_from_dicts():
    with pytest.raises(UserError, match="derived"):
        ViTConfig.from_dict({**SMALL, "context_length": 64})
