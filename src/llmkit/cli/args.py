"""Turn dataclass fields into argparse options, so each option is declared once (on the config),
with its rule (`llmkit.options`) as the parser: a bad value is argparse's one line and exit 2."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from llmkit.options import rule_of


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
