"""Character-level tokenizer: one id per distinct character of the training text (nanoGPT's
shakespeare_char). Tiny vocabulary, no unknown handling: a character never seen is an error, and so
is an id with no character. Its chat template is plain text (`PLAIN_CHAT_TEMPLATE`: "User: ..." lines)
because ChatML's `<|...|>` markers are characters a training text rarely has."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from llmkit.errors import UserError
from llmkit.tokenizers.base import Tokenizer, register
from llmkit.tokenizers.chat import PLAIN_CHAT_TEMPLATE, PLAIN_TURN_ENDS
from llmkit.utils import atomic_write_text

FILENAME = "char_tokenizer.json"


@register
class CharTokenizer(Tokenizer):
    kind = "char"
    chat_template = PLAIN_CHAT_TEMPLATE
    chat_turn_ends = PLAIN_TURN_ENDS  # text that starts the next turn: where a chat reply stops

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise UserError("cannot build a character vocabulary from empty text: give a non-empty file")
        return cls(sorted(set(text)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise UserError(
                f"text has characters outside the character vocabulary: {self.missing(text)!r}; "
                "use only characters seen in training, or train with --tokenizer bpe"
            ) from None

    def missing(self, text: str) -> str:
        """The distinct characters of `text` that the vocabulary lacks, sorted ("" when none)."""
        return "".join(sorted({c for c in text if c not in self.stoi}))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        n = len(self.chars)
        out = []
        for i in ids:
            if not 0 <= i < n:  # a negative id would index from the end: a wrong character, silently
                raise UserError(f"token id {i} has no character: the character vocabulary has ids 0-{n - 1}; the "
                                "model's vocabulary is larger than its tokenizer's, or the ids come from another "
                                "tokenizer: use the tokenizer the model was trained with")
            out.append(self.chars[i])
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / FILENAME, json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False))

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        return (directory / FILENAME).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        path = Path(directory) / FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"corrupt character tokenizer {path}: {e}; re-train or restore the file") from None
        problem = _chars_problem(data)
        if problem:
            raise UserError(f"corrupt character tokenizer {path}: {problem}; re-train or restore the file")
        return cls(data["chars"])


def _chars_problem(data: object) -> str | None:
    """What is wrong with a loaded char_tokenizer.json, or None: it must be an object whose "chars"
    is a list of distinct single characters (the id of a character is its position)."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object with \"chars\""
    chars = data.get("chars")
    if not isinstance(chars, list):
        return "it has no \"chars\" list" if chars is None else f"\"chars\" is a {type(chars).__name__}, not a list"
    bad = [c for c in chars if not (isinstance(c, str) and len(c) == 1)]
    if bad:
        return f"\"chars\" holds {bad[0]!r}, not a single character"
    if len(set(chars)) != len(chars):
        dup = next(c for i, c in enumerate(chars) if c in chars[:i])
        return f"\"chars\" lists {dup!r} more than once"
    if not chars:
        return "\"chars\" is empty"
    return None
