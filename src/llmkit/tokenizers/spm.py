"""SentencePiece `.model` files (Llama 1/2, T5, ALBERT, llama2.c, ...) through the `sentencepiece`
library itself, so ids equal the reference exactly (a conversion to `tokenizers` can differ on
rare normalisation and byte-fallback corners).

Control tokens (`<s>`, `</s>`) and `<unk>` written in the text are matched as single ids, as
transformers' Llama tokenizer does; the text between them is encoded by SentencePiece unchanged.
Saved as `tokenizer.model` + `tokenizer_config.json`.

`add_special_tokens=True` prepends BOS unless a tokenizer_config.json beside the model says
add_bos_token=false: llama2.c and Meta's Llama code prompt with `encode(bos=True)`. (transformers 5
adds no BOS for a bare .model with no config; the config llmkit saves states the flag, which
transformers then follows.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from llmkit.errors import UserError
from llmkit.tokenizers.base import Tokenizer, register
from llmkit.utils import atomic_write_bytes, atomic_write_text

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
# Names SentencePiece models go by in released model folders, most common first.
MODEL_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model")


def _processor(model_bytes: bytes, source: Path | str) -> Any:
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError("reading a SentencePiece .model needs the sentencepiece package: pip install sentencepiece") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
        raise UserError(f"{source} is not a SentencePiece model ({e}); pass a valid .model file") from None
    return sp


@register
class SentencePieceTokenizer(Tokenizer):
    """A SentencePieceProcessor behind the common interface."""

    kind = "sentencepiece"
    priority = 20

    def __init__(self, model_bytes: bytes, source: str = "<bytes>", config: dict[str, Any] | None = None):
        self.model_bytes = model_bytes
        self.sp = _processor(model_bytes, source)
        config = config or {}
        self.chat_template = config.get("chat_template")
        self.add_bos_token = config.get("add_bos_token", True)
        self.add_eos_token = config.get("add_eos_token", False)
        self._roles = self._find_roles()
        # Control pieces (and unk) that written text may contain: longest first so "</s>" beats "<s>".
        matchable = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())
                     if self.sp.is_control(i) or self.sp.is_unknown(i)]
        matchable = sorted((p for p in matchable if p), key=len, reverse=True)
        # Decoding writes control pieces back; unk keeps SentencePiece's own rendering (" ⁇ ").
        self._special_ids = {i for i in map(self.sp.piece_to_id, matchable) if self.sp.is_control(i)}
        self._split = re.compile("(" + "|".join(map(re.escape, matchable)) + ")") if matchable else None

    def _find_roles(self) -> dict[str, str]:
        roles = {}
        for role, idx in (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()),
                          ("pad", self.sp.pad_id()), ("unk", self.sp.unk_id())):
            if 0 <= idx < self.sp.get_piece_size():
                roles[role] = self.sp.id_to_piece(idx)
        return roles

    # -- the interface --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text) if self._split is not None else [text]
        for i, part in enumerate(parts):
            if i % 2:  # odd parts are the matched special pieces
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        if add_special_tokens:
            if self.add_bos_token and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos_token and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def encode_with_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Whole-text ids; each token's characters are found by decoding growing prefixes (quadratic,
        fine for chat samples), since SentencePiece's Python API gives no offsets without protobuf."""
        ids = self.encode(text)
        ends: list[int | None] = []
        for k in range(len(ids)):
            prefix = self.decode(ids[: k + 1])
            ends.append(len(prefix) if text.startswith(prefix) else None)  # None: inside a split character
        mask, start, pending = [0] * len(ids), 0, []
        for k, end in enumerate(ends):
            pending.append(k)
            if end is None and k < len(ids) - 1:
                continue
            end = len(text) if end is None else end
            hit = int(any(s < end and start < e for s, e in spans))
            for j in pending:
                mask[j] = hit
            start, pending = end, []
        return ids, mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece drops control pieces when decoding; write them back between the runs.
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def special_token_strings(self) -> dict[str, str]:
        return dict(self._roles)

    def token_to_id(self, token: str) -> int | None:
        idx = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces; only the real unk piece maps to it.
        return None if idx == self.sp.unk_id() and token != self.sp.id_to_piece(idx) else idx

    def id_to_token(self, idx: int) -> str | None:
        return self.sp.id_to_piece(idx) if 0 <= idx < self.sp.get_piece_size() else None

    # -- files ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        atomic_write_bytes(directory / MODEL_FILE, self.model_bytes)
        config: dict[str, Any] = {"llmkit_kind": self.kind, "add_bos_token": self.add_bos_token,
                                  "add_eos_token": self.add_eos_token}
        config.update({f"{role}_token": tok for role, tok in self._roles.items()})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        return _model_in(directory) is not None

    @classmethod
    def load(cls, directory: str | Path) -> "SentencePieceTokenizer":
        directory = Path(directory)
        path = _model_in(directory)
        if path is None:
            raise UserError(f"no SentencePiece .model in {directory}: copy tokenizer.model into it")
        return cls.load_file(path)

    @classmethod
    def can_load_file(cls, path: Path) -> bool:
        return path.suffix == ".model"

    @classmethod
    def load_file(cls, path: Path) -> "SentencePieceTokenizer":
        from llmkit.tokenizers.hf import read_hf_config

        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}") from None
        config = read_hf_config(path.parent)
        flags = {k: v for k, v in (("add_bos_token", config["add_bos_token"]),
                                   ("add_eos_token", config["add_eos_token"])) if v is not None}
        return cls(data, str(path), {"chat_template": config["chat_template"], **flags})


def _model_in(directory: Path) -> Path | None:
    """The SentencePiece model file of a folder: a well-known name, else the only *.model there."""
    for name in MODEL_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.model"))
    return found[0] if len(found) == 1 else None
