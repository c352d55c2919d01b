"""Full and partial fine-tuning, and feature extraction: which of a pretrained model's own
parameters train, and at what learning rate. No new modules; what is saved is the whole model.

- "full": every parameter trains.
- "partial": only some do: the blocks `train_layers` names (`last:2`, `first:1`, `0-3`, `1,5`),
  always with the head and the final norm (ULMFiT's practice: the new task's head must learn), then
  `freeze` patterns are frozen and `unfreeze` patterns trained again (fnmatch over parameter names,
  `blocks.0.*`; a pattern naming a module, `tok_emb`, matches its parameters).
- "feature-extraction": the backbone frozen, only the head trains (the LM head, or an encoder's
  classifier with its pooler).

Both full and partial take two ULMFiT refinements (Howard & Ruder 2018, "Universal Language Model
Fine-tuning for Text Classification"):
- gradual unfreezing (`gradual_unfreeze` N): at first the head, final norm and top block train;
  every N steps the next block down joins; the embeddings come last. The set that trains at step s
  is a pure function of s (`trainable_at`), so a resumed run trains exactly what it would have.
- layer-wise learning-rate decay (`layer_lr_decay` d; ULMFiT's discriminative fine-tuning, ELECTRA:
  Clark et al. 2020): block i of n gets lr * d^(n - i), the embeddings d^(n + 1), head and final
  norm 1, as `lr_scale` on their optimizer groups (the loop multiplies it into the scheduled lr).

Depth: every parameter has one (`parameter_depths`): 0 for the embeddings and whatever else sits
below the first block, i + 1 for block i, n + 1 for the head and final norm. A weight shared by
several modules (an LM head tied to the token embeddings) takes its highest use's depth: training
the head trains it. Layer stacks: a model's `blocks` (decoder, encoder, ViT), or a T5's `encoder`
then `decoder` layers, numbered on as one stack.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Mapping

from torch import nn

from llmkit.errors import UserError
from llmkit.nn.weight_decay import decays, no_decay
from llmkit.peft.base import Method, register_method

# modules that are "the head": what feature extraction trains and partial always trains. An
# encoder's pooler feeds only its classifier / next-sentence head (RoBERTa's and DistilBERT's pooler
# is their classifier's first layer), so it counts as head; `score` is a decoder classifier's.
HEAD_MODULES = ("lm_head", "head", "score", "nsp_head", "pooler")
HEAD_OUTPUTS = ("lm_head", "head", "score")  # a model has a head when one of these has parameters
# layer stacks in depth order, per model layout; the norm after each stack sits at its last layer
STACKS = (("blocks",), ("encoder", "decoder"))
STACK_NORMS = {"blocks": "norm", "encoder": "encoder_norm", "decoder": "decoder_norm"}
_LAYER_SPEC = re.compile(r"^(?:(first|last):(\d+)|(\d+)-(\d+)|(\d+))$")


# --- the model's layers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where a model's layers are: `body` (the path of the module holding the stack, with a
    trailing dot: "" for a bare model, "model." under a decoder classifier), the layer paths in
    depth order (`blocks.0`, ... or a T5's `encoder.0`, ..., `decoder.0`, ...; relative to the
    body) and the norms after the stacks (relative name -> depth)."""

    body: str
    layers: tuple[str, ...]
    norms: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.layers)


def find_layout(model: nn.Module) -> Layout:
    """The model's `Layout`: the shallowest module with a layer stack (no layers: an empty one)."""
    found = []
    for path, module in model.named_modules():
        for stack in STACKS:
            lists = [module._modules.get(name) for name in stack]
            if all(isinstance(m, nn.ModuleList) and len(m) for m in lists):
                found.append((path.count(".") if path else -1, path, stack, lists))
    if not found:
        return Layout("", (), {})
    _, path, stack, lists = min(found, key=lambda f: f[0])
    layers = tuple(f"{name}.{i}" for name, m in zip(stack, lists) for i in range(len(m)))
    norms, top = {}, 0
    for name, m in zip(stack, lists):
        top += len(m)
        norms[STACK_NORMS[name]] = len(layers) + 1 if top == len(layers) else top
    return Layout(f"{path}." if path else "", layers, norms)


def depth_of(name: str, layout: Layout) -> int:
    """Depth of one parameter name (see the module docstring)."""
    inside = name.startswith(layout.body)
    parts = (name[len(layout.body):] if inside else name).split(".")
    if inside and len(parts) > 2 and f"{parts[0]}.{parts[1]}" in layout.layers:
        return layout.layers.index(f"{parts[0]}.{parts[1]}") + 1
    if inside and parts[0] in layout.norms:
        return layout.norms[parts[0]]
    return layout.n + 1 if parts[0] in HEAD_MODULES else 0


def is_head(name: str, layout: Layout) -> bool:
    """Whether a parameter belongs to the head (`HEAD_MODULES`, in the body or on top of it)."""
    rest = name[len(layout.body):] if name.startswith(layout.body) else name
    return rest.split(".")[0] in HEAD_MODULES or name.split(".")[0] in HEAD_MODULES


def parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name (as `named_parameters` yields it, shared ones once) -> every name it has (a
    tied weight has two)."""
    canonical: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(canonical.setdefault(id(p), name), []).append(name)
    return names


def parameter_depths(model: nn.Module, layout: Layout | None = None) -> dict[str, int]:
    """Parameter name (shared ones once) -> depth: 0 embeddings, i + 1 block i, n + 1 head and
    final norm; a shared weight at its highest use."""
    layout = find_layout(model) if layout is None else layout
    return {key: max(depth_of(n, layout) for n in names) for key, names in parameter_names(model).items()}


# --- options -----------------------------------------------------------------------------------------

def parse_layers(spec: str, n: int | None) -> list[int]:
    """Block indices of a `train_layers` spec: comma-separated `last:k`, `first:k`, `a-b` (inclusive)
    or `i`, for a stack of n blocks (None: check the syntax only, return [])."""
    chosen: set[int] = set()
    items = [s.strip() for s in str(spec).split(",")]
    if not any(items):
        raise UserError(f"train_layers {spec!r} names no block: give e.g. last:2, first:1, 0-3 or 1,5")
    for item in items:
        m = _LAYER_SPEC.match(item)
        if m is None:
            raise UserError(f"train_layers item {item!r} is not last:K, first:K, A-B or I: write e.g. last:2, 0-3 "
                            "or 1,5")
        side, k, a, b, i = m.groups()
        if side and int(k) == 0:
            raise UserError(f"train_layers {item!r} names no block: use {side}:1 or more")
        if a is not None and int(a) > int(b):
            raise UserError(f"train_layers range {item!r} is empty: write the lower block first ({b}-{a})")
        if n is None:
            continue
        if side:
            if int(k) > n:
                raise UserError(f"train_layers {item!r} is out of range: the model has {n} blocks")
            chosen.update(range(n - int(k), n) if side == "last" else range(int(k)))
            continue
        lo, hi = (int(a), int(b)) if a is not None else (int(i), int(i))
        if hi >= n:
            raise UserError(f"train_layers {item!r} is out of range: the model has {n} blocks (0-{n - 1})")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def parse_patterns(spec: str | None, option: str) -> list[str]:
    """The comma-separated fnmatch patterns of `freeze` / `unfreeze` (None: none)."""
    if spec is None:
        return []
    patterns = [s.strip() for s in str(spec).split(",")]
    if not all(patterns):
        raise UserError(f"{option} {spec!r} has an empty pattern: write e.g. tok_emb.*,blocks.0.*")
    return patterns


def matches(name: str, pattern: str) -> bool:
    """Whether a parameter name matches a pattern (fnmatch, case-sensitive), the pattern also naming
    a module (`blocks.0` matches `blocks.0.attn.qkv.weight`)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def select(names: Mapping[str, list[str]], patterns: list[str], option: str) -> set[str]:
    """The parameters (canonical names) any of whose names matches a pattern; UserError for a
    pattern matching nothing."""
    chosen: set[str] = set()
    for pattern in patterns:
        hit = {key for key, all_names in names.items() if any(matches(n, pattern) for n in all_names)}
        if not hit:
            examples = ", ".join(list(names)[:3] + ([list(names)[-1]] if len(names) > 3 else []))
            raise UserError(f"{option} pattern {pattern!r} matches no parameter: names look like {examples} "
                            "(fnmatch, e.g. blocks.0.*)")
        chosen |= hit
    return chosen


def trainable_at(base: set[str], depths: Mapping[str, int], n: int, every: int, step: int) -> set[str]:
    """Gradual unfreezing (ULMFiT): of the parameters that train (`base`), those at depth
    >= n - step // every (the head and top block at first, one block more every `every` steps, the
    embeddings last); all of `base` when `every` is 0."""
    if every <= 0:
        return set(base)
    lowest = n - step // every
    return {name for name in base if depths[name] >= lowest}


def lr_scale(depth: int, n: int, decay: float) -> float:
    """Layer-wise lr decay: decay^(n + 1 - depth), i.e. block i of n decay^(n - i), the embeddings
    decay^(n + 1), the head 1 (ULMFiT; Clark et al. 2020, ELECTRA)."""
    return decay ** (n + 1 - depth)


def _check_decay_and_steps(opts: Mapping[str, Any]) -> None:
    decay = opts.get("layer_lr_decay", 1.0)
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 < decay <= 1.0:
        raise UserError(f"layer_lr_decay {decay!r} is not in (0, 1]: give e.g. 0.8 (1 = off)")
    every = opts.get("gradual_unfreeze", 0)
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise UserError(f"gradual_unfreeze {every!r} is not a whole number of steps >= 0: give e.g. 100 (0 = off)")


# --- the methods -------------------------------------------------------------------------------------

class _OwnWeights(Method):
    """Shared by full and partial fine-tuning: choose the parameters that train (`choose`), then
    gradual unfreezing and layer-wise lr decay over them."""

    saves_adapter = False

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        _check_decay_and_steps(opts)

    @property
    def decay(self) -> float:
        return float(self.opts.get("layer_lr_decay", 1.0))

    @property
    def every(self) -> int:
        return int(self.opts.get("gradual_unfreeze", 0))

    def apply(self, model: nn.Module) -> nn.Module:
        layout = find_layout(model)
        if layout.n == 0 and (self.every or self.decay != 1.0):
            raise UserError(f"gradual_unfreeze and layer_lr_decay work on a model's blocks, and this "
                            f"{type(model).__name__} has no layer stack: drop them")
        self.depths, self.n = parameter_depths(model, layout), layout.n
        self.base = self.choose(model, layout)
        if not self.base:
            raise UserError(f"--method {self.name}: every parameter is frozen: train some (--train-layers, --unfreeze) "
                            "or freeze fewer (--freeze)")
        self.on_step(model, 0)
        return model

    def choose(self, model: nn.Module, layout: Layout) -> set[str]:
        """The parameters (names as `named_parameters` yields them) that train once all are thawed."""
        return set(self.depths)

    def trainable_at(self, step: int) -> set[str]:
        """The parameters that train at optimizer step `step` (a pure function of it)."""
        return trainable_at(self.base, self.depths, self.n, self.every, step)

    def on_step(self, model: nn.Module, step: int) -> None:
        train = self.trainable_at(step)
        for name, p in model.named_parameters():
            p.requires_grad_(name in train)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict] | None:
        """With layer-wise lr decay or gradual unfreezing: one group per (depth, decayed or not),
        holding every parameter that will ever train (still-frozen ones have no gradient, and AdamW
        skips them until they thaw), with the depth's `lr_scale`; which parameters decay is
        `no_decay`'s rule. None (the loop's default groups) otherwise."""
        if self.decay == 1.0 and not self.every:
            return None
        skip = no_decay(model)
        groups = []
        for depth in range(self.n + 2):
            members = [p for name, p in model.named_parameters() if name in self.base and self.depths[name] == depth]
            for decayed in (True, False):
                params = [p for p in members if decays(p, skip) == decayed]
                if params:
                    groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0,
                                   "depth": depth, "lr_scale": lr_scale(depth, self.n, self.decay)})
        return groups


@register_method("full")
class Full(_OwnWeights):
    """Every parameter trains (optionally thawed gradually, with layer-wise lr decay)."""

    options = ("layer_lr_decay", "gradual_unfreeze")


@register_method("partial")
class Partial(_OwnWeights):
    """Some parameters train: the blocks `train_layers` names (with the head and final norm), less
    what `freeze` matches, plus what `unfreeze` matches (see the module docstring)."""

    options = ("train_layers", "freeze", "unfreeze", "layer_lr_decay", "gradual_unfreeze")

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        _check_decay_and_steps(opts)
        if opts.get("train_layers") is not None:
            parse_layers(opts["train_layers"], None)
        freeze = parse_patterns(opts.get("freeze"), "freeze")
        unfreeze = parse_patterns(opts.get("unfreeze"), "unfreeze")
        if opts.get("train_layers") is None and not freeze:
            if unfreeze:
                raise UserError("--unfreeze trains again what --freeze or --train-layers froze: give one of them")
            raise UserError("--method partial needs --train-layers or --freeze (without them every parameter trains: "
                            "that is --method full)")

    def choose(self, model: nn.Module, layout: Layout) -> set[str]:
        names = parameter_names(model)
        train = set(self.depths)
        if self.opts.get("train_layers") is not None:
            if layout.n == 0:
                raise UserError(f"train_layers needs a model with blocks, and this {type(model).__name__} has none: "
                                "use --freeze / --unfreeze patterns")
            keep = {i + 1 for i in parse_layers(self.opts["train_layers"], layout.n)} | {layout.n + 1}
            train = {name for name in train if self.depths[name] in keep}
        train -= select(names, parse_patterns(self.opts.get("freeze"), "freeze"), "freeze")
        return train | select(names, parse_patterns(self.opts.get("unfreeze"), "unfreeze"), "unfreeze")


@register_method("feature-extraction")
class FeatureExtraction(Method):
    """The backbone frozen, only the head trains (`HEAD_MODULES`: the LM head or classifier, an
    encoder's pooler; a head tied to the token embeddings trains that shared tensor)."""

    saves_adapter = False

    def apply(self, model: nn.Module) -> nn.Module:
        layout = find_layout(model)
        names = parameter_names(model)
        head = {key for key, all_names in names.items() if any(is_head(n, layout) for n in all_names)}
        outputs = [n for all_names in names.values() for n in all_names
                   if (n[len(layout.body):] if n.startswith(layout.body) else n).split(".")[0] in HEAD_OUTPUTS]
        if not outputs:
            raise UserError(f"feature-extraction trains only the head, and this {type(model).__name__} has none "
                            "(an encoder built with head 'none'?): give the model a head or use --method partial")
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)
        return model
