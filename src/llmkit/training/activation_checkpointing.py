"""Activation checkpointing per block: each transformer block keeps only its inputs in the forward
pass and recomputes its activations in the backward pass (Chen et al. 2016, "Training Deep Nets
with Sublinear Memory Cost"), trading about one more forward per step for the activation memory
of every block but the one being differentiated.

The recomputation is torch's own non-reentrant checkpoint (`torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)`, https://pytorch.org/docs/stable/checkpoint.html), which restores the RNG
state so dropout draws the same masks twice. It is put on each block as an instance-level
`forward`, so the module tree, the parameter names and the state dict do not change: checkpoints
load either way and `fully_shard` per block (FSDP2) wraps the block as before (apply this first,
then shard; the FSDP2 hooks gather the parameters before the recomputation runs in backward).

A block is recomputed only where it pays: the grad mode is on and the block is training. In eval,
under `torch.no_grad` (generation) and whenever a decoding cache that stores keys and values is
among its inputs, the block runs as it always did (a recomputation would write into the cache
twice). Prefix tuning's `PrefixCache`, which stores nothing, is recomputed like any input.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmkit.errors import UserError
from llmkit.nn.cross_attention import CrossAttentionCache
from llmkit.nn.kv_cache import Cache

# names of the ModuleLists that hold a model's layers: `blocks` (decoder, encoder, ViT, CLIP towers),
# `encoder` and `decoder` (the encoder-decoder's two stacks)
LAYER_STACKS = ("blocks", "encoder", "decoder")


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(path, list) of every layer stack in `model`, wrappers included (a PEFT method's
    `base_model`, a CLIP model's two towers): each `nn.ModuleList` named in `LAYER_STACKS`."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and path.rsplit(".", 1)[-1] in LAYER_STACKS]


def _stateless_caches() -> tuple[type, ...]:
    """Cache classes whose `update` stores nothing, so a recomputation may call it again."""
    from llmkit.peft.prefix import PrefixCache

    return (PrefixCache,)


def _stores_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a decoding cache that keeps state (keys/values written by `update`) is an input."""
    stateless = _stateless_caches()
    return any(isinstance(a, (Cache, CrossAttentionCache)) and not isinstance(a, stateless)
               for a in (*args, *kwargs.values()))


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, recomputed in backward where grad mode is on and it trains."""
    forward = types.MethodType(type(self).forward, self)
    if not (self.training and torch.is_grad_enabled()) or _stores_cache(args, kwargs):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(block: nn.Module) -> bool:
    """Whether `apply_activation_checkpointing` put the recomputing forward on this block."""
    f = vars(block).get("forward")
    return isinstance(f, types.MethodType) and f.__func__ is _checkpointed_forward and f.__self__ is block


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Make every block of every layer stack (`layer_stacks`) recompute its forward in backward;
    returns how many blocks (already checkpointed ones count, nothing is applied twice).

    Call it before `fully_shard` or `parallelize_module`; parameter names stay the same."""
    stacks = layer_stacks(model)
    if not stacks:
        raise UserError(f"activation checkpointing found no layer stack ({'/'.join(LAYER_STACKS)} ModuleList) in "
                        f"{type(model).__name__}: turn activation_checkpointing off for this model")
    n = 0
    for _, stack in stacks:
        for block in stack:
            if not is_checkpointed(block):
                # a bound method (not a closure): deepcopy rebinds it to the copy, as it does a module
                block.forward = types.MethodType(_checkpointed_forward, block)
            n += 1
    return n


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo `apply_activation_checkpointing`: the blocks keep their activations again; returns how many."""
    n = 0
    for _, stack in layer_stacks(model):
        for block in stack:
            if is_checkpointed(block):
                del block.forward
                n += 1
    return n


__all__ = ["LAYER_STACKS", "apply_activation_checkpointing", "is_checkpointed", "layer_stacks",
           "remove_activation_checkpointing"]
