"""Hugging Face BERT, RoBERTa and DistilBERT directories in (and BERT out) as llmkit `Encoder`s,
including the sentence-transformers layout (modules.json, 1_Pooling/config.json, a Normalize
module, sentence_bert_config.json), as all-MiniLM-L6-v2 ships.

A conversion is a name-mapping table per model type: llmkit tensor name (with `{i}` for the layer
and `{p}` for weight/bias) -> the Hugging Face tensor(s) it is made of; three HF tensors (query,
key, value) are concatenated into `Attention`'s fused qkv. The body's HF names sit under the
model's prefix (`bert.`, `roberta.`, `distilbert.`) where a head model stored them, bare in a
`BertModel` directory; the heads have their own small tables. The head is what config.json's
`architectures` names, the same class transformers' `AutoModel...from_pretrained` builds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.interop.dtypes import check_runnable, parse_dtype
from llmkit.interop.hf import _skipping_init, assign_state, gather, open_checkpoint, write_hf_dir
from llmkit.models.encoder import Encoder, EncoderConfig
from llmkit.models.kinds import build_model
from llmkit.utils import atomic_write_text

Names = tuple[str, ...]

# --- the tables ----------------------------------------------------------------------------------
_BERT_BODY: dict[str, Names] = {
    "tok_emb.weight": ("embeddings.word_embeddings.weight",),
    "pos.weight": ("embeddings.position_embeddings.weight",),
    "type_emb.weight": ("embeddings.token_type_embeddings.weight",),
    "emb_norm.{p}": ("embeddings.LayerNorm.{p}",),
    "blocks.{i}.attn.qkv.{p}": ("encoder.layer.{i}.attention.self.query.{p}", "encoder.layer.{i}.attention.self.key.{p}",
                                "encoder.layer.{i}.attention.self.value.{p}"),
    "blocks.{i}.attn.proj.{p}": ("encoder.layer.{i}.attention.output.dense.{p}",),
    "blocks.{i}.norm1.{p}": ("encoder.layer.{i}.attention.output.LayerNorm.{p}",),
    "blocks.{i}.mlp.up.{p}": ("encoder.layer.{i}.intermediate.dense.{p}",),
    "blocks.{i}.mlp.down.{p}": ("encoder.layer.{i}.output.dense.{p}",),
    "blocks.{i}.norm2.{p}": ("encoder.layer.{i}.output.LayerNorm.{p}",),
    "pooler.{p}": ("pooler.dense.{p}",),  # BertModel / RobertaModel's pooler (inside the body)
}
_DISTILBERT_BODY: dict[str, Names] = {
    "tok_emb.weight": ("embeddings.word_embeddings.weight",),
    "pos.weight": ("embeddings.position_embeddings.weight",),
    "emb_norm.{p}": ("embeddings.LayerNorm.{p}",),
    "blocks.{i}.attn.qkv.{p}": ("transformer.layer.{i}.attention.q_lin.{p}", "transformer.layer.{i}.attention.k_lin.{p}",
                                "transformer.layer.{i}.attention.v_lin.{p}"),
    "blocks.{i}.attn.proj.{p}": ("transformer.layer.{i}.attention.out_lin.{p}",),
    "blocks.{i}.norm1.{p}": ("transformer.layer.{i}.sa_layer_norm.{p}",),
    "blocks.{i}.mlp.up.{p}": ("transformer.layer.{i}.ffn.lin1.{p}",),
    "blocks.{i}.mlp.down.{p}": ("transformer.layer.{i}.ffn.lin2.{p}",),
    "blocks.{i}.norm2.{p}": ("transformer.layer.{i}.output_layer_norm.{p}",),
}
# Heads, by full HF name (outside the body's prefix). A pooler a head owns maps onto llmkit's pooler.
_MLM = {
    "bert": {"head.dense.{p}": ("cls.predictions.transform.dense.{p}",),
             "head.norm.{p}": ("cls.predictions.transform.LayerNorm.{p}",),
             "head.decoder.weight": ("cls.predictions.decoder.weight",), "head.decoder.bias": ("cls.predictions.bias",)},
    "roberta": {"head.dense.{p}": ("lm_head.dense.{p}",), "head.norm.{p}": ("lm_head.layer_norm.{p}",),
                "head.decoder.weight": ("lm_head.decoder.weight",), "head.decoder.bias": ("lm_head.bias",)},
    "distilbert": {"head.dense.{p}": ("vocab_transform.{p}",), "head.norm.{p}": ("vocab_layer_norm.{p}",),
                   "head.decoder.weight": ("vocab_projector.weight",), "head.decoder.bias": ("vocab_projector.bias",)},
}
_SEQUENCE = {
    "bert": {"head.{p}": ("classifier.{p}",)},  # the pooler is the body's
    "roberta": {"pooler.{p}": ("classifier.dense.{p}",), "head.{p}": ("classifier.out_proj.{p}",)},
    "distilbert": {"pooler.{p}": ("pre_classifier.{p}",), "head.{p}": ("classifier.{p}",)},
}
_TOKEN = {t: {"head.{p}": ("classifier.{p}",)} for t in ("bert", "roberta", "distilbert")}
_NSP = {"bert": {"nsp_head.{p}": ("cls.seq_relationship.{p}",)}}
# Old checkpoints also store buffers transformers rebuilds (position ids): never weights.
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")

PREFIX = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert"}
BODY = {"bert": _BERT_BODY, "roberta": _BERT_BODY, "distilbert": _DISTILBERT_BODY}
# architectures[0] without the model-type prefix -> (head, next-sentence head)
_ARCHITECTURES = {"Model": ("none", False), "ForMaskedLM": ("masked-lm", False),
                  "ForPreTraining": ("masked-lm", True), "ForSequenceClassification": ("sequence-classification", False),
                  "ForTokenClassification": ("token-classification", False)}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
_REQUIRED = (("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim"),
             ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _head_of(config: dict[str, Any]) -> tuple[str, bool]:
    model_type = config["model_type"]
    archs = config.get("architectures") or [f"{_CLASS_PREFIX[model_type]}Model"]
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    suffix = arch[len(_CLASS_PREFIX[model_type]):] if arch.startswith(_CLASS_PREFIX[model_type]) else None
    if suffix not in _ARCHITECTURES or (suffix == "ForPreTraining" and model_type != "bert"):
        known = ", ".join(_CLASS_PREFIX[model_type] + s for s in _ARCHITECTURES
                          if s != "ForPreTraining" or model_type == "bert")
        raise UserError(f"config.json names architecture {arch!r}: llmkit reads {known}; set \"architectures\" "
                        f"to one of these (e.g. {_CLASS_PREFIX[model_type]}Model for the hidden states)")
    return _ARCHITECTURES[suffix]


def head_table(model_type: str, head: str, nsp: bool) -> dict[str, Names]:
    table = {"masked-lm": _MLM, "sequence-classification": _SEQUENCE, "token-classification": _TOKEN}.get(head)
    out = dict(table[model_type]) if table is not None else {}
    if nsp:
        out.update(_NSP[model_type])
    return out


def _num_labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    n = config.get("num_labels", 2)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 2


def _labels(config: dict[str, Any]) -> dict[str, Any]:
    """id2label (unless it is transformers' LABEL_i default) and problem_type of a classifier's config."""
    out: dict[str, Any] = {}
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label and any(v != f"LABEL_{k}" for k, v in id2label.items()):
        out["id2label"] = {str(k): v for k, v in id2label.items()}
    if config.get("problem_type") is not None:
        out["problem_type"] = config["problem_type"]
    return out


def _get(config: dict[str, Any], key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def config_from_hf_dict(config: dict[str, Any]) -> EncoderConfig:
    """The EncoderConfig of a BERT / RoBERTa / DistilBERT config.json (its head from
    `architectures`). Settings llmkit does not implement are refused in one line."""
    model_type = config.get("model_type")
    if model_type not in BODY:
        raise UserError(f"model_type {model_type!r} is not an encoder llmkit reads (bert, roberta, distilbert)")
    head, nsp = _head_of(config)
    required = _REQUIRED[model_type != "distilbert"]
    missing = [key for key in required if key not in config]
    if missing:
        raise UserError(f"config.json of this {model_type} model lacks {', '.join(missing)}: it is incomplete; "
                        "download it again")
    if model_type == "distilbert":
        act = _get(config, "activation", "gelu")
        fields = dict(vocab_size=config.get("vocab_size"), d_model=config.get("dim"), n_layers=config.get("n_layers"),
                      n_heads=config.get("n_heads"), d_ff=config.get("hidden_dim"),
                      context_length=_get(config, "max_position_embeddings", 512), norm_eps=1e-12,
                      dropout=float(_get(config, "dropout", 0.1)), type_vocab_size=0,
                      pad_token_id=_get(config, "pad_token_id", 0), pooler_act="relu",
                      pooler=head == "sequence-classification",
                      classifier_dropout=float(_get(config, "seq_classif_dropout", 0.2)))
    else:
        act = _get(config, "hidden_act", "gelu")
        if _get(config, "position_embedding_type", "absolute") != "absolute":
            raise UserError(f"config.json has position_embedding_type {config['position_embedding_type']!r}: llmkit "
                            "reads absolute position embeddings only")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise UserError("config.json makes this BERT a decoder (is_decoder / add_cross_attention): llmkit reads "
                            "BERT-family encoders only")
        pad = _get(config, "pad_token_id", 1 if model_type == "roberta" else 0)
        classifier_dropout = config.get("classifier_dropout")
        fields = dict(vocab_size=config.get("vocab_size"), d_model=config.get("hidden_size"),
                      n_layers=config.get("num_hidden_layers"), n_heads=config.get("num_attention_heads"),
                      d_ff=config.get("intermediate_size"), context_length=_get(config, "max_position_embeddings", 512),
                      norm_eps=float(_get(config, "layer_norm_eps", 1e-12)),
                      dropout=float(_get(config, "hidden_dropout_prob", 0.1)),
                      type_vocab_size=_get(config, "type_vocab_size", 2), pad_token_id=pad,
                      position_offset=pad + 1 if model_type == "roberta" else 0,
                      pooler=head in ("none", "sequence-classification") or nsp,
                      classifier_dropout=None if classifier_dropout is None else float(classifier_dropout))
    if act not in _ACTIVATIONS:
        raise UserError(f"config.json sets activation {act!r}: llmkit's encoders take {', '.join(_ACTIVATIONS)}")
    return EncoderConfig(mlp=_ACTIVATIONS[act], block="post_norm", norm="layernorm", position="learned", bias=True,
                         embedding_norm=True, tie_embeddings=bool(_get(config, "tie_word_embeddings", True)),
                         init_std=float(_get(config, "initializer_range", 0.02)), head=head, nsp=nsp,
                         num_labels=_num_labels(config), **_labels(config), **fields)


# --- sentence-transformers ---------------------------------------------------------------------
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def sentence_settings(directory: Path) -> dict[str, Any]:
    """`pooling`, `normalize` and `max_seq_length` from a sentence-transformers folder ({} when the
    folder is a plain transformers one). Modules llmkit does not run (Dense, ...) are refused."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = [(str(m["type"]).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{modules_file} is not a sentence-transformers module list ({e}): restore the file") from None
    other = [k for k, _ in kinds if k not in _ST_MODULES]
    if other:
        raise UserError(f"{modules_file} has module(s) {', '.join(other)}: llmkit runs Transformer, Pooling and "
                        "Normalize only; use sentence-transformers for this model")
    out: dict[str, Any] = {"normalize": any(k == "Normalize" for k, _ in kinds)}
    for kind, path in kinds:
        if kind == "Pooling":
            pooling_file = directory / path / "config.json"
            try:
                pooling = json.loads(pooling_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the pooling settings {pooling_file}: {e}: restore the file") from None
            on = [key for key, value in pooling.items() if key.startswith("pooling_mode") and value is True]
            if len(on) != 1 or on[0] not in _POOLING_MODES:
                raise UserError(f"{pooling_file} asks for pooling {on}: llmkit pools one of "
                                f"{', '.join(_POOLING_MODES)} (exactly one)")
            out["pooling"] = _POOLING_MODES[on[0]]
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            length = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (ValueError, AttributeError) as e:
            raise UserError(f"{st_config} is not valid JSON ({e}): restore the file") from None
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            out["max_seq_length"] = length
    return out


# --- applying a table --------------------------------------------------------------------------

def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$")


def _hf_names(table: dict[str, Names], name: str) -> Names | None:
    """The HF names llmkit tensor `name` is made of, from `table`; None when no entry matches."""
    for template, hf in table.items():
        m = _pattern(template).match(name)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            return tuple(h.format(**groups) for h in hf)
    return None


def _body_prefix(names: set[str], model_type: str) -> str:
    """'bert.' (etc.) where the checkpoint stores the body under the head model's prefix, '' where bare."""
    prefix = PREFIX[model_type] + "."
    return prefix if any(n.startswith(prefix) for n in names) else ""


def _known_unused(name: str, model_type: str, n_layers: int) -> bool:
    """A tensor some other head of this family has (an MLM checkpoint's pooler and NSP head, which
    transformers also leaves unused), or a rebuilt buffer: safe to skip. A layer past n_layers is not."""
    if _IGNORED.search(name):
        return True
    tables = [BODY[model_type], _MLM[model_type], _SEQUENCE[model_type], _TOKEN[model_type], _NSP.get(model_type, {})]
    prefix = PREFIX[model_type] + "."
    for table in tables:
        for hf in table.values():
            for template in hf:
                for candidate in (name, name.removeprefix(prefix)):
                    m = _pattern(template).match(candidate)
                    if m and (m.groupdict().get("i") is None or int(m["i"]) < n_layers):
                        return True
    return False


def _read_weights(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight of the files transformers would read (memory-mapped, by stored name), less the
    integer buffers old checkpoints carry (`embeddings.position_ids`, I64), which
    `llmkit.interop.hf.read_tensors` would refuse as a quantized tensor."""
    with open_checkpoint(directory, None, config) as ckpt:
        return {name: ckpt.get(name) for name in sorted(ckpt.names()) if not _IGNORED.search(name)}


def load_hf_dir(directory: Path, config: dict[str, Any], device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> Encoder:
    """An `Encoder` with the weights of a BERT / RoBERTa / DistilBERT (or sentence-transformers)
    directory, in eval mode, in the stored dtype unless `dtype` asks for another."""
    cfg = config_from_hf_dict(config)
    settings = sentence_settings(directory)
    wanted = parse_dtype(dtype)
    stored = _read_weights(directory, config)
    if settings.get("max_seq_length") is not None and settings["max_seq_length"] > cfg.max_positions:
        settings["max_seq_length"] = cfg.max_positions
    model_type = config["model_type"]
    prefix = _body_prefix(set(stored), model_type)
    if cfg.pooler and cfg.head == "none" and prefix + "pooler.dense.weight" not in stored:
        settings["pooler"] = False  # a BertModel saved without its pooler: nothing reads one
    cfg = EncoderConfig.from_dict({**cfg.to_dict(), **settings})
    with _skipping_init():
        model = build_model(cfg)
    body, heads = BODY[model_type], head_table(model_type, cfg.head, cfg.nsp)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    target = wanted or next((t.dtype for t in stored.values() if t.is_floating_point()), torch.float32)
    check_runnable(target, device)
    for name in model.state_dict():
        hf = _hf_names(heads, name)
        if hf is None:
            hf = _hf_names(body, name)
            hf = None if hf is None else tuple(prefix + h for h in hf)
        if hf is None:
            raise RuntimeError(f"no conversion rule for llmkit tensor {name}")  # a gap in the table: our bug
        if name == "head.decoder.weight" and cfg.tie_embeddings and not all(h in stored for h in hf):
            continue  # tied to the embeddings, as transformers ties it
        state[name] = gather(stored, hf, name, directory).to(target)
        used.update(hf)
    extra = sorted(n for n in set(stored) - used if not _known_unused(n, model_type, cfg.n_layers))
    if extra:
        raise UserError(f"{directory} has tensors llmkit would not use ({', '.join(extra[:3])}): config.json does "
                        "not describe these weights; check it belongs to this checkpoint")
    if (cfg.head == "masked-lm" and cfg.tie_embeddings and "head.decoder.weight" in state
            and not torch.equal(state["head.decoder.weight"], state["tok_emb.weight"])):
        cfg.tie_embeddings = False  # a stored decoder that differs is kept, as transformers keeps it
        with _skipping_init():
            model = build_model(cfg)
    if cfg.head == "masked-lm" and cfg.tie_embeddings:
        state.pop("head.decoder.weight", None)
    assign_state(model, state, directory)
    return model.to(device=device, dtype=target).eval()


# --- writing BERT --------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_BERT_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def _check_bert_shape(cfg: EncoderConfig) -> None:
    """UserError unless a transformers BERT has this shape (what the writer can express)."""
    wrong = [(name, value) for name, value, ok in (
        ("block", cfg.block, cfg.block == "post_norm"), ("norm", cfg.norm, cfg.norm == "layernorm"),
        ("position", cfg.position, cfg.position == "learned"), ("mlp", cfg.mlp, cfg.mlp in _BERT_ACTS),
        ("bias", cfg.bias, cfg.bias and cfg.qkv_bias), ("embedding_norm", cfg.embedding_norm, cfg.embedding_norm),
        ("n_kv_heads", cfg.n_kv_heads, cfg.n_kv_heads == cfg.n_heads),
        ("head_dim", cfg.head_dim, cfg.head_dim * cfg.n_heads == cfg.d_model),
        ("position_offset", cfg.position_offset, cfg.position_offset == 0),
        ("type_vocab_size", cfg.type_vocab_size, cfg.type_vocab_size >= 1),
        ("pooler_act", cfg.pooler_act, cfg.pooler_act == "tanh"),
        ("pooler", cfg.pooler, cfg.pooler or cfg.head != "sequence-classification"),
        ("qk_norm", cfg.qk_norm, cfg.qk_norm is None), ("attn_scale", cfg.attn_scale, cfg.attn_scale is None),
        ("attn_softcap", cfg.attn_softcap, cfg.attn_softcap is None), ("attn_gate", cfg.attn_gate, not cfg.attn_gate),
        ("embedding_scale", cfg.embedding_scale, cfg.embedding_scale is None), ("moe", cfg.moe, cfg.moe is None),
        ("rope_scaling", cfg.rope_scaling, cfg.rope_scaling is None)) if not ok]
    if wrong:
        name, value = wrong[0]
        raise UserError(f"Hugging Face BERT has no encoder with {name}={value!r}: save it as an llmkit directory "
                        "instead (--to llmkit)")


def export_hf_dir(model: Encoder, tokenizer=None, out_dir: str | Path = ".", dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` as a transformers BERT directory (config.json + model.safetensors, and the
    tokenizer): `Bert{Model, ForMaskedLM, ForPreTraining, ForSequenceClassification,
    ForTokenClassification}.from_pretrained` reads it with the same outputs."""
    cfg = model.cfg
    _check_bert_shape(cfg)
    wanted = parse_dtype(dtype)
    arch = {("none", False): "BertModel", ("masked-lm", False): "BertForMaskedLM", ("masked-lm", True): "BertForPreTraining",
            ("sequence-classification", False): "BertForSequenceClassification",
            ("token-classification", False): "BertForTokenClassification"}.get((cfg.head, cfg.nsp))
    if arch is None:
        raise UserError(f"Hugging Face BERT has no {cfg.head} model with a next-sentence head: save it as an llmkit "
                        "directory instead (--to llmkit)")
    prefix = "" if arch == "BertModel" else "bert."
    tables = [(_BERT_BODY, prefix), (head_table("bert", cfg.head, cfg.nsp), "")]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "head.decoder.weight" and cfg.tie_embeddings:
            continue
        for table, pre in reversed(tables):  # heads first: their pooler entries outrank the body's
            hf = _hf_names(table, name)
            if hf is not None:
                break
        parts = t.detach().chunk(len(hf), dim=0)
        for h, part in zip(hf, parts):
            part = part if wanted is None else part.to(wanted)
            tensors[pre + h] = part.contiguous().clone()
    stored = wanted or model.tok_emb.weight.dtype
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
        "hidden_act": _BERT_ACTS[cfg.mlp], "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.context_length, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute", "classifier_dropout": cfg.classifier_dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "dtype": _DTYPE_NAMES.get(stored, "float32"),
    }
    if cfg.head in ("sequence-classification", "token-classification"):
        names = cfg.labels()
        config["id2label"] = {str(k): name for k, name in enumerate(names)}
        config["label2id"] = {name: k for k, name in enumerate(names)}
        if cfg.problem_type is not None:
            config["problem_type"] = cfg.problem_type
    out = write_hf_dir(out_dir, config, tensors, tokenizer)
    if cfg.head == "none":
        write_sentence_settings(cfg, out)
    return out


def write_sentence_settings(cfg: EncoderConfig, out: Path) -> None:
    """The sentence-transformers files that say how `cfg` pools (modules.json, 1_Pooling/config.json,
    sentence_bert_config.json), so sentence-transformers and llmkit embed the export alike."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "1_Pooling").mkdir(exist_ok=True)
    modes = {key: cfg.pooling == mode for key, mode in _POOLING_MODES.items()}
    atomic_write_text(out / "1_Pooling" / "config.json",
                      json.dumps({"word_embedding_dimension": cfg.d_model, **modes}, indent=2) + "\n")
    if cfg.max_seq_length is not None:
        atomic_write_text(out / "sentence_bert_config.json",
                          json.dumps({"max_seq_length": cfg.max_seq_length, "do_lower_case": False}) + "\n")
    atomic_write_text(out / "modules.json", json.dumps(modules, indent=2) + "\n")


__all__ = ["config_from_hf_dict", "export_hf_dir", "head_table", "load_hf_dir", "sentence_settings"]
