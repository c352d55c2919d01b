"""Sequence classification: fine-tune a pretrained model to give each text (or text pair) one
label, with cross entropy on a classification head.

The model (`init_from`, required): a decoder gets `DecoderForSequenceClassification` (a score
layer on the last real token's or the mean final state, `pooling`; Radford et al. 2018, GPT-1);
an encoder its own sequence-classification head (pooled [CLS], Devlin et al. 2019, BERT) with
`num_labels` / `id2label` in its config. The tokenizer is the pretrained model's.

Data (`--data`): a file, or a folder of files, of JSONL / JSON / CSV / TSV (or headerless
`text<TAB>label` .txt lines, as the UCI sentiment sentences); the fields `text_column`,
`label_column` and, for sentence pairs, `text_pair_column` (a headerless file holds text, [pair,]
label in that order). README / SOURCE / LICENSE files are skipped. A folder whose files are named
train / dev (val, validation) / test uses those splits (a test file without labels, as GLUE's, is
left out: dev is then the test set); other data is pooled and `val_fraction` of each class held
out (by seed). The held-out set is the validation data and, without a labelled test file, also
the test set of `final_evaluation` (accuracy, macro F1, a report, `confusion.png` in the run).
Labels are mapped to ids in sorted order (numbers numerically) and saved as `id2label`
(`labels.json` in the run directory; the encoder's config too).

Options: `class_weights` balanced (weight of class c = n / (C * n_c), as scikit-learn's
"balanced"; PyTorch's weighted mean: sum_i w_{y_i} nll_i / sum_i w_{y_i}); `balanced_sampling`
(each run of C consecutive training rows holds every class once); `token_dropout` p (each real,
non-special input token of a training row replaced by the unknown (else padding) token with
probability p); `shots` k (train on k examples per class, chosen by the seed; a list is
`llmkit.training.few_shot.few_shot_curve`'s business).

Batches are a pure function of (seed, step, micro-step, rank): global row p of step s is position
s*G + p of an endless sequence of epochs (each a permutation drawn from (seed, epoch)), or of
balanced rounds; a row's token dropout is drawn from (seed, step, p). Resume and data parallelism
see the same rows.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.objectives.task import Task, TaskOptions, register_task

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")
SKIPPED_STEMS = ("readme", "source", "license", "licence")
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "val", "validation", "valid"), "test": ("test",)}
# text fields tried when the default text_column ("text") is missing (GLUE, review data sets)
TEXT_FALLBACKS = ("sentence", "sentence1", "review", "content")
MAX_TOKENS = 512  # a text is cut to this (or --context-length, or the model's positions if fewer)
_BALANCED_STREAM, _DROPOUT_STREAM, _SHOTS_STREAM, _SPLIT_STREAM, _ROUND_STREAM = 11, 12, 13, 14, 15


# --- reading labelled texts ---------------------------------------------------------------------

@dataclass
class Records:
    """Labelled texts as read: text, the second text of a pair (or None) and the label, as strings."""

    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[str] = field(default_factory=list)

    def extend(self, other: "Records") -> None:
        self.texts += other.texts
        self.labels += other.labels
        if other.pairs is not None:
            self.pairs = (self.pairs or []) + other.pairs

    def subset(self, index: Sequence[int]) -> "Records":
        return Records([self.texts[i] for i in index], None if self.pairs is None else [self.pairs[i] for i in index],
                       [self.labels[i] for i in index])

    def __len__(self) -> int:
        return len(self.texts)


def _text_field(fields: Sequence[str], wanted: str, where: str) -> str:
    if wanted in fields:
        return wanted
    if wanted == "text":
        for name in TEXT_FALLBACKS:
            if name in fields:
                return name
    raise UserError(f"{where}: no text field {wanted!r} (fields: {', '.join(map(str, fields))}): pass --text-column")


def _from_rows(rows: list[dict], fields: Sequence[str], path: Path, text_column: str, label_column: str,
               pair_column: str | None, need_labels: bool) -> Records | None:
    """Records of dict rows with these `fields`; None when there is no label field and labels are optional."""
    text = _text_field(fields, text_column, str(path))
    if label_column not in fields:
        if not need_labels:
            return None
        raise UserError(f"{path}: no label field {label_column!r} (fields: {', '.join(map(str, fields))}): "
                        "pass --label-column")
    if pair_column and pair_column not in fields:
        raise UserError(f"{path}: no text-pair field {pair_column!r} (fields: {', '.join(map(str, fields))}): "
                        "pass --text-pair-column or drop it")
    out = Records([], [] if pair_column else None, [])
    for i, row in enumerate(rows, 1):
        t, y = row.get(text), row.get(label_column)
        if not isinstance(t, str) or y is None or isinstance(y, (dict, list)) or str(y).strip() == "":
            raise UserError(f"{path}: record {i} has no text {text!r} or no label {label_column!r}: fix or drop it")
        out.texts.append(t)
        out.labels.append(str(y).strip())
        if pair_column:
            p = row.get(pair_column)
            if not isinstance(p, str):
                raise UserError(f"{path}: record {i} has no text {pair_column!r}: fix or drop it")
            out.pairs.append(p)
    return out


def read_records(path: Path, text_column: str = "text", label_column: str = "label",
                 pair_column: str | None = None, need_labels: bool = True) -> Records | None:
    """The labelled texts of one JSONL / JSON / CSV / TSV / .txt file. A delimited file whose first
    row names the text and label fields has a header; without one its rows are text, [pair,] label.
    TSV and .txt are read without quote handling (a `"` is text). None for a file without labels
    when `need_labels` is False (an unlabelled test split)."""
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: convert it") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if suffix in (".jsonl", ".json"):
        try:
            if suffix == ".json":
                rows = json.loads(raw)
            else:
                rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}): fix the file") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: expected JSON objects (one per line, or a list of them)")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        return _from_rows(rows, fields, path, text_column, label_column, pair_column, need_labels)
    delimiter, quoting = (",", csv.QUOTE_MINIMAL) if suffix == ".csv" else ("\t", csv.QUOTE_NONE)
    lines = [r for r in csv.reader(raw.splitlines(), delimiter=delimiter, quoting=quoting) if any(c.strip() for c in r)]
    if not lines:
        return Records([], [] if pair_column else None, [])
    head = [c.strip() for c in lines[0]]
    texts = {text_column, *TEXT_FALLBACKS} if text_column == "text" else {text_column}
    if texts & set(head) or label_column in head:
        rows = [dict(zip(head, r)) for r in lines[1:]]
        for i, r in enumerate(lines[1:], 2):
            if len(r) != len(head):
                raise UserError(f"{path}:{i}: {len(r)} fields where the header has {len(head)}: fix the line")
        return _from_rows(rows, head, path, text_column, label_column, pair_column, need_labels)
    width = 3 if pair_column else 2
    out = Records([], [] if pair_column else None, [])
    for i, r in enumerate(lines, 1):
        if len(r) != width:
            raise UserError(f"{path}:{i}: {len(r)} fields; a file without a header holds text, "
                            f"{'pair, ' if pair_column else ''}label per line (or give a header naming "
                            f"{text_column!r} and {label_column!r})")
        out.texts.append(r[0])
        if pair_column:
            out.pairs.append(r[1])
        out.labels.append(r[-1].strip())
    return out


def data_files(data: str | Path) -> list[Path]:
    """The data files of a file or folder (sorted; README / SOURCE / LICENSE files skipped)."""
    path = Path(data)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"data not found: {path}: pass a JSONL/CSV/TSV file or a folder of them")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not p.stem.lower().startswith(SKIPPED_STEMS))
    if not files:
        raise UserError(f"{path} holds no {'/'.join(SUFFIXES)} files: pass labelled text files")
    return files


def split_of(path: Path) -> str | None:
    """"train", "dev" or "test" when the file's name says so, else None."""
    stem = path.stem.lower()
    return next((split for split, names in SPLIT_NAMES.items() if stem in names), None)


def stratified_holdout(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: round(fraction * n_c) of each class c held out (at least one when
    fraction > 0 and the class has two or more), drawn by `seed`; both sorted."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    train, held = [], []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        order = rng.permutation(len(members))
        k = int(round(fraction * len(members)))
        if fraction > 0 and len(members) > 1:
            k = min(max(k, 1), len(members) - 1)
        held += [members[j] for j in order[:k]]
        train += [members[j] for j in order[k:]]
    return sorted(train), sorted(held)


def load_splits(cfg: TaskOptions) -> tuple[dict[str, Records], list[str]]:
    """({"train", "val", "test"} -> records (val and test may be empty), notes for the summary)."""
    text, label = cfg.text_column, cfg.label_column
    pair = getattr(cfg, "text_pair_column", None)
    files = data_files(cfg.data)
    named = {p: split_of(p) for p in files}
    notes: list[str] = []
    if any(s == "train" for s in named.values()):
        parts = {s: Records([], [] if pair else None, []) for s in SPLIT_NAMES}
        for p, s in named.items():
            if s is None:
                notes.append(f"{p.name} ignored (not train/dev/test)")
                continue
            recs = read_records(p, text, label, pair, need_labels=s != "test")
            if recs is None:
                notes.append(f"{p.name} has no labels: left out")
                continue
            parts[s].extend(recs)
        val = parts["dev"] if len(parts["dev"]) else parts["test"]
        test = parts["test"] if len(parts["test"]) else parts["dev"]
        if not len(val) and cfg.val_fraction > 0:  # a train file alone: hold out as for pooled data
            tr, held = stratified_holdout(parts["train"].labels, cfg.val_fraction, cfg.seed)
            return {"train": parts["train"].subset(tr), "val": parts["train"].subset(held),
                    "test": parts["train"].subset(held)}, notes
        return {"train": parts["train"], "val": val, "test": test}, notes
    pool = Records([], [] if pair else None, [])
    for p in files:
        pool.extend(read_records(p, text, label, pair))
    tr, held = stratified_holdout(pool.labels, cfg.val_fraction, cfg.seed)
    return {"train": pool.subset(tr), "val": pool.subset(held), "test": pool.subset(held)}, notes


def label_order(labels: Sequence[str]) -> list[str]:
    """The distinct labels in id order: numerically when all are integers, else alphabetically."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


# --- the pure parts: shots, sampling, weights, dropout -------------------------------------------

def parse_shots(shots: str | int | None) -> list[int]:
    """The k of `--shots` ("16" or "1,4,16"): positive integers, in the order given; [] for none."""
    if shots is None or shots == "":
        return []
    parts = [shots] if isinstance(shots, int) else [s.strip() for s in str(shots).split(",") if s.strip()]
    try:
        ks = [int(s) for s in parts]
    except ValueError:
        raise UserError(f"--shots {shots!r}: give examples per class as a number or a list such as 1,4,16") from None
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"--shots {shots!r}: each k must be a positive number of examples per class")
    return ks


def pick_shots(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of k examples of each class (sorted), drawn by `seed`; a class with fewer than k
    examples is a UserError."""
    rng = np.random.default_rng([seed, _SHOTS_STREAM])
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise UserError(f"--shots {k}: class {int(c)} has only {len(members)} training examples: lower --shots")
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """w_c = n / (C * n_c) (scikit-learn's "balanced"): each class weighs the same in total; a
    class absent from the labels gets weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


@lru_cache(maxsize=64)
def _permutation(seed: int, stream: int, key: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, key, epoch]).permutation(n)


def epoch_indices(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Example index at each position of an endless run of epochs, each a permutation of n drawn
    from (seed, epoch)."""
    epochs, within = positions // n, positions % n
    return np.array([_permutation(seed, 0, 0, int(e), n)[w] for e, w in zip(epochs, within)], dtype=np.int64)


def balanced_indices(positions: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Example index at each position of an endless run of balanced rounds: round r (positions
    r*C .. r*C+C-1) holds one example of each of the C classes, in an order drawn from (seed, r);
    class c's examples come in epochs of its own permutations (seed, c, epoch)."""
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    C = len(classes)
    out = np.empty(len(positions), dtype=np.int64)
    for j, p in enumerate(positions):
        r, slot = divmod(int(p), C)
        c = int(_permutation(seed, _ROUND_STREAM, 0, r, C)[slot])
        n_c = len(members[c])
        e, w = divmod(r, n_c)
        out[j] = members[c][_permutation(seed, _BALANCED_STREAM, c, e, n_c)[w]]
    return out


def drop_tokens(ids: list[int], p: float, replacement: int, keep: set[int], rng: np.random.Generator) -> list[int]:
    """`ids` with each token not in `keep` (special tokens) replaced by `replacement` with
    probability p (word dropout as augmentation)."""
    if p <= 0:
        return ids
    hit = rng.random(len(ids)) < p
    return [replacement if h and t not in keep else t for t, h in zip(ids, hit)]


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy; with class weights w the weighted mean sum_i w_{y_i} nll_i / sum_i w_{y_i}."""
    return F.cross_entropy(logits.float(), labels, weight=None if weight is None else weight.to(logits.device))


# --- encoding -----------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Token ids (and token types for pairs) of each example, with its label id."""

    ids: list[list[int]]
    types: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def encode_records(tokenizer, records: Records, label_ids: dict[str, int], max_len: int) -> Encoded:
    """Each text encoded with the tokenizer's special tokens ([CLS] a [SEP], <s> a); a pair as the
    first text's ids, an end token if they do not end with one (eos / [SEP]), then the second's
    without its leading begin token (type 1); cut to `max_len` from the right."""
    specials = tokenizer.special_tokens
    begin = {specials[r] for r in ("bos", "cls") if r in specials}
    end = next((specials[r] for r in ("sep", "eos") if r in specials), None)
    firsts = tokenizer.encode_many(records.texts, add_special_tokens=True)
    seconds = tokenizer.encode_many(records.pairs, add_special_tokens=True) if records.pairs is not None else None
    ids, types = [], []
    for i, a in enumerate(firsts):
        a = list(a)
        if seconds is None:
            row, tt = a, [0] * len(a)
        else:
            if end is not None and (not a or a[-1] != end):
                a.append(end)
            b = list(seconds[i])
            if b and b[0] in begin:
                b = b[1:]
            row, tt = a + b, [0] * len(a) + [1] * len(b)
        if not row:
            raise UserError(f"example {i + 1} ({records.texts[i][:40]!r}) encodes to no tokens: drop it")
        ids.append(row[:max_len])
        types.append(tt[:max_len])
    return Encoded(ids, types, np.array([label_ids[y] for y in records.labels], dtype=np.int64))


def collate(ids: Sequence[list[int]], types: Sequence[list[int]], labels: np.ndarray, pad_id: int,
            with_types: bool) -> dict[str, torch.Tensor]:
    """Right-padded rows: input_ids, attention_mask, labels (+ token_type_ids)."""
    T = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    tt = torch.zeros(len(ids), T, dtype=torch.long)
    for b, (row, ty) in enumerate(zip(ids, types)):
        input_ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
        tt[b, :len(ty)] = torch.tensor(ty, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.from_numpy(np.asarray(labels))}
    if with_types:
        batch["token_type_ids"] = tt
    return batch


# --- the task -----------------------------------------------------------------------------------

@register_task("classification")
class ClassificationTask(Task):
    """Cross entropy (optionally class-weighted) of a classification head on a pretrained model."""

    options = ("pooling", "label_column", "text_column", "text_pair_column", "shots", "class_weights",
               "balanced_sampling", "token_dropout")

    @classmethod
    def check_settings(cls, cfg: TaskOptions) -> None:
        """`--shots` must parse (a number or a list of them)."""
        parse_shots(getattr(cfg, "shots", None))

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a run without a pretrained model or data, and a list of shots (one run per k:
        `few_shot_curve`)."""
        if not getattr(cfg, "init_from", None):
            raise UserError("classification fine-tunes a pretrained model: give --init-from MODEL (an llmkit or "
                            "Hugging Face directory, or a llama2.c .bin)")
        if cfg.data is None:
            raise UserError("no classification data: pass --data FILE or FOLDER of labelled texts (JSONL/CSV/TSV)")
        ks = parse_shots(getattr(cfg, "shots", None))
        if len(ks) > 1:
            raise UserError(f"--shots {cfg.shots} is a list: one run trains one k; run few_shot_curve "
                            "(llmkit.training.few_shot) for the curve, or give one k")
        self.shots = ks[0] if ks else None
        super().__init__(cfg)

    # --- set-up -----------------------------------------------------------------------------

    def prepare(self, run_dir: Path) -> None:
        """Save the pretrained model's tokenizer and the labels (`labels.json`: id2label) into the
        run directory."""
        from llmkit.model_io import pretrained_tokenizer
        from llmkit.utils import atomic_write_text

        run_dir.mkdir(parents=True, exist_ok=True)
        pretrained_tokenizer(self.cfg.init_from).save(run_dir)
        splits, _ = load_splits(self.cfg)
        names = label_order(splits["train"].labels + splits["val"].labels + splits["test"].labels)
        atomic_write_text(run_dir / "labels.json",
                          json.dumps({"id2label": {str(i): n for i, n in enumerate(names)}}, indent=2) + "\n")

    def setup(self, run_dir: Path) -> None:
        """Read and split the data, map labels to ids, pick the shots, encode every split with the
        pretrained tokenizer and fix the model config (an encoder's with its head and labels)."""
        from llmkit.model_io import pretrained_tokenizer
        from llmkit.models.encoder import Encoder

        cfg = self.cfg
        self.tokenizer = tok = pretrained_tokenizer(cfg.init_from)
        splits, self.notes = load_splits(cfg)
        if not len(splits["train"]):
            raise UserError(f"{cfg.data}: no training examples: check the data (and --val-fraction)")
        self.label_names = label_order(splits["train"].labels + splits["val"].labels + splits["test"].labels)
        if len(self.label_names) < 2:
            raise UserError(f"{cfg.data}: only one label ({self.label_names[0]!r}): classification needs two or more")
        self.id2label = {str(i): name for i, name in enumerate(self.label_names)}
        label_ids = {name: i for i, name in enumerate(self.label_names)}
        base = self.pretrained()
        self.is_encoder = isinstance(base, Encoder)
        positions = base.cfg.max_positions if self.is_encoder else base.cfg.context_length
        self.max_len = min(positions, getattr(cfg, "context_length", None) or MAX_TOKENS)
        self.train_data = encode_records(tok, splits["train"], label_ids, self.max_len)
        self.val_data = encode_records(tok, splits["val"], label_ids, self.max_len)
        self.test_data = encode_records(tok, splits["test"], label_ids, self.max_len)
        if self.shots is not None:
            keep = pick_shots(self.train_data.labels, self.shots, cfg.seed)
            self.train_data = Encoded([self.train_data.ids[i] for i in keep], [self.train_data.types[i] for i in keep],
                                      self.train_data.labels[keep])
        C = len(self.label_names)
        self.class_weight = (balanced_class_weights(self.train_data.labels, C)
                             if getattr(cfg, "class_weights", "none") == "balanced" else None)
        self.pad_id = tok.pad_id if tok.pad_id is not None else (base.cfg.pad_token_id if self.is_encoder else 0)
        self.drop_id = tok.unk_id if tok.unk_id is not None else self.pad_id
        self.special_ids = set(tok.special_tokens.values())
        self.with_types = self.is_encoder and base.cfg.type_vocab_size > 0
        if 0 < len(self.val_data) < cfg.eval_batches:
            raise UserError(f"--eval-batches {cfg.eval_batches} is more than the {len(self.val_data)} validation "
                            "examples: lower --eval-batches")
        if self.is_encoder:
            self.model_config = dataclasses.replace(base.cfg, head="sequence-classification", num_labels=C,
                                                    id2label=dict(self.id2label))
        else:
            self.model_config = base.cfg

    peft_task_type = "SEQ_CLS"

    def new_modules(self, model: torch.nn.Module) -> list[str]:
        """The classification head (an encoder's `head`, a decoder classifier's `score`): it trains
        under every fine-tuning method and is saved with an adapter (peft's modules_to_save)."""
        return ["head"] if self.is_encoder else ["score"]

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The pretrained model under a classification head (new, seeded by the run's seed; an
        encoder that already has a head of this many labels keeps it)."""
        from llmkit.models.decoder import DecoderLM
        from llmkit.models.decoder_heads import DecoderForSequenceClassification
        from llmkit.models.encoder import Encoder

        base = self.pretrained()
        C = len(self.label_names)
        torch.manual_seed(self.cfg.seed)
        if self.is_encoder:
            model = Encoder(self.model_config)
            state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
            if base.cfg.head == "sequence-classification" and base.cfg.num_labels == C:
                state = base.state_dict()
            missing, unexpected = model.load_state_dict(state, strict=False)
            odd = [k for k in missing if not k.startswith(("head.", "pooler."))] + list(unexpected)
            if odd:
                raise UserError(f"{self.cfg.init_from}: its weights do not fit the classifier (first: {odd[0]!r}): "
                                "pass an encoder checkpoint")
            return model.train().to(device)
        if isinstance(base, DecoderLM):
            model = DecoderForSequenceClassification(base, C, pooling=self.cfg.pooling, pad_id=self.tokenizer.pad_id,
                                                     id2label=dict(self.id2label))
            return model.train().to(device)
        raise UserError(f"{self.cfg.init_from} is a {type(base).__name__}: classification fine-tunes a decoder or "
                        "an encoder")

    def summary(self) -> dict[str, Any]:
        """Example counts per split, the classes and how many training examples each has."""
        counts = np.bincount(self.train_data.labels, minlength=len(self.label_names))
        out = {"train_examples": len(self.train_data), "val_examples": len(self.val_data),
               "test_examples": len(self.test_data), "classes": len(self.label_names),
               "train_per_class": {n: int(c) for n, c in zip(self.label_names, counts)}}
        if self.notes:
            out["data_notes"] = "; ".join(self.notes)
        return out

    @property
    def tokens_per_example(self) -> int:
        """The mean token count of a training example."""
        return max(1, round(sum(map(len, self.train_data.ids)) / max(len(self.train_data), 1)))

    @property
    def has_validation(self) -> bool:
        """Whether there are held-out examples."""
        return len(self.val_data) > 0

    # --- batches ----------------------------------------------------------------------------

    def train_positions(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                        grad_accum: int) -> np.ndarray:
        """The global positions (in the endless training sequence) of this micro-step's rows."""
        g = batch_size * world * grad_accum
        return step * g + (micro * world + rank) * batch_size + np.arange(batch_size)

    def train_indices(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                      grad_accum: int) -> np.ndarray:
        """Training-example indices of this (micro-step, rank)'s rows of step `step`'s global batch."""
        positions = self.train_positions(step, micro, batch_size, rank, world, grad_accum)
        if getattr(self.cfg, "balanced_sampling", False):
            return balanced_indices(positions, self.train_data.labels, self.cfg.seed)
        return epoch_indices(positions, len(self.train_data), self.cfg.seed)

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> dict[str, torch.Tensor]:
        """Right-padded rows of training examples, token dropout applied where asked."""
        positions = self.train_positions(step, micro, batch_size, rank, world, grad_accum)
        index = self.train_indices(step, micro, batch_size, rank, world, grad_accum)
        d = self.train_data
        ids = [d.ids[i] for i in index]
        p = getattr(self.cfg, "token_dropout", 0.0)
        if p > 0:
            ids = [drop_tokens(row, p, self.drop_id, self.special_ids,
                               np.random.default_rng([self.cfg.seed, _DROPOUT_STREAM, step, int(pos)]))
                   for row, pos in zip(ids, positions)]
        return collate(ids, [d.types[i] for i in index], d.labels[index], self.pad_id, self.with_types)

    def eval_parts(self) -> list[np.ndarray]:
        """The validation set in contiguous parts of at most `batch_size` examples (at least
        `eval_batches` parts): evaluation reads the first `eval_batches`."""
        n = len(self.val_data)
        return np.array_split(np.arange(n), max(self.cfg.eval_batches, math.ceil(n / self.cfg.batch_size)))

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This rank's share of validation part `i` (the same rows every evaluation)."""
        index = self.eval_parts()[i][rank::world]
        if len(index) == 0:  # more ranks than rows in this part: repeat its first row
            index = self.eval_parts()[i][:1]
        d = self.val_data
        return collate([d.ids[j] for j in index], [d.types[j] for j in index], d.labels[index], self.pad_id,
                       self.with_types)

    # --- the objective ----------------------------------------------------------------------

    def perplexity(self, loss: float, metrics: dict[str, float]) -> float | None:
        """None: a classification's loss has no perplexity."""
        return None

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross entropy of the head's logits (class-weighted with class_weights balanced); metric `accuracy`."""
        logits = classify(model, batch).float()
        loss = weighted_cross_entropy(logits, batch["labels"], self.class_weight)
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean().detach()}

    def final_evaluation(self, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """Accuracy and macro F1 of the trained model on the test split; the report is printed and
        written (`classification_report.txt`), the confusion matrix drawn (`confusion.png`)."""
        from llmkit.eval.metrics import classification_scores, format_report, save_confusion_png

        if self.final_model is None or not len(self.test_data):
            return {}
        pred = predict(self.final_model, self.test_data, self.pad_id, self.with_types, device)
        scores = classification_scores(self.test_data.labels.tolist(), pred.tolist(), self.label_names)
        report = format_report(scores)
        print(report, flush=True)
        from llmkit.utils import atomic_write_text

        atomic_write_text(Path(run_dir) / "classification_report.txt", report + "\n")
        save_confusion_png(scores["confusion"], self.label_names, Path(run_dir) / "confusion.png")
        return {"accuracy": float(scores["accuracy"]), "macro_f1": float(scores["macro_f1"]),
                "test_examples": int(scores["support"])}


def classify(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, C] of a batch (the token types go to encoders that take them)."""
    if "token_type_ids" in batch:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return model(batch["input_ids"], attention_mask=batch["attention_mask"])


@torch.no_grad()
def predict(model: torch.nn.Module, data: Encoded, pad_id: int, with_types: bool, device: torch.device | str,
            batch_size: int = 64) -> np.ndarray:
    """Argmax class of every example (eval mode, in batches of similar length; back in the mode it was)."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(r) for r in data.ids], kind="stable")
    out = np.empty(len(data), dtype=np.int64)
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        batch = collate([data.ids[j] for j in idx], [data.types[j] for j in idx], data.labels[idx], pad_id, with_types)
        batch = {k: v.to(device) for k, v in batch.items()}
        out[idx] = classify(model, batch).argmax(-1).cpu().numpy()
    model.train(was_training)
    return out


__all__ = ["ClassificationTask", "Encoded", "Records", "balanced_class_weights", "balanced_indices", "classify",
           "collate", "data_files", "drop_tokens", "encode_records", "epoch_indices", "label_order", "load_splits",
           "parse_shots", "pick_shots", "predict", "read_records", "stratified_holdout", "weighted_cross_entropy"]
