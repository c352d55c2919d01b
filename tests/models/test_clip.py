"""The CLIP kind (llmkit.models.clip) and its Hugging Face reader (llmkit.interop.clip_tables):
parity with transformers' CLIPModel, the contrastive loss, the towers' attention patterns, the
config's round trip, zero-shot probabilities."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.model_io import load_model, save_model
from llmkit.models.clip import CLIPConfig, CLIPModel, clip_loss, encode_captions, zero_shot
from llmkit.models.kinds import config_from_preset

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=1)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=16,
              patch_size=4, num_channels=3)


def tiny_hf_clip(tmp_path, seed: int = 0, **text):
    """A random transformers CLIPModel saved to tmp_path; returns (model, directory)."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config={**TEXT, **text}, vision_config=VISION, projection_dim=20,
                                     logit_scale_init_value=2.3)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or missing tensor shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def text_batch(eos: int = 98):
    """Ids with start token 97 and an end token, three rows of different lengths, padded two ways
    (with the pad id 1 behind the end, and with repeated ends, as CLIP's tokenizer pads)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 90, (3, 10), generator=g)
    ids[:, 0] = 97
    ids[0, 9] = eos
    ids[1, 6:] = eos
    ids[2, 4], ids[2, 5:] = eos, 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from llmkit.interop.hf import load_hf

    ref, directory = tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))
    return ref, load_hf(directory)


def test_hf_clip_loads_with_equal_embeddings_and_logits(pair):
    ref, ours = pair
    assert isinstance(ours, CLIPModel)
    ids, mask = text_batch()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        logits_per_image, logits_per_text = ours(ids, pixels, mask)
        image = ours.encode_image(pixels)
        text = ours.encode_text(ids, mask)
        want_image = ref.get_image_features(pixel_values=pixels).pooler_output
        want_text = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(image, want_image, atol=TOL, rtol=0)
    torch.testing.assert_close(text, want_text, atol=TOL, rtol=0)
    torch.testing.assert_close(logits_per_image, want.logits_per_image, atol=TOL, rtol=0)
    torch.testing.assert_close(logits_per_text, want.logits_per_text, atol=TOL, rtol=0)
    assert logits_per_image.shape == (2, 3)


def test_legacy_eos_token_id_2_reads_features_at_the_largest_id(tmp_path):
    from llmkit.interop.hf import load_hf

    ref, directory = tiny_hf_clip(tmp_path, seed=3, eos_token_id=2)
    ours = load_hf(directory)
    assert ours.cfg.text.eos_token_id == 2
    ids, mask = text_batch()  # end token 98 is each row's largest id, as 49407 is in CLIP's vocabulary
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(ours.encode_text(ids, mask), want, atol=TOL, rtol=0)
    assert ours.text.eos_positions(ids).tolist() == [9, 6, 4]


def test_a_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmkit.interop.hf import load_hf

    _, directory = tiny_hf_clip(tmp_path)
    state = load_file(directory / "model.safetensors")
    del state["vision_model.post_layernorm.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="post_layernorm"):
        load_hf(directory)


def test_vit_b_32_preset_has_the_parameters_of_openai_clip_vit_base_patch32():
    with torch.device("meta"):
        ours = CLIPModel(config_from_preset("clip-vit-b-32"))
        ref = transformers.CLIPModel(transformers.CLIPConfig())  # transformers' defaults: ViT-B/32
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref) == 151_277_313


def test_clip_loss_equals_symmetric_cross_entropy_by_hand():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    by_hand = 0.0
    for i in range(5):
        by_hand -= logits[i, i] - torch.logsumexp(logits[i], 0)  # text i -> its image
        by_hand -= logits[i, i] - torch.logsumexp(logits[:, i], 0)  # image i -> its text
    torch.testing.assert_close(clip_loss(logits), by_hand / 10, atol=1e-6, rtol=0)


def test_clip_loss_is_minimal_when_the_logits_are_diagonal():
    n = 6
    diagonal = torch.eye(n) * 10
    assert clip_loss(diagonal) < 1e-3
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any other arrangement of the same scores costs more
        permuted = diagonal[torch.randperm(n, generator=g)]
        if not torch.equal(permuted, diagonal):
            assert clip_loss(permuted) > clip_loss(diagonal) + 1
    assert clip_loss(torch.zeros(n, n)) == pytest.approx(math.log(n))  # no information: ln n


def tiny_clip(**overrides) -> CLIPModel:
    torch.manual_seed(0)
    cfg = CLIPConfig.from_dict({"text": dict(vocab_size=50, context_length=12, n_layers=2, d_model=32, n_heads=4,
                                             eos_token_id=49),
                                "vision": dict(image_size=8, patch_size=2, num_channels=1, n_layers=2, d_model=32,
                                               n_heads=4),
                                "projection_dim": 16, **overrides})
    return CLIPModel(cfg).eval()


def test_text_tower_is_causal_and_vision_tower_is_not():
    model = tiny_clip()
    ids = torch.randint(0, 49, (2, 10), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 7) % 49  # change every token from position 6 on
    with torch.no_grad():
        a, b = model.text.hidden_states(ids), model.text.hidden_states(later)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)  # earlier positions never see later tokens
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3
    pixels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    changed = pixels.clone()
    changed[:, :, 6:, 6:] += 1.0  # the last patch only
    with torch.no_grad():
        a, b = model.vision.hidden_states(pixels), model.vision.hidden_states(changed)
    assert (a[:, :-1] - b[:, :-1]).abs().amax(dim=-1).min() > 1e-4  # every other position (and CLS) sees it


def test_padding_does_not_change_the_text_features():
    model = tiny_clip()
    ids = torch.tensor([[48, 5, 7, 9, 49]])
    padded = torch.tensor([[48, 5, 7, 9, 49, 49, 49, 49]])
    with torch.no_grad():
        plain = model.encode_text(ids)
        torch.testing.assert_close(model.encode_text(padded, torch.tensor([[1] * 5 + [0] * 3])), plain,
                                   atol=1e-6, rtol=0)


def test_temperature_is_clipped_at_100():
    model = tiny_clip(logit_scale_init=math.log(1 / 0.07))
    assert float(model.temperature().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    assert float(model.temperature().detach()) == pytest.approx(100.0, rel=1e-5)


def test_config_and_weights_round_trip_through_a_model_directory(tmp_path):
    model = tiny_clip()
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert isinstance(again, CLIPModel) and again.cfg == model.cfg
    assert again.cfg.to_dict() == model.cfg.to_dict()
    theirs = again.state_dict()
    assert all(torch.equal(t, theirs[name]) for name, t in model.state_dict().items())
    ids, pixels = torch.tensor([[48, 3, 4, 49]]), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixels)[0], model(ids, pixels)[0], atol=1e-5, rtol=0)


def test_presets_and_overrides():
    cfg = config_from_preset("clip-digits")
    assert (cfg.vision.image_size, cfg.vision.num_channels, cfg.text.vocab_size) == (8, 1, 49408)
    assert cfg.vision.context_length == cfg.vision.num_patches + 1
    assert cfg.logit_scale_init == pytest.approx(math.log(1 / 0.07))
    over = CLIPConfig.from_preset("clip-digits", n_layers=3, context_length=20, text={"d_model": 32})
    assert (over.text.n_layers, over.vision.n_layers, over.text.context_length, over.text.d_model,
            over.vision.d_model) == (3, 3, 20, 32, 64)


@pytest.mark.parametrize("bad, match", [
    ({"text": {"position": "rope"}}, "learned"),
    ({"vision": {"image_size": 10, "patch_size": 4}}, "multiple"),
    ({"colour": 1}, "unknown clip keys"),
    ({"vision": {"sliding_window": 4}}, "not a CLIP tower setting"),
    ({"text": {"n_heads": 5}}, "divisible"),
])
def test_bad_configs_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        CLIPConfig.from_dict(bad)


def test_bad_inputs_are_user_errors():
    model = tiny_clip()
    with pytest.raises(UserError, match="images of shape"):
        model.encode_image(torch.randn(2, 3, 8, 8))
    with pytest.raises(UserError, match="longer than"):
        model.encode_text(torch.zeros(1, 13, dtype=torch.long))


def test_zero_shot_probabilities_equal_transformers(shared_data, tmp_path):
    """The real CLIP tokenizer on both sides: llmkit's zero_shot equals the softmax of transformers'
    logits_per_image for the same captions (a random model with CLIP's vocabulary)."""
    from llmkit.interop.hf import load_hf
    from llmkit.tokenizers.clip import clip_tokenizer, write_vocab_files

    merges = shared_data / "tokenizers" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    ref, directory = tiny_hf_clip(tmp_path / "model", seed=5, vocab_size=49408, bos_token_id=49406,
                                  eos_token_id=49407, pad_token_id=49407)
    ours, tok = load_hf(directory), clip_tokenizer(merges)
    vocab, merge_file = write_vocab_files(tmp_path, merges)
    ref_tok = transformers.CLIPTokenizer(vocab=str(vocab), merges=str(merge_file))
    labels = ["cat", "dog", "a very long name of a bird"]
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    probs = zero_shot(ours, tok, pixels, labels, template="a photo of a {}.")
    inputs = ref_tok([f"a photo of a {x}." for x in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**inputs, pixel_values=pixels).logits_per_image.softmax(-1)
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, want, atol=TOL, rtol=0)
    ids, mask = encode_captions(tok, ["one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen"], ours.cfg.text.context_length)
    assert ids.shape[1] == 16 and ids[0, -1] == tok.eos_id  # cut to the positions, the end of text kept


def test_pixels_are_normalised_as_clips_image_processor(tmp_path):
    """Without preprocessor_config.json the reader takes CLIPImageProcessor's defaults (OpenAI's RGB
    statistics); with one, its image_mean / image_std. normalize_pixels then equals the processor's
    output on an image at the model's size (no resize, no crop)."""
    import numpy as np

    from llmkit.interop.hf import load_hf
    from llmkit.models.clip import OPENAI_CLIP_MEAN, normalize_pixels

    _, directory = tiny_hf_clip(tmp_path)
    assert load_hf(directory).cfg.vision.image_mean == list(OPENAI_CLIP_MEAN)
    processor = transformers.CLIPImageProcessorPil(do_resize=False, do_center_crop=False,
                                                   image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7])
    processor.save_pretrained(directory)
    vision = load_hf(directory).cfg.vision
    assert (vision.image_mean, vision.image_std) == ([0.2, 0.3, 0.4], [0.5, 0.6, 0.7])
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    want = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = normalize_pixels(vision, torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)


def test_export_loads_in_transformers_with_equal_logits_and_reads_back(tmp_path):
    from llmkit.interop.clip_tables import export_hf_dir
    from llmkit.interop.hf import load_hf

    torch.manual_seed(0)
    model = CLIPModel(config_from_preset("clip-digits", projection_dim=24)).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or missing tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    export_hf_dir(model, None, tmp_path)
    ref = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 518, 27472, 278, 269, 49407, 49407],
                        [49406, 320, 12, 269, 49407, 49407, 49407, 49407, 49407, 49407]])
    mask = (torch.arange(10) < torch.tensor([[9], [5]])).long()
    pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image
        torch.testing.assert_close(model(ids, pixels, mask)[0], want, atol=TOL, rtol=0)
    back = load_hf(tmp_path)
    assert back.cfg == model.cfg
    theirs = back.state_dict()
    assert all(torch.equal(t, theirs[name]) for name, t in model.state_dict().items())


def test_export_refuses_what_transformers_clip_cannot_run(tmp_path):
    from llmkit.interop.clip_tables import export_hf_dir

    model = tiny_clip(text={"vocab_size": 50, "context_length": 12, "n_layers": 1, "d_model": 32, "n_heads": 4,
                            "eos_token_id": 49, "qk_norm": "head"})
    with pytest.raises(UserError, match="qk_norm"):
        export_hf_dir(model, None, tmp_path)


@pytest.mark.parametrize("shape", [(32, 96, 3), (64, 64, 3), (50, 70, 3)])
def test_images_for_zero_shot_are_resized_and_cropped_as_clips_image_processor(tmp_path, shape):
    """`read_image(crop=True)` (what `llmkit classify` feeds CLIP): shortest edge to the size, bicubic,
    then the centre crop, equal to CLIPImageProcessor's pixels before normalisation."""
    import numpy as np
    from PIL import Image

    from llmkit.data.images import read_image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "x.png")
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_normalize=False)
    want = processor(Image.open(tmp_path / "x.png"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(torch.from_numpy(read_image(tmp_path / "x.png", 3, 16, crop=True)), want,
                               atol=1e-6, rtol=0)
