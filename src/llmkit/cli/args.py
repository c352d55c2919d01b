"""Turn dataclass fields into argparse options, so each option is declared once (on the config),
with its rule (`llmkit.options`) as the parser: a bad value is argparse's one line and exit 2."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from llmkit.errors import UserError
from llmkit.options import rule_of

STDIN_LIMIT = 64 << 20  # bytes of standard input a verb reads at most (/dev/zero never ends)
LINE_LIMIT = 1 << 20  # bytes of one chat line


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """--field-name for each field; every default is None so the caller can tell 'given' from 'not'."""
    for f in dataclasses.fields(cls):
        rule = rule_of(f)
        if f.name in skip or rule is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if rule.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "{" + ",".join(rule.choices) + "}" if rule.choices else rule.type.__name__.upper()
            parser.add_argument(flag, dest=f.name, type=rule.parse, default=None, help=help_text, metavar=metavar)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _decoded(data: bytes | str, what: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None


def stdin_text(limit: int = STDIN_LIMIT) -> str:
    """All of standard input as UTF-8 text, or one line saying why not: closed, not UTF-8, or
    endless (more than `limit` bytes: a device such as /dev/zero, not a file)."""
    stream = sys.stdin
    if stream is None:
        raise UserError("standard input is closed: pass the text as an argument or pipe it in")
    source = getattr(stream, "buffer", stream)
    data = source.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"standard input goes on past {limit >> 20} MB (a device such as /dev/zero?): "
                        "pass a file's contents, or split it")
    return _decoded(data, "standard input")


class StdinLines:
    """Standard input one line at a time for an interactive verb (chat), each line bounded and
    decoded as UTF-8: a closed stdin, binary input or a line without end is one clear line."""

    def __init__(self, stream: Any = None, limit: int = LINE_LIMIT) -> None:
        stream = sys.stdin if stream is None else stream
        if stream is None:
            raise UserError("standard input is closed: chat reads the conversation from it; run it in a "
                            "terminal or pipe the messages in")
        self.stream, self.limit = stream, limit
        self.source = getattr(stream, "buffer", stream)

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def readline(self) -> str:
        line = self.source.readline(self.limit + 1)
        if len(line) > self.limit:
            raise UserError(f"a line of standard input is longer than {self.limit >> 20} MB (a device such as "
                            "/dev/zero?): send shorter messages")
        return _decoded(line, "standard input")
