"""Turn dataclass fields into argparse options, so each option is declared once (on the config)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_SCALARS = {int, float, str}


def _scalar_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, {}, {})  # annotations are strings under `from __future__ import annotations`
    args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else [tp]
    return args[0] if len(args) == 1 else None


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """--field-name for each field; every default is None so the caller can tell 'given' from 'not'."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _scalar_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif tp in _SCALARS:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text,
                                metavar=tp.__name__.upper())


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
