"""Train a tokenizer on text files: byte-level BPE (GPT-2, "Language Models are Unsupervised
Multitask Learners" 2019), WordPiece (BERT, 2018) or Unigram (SentencePiece, "Subword
Regularization" 2018) with the `tokenizers` library, or a character vocabulary.

Each kind is a builder in `BUILDERS`: it returns the untrained pipeline and its trainer; the
shared code reads the files, trains, and wraps the result as an `HFTokenizer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmkit.errors import UserError
from llmkit.options import VOCAB_SIZE, integer
from llmkit.textio import read_text
from llmkit.tokenizers.base import Tokenizer, guess_special_roles
from llmkit.tokenizers.char import CharTokenizer
from llmkit.tokenizers.chat import ROLE_MARKER_CHAT_TEMPLATE
from llmkit.tokenizers.hf import HFTokenizer

ROLE_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
DEFAULT_SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|mask|>", *ROLE_MARKERS]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's byte-fallback spelling

NORMALIZERS: dict[str, Callable[[], normalizers.Normalizer]] = {
    "nfc": normalizers.NFC,
    "nfd": normalizers.NFD,
    "nfkc": normalizers.NFKC,
    "nfkd": normalizers.NFKD,
}


@dataclass
class TrainOptions:
    vocab_size: int
    min_frequency: int
    special_tokens: list[str]
    roles: dict[str, str]
    lowercase: bool
    normalization: str | None


def _normalizer(opts: TrainOptions) -> normalizers.Normalizer | None:
    steps = [NORMALIZERS[opts.normalization]()] if opts.normalization else []
    if opts.lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps) if steps else None


def _template(opts: TrainOptions, with_eos: bool) -> processors.TemplateProcessing | None:
    """For encoders (`with_eos`), `add_special_tokens=True` wraps the text in bos ... eos. For
    decoders it adds nothing: llmkit trains them on documents separated by eos alone, so a prompt
    (which generation encodes with add_special_tokens=True, as transformers does) goes in as the
    training text did."""
    bos, eos = opts.roles.get("bos"), opts.roles.get("eos")
    if bos is None or not with_eos:
        return None
    single = f"{bos} $A" + (f" {eos}" if with_eos and eos else "")
    pair = f"{bos} $A" + (f" {eos}" if with_eos and eos else "") + " $B:1" + (f" {eos}:1" if with_eos and eos else "")
    tokens = [(t, i) for i, t in enumerate(opts.special_tokens) if t in (bos, eos)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


def _build_bpe(opts: TrainOptions) -> tuple[BackendTokenizer, trainers.Trainer]:
    """Byte-level BPE: every byte is in the alphabet, so any text encodes and decodes back exactly."""
    floor = 256 + len(opts.special_tokens)  # the byte alphabet is always kept: the trainer would overshoot
    if opts.vocab_size < floor:
        raise UserError(f"bpe vocab_size must be at least {floor} (256 byte tokens + {len(opts.special_tokens)} "
                        f"special tokens), not {opts.vocab_size}: raise --vocab-size")
    tok = BackendTokenizer(models.BPE())
    tok.normalizer = _normalizer(opts)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    template = _template(opts, with_eos=False)
    tok.post_processor = processors.Sequence(post + [template]) if template else post[0]
    trainer = trainers.BpeTrainer(
        vocab_size=opts.vocab_size, min_frequency=opts.min_frequency, special_tokens=opts.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    return tok, trainer


def _build_wordpiece(opts: TrainOptions) -> tuple[BackendTokenizer, trainers.Trainer]:
    """BERT's WordPiece: split on whitespace and punctuation, `##` marks word continuations."""
    unk = opts.roles.get("unk")
    if unk is None:
        raise UserError("wordpiece needs an unknown token: add <|unk|> or [UNK] to --special-tokens")
    tok = BackendTokenizer(models.WordPiece(unk_token=unk))
    steps = [normalizers.BertNormalizer(lowercase=opts.lowercase, strip_accents=False)]
    if opts.normalization:
        steps.append(NORMALIZERS[opts.normalization]())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = _template(opts, with_eos=True)
    trainer = trainers.WordPieceTrainer(
        vocab_size=opts.vocab_size, min_frequency=opts.min_frequency, special_tokens=opts.special_tokens,
        continuing_subword_prefix="##", show_progress=False,
    )
    return tok, trainer


def _build_unigram(opts: TrainOptions) -> tuple[BackendTokenizer, trainers.Trainer]:
    """SentencePiece-style Unigram over `▁`-marked words; 256 byte pieces are added after training
    (byte fallback), so the vocabulary learned here leaves room for them."""
    learned = opts.vocab_size - len(BYTE_PIECES)
    if learned <= len(opts.special_tokens):
        raise UserError(f"unigram vocab_size must exceed {len(BYTE_PIECES) + len(opts.special_tokens)} "
                        "(256 byte pieces + special tokens): raise --vocab-size")
    tok = BackendTokenizer(models.Unigram())
    tok.normalizer = _normalizer(opts)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="never")])
    tok.post_processor = _template(opts, with_eos=False)
    trainer = trainers.UnigramTrainer(
        vocab_size=learned, special_tokens=opts.special_tokens, unk_token=opts.roles.get("unk"),
        show_progress=False,
    )
    return tok, trainer


def _add_byte_fallback(tok: BackendTokenizer) -> BackendTokenizer:
    """Rebuild a trained Unigram model with `<0xNN>` pieces and byte_fallback, making it lossless."""
    import json

    spec = json.loads(tok.to_str())
    vocab = [tuple(v) for v in spec["model"]["vocab"]]
    have = {p for p, _ in vocab}
    floor = min((s for _, s in vocab if s != 0.0), default=-10.0) - 10.0
    vocab += [(p, floor) for p in BYTE_PIECES if p not in have]
    spec["model"]["vocab"] = [list(v) for v in vocab]
    spec["model"]["byte_fallback"] = True
    return BackendTokenizer.from_str(json.dumps(spec))


@dataclass(frozen=True)
class Builder:
    build: Callable[[TrainOptions], tuple[BackendTokenizer, trainers.Trainer]]
    finish: Callable[[BackendTokenizer], BackendTokenizer] = lambda tok: tok


BUILDERS: dict[str, Builder] = {
    "bpe": Builder(_build_bpe),
    "wordpiece": Builder(_build_wordpiece),
    "unigram": Builder(_build_unigram, _add_byte_fallback),
}


def read_text_file(path: str | Path) -> str:
    """A corpus file as text; missing, unreadable or binary files are user errors with a fix."""
    return read_text(path)


def _lines(files: Iterable[str | Path], texts: Iterable[str] | None) -> Iterator[str]:
    for path in files:
        yield from read_text_file(path).splitlines(keepends=True)
    if texts is not None:
        for text in texts:
            yield from text.splitlines(keepends=True)


def train_tokenizer(
    kind: str,
    files: list[str | Path] | None = None,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    lowercase: bool = False,
    normalization: str | None = None,
) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe", "wordpiece", "unigram" or "char") on files and/or texts.

    Special tokens default to bos/eos/pad/unk/mask plus the chat role markers; their roles are
    recognised from their spelling (`<s>`, `[PAD]`, `<|eos|>`, ...).
    """
    files = list(files or [])
    if kind == "char":
        return CharTokenizer.train("".join(_lines(files, texts)))
    if kind not in BUILDERS:
        raise UserError(f"unknown tokenizer kind {kind!r}: choose one of {sorted([*BUILDERS, 'char'])}")
    if normalization is not None and normalization not in NORMALIZERS:
        raise UserError(f"unknown normalization {normalization!r}: choose one of {sorted(NORMALIZERS)}")
    if not files and texts is None:
        raise UserError("nothing to train on: pass text files (or texts=...)")
    specials = list(dict.fromkeys(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens))
    opts = TrainOptions(vocab_size, min_frequency, specials, guess_special_roles(specials), lowercase, normalization)
    VOCAB_SIZE.check(vocab_size, "vocab_size")
    integer(0).check(min_frequency, "min_frequency")
    if vocab_size <= len(specials):
        raise UserError(f"vocab_size {vocab_size} leaves no room beyond {len(specials)} special tokens: raise it")
    builder = BUILDERS[kind]
    tok, trainer = builder.build(opts)
    seen = {"chars": 0}
    tok.train_from_iterator(_counting(_lines(files, texts), seen), trainer=trainer)
    if seen["chars"] == 0:
        raise UserError("the training corpus is empty: pass files with text in them")
    if tok.get_vocab_size() > vocab_size:  # wordpiece keeps every character of the corpus, whatever the size
        raise UserError(f"{kind} vocab_size must be at least {tok.get_vocab_size()} for this corpus (its distinct "
                        f"characters and their continuations + {len(specials)} special tokens), not {vocab_size}: "
                        "raise --vocab-size")
    tok = builder.finish(tok)
    template = ROLE_MARKER_CHAT_TEMPLATE if all(m in specials for m in ROLE_MARKERS) else None
    return HFTokenizer(tok, special_tokens=opts.roles, chat_template=template)


def _counting(lines: Iterator[str], seen: dict[str, int]) -> Iterator[str]:
    """Pass lines through, counting non-whitespace characters so an empty corpus is caught."""
    for line in lines:
        seen["chars"] += len(line.strip())
        yield line
