"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), built from OpenAI's released merge list `bpe_simple_vocab_16e6.txt.gz`.

The vocabulary is derived as OpenAI's `simple_tokenizer.py` derives it: the 256 byte symbols (in
GPT-2's byte -> printable-unicode order), the same 256 with the end-of-word mark `</w>`, one token
per merge of the first 49152 - 256 - 2 merges, then `<|startoftext|>` and `<|endoftext|>`: 49,408
ids. Text is NFC-normalised, runs of whitespace become one space and everything is lowercased;
words are split by CLIP's regex (contractions, letter runs, single digits, punctuation runs), mapped
to byte symbols and merged with `</w>` closing each word. `encode(text, add_special_tokens=True)`
wraps the ids in start/end of text, as transformers' `CLIPTokenizer` does; its padding token is
`<|endoftext|>` too, so the text tower pools at the *first* end-of-text.

The result is a `CLIPTokenizer`, an `HFTokenizer` (a `tokenizers` pipeline): it saves as
tokenizer.json + tokenizer_config.json and loads back with `llmkit.tokenizers.load_tokenizer`
giving the same ids.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Sequence

from tokenizers import Regex
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from llmkit.errors import UserError
from llmkit.tokenizers.base import register
from llmkit.tokenizers.hf import CONFIG_FILE, TOKENIZER_FILE, HFTokenizer
from llmkit.utils import atomic_write_text

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
ENV_VAR = "LLMKIT_CLIP_BPE"  # path of the .gz where it is not in the default places
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds 262,144)
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word split: the special tokens, English contractions, letter runs, single digits, runs of
# anything else that is not whitespace
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable unicode character: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards, in byte order (Radford et al. 2019)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def read_merges(path: str | Path, n_merges: int = N_MERGES) -> list[tuple[str, str]]:
    """The first `n_merges` merges of the gzip'd merge list (its first line is a version header)."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the CLIP merge list {path}: {e}; restore {VOCAB_FILE_NAME} from openai/CLIP") from None
    merges = [tuple(line.split()) for line in lines[1:n_merges + 1]]
    if len(merges) < n_merges or any(len(m) != 2 for m in merges):
        raise UserError(f"{path} is not CLIP's merge list (expected {n_merges} lines of two symbols after a header): "
                        f"restore {VOCAB_FILE_NAME} from openai/CLIP")
    return merges  # type: ignore[return-value]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id as simple_tokenizer builds it: bytes, bytes + `</w>`, merges, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> BackendTokenizer:
    """The `tokenizers` pipeline: NFC, whitespace runs -> " ", lowercase; CLIP's split; byte symbols;
    BPE with `</w>` ending each word; BOS ... EOS around a text when special tokens are added."""
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD,
                                          continuing_subword_prefix="", unk_token=EOS, fuse_unk=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.add_special_tokens([BOS, EOS])
    # an end-of-word mark reads as a space (the byte symbol of " "), then byte symbols back to text
    backend.decoder = decoders.Sequence([decoders.Replace(END_OF_WORD, bytes_to_unicode()[ord(" ")]),
                                         decoders.ByteLevel()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return backend


@register
class CLIPTokenizer(HFTokenizer):
    """CLIP's BPE as an `HFTokenizer` whose decoding drops the space the last word's `</w>` leaves
    (as transformers' CLIPTokenizer decodes). Saved with `llmkit_kind: clip` in tokenizer_config.json;
    where this module is not imported such a folder loads as a plain `HFTokenizer` (same ids)."""

    kind = "clip"
    priority = 5  # before HFTokenizer, which reads the same files

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return super().decode(ids, skip_special_tokens=skip_special_tokens).strip()

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        config = directory / CONFIG_FILE
        if not (directory / TOKENIZER_FILE).is_file() or not config.is_file():
            return False
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("llmkit_kind") == cls.kind
        except (OSError, ValueError, AttributeError):
            return False

    @classmethod
    def can_load_file(cls, path: Path) -> bool:
        return False


def find_vocab_file() -> Path:
    """Where the merge list is: $LLMKIT_CLIP_BPE, or the data folder beside a development checkout."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(Path(__file__).resolve().parents[4] / "shared" / "data" / "tokenizers" / "clip" / VOCAB_FILE_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"CLIP's merge list {VOCAB_FILE_NAME} was not found: download it from openai/CLIP "
                    f"(clip/{VOCAB_FILE_NAME}) and set {ENV_VAR}=/path/to/{VOCAB_FILE_NAME}")


def clip_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer from the merge list at `path` (None: `find_vocab_file()`)."""
    merges = read_merges(path if path is not None else find_vocab_file())
    backend = clip_backend(clip_vocab(merges), merges)
    return CLIPTokenizer(backend, special_tokens={"bos": BOS, "eos": EOS, "pad": EOS, "unk": EOS})


def write_vocab_files(directory: str | Path, path: str | Path | None = None) -> tuple[Path, Path]:
    """vocab.json + merges.txt (the files transformers' `CLIPTokenizer` reads) derived from the merge
    list; returns their paths."""
    directory = Path(directory)
    merges = read_merges(path if path is not None else find_vocab_file())
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    atomic_write_text(vocab_path, json.dumps(clip_vocab(merges), ensure_ascii=False))
    atomic_write_text(merges_path, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


__all__ = ["BOS", "CLIPTokenizer", "ENV_VAR", "EOS", "VOCAB_SIZE", "bytes_to_unicode", "clip_backend", "clip_tokenizer", "clip_vocab",
           "find_vocab_file", "read_merges", "write_vocab_files"]
