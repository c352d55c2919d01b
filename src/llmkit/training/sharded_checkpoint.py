"""Sharded checkpoints (`torch.distributed.checkpoint`, DCP) for runs whose parameters are DTensors
(`--parallel fsdp | tp | fsdp+tp`): every rank writes its own shards of the model and the optimizer
state into `step-N/dcp/` in parallel, and a later run loads them into whatever layout it has (another
world size, FSDP instead of TP, one plain process): DCP reads each rank's pieces by their global
offsets, so resharding is its job, not ours.

The checkpoint keys are the model's own parameter names (FQNs) in the model's own layout: where
tensor parallelism permutes a fused projection's rows (q|k|v by shard), those tensors are saved
gathered and put back in order (`Sharded.canonical`), so a TP checkpoint loads into a model that
was never split and the other way round. The rest of the run's state (counters, log window,
scaler, RNG) is `trainer_state.pt` beside it, as in a one-file checkpoint.

`load_model` (llmkit.model_io `read_sharded`) reads a `dcp/` folder too, so `llmkit generate` /
`llmkit.load` take a sharded checkpoint directly, and `llmkit convert CHECKPOINT --out DIR` writes it
as one `model.safetensors`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

DCP_DIR = "dcp"


def is_sharded(checkpoint: Path) -> bool:
    """Whether a `step-N` folder holds a sharded (DCP) checkpoint."""
    return (Path(checkpoint) / DCP_DIR).is_dir()


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full)


def model_state(model: nn.Module, strategy: Any, only_trainable: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors by name for DCP: DTensor shards as they are, the tensors whose layout
    tensor parallelism permuted gathered whole and put back in the model's order."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_options())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for name, t in state.items():
        if only_trainable and name not in trainable:
            continue
        out[name] = _canonical(strategy, name, t)
    return out


def _canonical(strategy: Any, name: str, t: torch.Tensor) -> torch.Tensor:
    fused = getattr(strategy, "fused", {})
    if name not in fused:
        return t
    return strategy.canonical(name, t.full_tensor())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Any) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (DCP's form), fused TP rows put back in order."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=_options())
    return _map_moments(state, lambda name, t: _canonical(strategy, name, t))


def _map_moments(state: dict[str, Any], fn) -> dict[str, Any]:
    """The optimizer state with `fn(name, tensor)` applied to every per-element tensor (the moments),
    in new dicts: the ones `get_optimizer_state_dict` returns may be the optimizer's own."""
    moments = {name: {key: fn(name, v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                      for key, v in entry.items()} for name, entry in state.get("state", {}).items()}
    return {**state, "state": moments}


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Any,
         only_trainable: bool = False) -> None:
    """Every rank writes its shards of the model and the optimizer into `directory` (collective)."""
    import torch.distributed.checkpoint as dcp
    state = {"model": model_state(model, strategy, only_trainable),
             "optim": optimizer_state(model, optimizer, strategy)}
    dcp.save(state, checkpoint_id=str(Path(directory)))


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, strategy: Any,
         only_trainable: bool = False) -> None:
    """Load a sharded checkpoint into this run's model (and optimizer), whatever layout either has."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state: dict[str, Any] = {"model": model_state(model, strategy, only_trainable)}
    if optimizer is not None:
        state["optim"] = optimizer_state(model, optimizer, strategy)
    dcp.load(state, checkpoint_id=str(Path(directory)))
    params = dict(model.named_parameters())
    state["model"] = {name: _relayout(strategy, name, t, params.get(name)) for name, t in state["model"].items()}
    set_model_state_dict(model, state["model"], options=_options_strict(not only_trainable))
    if optimizer is not None:
        state["optim"] = _map_moments(state["optim"], lambda name, t: _relayout(strategy, name, t, params.get(name)))
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options())


def _options_strict(strict: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(strict=strict)


def _relayout(strategy: Any, name: str, t: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor:
    """A tensor loaded in the model's layout, in this run's layout: fused TP rows permuted back by
    shard and distributed like the parameter they belong to."""
    fused = getattr(strategy, "fused", {})
    if name not in fused or param is None:
        return t
    from torch.distributed.tensor import distribute_tensor

    from llmkit.training import tensor_parallel as TP
    permuted = TP.shard_major(t, fused[name], strategy.tp)
    return distribute_tensor(permuted.to(param.dtype), param.device_mesh, param.placements)

