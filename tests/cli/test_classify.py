"""`llmkit classify`: a ViT directory classifies PNG files written here (the printed probabilities
are the model's own on the same pixels), bad input is one line with exit 2, and another kind's
classifier plugs in through `CLASSIFIERS`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.cli import classify as verb
from llmkit.config import ModelConfig
from llmkit.data.images import normalize, read_image
from llmkit.model_io import save_model
from llmkit.models import DecoderLM
from llmkit.models.kinds import MODEL_KINDS, ModelKind
from llmkit.models.vit import ViT, ViTConfig

from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = {"0": "zero", "1": "one", "2": "two", "3": "three"}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=4, d_model=32, n_layers=2, n_heads=4,
                    id2label=LABELS, image_mean=[0.3], image_std=[0.4], init_std=0.5)  # a wide init: varied outputs
    return save_model(ViT(cfg), tmp_path_factory.mktemp("vit"))


def write_png(path: Path, seed: int, size: int = 8, mode: str = "L") -> Path:
    from PIL import Image

    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def printed(out: str) -> dict[str, list[tuple[float, str]]]:
    result, name = {}, None
    for line in out.splitlines():
        if not line.startswith("  "):
            name = line.rstrip(":")
            result[name] = []
        else:
            p, label = line.strip().split(maxsplit=1)  # a label may hold spaces (CLIP's captions)
            result[name].append((float(p), label))
    return result


def test_classify_prints_the_models_top_labels_for_each_png(vit_dir, tmp_path, capsys):
    a, b = write_png(tmp_path / "a.png", 0), write_png(tmp_path / "b.png", 1, size=16, mode="RGB")  # resized, greyed
    code, out, err = run_cli(capsys, "classify", str(vit_dir), "--image", str(a), "--image", str(b), "--top-k", "3")
    assert code == 0, err
    shown = printed(out)
    assert list(shown) == [str(a), str(b)]
    from llmkit.api import load_model_any

    model = load_model_any(vit_dir)
    pixels = torch.from_numpy(np.stack([read_image(a, 1, 8), read_image(b, 1, 8)]))
    with torch.no_grad():
        probs = model(normalize(pixels, [0.3], [0.4])).softmax(-1)
    for row, (name, top) in zip(probs, shown.items()):
        assert len(top) == 3
        want = row.topk(3)
        assert [label for _, label in top] == [LABELS[str(i)] for i in want.indices.tolist()]
        assert [p for p, _ in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert shown[str(a)] != shown[str(b)]


def test_missing_image_is_one_line(vit_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "classify", str(vit_dir), "--image", str(tmp_path / "nope.png"))
    assert_one_line_error(code, err, "image not found")


def test_a_file_that_is_not_an_image_is_one_line(vit_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    code, _, err = run_cli(capsys, "classify", str(vit_dir), "--image", str(bad))
    assert_one_line_error(code, err, "cannot read image")


def test_a_decoder_does_not_classify(tmp_path, capsys):
    decoder = save_model(DecoderLM(ModelConfig.from_preset("tiny")), tmp_path / "decoder")
    png = write_png(tmp_path / "a.png", 0)
    code, _, err = run_cli(capsys, "classify", str(decoder), "--image", str(png))
    assert_one_line_error(code, err, "'decoder' model, which does not classify")


def test_text_and_labels_are_refused_for_a_vit(vit_dir, capsys):
    code, _, err = run_cli(capsys, "classify", str(vit_dir), "--text", "hello")
    assert_one_line_error(code, err, "drop --text")
    code, _, err = run_cli(capsys, "classify", str(vit_dir))
    assert_one_line_error(code, err, "nothing to classify")


def test_another_kind_plugs_in_through_classifiers(vit_dir, monkeypatch, capsys):
    """A kind registered with its own classifier (as text classification and CLIP zero-shot will be)
    is served by the verb unchanged: here a 'toy' kind scoring each --text by its length."""
    class Toy(ViT):
        pass

    monkeypatch.setitem(MODEL_KINDS, "toy", ModelKind("toy", type("ToyConfig", (ViTConfig,), {}), Toy))

    def by_length(req: verb.Request) -> verb.Scores:
        lengths = torch.tensor([[len(t), 10.0 - len(t)] for t in req.texts])
        return verb.Scores(list(req.texts), ["long", "short"], lengths.softmax(-1))

    monkeypatch.setitem(verb.CLASSIFIERS, "toy", by_length)
    monkeypatch.setattr("llmkit.models.kinds.kind_of_model", lambda m: MODEL_KINDS["toy"])
    code, out, err = run_cli(capsys, "classify", str(vit_dir), "--text", "a long sentence", "--text", "hi",
                             "--top-k", "1")
    assert code == 0, err
    assert printed(out) == {"a long sentence": [(pytest.approx(1.0, abs=1e-3), "long")],
                            "hi": [(pytest.approx(1.0, abs=1e-2), "short")]}


def test_clip_classifies_pngs_zero_shot_against_the_given_captions(shared_data, tmp_path, capsys):
    """A CLIP directory with the real CLIP tokenizer: the printed probabilities are zero_shot's own."""
    from llmkit.api import load
    from llmkit.models.clip import CLIPConfig, CLIPModel, normalize_pixels, zero_shot
    from llmkit.tokenizers.clip import clip_tokenizer

    tok = clip_tokenizer(shared_data / "tokenizers" / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    torch.manual_seed(0)
    cfg = CLIPConfig.from_dict({"text": dict(vocab_size=tok.vocab_size, context_length=16, n_layers=1, d_model=32,
                                             n_heads=4, eos_token_id=tok.eos_id),
                                "vision": dict(image_size=8, patch_size=2, num_channels=1, n_layers=1, d_model=32,
                                               n_heads=4), "projection_dim": 16})
    directory = save_model(CLIPModel(cfg).eval(), tmp_path / "clip", tok)
    images = [write_png(tmp_path / f"{i}.png", i) for i in range(2)]
    captions = ["a photo of the digit 1", "a photo of the digit 7", "a cat"]
    code, out, err = run_cli(capsys, "classify", str(directory), *sum((["--image", str(p)] for p in images), []),
                             "--labels", ",".join(captions), "--top-k", "3")
    assert code == 0, err
    lm = load(directory)
    pixels = torch.from_numpy(np.stack([read_image(p, 1, 8) for p in images]))
    want = zero_shot(lm.model, lm.tokenizer, normalize_pixels(cfg.vision, pixels), captions, template="{}")
    for (name, shown), row in zip(printed(out).items(), want):
        assert {label: p for p, label in shown} == pytest.approx({c: float(q) for c, q in zip(captions, row)}, abs=1e-4)
    code, _, err = run_cli(capsys, "classify", str(directory), "--image", str(images[0]))
    assert code == 2 and "--labels" in err


def test_an_encoder_with_a_classification_head_classifies_texts(tmp_path, capsys):
    """A BERT sequence classifier saved by transformers: the printed probabilities equal transformers'
    softmax for the same tokenized text."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from llmkit.tokenizers.hf import HFTokenizer

    words = ["the", "film", "was", "great", "awful", "."]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(0)
    names = {0: "negative", 1: "neutral", 2: "positive"}
    ref = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, id2label=names, label2id={v: k for k, v in names.items()})).eval()
    ref.save_pretrained(tmp_path / "bert")
    HFTokenizer(backend).save(tmp_path / "bert")
    texts = ["The film was great.", "awful"]
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "bert"), "--text", texts[0], "--text", texts[1])
    assert code == 0, err
    shown = printed(out)
    for text, row in zip(texts, shown.values()):
        ids = torch.tensor([backend.encode(text).ids])
        with torch.no_grad():
            want = ref(ids).logits.softmax(-1)[0]
        assert {label: p for p, label in row} == pytest.approx({names[i]: float(q) for i, q in enumerate(want)},
                                                               abs=1e-4)
    code, _, err = run_cli(capsys, "classify", str(tmp_path / "bert"), "--image", str(write_png(tmp_path / "x.png", 0)))
    assert code == 2 and "--text" in err


def test_a_one_label_text_classifier_prints_the_sigmoid_of_its_score(tmp_path, capsys):
    """num_labels 1 (a cross-encoder's relevance score): the sigmoid, as transformers' pipeline gives."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmkit.tokenizers.hf import HFTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "good", "bad"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=1)).eval()
    ref.save_pretrained(tmp_path / "ce")
    HFTokenizer(backend).save(tmp_path / "ce")
    code, out, err = run_cli(capsys, "classify", str(tmp_path / "ce"), "--text", "good bad")
    assert code == 0, err
    with torch.no_grad():
        want = ref(torch.tensor([backend.encode("good bad").ids])).logits.sigmoid()[0, 0]
    [(p, label)] = printed(out)["good bad"]
    assert label == "LABEL_0" and p == pytest.approx(float(want), abs=1e-4) and p != pytest.approx(1.0)
