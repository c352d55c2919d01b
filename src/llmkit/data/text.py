"""Read raw text from a file or a folder of text files, with clear errors for bad input."""
from __future__ import annotations

import hashlib
from pathlib import Path

from llmkit.errors import UserError
from llmkit.textio import read_text

TEXT_SUFFIXES = (".txt", ".md")


def text_files(source: str | Path) -> list[Path]:
    """The file itself, or the .txt/.md files under a folder (sorted, recursive)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"no .txt or .md files in folder {path}: add text files or point --data at a file")
        return files
    raise UserError(f"data not found: {path}: pass an existing text file or folder with --data")


def read_corpus(source: str | Path) -> str:
    """All text of a source, files joined by a blank line; an empty corpus is an error."""
    texts = [read_text(p) for p in text_files(source)]
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise UserError(f"data {source} is empty: give a file with some text in it")
    return text


def fingerprint(source: str | Path) -> str:
    """Content hash of a source (names + bytes), to key the token cache."""
    h = hashlib.sha256()
    for p in text_files(source):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
