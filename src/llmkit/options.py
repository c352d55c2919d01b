"""One validation layer for every option: a `Rule` says what values an option takes (its type, range,
choices, whether it may be unset), checks typed data (recipes, Python callers) and parses command-line
text with the same words, so `--lr nan`, `lr: nan` in a recipe and `TrainConfig(lr=nan)` get the same
one-line answer before anything runs or is written.

Config dataclasses declare a rule per field with `option(default, help, rule)`; `check_fields`
checks an instance, `llmkit.cli.args` turns the fields into flags whose `type=` is the rule's parser.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import UserError

_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


@dataclass(frozen=True)
class Rule:
    """The values one option accepts. Bounds are inclusive (`min`, `max`) or exclusive (`above`,
    `below`); numbers must be finite; `optional` allows None ("not set")."""

    type: type
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False

    def describe(self) -> str:
        """The accepted values in words, e.g. "a finite number > 0" or "one of cpu, cuda"."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        bounds = [f">= {_num(self.min)}" if self.min is not None else None,
                  f"> {_num(self.above)}" if self.above is not None else None,
                  f"<= {_num(self.max)}" if self.max is not None else None,
                  f"< {_num(self.below)}" if self.below is not None else None]
        words = " and ".join(b for b in bounds if b)
        return _KINDS[self.type] + (f" {words}" if words else "")

    def check(self, value: Any, name: str) -> Any:
        """`value` as the option's type, or a UserError naming `name`, what it must be and what it was.
        Types are strict (5.5 is not an integer, "yes" is not a boolean); a float option also takes
        an integer, and a number written as text (YAML reads `1e-3` as a string)."""
        if value is None:
            if self.optional:
                return None
            raise UserError(f"{name} must be {self.describe()}, got nothing (null)")
        value = self._typed(value, name)
        if not self._in_range(value):
            raise UserError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """argparse `type=`: the value of a command-line word, or argparse's error (one line, exit 2)."""
        try:
            if self.type is int:
                value: Any = int(text)
            elif self.type is float:
                value = float(text)
            else:
                value = text
            return self.check(value, "the value")
        except (ValueError, UserError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None

    def _typed(self, value: Any, name: str) -> Any:
        wrong = UserError(f"{name} must be {self.describe()}, got {type(value).__name__} {value!r}")
        if self.type is bool:
            if not isinstance(value, bool):
                raise wrong
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong
            return value
        if self.type is float:
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise wrong from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise wrong
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{name} must be {self.describe()}, got {value!r}")
            return value
        if not isinstance(value, str):
            raise wrong
        return value

    def _in_range(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.type is str or self.type is bool:
            return True
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --- the rules options are declared with ------------------------------------------------------

def integer(min: int | None = None, max: int | None = None, optional: bool = False) -> Rule:
    return Rule(int, min=min, max=max, optional=optional)


def number(min: float | None = None, max: float | None = None, above: float | None = None,
           below: float | None = None, optional: bool = False) -> Rule:
    return Rule(float, min=min, max=max, above=above, below=below, optional=optional)


def one_of(*choices: str, optional: bool = False) -> Rule:
    return Rule(str, choices=tuple(choices), optional=optional)


def text(optional: bool = False) -> Rule:
    return Rule(str, optional=optional)


def flag() -> Rule:
    return Rule(bool)


SEED = integer(0, 2**32 - 1)  # what numpy accepts and torch mixes without overflow
COUNT = integer(1, 2**31 - 1)  # a positive count that fits every index type
NONNEGATIVE = integer(0, 2**31 - 1)
MAX_VOCAB = 1 << 22  # token ids are stored as uint32; no tokenizer in use comes near 4M entries
VOCAB_SIZE = integer(1, MAX_VOCAB)


def option(default: Any, help: str, rule: Rule | None = None) -> Any:
    """A dataclass field with its help text and rule (inferred from the annotation when None)."""
    return field(default=default, metadata={"help": help, "rule": rule})


def rule_of(f: dataclasses.Field) -> Rule | None:
    """The field's declared rule, or one inferred from a scalar annotation (`int | None` -> an
    optional integer); None for fields that are not options (lists, dicts)."""
    declared = f.metadata.get("rule")
    if declared is not None:
        return declared
    tp = f.type
    if isinstance(tp, str):
        tp = eval(tp, {}, {})  # annotations are strings under `from __future__ import annotations`
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return None
        tp = args[0]
    return Rule(tp, optional=optional) if tp in _KINDS else None


def check_fields(obj: Any, where: str = "") -> None:
    """Check every ruled field of a dataclass instance, storing the typed value back (so a float
    option given 1 holds 1.0). `where` prefixes the name in messages."""
    for f in dataclasses.fields(obj):
        rule = rule_of(f)
        if rule is not None:
            object.__setattr__(obj, f.name, rule.check(getattr(obj, f.name), f"{where}{f.name}"))


def check_id2label(id2label: Any, num_labels: int) -> dict[str, str] | None:
    """A config's id2label as {"0": name, ...} with one entry per label (int keys, as Python gives
    them, accepted; None stays None); one line naming the problem otherwise."""
    if id2label is None:
        return None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise UserError(f"config: id2label must map class indices to names, got {id2label!r}")
    out = {str(k): v for k, v in id2label.items()}
    if sorted(out) != sorted(str(i) for i in range(num_labels)):
        raise UserError(f"config: id2label has keys {sorted(out)[:5]} but num_labels is {num_labels}: "
                        f"give one name for each of 0..{num_labels - 1}")
    return out


def label_names(id2label: dict[str, str] | None, num_labels: int) -> list[str]:
    """The class names in index order (`id2label`, else "LABEL_i" as transformers names them)."""
    names = id2label or {}
    return [names.get(str(i), f"LABEL_{i}") for i in range(num_labels)]
