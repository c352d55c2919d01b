"""Token classification (named-entity recognition): a pretrained model learns one BIO tag per word
(cross entropy of a token head over the labelled sub-tokens).

Words and sub-tokens. The data holds words with one tag each ("Empire/B-location State/I-location");
the model's tokenizer splits a word into sub-tokens. Each word is encoded on its own and the pieces
are concatenated (with a space before every word but the first where the tokenizer tells words
apart by a leading space, as GPT-2's byte-level BPE); the word's tag goes on its FIRST sub-token and
the others get -100, ignored by the loss, as in the BERT paper's NER set-up (Devlin et al. 2019,
section 5.3) and transformers' token-classification example. A word's predicted tag is its first
sub-token's. Special tokens the tokenizer adds (BOS; [CLS] ... [SEP]) get -100 too.

Models (`init_from`, required): an encoder gets its own token-classification head
(`EncoderConfig.head`); a decoder gets `DecoderForTokenClassification` (a score layer on the
final-normed hidden states). A decoder sees only the words to the left of each token (causal
attention), so it tags worse than an encoder of its size; rows are right-padded, which a causal
model needs no mask for (real tokens never attend to later positions).

Data (`--data`): a CoNLL file (one `word<TAB>tag` per line, sentences split by blank or
whitespace-only lines; WNUT-17 "Emerging and Rare Entities", Derczynski et al. 2017) or a JSONL
file whose rows hold a word list (`text_column`) and a tag list (`label_column`); or a folder of such
files, split by name: `*train*`, `*dev*`/`*valid*`, `*test*`. Without a dev file `val_fraction` of
the training sentences is held out (a fixed split). Labels: "O" first, then B-/I- per type, from the
tags of every split.

Options: `class_weights balanced` weights the cross entropy per tag by N / (C * count) (the
inverse frequency, scikit-learn's "balanced"; PyTorch normalises a weighted mean by the targets'
weights); `token_dropout p` replaces a share p of the real, non-special input tokens by the unknown
token (else padding) in training batches.

Metrics: `token_accuracy` (over labelled sub-tokens, i.e. words) in train and eval lines; after
training, `final_evaluation` tags the test split (the dev split without one) and reports entity
precision / recall / F1 (`llmkit.eval.metrics.entity_scores`, equal to seqeval's default mode),
per-type scores, the tag-level report, and writes `confusion.png` (tags, rows = true) and
`test_report.txt` (`dev_report.txt` when there is no test split) into the run directory.

Batches are a pure function of (seed, step, micro-step, rank): the global batch of step s is the
positions s*G .. s*G+G-1 of an endless sequence of epochs, each a permutation of the training
sentences drawn from (seed, epoch); token dropout is drawn from (seed, step, micro-step, rank).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.eval.metrics import (classification_scores, entity_scores, format_report, save_confusion_png)
from llmkit.objectives.builders import unwrap_model
from llmkit.objectives.task import Task, TaskOptions, register_task

IGNORE = -100  # label of positions the loss skips (later sub-tokens, special tokens, padding)
SPLITS = {"train": ("train",), "dev": ("dev", "valid"), "test": ("test",)}
_DROPOUT_STREAM = 11  # token dropout's draws, apart from the epoch permutations'

Sentence = tuple[list[str], list[str]]  # (words, tags)


# --- reading --------------------------------------------------------------------------------------

def read_conll(path: str | Path) -> list[Sentence]:
    """The (words, tags) sentences of a CoNLL file: `word<TAB>tag` (or `word tag`; the first field is
    the word, the last the tag) per line, a blank or whitespace-only line between sentences,
    `-DOCSTART-` lines skipped."""
    path = Path(path)
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields if f.strip()]
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2:
            raise UserError(f"{path}:{n}: {line!r} has no tag: a CoNLL line is `word<TAB>tag`")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def read_jsonl(path: str | Path, text_column: str, label_column: str) -> list[Sentence]:
    """The (words, tags) sentences of a JSONL file whose rows hold a word list under `text_column`
    and a tag list (strings) under `label_column`."""
    path = Path(path)
    out: list[Sentence] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
        words, tags = (row.get(text_column), row.get(label_column)) if isinstance(row, dict) else (None, None)
        if not (isinstance(words, list) and isinstance(tags, list) and len(words) == len(tags)
                and all(isinstance(x, str) for x in words + tags)):
            raise UserError(f"{path}:{n}: needs a word list `{text_column}` and a tag list `{label_column}` (strings) "
                            "of one length: set --text-column / --label-column")
        if words:
            out.append((words, tags))
    return out


def read_sentences(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[Sentence]:
    """A CoNLL or (by its .jsonl / .json suffix) JSONL file's sentences."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path, text_column, label_column)
    return read_conll(path)


def find_splits(data: str | Path) -> dict[str, Path]:
    """Split name (train, dev, test) -> file: a file is the training split; a folder's files are
    assigned by their names (`*train*`, `*dev*` or `*valid*`, `*test*`)."""
    data = Path(data)
    if data.is_file():
        return {"train": data}
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist: pass a CoNLL/JSONL file or a folder with *train* / *dev* / "
                        "*test* files")
    files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() not in (".md", ".txt", ".py", ".sh"))
    out: dict[str, Path] = {}
    for split, keys in SPLITS.items():
        found = [p for p in files if any(k in p.name.lower() for k in keys)]
        if len(found) > 1:
            raise UserError(f"--data {data}: {len(found)} files could be the {split} split "
                            f"({', '.join(p.name for p in found)}): keep one")
        if found:
            out[split] = found[0]
    if "train" not in out:
        raise UserError(f"--data {data} has no file named *train*: name the training file so, or pass it alone")
    return out


def label_list(tag_lists: Sequence[Sequence[str]]) -> list[str]:
    """The tag vocabulary in a fixed order: "O", then for each entity type (sorted) its B-, I- (and
    any other prefix) tags; other tags after."""
    tags = {t for seq in tag_lists for t in seq}
    types = sorted({t[2:] for t in tags if len(t) > 2 and t[1] == "-"})
    ordered = ["O"] if "O" in tags else []
    for typ in types:
        ordered += [f"{p}-{typ}" for p in "BIES" if f"{p}-{typ}" in tags]
    return ordered + sorted(tags - set(ordered))


# --- words to sub-tokens ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """How a tokenizer's ids of a pre-split sentence are made: the ids before and after the words
    (special tokens) and whether words after the first need a leading space."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    space_before_words: bool


def sentence_encoding(tokenizer) -> Encoding:
    """Read the tokenizer's rules off probe texts: the special ids `encode(..., add_special_tokens=True)`
    puts around a text, and whether "a b" is the pieces of "a" and "b" (WordPiece, SentencePiece)
    or of "a" and " b" (byte-level BPE: words carry their space)."""
    probe = "hello"
    plain = tokenizer.encode(probe)
    full = tokenizer.encode(probe, add_special_tokens=True)
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            prefix, suffix = tuple(full[:i]), tuple(full[i + len(plain):])
            break
    joined = tokenizer.encode("hello world")
    space = joined != plain + tokenizer.encode("world") and joined == plain + tokenizer.encode(" world")
    return Encoding(prefix, suffix, space)


def align_labels(pieces: Sequence[Sequence[int]], labels: Sequence[int], prefix: Sequence[int] = (),
                 suffix: Sequence[int] = (), max_len: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, first) of one sentence: ids = prefix + the words' pieces + suffix; labels the
    word's label on its first piece and IGNORE on its other pieces and the special tokens; first[w]
    the position of word w's first piece (-1 for a word with no pieces or cut off by `max_len`,
    the most ids a row may hold, special tokens included)."""
    ids, out, first = list(prefix), [IGNORE] * len(prefix), []
    room = None if max_len is None else max_len - len(suffix)
    for piece, label in zip(pieces, labels):
        if not piece or (room is not None and len(ids) + len(piece) > room):
            first.append(-1)
            if piece:
                room = len(ids)  # once a word does not fit, no later word does either
            continue
        first.append(len(ids))
        ids += piece
        out += [label] + [IGNORE] * (len(piece) - 1)
    return ids + list(suffix), out + [IGNORE] * len(suffix), first


@dataclass
class TaggedSet:
    """Encoded sentences: per sentence its ids, labels (IGNORE where no word starts) and each word's
    first position, with the words and tags themselves for scoring."""

    ids: list[list[int]]
    labels: list[list[int]]
    first: list[list[int]]
    sentences: list[Sentence]

    def __len__(self) -> int:
        return len(self.ids)


def encode_sentences(tokenizer, sentences: Sequence[Sentence], label_ids: dict[str, int],
                     max_len: int | None) -> TaggedSet:
    """Every sentence through `align_labels`: each word encoded on its own (with a leading space after
    the first word where `sentence_encoding` says so; a word may have no ids), each distinct one once."""
    encoding = sentence_encoding(tokenizer)
    cache: dict[tuple[str, bool], list[int]] = {}

    def piece(word: str, later: bool) -> list[int]:
        key = (word, later and encoding.space_before_words)
        if key not in cache:
            cache[key] = tokenizer.encode(" " + word if key[1] else word)
        return cache[key]

    ids, labels, firsts = [], [], []
    for words, tags in sentences:
        pieces = [piece(w, i > 0) for i, w in enumerate(words)]
        row, lab, first = align_labels(pieces, [label_ids[t] for t in tags], encoding.prefix, encoding.suffix,
                                       max_len)
        ids.append(row)
        labels.append(lab)
        firsts.append(first)
    return TaggedSet(ids, labels, firsts, list(sentences))


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """[B, T] long tensor of the rows right-padded with `value` to the longest."""
    width = max((len(r) for r in rows), default=1) or 1
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def balanced_weights(labels: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Per-class weights N / (C * count_c) of the labelled positions (0 for a class never seen)."""
    counts = torch.zeros(n, dtype=torch.float64)
    for row in labels:
        for y in row:
            if y != IGNORE:
                counts[y] += 1
    total, seen = counts.sum(), int((counts > 0).sum())
    return torch.where(counts > 0, total / (seen * counts.clamp(min=1)), torch.zeros_like(counts)).float()


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy (fp32) of logits [B, T, C] over the positions whose label is not IGNORE
    (weighted by `weight[label]` and normalised by the weights' sum where given)."""
    if not labels.ne(IGNORE).any():  # nothing to learn in this batch: a zero that keeps the graph
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                           weight=None if weight is None else weight.to(logits.device), ignore_index=IGNORE)


# --- the model -------------------------------------------------------------------------------------

def token_classifier(base: torch.nn.Module, labels: Sequence[str]) -> torch.nn.Module:
    """`base` with a token-classification head for `labels`: an encoder rebuilt with its own head
    (the body's weights kept, a masked-LM or sequence head dropped), a decoder under
    `DecoderForTokenClassification`; a model that already tags these labels is returned as it is."""
    from llmkit.models.decoder import DecoderLM
    from llmkit.models.encoder import Encoder

    n, id2label = len(labels), {str(i): name for i, name in enumerate(labels)}
    if isinstance(base, Encoder):
        cfg = base.cfg
        if cfg.head == "token-classification" and cfg.labels() == list(labels):
            return base
        new_cfg = dataclasses.replace(cfg, head="token-classification", num_labels=n, id2label=id2label,
                                      problem_type=None)
        model = Encoder(new_cfg)
        body = {k: v for k, v in base.state_dict().items() if not k.startswith(("head.", "nsp_head."))}
        missing, unexpected = model.load_state_dict(body, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
        return model.train()
    try:
        from llmkit.models.decoder_heads import DecoderForTokenClassification
    except ImportError:  # pragma: no cover - decoder_heads is part of the tree
        DecoderForTokenClassification = None
    if DecoderForTokenClassification is not None and isinstance(base, DecoderForTokenClassification):
        if base.labels() == list(labels):
            return base
        base = base.base_model
    if isinstance(base, DecoderLM) and DecoderForTokenClassification is not None:
        return DecoderForTokenClassification(base, n, id2label=id2label).train()
    raise UserError(f"token classification tags with an encoder or a decoder, not a {type(base).__name__}: "
                    "pass --init-from an encoder (BERT family) or decoder model")


def tag_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, C] logits of a token classifier: an encoder is given the padding mask; a decoder's
    right padding needs none (causal attention never looks ahead)."""
    from llmkit.models.encoder import Encoder

    if isinstance(unwrap_model(model), Encoder):
        return model(input_ids, attention_mask)
    return model(input_ids)


# --- the task --------------------------------------------------------------------------------------

@register_task("token-classification")
class TokenClassificationTask(Task):
    """Cross entropy of a token head against BIO tags on each word's first sub-token."""

    options = ("text_column", "label_column", "class_weights", "token_dropout")
    model_config: Any

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a run without a pretrained model or data before anything is read or written."""
        if not getattr(cfg, "init_from", None):
            raise UserError(f"task {self.name or 'token-classification'} fine-tunes a pretrained model: pass "
                            "--init-from MODEL (an encoder such as all-MiniLM-L6-v2, or a decoder)")
        if cfg.data is None:
            raise UserError("no tagged data: pass --data a CoNLL/JSONL file or a folder with *train* / *dev* / *test* "
                            "files (e.g. WNUT-17)")
        self.splits = find_splits(cfg.data)
        self.token_dropout = float(getattr(cfg, "token_dropout", 0.0) or 0.0)
        self.class_weights = getattr(cfg, "class_weights", "none") or "none"
        super().__init__(cfg)
        self._tokenizer = None

    # --- set-up ---------------------------------------------------------------------------------

    def tokenizer(self):
        """The pretrained model's tokenizer (read once)."""
        if self._tokenizer is None:
            from llmkit.model_io import pretrained_tokenizer

            self._tokenizer = pretrained_tokenizer(self.cfg.init_from)
        return self._tokenizer

    def prepare(self, run_dir: Path) -> None:
        """Save the model's tokenizer into the run (the saved tagger then loads as a whole)."""
        self.tokenizer().save(run_dir)

    def setup(self, run_dir: Path) -> None:
        """Read the splits, fix the labels, encode every sentence at the model's length."""
        cfg = self.cfg
        text_col, label_col = getattr(cfg, "text_column", "text"), getattr(cfg, "label_column", "label")
        data = {split: read_sentences(path, text_col, label_col) for split, path in self.splits.items()}
        if not data["train"]:
            raise UserError(f"{self.splits['train']}: no sentences found: check the file's format (`word<TAB>tag`)")
        if "dev" not in data and cfg.val_fraction > 0:
            order = np.random.default_rng(0).permutation(len(data["train"]))
            n_val = int(round(len(order) * cfg.val_fraction))
            if n_val >= len(order):
                raise UserError(f"--val-fraction {cfg.val_fraction} leaves no training sentences: lower it")
            data["dev"] = [data["train"][i] for i in sorted(order[:n_val])]
            data["train"] = [data["train"][i] for i in sorted(order[n_val:])]
        self.labels = label_list([tags for sents in data.values() for _, tags in sents])
        self.label_ids = {t: i for i, t in enumerate(self.labels)}
        base = self.pretrained()
        self.model_config = token_classifier_config(base, self.labels)
        self.max_len = max_length(base)
        tok = self.tokenizer()
        self.pad_value = pad_value(base, tok)
        self.drop_value = tok.unk_id if tok.unk_id is not None else self.pad_value
        self.data = {split: encode_sentences(tok, sents, self.label_ids, self.max_len) for split, sents in data.items()}
        self.train_data = self.data["train"]
        self.val_data = self.data.get("dev")
        self.eval_split = "test" if "test" in self.data else ("dev" if "dev" in self.data else None)
        self.weight = balanced_weights(self.train_data.labels, len(self.labels)) if self.class_weights == "balanced" \
            else None
        encoding = sentence_encoding(tok)
        self._special = len(encoding.prefix), len(encoding.suffix)

    peft_task_type = "TOKEN_CLS"

    def new_modules(self, model: torch.nn.Module) -> list[str]:
        """The token head (a decoder tagger's `score`, an encoder's `head`): it trains under every
        fine-tuning method and is saved with an adapter (peft's modules_to_save)."""
        return ["score"] if hasattr(model, "score") else ["head"]

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The pretrained model with a token head for the data's tags (`token_classifier`)."""
        return token_classifier(self.pretrained(), self.labels).to(device)

    def summary(self) -> dict[str, Any]:
        """Sentences per split, words and labels."""
        out: dict[str, Any] = {f"{s}_sentences": len(d) for s, d in self.data.items()}
        out.update(words=sum(len(w) for w, _ in self.train_data.sentences), labels=len(self.labels))
        return out

    @property
    def tokens_per_example(self) -> int:
        """The mean ids per training sentence (rows are padded to the longest of their batch)."""
        return max(1, round(sum(map(len, self.train_data.ids)) / max(len(self.train_data), 1)))

    @property
    def has_validation(self) -> bool:
        return self.val_data is not None and len(self.val_data) > 0

    # --- batches --------------------------------------------------------------------------------

    def _batch(self, data: TaggedSet, index: Sequence[int]) -> dict[str, torch.Tensor]:
        ids = pad_rows([data.ids[i] for i in index], self.pad_value)
        labels = pad_rows([data.labels[i] for i in index], IGNORE)
        mask = pad_rows([[1] * len(data.ids[i]) for i in index], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> dict[str, torch.Tensor]:
        """This rank's rows of step `step` (epoch permutations of the training sentences), with
        token dropout applied where asked."""
        g = batch_size * world * grad_accum
        positions = step * g + (micro * world + rank) * batch_size + np.arange(batch_size)
        n = len(self.train_data)
        index = [int(_permutation(self.cfg.seed, int(p // n), n)[p % n]) for p in positions]
        batch = self._batch(self.train_data, index)
        if self.token_dropout > 0:
            draw = np.random.default_rng([self.cfg.seed, _DROPOUT_STREAM, step, micro, rank]).integers(1 << 62)
            gen = torch.Generator().manual_seed(int(draw))
            batch["input_ids"] = drop_tokens(batch["input_ids"], batch["attention_mask"], self.token_dropout,
                                             self.drop_value, self._special, gen)
        return batch

    def eval_parts(self) -> list[np.ndarray]:
        """The dev sentences in contiguous parts of at most `batch_size` (at least `eval_batches`)."""
        n = len(self.val_data)
        return np.array_split(np.arange(n), max(self.cfg.eval_batches, math.ceil(n / self.cfg.batch_size)))

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This rank's share of dev part `i` (the same sentences every evaluation)."""
        index = self.eval_parts()[i][rank::world]
        if len(index) == 0:
            index = self.eval_parts()[i][:1]
        return self._batch(self.val_data, [int(x) for x in index])

    # --- the objective --------------------------------------------------------------------------

    def perplexity(self, loss: float, metrics: dict[str, float]) -> float | None:
        """None: a tagging loss, not a language model's."""
        return None

    def loss(self, model: torch.nn.Module,
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross entropy over the labelled sub-tokens; metric `token_accuracy` (of those)."""
        logits = tag_logits(model, batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        loss = token_classification_loss(logits, labels, self.weight)
        with torch.no_grad():
            keep = labels.ne(IGNORE)
            right = (logits.argmax(-1).eq(labels) & keep).sum()
            acc = right.float() / keep.sum().clamp(min=1).float()
        return loss, {"token_accuracy": acc.detach()}

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return unwrap_model(model).flops_per_token(self.tokens_per_example)

    def final_evaluation(self, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """Tag the test split (dev without one) with the trained model: entity P/R/F1 (seqeval's
        default mode; also F1 in strict IOB2 mode, where an I- without its B- is no entity), the
        report printed and in `test_report.txt`, `confusion.png` of the tags."""
        if self.eval_split is None or self.final_model is None:
            return {}
        data = self.data[self.eval_split]
        pred = predict_tags(self.final_model, data, self.labels, self.pad_value, self.cfg.batch_size, device)
        true = [tags for _, tags in data.sentences]
        ents = entity_scores(true, pred)
        flat_t = [self.label_ids[t] for seq in true for t in seq]
        flat_p = [self.label_ids[t] for seq in pred for t in seq]
        tags = classification_scores(flat_t, flat_p, self.labels)
        report = (f"{self.eval_split} split: {len(data)} sentences, {ents['support']} entities\n\n"
                  f"entities (exact span and type):\n{format_report(ents)}\n\n"
                  f"tags (per word):\n{format_report(tags)}\n")
        print(report, flush=True)
        from llmkit.utils import atomic_write_text

        atomic_write_text(Path(run_dir) / f"{self.eval_split}_report.txt", report)
        save_confusion_png(tags["confusion"], self.labels, Path(run_dir) / "confusion.png",
                           title=f"tags on the {self.eval_split} split")
        p = self.eval_split
        return {f"{p}_entity_precision": ents["precision"], f"{p}_entity_recall": ents["recall"],
                f"{p}_entity_f1": ents["f1"], f"{p}_entity_macro_f1": ents["macro_f1"],
                f"{p}_entity_f1_strict": entity_scores(true, pred, mode="strict")["f1"],
                f"{p}_token_accuracy": tags["accuracy"], f"{p}_entities": ents["support"]}


@register_task("ner")
class NERTask(TokenClassificationTask):
    """`--task ner`: another name of token-classification."""


# --- helpers -----------------------------------------------------------------------------------------

def token_classifier_config(base: torch.nn.Module, labels: Sequence[str]) -> Any:
    """The config of the tagger `token_classifier` builds (no weights made): an encoder's with the
    token head, a decoder's own."""
    from llmkit.models.encoder import Encoder

    if isinstance(base, Encoder):
        return dataclasses.replace(base.cfg, head="token-classification", num_labels=len(labels),
                                   id2label={str(i): t for i, t in enumerate(labels)}, problem_type=None)
    return base.cfg


def max_length(base: torch.nn.Module) -> int:
    """The most ids a row may hold: an encoder's positions, a decoder's context."""
    cfg = base.cfg
    return int(getattr(cfg, "max_positions", None) or cfg.context_length)


def pad_value(base: torch.nn.Module, tokenizer) -> int:
    """The id rows are padded with: an encoder's pad token, else the tokenizer's pad, EOS or 0."""
    if hasattr(base.cfg, "pad_token_id"):
        return int(base.cfg.pad_token_id)
    for v in (tokenizer.pad_id, tokenizer.eos_id):
        if v is not None:
            return int(v)
    return 0


def drop_tokens(ids: torch.Tensor, mask: torch.Tensor, p: float, value: int, special: tuple[int, int],
                generator: torch.Generator) -> torch.Tensor:
    """`ids` with each real, non-special token replaced by `value` with probability p (the first
    special[0] and last special[1] real ids of a row are special tokens and kept)."""
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    length = mask.sum(1, keepdim=True)
    inner = mask.bool() & (pos >= special[0]) & (pos < length - special[1])
    drop = (torch.rand(B, T, generator=generator) < p) & inner
    return ids.masked_fill(drop, value)


@torch.no_grad()
def predict_tags(model: torch.nn.Module, data: TaggedSet, labels: Sequence[str], pad: int, batch_size: int,
                 device: torch.device | str = "cpu") -> list[list[str]]:
    """Each word's predicted tag (its first sub-token's argmax; "O" for a word without ids)."""
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        for start in range(0, len(data), batch_size):
            rows = range(start, min(start + batch_size, len(data)))
            ids = pad_rows([data.ids[i] for i in rows], pad).to(device)
            mask = pad_rows([[1] * len(data.ids[i]) for i in rows], 0).to(device)
            best = tag_logits(model, ids, mask).argmax(-1).cpu()
            for b, i in enumerate(rows):
                out.append([labels[int(best[b, f])] if f >= 0 else "O" for f in data.first[i]])
    finally:
        model.train(was_training)
    return out


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training sentences in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


__all__ = ["IGNORE", "Encoding", "NERTask", "TaggedSet", "TokenClassificationTask", "align_labels", "balanced_weights",
           "drop_tokens", "encode_sentences", "find_splits", "label_list", "predict_tags", "read_conll", "read_jsonl",
           "read_sentences", "sentence_encoding", "tag_logits", "token_classification_loss", "token_classifier"]
