"""Translation: a T5 learns source sentence -> target sentence with token cross entropy on the
target (teacher forcing), and is scored by BLEU on greedy translations of a test split.

Sutskever et al. 2014, "Sequence to Sequence Learning with Neural Networks"; the encoder-decoder
is T5's (Raffel et al. 2020); BLEU: Papineni et al. 2002, computed by sacrebleu (Post 2018, "A
Call for Clarity in Reporting BLEU Scores"). The data layout is Multi30k's (Elliott et al. 2016):
a folder of `{split}.{lang}` files, `.gz` or `.txt` or bare, line i of one language aligned with
line i of the other.

Data: the `train` split trains a byte-level BPE (or character) tokenizer on both languages, one
shared vocabulary; every sentence becomes its ids + eos, cut at the model's `context_length`.
Validation is the `val` split (or the last `val_fraction` of train when there is none; none
when `val_fraction` is 0), BLEU's test split the first of TEST_SPLITS present. Batch rows are
pairs drawn without replacement, a fresh permutation of the training pairs per epoch (a pure
function of seed and epoch), so the batch of (step, micro-step, rank) is a pure function too.
Batches are padded to their longest row.

The direction is `source_lang` -> `target_lang` of the run options when they have them, else
en -> de (DEFAULT_DIRECTION).
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.objectives.builders import (SpecialTokens, build_model_config,
                                       resolve_special_tokens)
from llmkit.objectives.task import Task, TaskOptions, register_task
from llmkit.tokenizers.base import Tokenizer, load_tokenizer

DEFAULT_DIRECTION = ("en", "de")
TRAIN_SPLIT = "train"
VAL_SPLITS = ("val", "valid", "dev")
TEST_SPLITS = ("test", "test_2016_flickr")
EXTENSIONS = (".gz", ".txt", "")
PAD, EOS = "<|pad|>", "<|eos|>"
IGNORE = -100  # labels at padding: cross entropy skips them (and T5's shift_right turns them into pad)
ARCHITECTURES = ("t5",)


# --- the data ---------------------------------------------------------------------------------------

def split_file(folder: str | Path, split: str, lang: str) -> Path | None:
    """`{split}.{lang}` with the first of EXTENSIONS that exists in `folder`, else None."""
    for ext in EXTENSIONS:
        path = Path(folder) / f"{split}.{lang}{ext}"
        if path.is_file():
            return path
    return None


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, gzip-compressed when its name ends in .gz."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8").splitlines()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: {e}: pass a folder of (gzipped) UTF-8 text files") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8") from None


def read_pairs(folder: str | Path, split: str, source: str, target: str) -> list[tuple[str, str]] | None:
    """Aligned (source, target) sentences of `split`, pairs with an empty side dropped; None when
    the split is absent for both languages, UserError when one side is missing or lengths differ."""
    src, tgt = split_file(folder, split, source), split_file(folder, split, target)
    if src is None and tgt is None:
        return None
    if src is None or tgt is None:
        have, lack = (src, target) if tgt is None else (tgt, source)
        raise UserError(f"{have} has no {split}.{lack} beside it in {folder}: add the other side of the split")
    a, b = read_lines(src), read_lines(tgt)
    if len(a) != len(b):
        raise UserError(f"{src} has {len(a)} lines and {tgt} has {len(b)}: the two sides must be aligned line by line")
    return [(s.strip(), t.strip()) for s, t in zip(a, b) if s.strip() and t.strip()]


def first_split(folder: str | Path, splits: Sequence[str], source: str, target: str
                ) -> tuple[str, list[tuple[str, str]]] | None:
    """(name, pairs) of the first of `splits` present in `folder`, else None."""
    for split in splits:
        pairs = read_pairs(folder, split, source, target)
        if pairs is not None:
            return split, pairs
    return None


def encode_side(tokenizer: Tokenizer, texts: Sequence[str], eos: int, max_len: int) -> list[np.ndarray]:
    """Each text as int64 ids + eos, cut to `max_len` tokens (the last one always eos)."""
    out = []
    for ids in tokenizer.encode_many(list(texts)):
        out.append(np.asarray([*ids[:max_len - 1], eos], dtype=np.int64))
    return out


def pad_rows(rows: Sequence[np.ndarray], value: int) -> torch.Tensor:
    """[len(rows), longest] int64, each row right-padded with `value`."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.from_numpy(r)
    return out


def collate(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """The model's inputs for these pairs: input_ids, attention_mask, labels."""
    input_ids = pad_rows(sources, pad_id)
    lengths = torch.tensor([len(s) for s in sources])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad_rows(targets, IGNORE)}


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of n training pairs for `epoch`: a pure function of (seed, epoch, n)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x7472]))
    return rng.permutation(n)


def train_rows(seed: int, n: int, step: int, micro: int, batch_size: int, rank: int, world: int,
               grad_accum: int) -> list[int]:
    """Pair indices of this (step, micro, rank)'s rows: the global batch of step `step` is the
    next `batch_size * world * grad_accum` pairs of the epoch permutations, laid out micro-major."""
    global_batch = batch_size * world * grad_accum
    first = step * global_batch + (micro * world + rank) * batch_size
    return [int(epoch_order(seed, g // n, n)[g % n]) for g in range(first, first + batch_size)]


# --- the task ---------------------------------------------------------------------------------------

@register_task("translation")
class TranslationTask(Task):
    """Teacher-forced target cross entropy of a T5 on (source, target) sentence pairs; at the end,
    BLEU of greedy translations of the test split (when the data has one)."""

    architectures = ARCHITECTURES
    options = ("source_lang", "target_lang")
    tokenizer: Tokenizer
    specials: SpecialTokens

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a new run without data, a data path that is not a folder, and a preset that is not a T5."""
        if cfg.data is None and not cfg.resume:
            raise UserError("no training data: pass --data FOLDER holding train.{src}.gz and train.{tgt}.gz "
                            "(e.g. Multi30k)")
        if cfg.data is not None and not Path(cfg.data).is_dir():
            raise UserError(f"--data {cfg.data} is not a folder: the translation task reads "
                            "FOLDER/{split}.{lang}[.gz|.txt]")
        super().__init__(cfg)
        self.source_lang: str = getattr(cfg, "source_lang", None) or DEFAULT_DIRECTION[0]
        self.target_lang: str = getattr(cfg, "target_lang", None) or DEFAULT_DIRECTION[1]
        self._tokenizer_ready = False

    # --- set-up ---
    def _read(self) -> None:
        folder, s, t = self.cfg.data, self.source_lang, self.target_lang
        train = read_pairs(folder, TRAIN_SPLIT, s, t)
        if not train:
            raise UserError(f"{folder} has no {TRAIN_SPLIT}.{s} / {TRAIN_SPLIT}.{t} pairs (.gz, .txt or bare): "
                            "pass the folder of a parallel corpus")
        val = first_split(folder, VAL_SPLITS, s, t) if self.cfg.val_fraction > 0 else None  # 0: no validation
        if val is None and self.cfg.val_fraction > 0:  # no val split: hold out the end of train
            n_val = max(1, int(len(train) * self.cfg.val_fraction))
            if n_val >= len(train):
                raise UserError(f"{len(train)} training pairs leave none after holding out val_fraction "
                                f"{self.cfg.val_fraction}: add a val split or lower --val-fraction")
            train, val = train[:-n_val], ("train[-%d:]" % n_val, train[-n_val:])
        self.train_pairs = train
        self.val_pairs = val[1] if val is not None else None
        self.val_split = val[0] if val is not None else None

    def _train_tokenizer(self) -> Tokenizer:
        texts = [p[0] for p in self.train_pairs] + [p[1] for p in self.train_pairs]
        if self.cfg.tokenizer == "char":
            from llmkit.tokenizers.char import CharTokenizer
            return CharTokenizer.train("\n".join(texts))
        from llmkit.tokenizers.train import train_tokenizer
        return train_tokenizer("bpe", texts=texts, vocab_size=self.cfg.vocab_size)

    def prepare(self, run_dir: Path) -> None:
        """Read the pairs and train the shared tokenizer on both sides of train (resume: load it)."""
        self._read()
        self.tokenizer = load_tokenizer(run_dir) if self.cfg.resume else self._train_tokenizer()
        if not self.cfg.resume:
            self.tokenizer.save(run_dir)
        self._tokenizer_ready = True

    def setup(self, run_dir: Path) -> None:
        """Tokenize the pairs, size the T5 to the vocabulary with pad/eos/decoder-start ids."""
        if not self._tokenizer_ready:  # the other ranks: rank 0 has written the tokenizer
            self._read()
            self.tokenizer = load_tokenizer(run_dir)
            self._tokenizer_ready = True
        self.specials = resolve_special_tokens(self.tokenizer, [PAD, EOS], roles={PAD: "pad", EOS: "eos"})
        pad, eos = self.specials[PAD], self.specials[EOS]
        self.model_config = build_model_config(self.cfg, self.specials.model_vocab_size, ARCHITECTURES,
                                               "task 'translation'", pad_token_id=pad, eos_token_id=eos,
                                               decoder_start_token_id=pad)
        max_len = self.model_config.context_length
        self.train_src = encode_side(self.tokenizer, [p[0] for p in self.train_pairs], eos, max_len)
        self.train_tgt = encode_side(self.tokenizer, [p[1] for p in self.train_pairs], eos, max_len)
        if self.val_pairs:
            self.val_src = encode_side(self.tokenizer, [p[0] for p in self.val_pairs], eos, max_len)
            self.val_tgt = encode_side(self.tokenizer, [p[1] for p in self.val_pairs], eos, max_len)

    def summary(self) -> dict[str, Any]:
        """Pair counts, the direction and the vocabulary."""
        return {"train_pairs": len(self.train_pairs), "val_pairs": len(self.val_pairs or ()),
                "direction": f"{self.source_lang}->{self.target_lang}", "vocab_size": self.specials.model_vocab_size}

    # --- data ---
    @property
    def tokens_per_example(self) -> int:
        """The mean target length (with eos) of the training pairs: the tokens a row predicts."""
        return max(1, round(float(np.mean([len(t) for t in self.train_tgt]))))

    @property
    def has_validation(self) -> bool:
        return bool(self.val_pairs)

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> dict[str, torch.Tensor]:
        """This rank's pairs of the step's global batch (see `train_rows`), padded."""
        rows = train_rows(self.cfg.seed, len(self.train_src), step, micro, batch_size, rank, world, grad_accum)
        return collate([self.train_src[i] for i in rows], [self.train_tgt[i] for i in rows], self.specials[PAD])

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Validation pairs in order (wrapping around): batch i is the same every evaluation."""
        n, first = len(self.val_src), (i * world + rank) * batch_size
        rows = [(first + r) % n for r in range(batch_size)]
        return collate([self.val_src[j] for j in rows], [self.val_tgt[j] for j in rows], self.specials[PAD])

    # --- the objective ---
    def loss(self, model: torch.nn.Module,
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy (nats per target token, fp32) over the non-padding labels, and
        `token_accuracy`: the share of those the argmax gets right."""
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return target_cross_entropy(logits, batch["labels"])

    def final_evaluation(self, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """BLEU (sacrebleu) of the saved model's greedy translations of the test split, when the data
        has one: {"bleu", "bleu_split", "bleu_pairs"}."""
        if first_split(self.cfg.data, TEST_SPLITS, self.source_lang, self.target_lang) is None:
            return {}
        found = evaluate_run(run_dir, self.cfg.data, device=str(device))
        return {"bleu": float(found["bleu"]), "bleu_split": found["split"], "bleu_pairs": found["pairs"]}


def target_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean token cross entropy over labels != IGNORE, {"token_accuracy": ...})."""
    logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    real = labels != IGNORE
    accuracy = ((logits.argmax(-1) == labels) & real).sum() / real.sum().clamp(min=1)
    return loss, {"token_accuracy": accuracy.detach()}


# --- greedy translation and BLEU ------------------------------------------------------------------

@torch.no_grad()
def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int) -> list[list[int]]:
    """Each source row's argmax target ids, up to (not including) eos, at most `max_new_tokens`:
    the memory is encoded once and the decoder runs one token at a time through its cache."""
    cfg = model.cfg
    B = input_ids.shape[0]
    memory = model.encode(input_ids, attention_mask)
    cache = model.make_cache(B, max_new_tokens + 1, dtype=memory.dtype)
    token = input_ids.new_full((B, 1), cfg.decoder_start_token_id)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = model.decode(token, memory, attention_mask, cache)
        memory = None  # the cache holds its keys and values now
        token = logits[:, -1].argmax(-1, keepdim=True)
        token = token.masked_fill(done[:, None], cfg.pad_token_id)
        out.append(token)
        done |= token[:, 0] == cfg.eos_token_id
        if bool(done.all()):
            break
    ids = torch.cat(out, dim=1).tolist()
    return [row[:row.index(cfg.eos_token_id)] if cfg.eos_token_id in row else row for row in ids]


def translate(model: torch.nn.Module, tokenizer: Tokenizer, sentences: Sequence[str], batch_size: int = 64,
              max_new_tokens: int | None = None) -> list[str]:
    """Greedy translations of `sentences` (batched by length, returned in their order)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    eos = cfg.eos_token_id
    sources = encode_side(tokenizer, sentences, eos, cfg.context_length)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([sources[i] for i in rows], [sources[i] for i in rows], cfg.pad_token_id)
        # a translation rarely runs past twice its source: stop there unless told otherwise
        limit = max_new_tokens or min(cfg.context_length, 2 * batch["input_ids"].shape[1] + 10)
        ids = greedy_decode(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), limit)
        for i, row in zip(rows, ids):
            known = [t for t in row if t < tokenizer.vocab_size]  # ids reserved past a char vocabulary: none
            out[i] = tokenizer.decode(known, skip_special_tokens=True).strip()
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation, one reference per sentence), 0..100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def evaluate_bleu(model: torch.nn.Module, tokenizer: Tokenizer, data: str | Path, split: str | None = None,
                  source_lang: str = DEFAULT_DIRECTION[0], target_lang: str = DEFAULT_DIRECTION[1],
                  limit: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """BLEU of the model's greedy translations of `split` (default: the first of TEST_SPLITS in
    `data`), optionally of its first `limit` pairs: {"split", "pairs", "bleu", "examples"}."""
    found = (first_split(data, TEST_SPLITS, source_lang, target_lang) if split is None
             else (split, read_pairs(data, split, source_lang, target_lang)))
    if found is None or found[1] is None:
        wanted = split or " or ".join(TEST_SPLITS)
        raise UserError(f"{data} has no {wanted}.{source_lang} / .{target_lang} files: pass the split to score")
    name, pairs = found
    pairs = pairs[:limit] if limit else pairs
    hyps = translate(model, tokenizer, [p[0] for p in pairs], batch_size=batch_size)
    return {"split": name, "pairs": len(pairs), "bleu": corpus_bleu(hyps, [p[1] for p in pairs]),
            "examples": [(p[0], h, p[1]) for p, h in list(zip(pairs, hyps))[:3]]}


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, split: str | None = None,
                 limit: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """BLEU of a finished `llmkit train --task translation` run (its saved best model and
    tokenizer) on `split` of `data` (default: the run's own --data)."""
    import json

    from llmkit.model_io import load_model

    run_dir = Path(run_dir)
    saved = run_dir / "train_config.json"
    options = json.loads(saved.read_text()) if saved.is_file() else {}
    data = data or options.get("data")
    if data is None:
        raise UserError(f"{run_dir} does not say which data it trained on: pass the data folder")
    model = load_model(run_dir, device=device)
    tokenizer = load_tokenizer(run_dir)
    source = options.get("source_lang") or DEFAULT_DIRECTION[0]
    target = options.get("target_lang") or DEFAULT_DIRECTION[1]  # runs saved before the options existed
    return evaluate_bleu(model, tokenizer, data, split, source, target, limit)
