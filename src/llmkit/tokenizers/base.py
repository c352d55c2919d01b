"""The one tokenizer interface every kind implements, and the registry that finds a saved one.

A model directory always carries its tokenizer; `load_tokenizer(path)` asks each registered kind,
most specific first (`priority`), whether it recognises the directory (or the single file) given.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Sequence

from llmkit.errors import UserError

# Role name -> the strings that usually play it, most common first. Used to recognise the role of
# a special token in user-given lists and in files that do not name roles (a bare tokenizer.json).
SPECIAL_ROLES: dict[str, tuple[str, ...]] = {
    "bos": ("<|bos|>", "<s>", "<|startoftext|>", "<|begin_of_text|>", "<bos>", "[BOS]"),
    "eos": ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
    "unk": ("<|unk|>", "<unk>", "[UNK]"),
    "mask": ("<|mask|>", "<mask>", "[MASK]"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
}


def guess_special_roles(tokens: Iterable[str]) -> dict[str, str]:
    """Map role -> token for the tokens whose string is a well-known spelling of that role."""
    present = list(tokens)
    roles: dict[str, str] = {}
    for role, spellings in SPECIAL_ROLES.items():
        for spelling in spellings:
            if spelling in present:
                roles[role] = spelling
                break
    return roles


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses register themselves under `kind`."""

    kind: ClassVar[str] = ""
    # Lower loads first: a directory may hold several formats (an HF Llama folder has both
    # tokenizer.json and tokenizer.model) and the richest description must win.
    priority: ClassVar[int] = 50
    # A Jinja chat template (transformers' format); None means DEFAULT_CHAT_TEMPLATE is used.
    chat_template: str | None = None
    chat_turn_ends: tuple[str, ...] = ()  # text that starts the next turn of its own template: where a reply stops

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; raises UserError when the text cannot be represented."""

    def adds_special_tokens(self) -> tuple[bool, bool]:
        """(prepends BOS, appends EOS): what `encode(..., add_special_tokens=True)` adds, read off
        the empty text (a lone id is taken as the BOS when BOS and EOS are one token)."""
        ids = self.encode("", add_special_tokens=True)
        bos = self.bos_id is not None and ids[:1] == [self.bos_id]
        eos = self.eos_id is not None and len(ids) > bos and ids[-1] == self.eos_id
        return bos, eos

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt to continue: `encode(text, add_special_tokens=True)`, the ids transformers'
        `tokenizer(text)` gives (so BOS where the tokenizer adds one: a Llama tokenizer.json's
        template, SentencePiece as llama2.c prompts it), less the EOS that rule appends, if it
        appends one: a prompt is to be continued, not ended."""
        ids = self.encode(text, add_special_tokens=True)
        return ids[:-1] if ids and self.adds_special_tokens()[1] else ids

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    # -- special tokens -------------------------------------------------------------------------
    def special_token_strings(self) -> dict[str, str]:
        """Role ("bos", "eos", "pad", "unk", "mask", ...) -> token string; empty when none."""
        return {}

    @property
    def special_tokens(self) -> dict[str, int]:
        """Role -> id for every special token this tokenizer knows."""
        out: dict[str, int] = {}
        for role, token in self.special_token_strings().items():
            idx = self.token_to_id(token)
            if idx is not None:
                out[role] = idx
        return out

    @property
    def bos_id(self) -> int | None:
        return self.special_tokens.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.special_tokens.get("eos")

    @property
    def pad_id(self) -> int | None:
        return self.special_tokens.get("pad")

    @property
    def unk_id(self) -> int | None:
        return self.special_tokens.get("unk")

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, None when absent (or when the kind has no token strings)."""
        return None

    def id_to_token(self, idx: int) -> str | None:
        """Vocabulary entry of one id, None when out of range."""
        return None

    # -- batches --------------------------------------------------------------------------------
    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode several texts; kinds with a fast batch path override this."""
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        padding: bool | Literal["longest", "max_length"] = True,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        add_special_tokens: bool = False,
        return_tensors: Literal["pt"] | None = None,
        pad_id: int | None = None,
    ) -> dict[str, Any]:
        """Encode a batch into equal-length rows plus an attention mask (1 = real token, 0 = padding).

        padding=True pads to the longest row, "max_length" to `max_length`; truncation cuts rows
        to `max_length` from the right. `pad_id` overrides the tokenizer's pad token.
        """
        if isinstance(texts, str):
            texts = [texts]
        if (truncation or padding == "max_length") and max_length is None:
            raise UserError("truncation or padding='max_length' needs max_length: pass max_length=N")
        if padding_side not in ("right", "left"):
            raise UserError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        rows = self.encode_many(list(texts), add_special_tokens=add_special_tokens)
        if truncation:
            rows = [r[:max_length] for r in rows]
        target = _padded_length(rows, padding, max_length)
        masks = [[1] * len(r) for r in rows]
        if target is not None and any(len(r) < target for r in rows):
            pad = self.pad_id if pad_id is None else pad_id
            if pad is None:
                raise UserError("this tokenizer has no pad token: pass pad_id=... (e.g. the eos id) or add a pad token")
            rows = [_pad(r, target, pad, padding_side) for r in rows]
            masks = [_pad(m, target, 0, padding_side) for m in masks]
        out: dict[str, Any] = {"input_ids": rows, "attention_mask": masks}
        if return_tensors == "pt":
            out = _to_tensors(out)
        elif return_tensors is not None:
            raise UserError(f"return_tensors must be 'pt' or None, not {return_tensors!r}")
        return out

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render a conversation with this tokenizer's chat template (or DEFAULT_CHAT_TEMPLATE)."""
        from llmkit.tokenizers.chat import render_chat

        text = render_chat(
            messages, chat_template or self.chat_template, add_generation_prompt, **self._template_tokens(), **extra
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def apply_chat_template_with_spans(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, **extra: Any
    ) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text plus the (start, end) character spans of assistant contents (to train on)."""
        from llmkit.tokenizers.chat import render_chat_with_spans

        return render_chat_with_spans(
            messages, self.chat_template, add_generation_prompt, **self._template_tokens(), **extra
        )

    def encode_with_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Ids of `text` and a 0/1 mask marking tokens inside the character `spans` (loss targets).

        This generic path encodes the pieces between span edges separately, so a token never
        straddles an edge; kinds with character offsets override it to keep whole-text ids.
        """
        ids: list[int] = []
        mask: list[int] = []
        pos = 0
        for start, end in sorted(spans):
            for piece, flag in ((text[pos:start], 0), (text[start:end], 1)):
                piece_ids = self.encode(piece) if piece else []
                ids += piece_ids
                mask += [flag] * len(piece_ids)
            pos = end
        tail = self.encode(text[pos:]) if pos < len(text) else []
        return ids + tail, mask + [0] * len(tail)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], **extra: Any
    ) -> tuple[list[int], list[int]]:
        """Ids of a rendered conversation and the mask of assistant-content tokens, for SFT."""
        text, spans = self.apply_chat_template_with_spans(messages, **extra)
        return self.encode_with_spans(text, spans)

    def _template_tokens(self) -> dict[str, str]:
        """Special tokens as templates see them (`bos_token`, `eos_token`, ...), as transformers passes them."""
        tokens = {f"{role}_token": tok for role, tok in self.special_token_strings().items()}
        tokens.setdefault("bos_token", "")
        tokens.setdefault("eos_token", "")
        return tokens

    # -- persistence ----------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write this tokenizer's files into `directory` (which exists)."""

    @classmethod
    @abstractmethod
    def can_load(cls, directory: Path) -> bool:
        """Whether `directory` holds files of this kind."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> "Tokenizer": ...

    @classmethod
    def can_load_file(cls, path: Path) -> bool:
        """Whether the single file `path` is of this kind (e.g. a `.model` or a `tokenizer.json`)."""
        return False

    @classmethod
    def load_file(cls, path: Path) -> "Tokenizer":
        """Load from one file; kinds that answer `can_load_file` override this."""
        raise NotImplementedError(cls.kind)


def _padded_length(rows: list[list[int]], padding: bool | str, max_length: int | None) -> int | None:
    """The row length padding aims for, or None when rows keep their own lengths."""
    if padding is False or padding == "do_not_pad":
        return None
    if padding == "max_length":
        return max_length
    if padding is True or padding == "longest":
        return max((len(r) for r in rows), default=0)
    raise UserError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")


def _pad(row: list[int], length: int, value: int, side: str) -> list[int]:
    fill = [value] * (length - len(row))
    return row + fill if side == "right" else fill + row


def _to_tensors(batch: dict[str, list[list[int]]]) -> dict[str, Any]:
    import torch

    lengths = {len(r) for r in batch["input_ids"]}
    if len(lengths) > 1:
        raise UserError("rows have different lengths: pass padding=True to get tensors")
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


TOKENIZERS: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    """Class decorator: make a tokenizer kind discoverable by `load_tokenizer`."""
    TOKENIZERS[cls.kind] = cls
    return cls


def _by_priority() -> list[type[Tokenizer]]:
    return sorted(TOKENIZERS.values(), key=lambda c: c.priority)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load whichever tokenizer kind a directory (or one tokenizer file) belongs to."""
    path = Path(path)
    if path.is_file():
        for cls in _by_priority():
            if cls.can_load_file(path):
                return cls.load_file(path)
        raise UserError(
            f"{path} is not a tokenizer file this library reads: pass a directory, a tokenizer.json, "
            "a SentencePiece .model, or a GPT-2 vocab.json (with merges.txt beside it)"
        )
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}: pass a model or run directory")
    for cls in _by_priority():
        if cls.can_load(path):
            return cls.load(path)
    raise UserError(
        f"no tokenizer files in {path}: expected one of the kinds {sorted(TOKENIZERS)}; "
        "train one (llmkit train) or copy the tokenizer files into the directory"
    )
