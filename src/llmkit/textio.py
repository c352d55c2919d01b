"""Reading a user's text file: one place for the checks (missing, unreadable, binary, not UTF-8)
that every layer reading corpora needs, each a one-line UserError with the fix."""
from __future__ import annotations

from pathlib import Path

from llmkit.errors import UserError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}: check the path")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}: check the path and its permissions") from None
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks binary (it contains NUL bytes): pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8") from None
