"""Hugging Face ViT directories load with the same outputs as transformers: tiny random
ViTForImageClassification and ViTModel checkpoints (logits, hidden states, pooler output within
1e-4, also at another image size with `interpolate_pos_encoding`), their pixel normalisation from
preprocessor_config.json, and one-line refusals for checkpoints that are not what config.json says."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import ViTConfig as HFViTConfig, ViTForImageClassification, ViTForMaskedImageModeling, ViTModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import llmkit  # noqa: E402
from llmkit.api import load_model_any  # noqa: E402
from llmkit.errors import UserError  # noqa: E402
from llmkit.interop.hf import config_from_hf  # noqa: E402
from llmkit.interop.vision import reader  # noqa: E402
from llmkit.models.vit import ViT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = ViTForImageClassification(HFViTConfig(**TINY, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"},
                                               label2id={"cat": 0, "dog": 1, "bird": 2})).eval()
    return hf, _save(hf, tmp_path_factory.mktemp("vit-cls"))


def test_classifier_logits_match_transformers(classifier_dir):
    hf, path = classifier_dir
    ours = load_model_any(path)
    assert isinstance(ours, ViT) and not ours.training
    assert ours.cfg.labels() == ["cat", "dog", "bird"] and ours.cfg.num_labels == 3
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, got = hf(pixel_values=pixels).logits, ours(pixels)
    assert want.std() > 1e-3  # not a degenerate all-equal output
    assert (got - want).abs().max() < TOL


@pytest.mark.parametrize("size", [(48, 48), (40, 24)])
def test_other_image_sizes_match_interpolate_pos_encoding(classifier_dir, size):
    hf, path = classifier_dir
    ours = load_model_any(path)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = hf(pixel_values=pixels, interpolate_pos_encoding=True).logits
        got = ours(pixels)
    assert (got - want).abs().max() < TOL


def test_vit_model_hidden_states_and_pooler_match(tmp_path):
    torch.manual_seed(0)
    hf = ViTModel(HFViTConfig(**TINY, qkv_bias=False, hidden_act="gelu_new")).eval()
    ours = load_model_any(_save(hf, tmp_path))
    assert ours.cfg.num_labels == 0 and ours.cfg.pooler and ours.cfg.qkv_bias is False
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        assert (ours.features(pixels) - out.last_hidden_state).abs().max() < TOL
        assert (ours(pixels) - out.pooler_output).abs().max() < TOL


def test_config_without_weights_and_normalisation_from_preprocessor(classifier_dir, tmp_path):
    _, path = classifier_dir
    cfg = config_from_hf(path)
    assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.n_layers, cfg.num_labels) == (32, 8, 32, 2, 3)
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_normalize": True}))
    lm = llmkit.load(tmp_path)
    assert lm.model.cfg.image_mean == [0.485, 0.456, 0.406] and lm.model.cfg.image_std == [0.229, 0.224, 0.225]


def test_missing_tensor_is_one_line(classifier_dir, tmp_path):
    _, path = classifier_dir
    state = load_file(path / "model.safetensors")
    del state["vit.encoder.layer.1.attention.attention.key.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(UserError, match="lacks tensor vit.encoder.layer.1.attention.attention.key.weight"):
        load_model_any(tmp_path)


def test_masked_image_modeling_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    hf = ViTForMaskedImageModeling(HFViTConfig(**TINY, encoder_stride=8))
    with pytest.raises(UserError, match="would not use"):
        load_model_any(_save(hf, tmp_path))


def test_non_square_images_and_unknown_activation_are_refused():
    config = {"model_type": "vit", **TINY, "architectures": ["ViTModel"]}
    with pytest.raises(UserError, match="not square"):
        reader("vit")[0]({**config, "image_size": [32, 16]})
    with pytest.raises(UserError, match="hidden_act"):
        reader("vit")[0]({**config, "hidden_act": "relu"})
