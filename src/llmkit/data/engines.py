"""The fastest exact way to encode many texts with a given tokenizer.

A byte-level BPE with GPT-2's pre-tokenizer (GPT-2 itself and BPEs trained like it) is encoded by
tiktoken's engine, rebuilt from the tokenizer's own vocabulary, when tiktoken is installed: it is
several times faster per core than the `tokenizers` library. Every other tokenizer uses its own
batch path (`Tokenizer.encode_many`). A candidate engine is only used if it gives the same ids as
the tokenizer on a probe text (and, in `prepare`, on the start of the corpus).

This module also decides whether a long document may be cut into pieces and encoded piecewise
(`splits_safely`), which both parallelism and constant memory need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from llmkit.tokenizers import Tokenizer

# GPT-2's pre-tokenizer regex, as `tokenizers`' ByteLevel(use_regex=True) and tiktoken's "gpt2" use it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE_TEXT = (
    "Hello world! It's 2024; we'll see. Ünïcödé — 中文字符, русский текст, العربية.\n"
    "Emoji 🙂👍🏽 and digits 1234567890 3.14159\n\n\n   spaces\t\ttabs  \n"
    "<|endoftext|>after the end <|endoftext|>\n    indented code():\n        return x\n"
)

# (left, right) cut points where left ends in "<non-space>\n" and right starts with a non-space.
SPLIT_PROBES = [
    ("Hello world.\n", "Next line here"), ("a\n", "'s a test"), ("数字 123\n", "émoji 🙂 ok"),
    ("x = 1\n", "y = 2"), ("The end.\n", "THE END"), ("end\n", "1234"), ("-\n", "--- ---"),
]


@dataclass
class Engine:
    """An encoder for many texts at once; `name` is reported so users know which path ran."""

    name: str
    encode_batch: Callable[[Sequence[str]], list[np.ndarray]]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (Radford et al., 2019, encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _is_gpt2_pretokenizer(spec: dict[str, Any] | None) -> bool:
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        steps = spec.get("pretokenizers", [])
        return len(steps) == 1 and _is_gpt2_pretokenizer(steps[0])
    return spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space", False)


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else (merge[0], merge[1])  # type: ignore[return-value]


def _tiktoken_ranks(model: dict[str, Any]) -> dict[bytes, int] | None:
    """Byte-string ranks for tiktoken, or None when the BPE cannot be expressed that way.

    tiktoken merges the adjacent pair whose joined bytes have the lowest id; that equals the BPE
    merge order only when merge results have increasing ids, as GPT-2-style vocabularies do.
    """
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        return None
    decode = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = model["vocab"]
    try:
        ranks = {bytes(decode[c] for c in token): idx for token, idx in vocab.items()}
    except KeyError:
        return None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    last = -1
    for merge in model.get("merges", []):
        left, right = _merge_pair(merge)
        idx = vocab.get(left + right)
        if idx is None or idx <= last:
            return None
        last = idx
    return ranks


def tiktoken_engine(tokenizer: Tokenizer) -> Engine | None:
    """tiktoken's BPE core over this tokenizer's vocabulary, if it is GPT-2-style byte-level BPE."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or getattr(tokenizer, "add_bos_token", None) or getattr(tokenizer, "add_eos_token", None):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") is not None or not _is_gpt2_pretokenizer(spec.get("pre_tokenizer")):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    ranks = _tiktoken_ranks(spec["model"])
    if ranks is None:
        return None
    # Added tokens are matched in the text before BPE (as `tokenizers` does), never merged to.
    specials = {t["content"]: t["id"] for t in added}
    for content in specials:
        ranks.pop(content.encode(), None)
    try:
        enc = tiktoken.Encoding("llmkit-bytelevel-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    except Exception:  # tiktoken rejects unusual rank tables; the tokenizer's own path still works
        return None
    allowed = set(specials)

    def encode_batch(texts: Sequence[str]) -> list[np.ndarray]:
        return [enc.encode_to_numpy(t, allowed_special=allowed) for t in texts]

    return Engine("tiktoken", encode_batch)


def batch_engine(tokenizer: Tokenizer) -> Engine:
    """The tokenizer's own batch path (HF `encode_batch`, SentencePiece, characters, ...)."""
    def encode_batch(texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_many(list(texts))]

    return Engine(f"{tokenizer.kind}.encode_many", encode_batch)


# Candidates, fastest first; each returns None when it does not apply to a tokenizer.
ENGINES: list[Callable[[Tokenizer], Engine | None]] = [tiktoken_engine]


def agrees(engine: Engine, tokenizer: Tokenizer, texts: Sequence[str]) -> bool:
    """Whether `engine` gives exactly the tokenizer's ids on `texts`."""
    ours = engine.encode_batch(texts)
    theirs = tokenizer.encode_many(list(texts))
    return all(list(map(int, a)) == list(b) for a, b in zip(ours, theirs))


def best_engine(tokenizer: Tokenizer, sample: str = "") -> Engine:
    """The fastest engine that reproduces the tokenizer exactly on the probe text and `sample`."""
    probes = [PROBE_TEXT] + ([sample] if sample else [])
    for make in ENGINES:
        engine = make(tokenizer)
        if engine is not None and agrees(engine, tokenizer, probes):
            return engine
    return batch_engine(tokenizer)


def splits_safely(tokenizer: Tokenizer) -> bool:
    """Whether encoding "a\\n" and "b" separately equals encoding "a\\nb" at a newline between
    non-space characters. True for GPT-2-style byte-level BPE and whitespace pre-tokenizers; false
    for tokenizers that treat the start of a text specially (a prefix space, SentencePiece's "▁")."""
    for left, right in SPLIT_PROBES:
        if tokenizer.encode(left + right) != tokenizer.encode(left) + tokenizer.encode(right):
            return False
    return True


def _is_space(ch: str) -> bool:
    return ch.isspace()


def safe_cut(text: str, before: int) -> int:
    """The last index <= `before` just after a newline with non-space characters on both sides
    (where `splits_safely` tokenizers give the same ids cut or uncut); 0 when there is none."""
    pos = text.rfind("\n", 0, before)
    while pos > 0:
        if pos + 1 < len(text) and not _is_space(text[pos - 1]) and not _is_space(text[pos + 1]):
            return pos + 1
        pos = text.rfind("\n", 0, pos)
    return 0
