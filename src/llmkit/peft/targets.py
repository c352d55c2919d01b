"""Which linear layers an adapter method wraps: target names resolved to modules and row slices.

llmkit fuses the query, key and value projections into one `attn.qkv` linear layer; the methods
that adapt "q" and "v" (LoRA's usual targets, Hu et al. 2021) adapt those rows of it only. A
`Target` is one adapted place: the module path of the linear layer, the rows it covers (None: all
of them) and its *name*, which is the path with the fused layer replaced by the slice
(`blocks.0.attn.q`): adapter state dicts are keyed by these names, and
`llmkit.interop.peft_format` maps them to the Hugging Face module names `peft` uses.

Target patterns (`--target-modules q,v`): short names matched against the last part of a target's
name, with the usual `peft` / Hugging Face spellings accepted too (q_proj, v_proj, c_attn, ...);
a pattern holding a dot or a wildcard (`blocks.0.attn.q`, `*.mlp.*`) matches whole names by
fnmatch. "all-linear" targets every linear layer of the blocks (as `peft` does: not the head).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.errors import UserError

# the Hugging Face / peft spellings of llmkit's short names (GPT-2's c_proj is both out projections, as peft matches it)
ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "proj", "out_proj": "proj", "dense": "proj",
           "c_proj": ("proj", "down"), "c_attn": "qkv", "query_key_value": "qkv", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down", "c_fc": "up", "fc1": "up", "fc2": "down", "w1": "gate", "w3": "up", "w2": "down",
           "query": "q", "key": "k", "value": "v"}
FEEDFORWARD = ("up", "gate", "down")  # the MLP's linear layers (IA3's feed-forward targets)


@dataclass(frozen=True)
class Target:
    """One adapted place: `name` keys its adapter tensors; `path` is the linear layer's module path
    in the model; `rows` the slice of its output rows (None: all); `layer` the block index (or None)."""

    name: str
    path: str
    rows: tuple[int, int] | None
    layer: int | None

    @property
    def short(self) -> str:
        """The last part of the name: q, k, v, qkv, proj, up, gate, down, ..."""
        return self.name.rsplit(".", 1)[-1]


def _layer_of(path: str) -> int | None:
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def candidates(model: nn.Module) -> list[Target]:
    """Every place a linear-layer adapter may go: each nn.Linear inside the model's blocks (not the
    embeddings or the LM head), and for a fused q/k/v projection its three row slices as well."""
    out: list[Target] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _layer_of(path) is None:
            continue
        layer = _layer_of(path)
        out.append(Target(path, path, None, layer))
        parent_path, _, leaf = path.rpartition(".")
        if leaf == "qkv":
            parent = model.get_submodule(parent_path)
            q = parent.n_heads * parent.head_dim
            kv = parent.n_kv_heads * parent.head_dim
            for short, start, stop in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
                out.append(Target(f"{parent_path}.{short}", path, (start, stop), layer))
    return out


def _matches(target: Target, pattern: str) -> bool:
    if "." in pattern or any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(target.name, pattern)
    names = ALIASES.get(pattern, pattern)
    return target.short in (names if isinstance(names, tuple) else (names,))


def find_targets(model: nn.Module, patterns: str | list[str] | tuple[str, ...],
                 layers: set[int] | None = None) -> list[Target]:
    """The targets `patterns` select (comma-separated text or a list), in model order, optionally
    only in `layers`. A pattern that matches nothing, or a module selected both whole and by a
    slice (qkv and q), is a UserError naming what there is."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    found = candidates(model)
    if list(patterns) == ["all-linear"]:
        chosen = [t for t in found if t.rows is None]
    else:
        chosen = []
        for pattern in patterns:
            hits = [t for t in found if _matches(t, pattern)]
            if not hits:
                names = sorted({t.short for t in found})
                raise UserError(f"target module {pattern!r} matches nothing in this model: choose among "
                                f"{', '.join(names)} (or all-linear)")
            chosen += [t for t in hits if t not in chosen]
        chosen.sort(key=lambda t: [t2.name for t2 in found].index(t.name))
    if layers is not None:
        chosen = [t for t in chosen if t.layer in layers]
    whole = {t.path for t in chosen if t.rows is None}
    both = [t for t in chosen if t.rows is not None and t.path in whole]
    if both:
        raise UserError(f"{both[0].path} is targeted both whole and as its slice {both[0].short}: "
                        "give one of the two (e.g. q,v or qkv)")
    if not chosen:
        raise UserError("the target modules select no layer of this model: check --target-modules")
    return chosen


def group_by_module(targets: list[Target]) -> dict[str, list[Target]]:
    """module path -> the targets on it (a fused qkv layer may carry q and v)."""
    out: dict[str, list[Target]] = {}
    for t in targets:
        out.setdefault(t.path, []).append(t)
    return out


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where `path` is."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def rows_of(weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """The slice of `weight`'s output rows a target covers (a view)."""
    return weight if rows is None else weight[rows[0]:rows[1]]
