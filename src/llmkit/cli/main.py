"""`llmkit VERB ...`: each verb is a thin module under llmkit.cli with `register(subparsers)`.
User mistakes (UserError, bad flag values) print one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from llmkit.errors import UserError

VERBS = ["train", "generate", "chat", "demo", "convert", "data", "tokenizer", "presets", "info"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own default code)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmkit", description="Build, train, fine-tune and run transformer language models.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        try:
            module = importlib.import_module(f"llmkit.cli.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"llmkit.cli.{verb}":
                continue  # a verb not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
