"""Measure the per-rank memory of real training steps on the CPU, to check `llmkit.training.memory_plan`.

The CPU allocator keeps no statistics, so `LiveBytes` counts them itself: a `TorchDispatchMode`
that counts the storage of every tensor an operator reads or writes (by its StorageImpl, once)
and drops it when the storage is freed (`weakref.finalize`). FSDP2 frees and re-allocates its
unsharded parameters by resizing their storages in place (`UntypedStorage.resize_`), which the
mode follows too. The model's parameters, buffers, gradients and optimizer state, made before
tracking starts, are counted up front; a first tracked step finds the rest that lives across steps
(DDP's buckets, FSDP2's unsharded storages) before the measured one.

Run by the tests in-process (`measure`) or under torchrun (`python -m torch.distributed.run
--nproc_per_node 2 memory_worker.py SPECS_JSON OUT_JSON`) for DDP and FSDP2 (`fully_shard` per
block and for the root), with torch's AdamW and the causal-LM loss llmkit trains with.
"""
from __future__ import annotations

import json
import sys
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data (a DTensor's local shard; `t` itself otherwise)."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        inner = [getattr(t, a) for a in attrs]
        return [p for i in inner if isinstance(i, torch.Tensor) for p in plain_tensors(i)]
    return [t]


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, after every operator; `peak` their maximum. A running
    total: a storage is counted when first seen, recounted when an operator touches it again or
    `UntypedStorage.resize_` changes it (patched while the mode is on), and dropped when freed."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # StorageImpl address -> bytes counted
        self.total = 0
        self.peak = 0
        self.at_peak = ""

    def count(self, storage: torch.UntypedStorage) -> None:
        key, n = storage._cdata, storage.nbytes()
        old = self.sizes.get(key)
        if old is None:
            weakref.finalize(storage, self._freed, key)
        self.sizes[key] = n
        self.total += n - (old or 0)

    def _freed(self, key: int) -> None:
        self.total -= self.sizes.pop(key, 0)

    def track(self, *tensors: Any) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                for plain in plain_tensors(t):
                    if plain.device.type != "meta":
                        self.count(plain.untyped_storage())

    def reset_peak(self) -> None:
        self.peak = self.total

    def __enter__(self):
        original = self._resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            out = original(storage, size)
            if storage._cdata in self.sizes:
                self.count(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(args, kwargs, out)
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, str(func)
        return out


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters, buffers, gradients and optimizer state: what lives across steps."""
    out = [*model.parameters(), *model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    out += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages (local shards of DTensors) holding `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        for plain in plain_tensors(t):
            s = plain.untyped_storage()
            seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing per block (torch.utils.checkpoint, non-reentrant), as an instance forward."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward

        def recomputed(self, *args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = types.MethodType(recomputed, block)


def build(spec: dict[str, Any]) -> torch.nn.Module:
    """The spec's DecoderLM, seeded, with llmkit's CPU fast paths off (the reference code runs, as on a GPU)."""
    import llmkit.accel
    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM

    llmkit.accel.unregister()
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**spec["model"]))
    if spec.get("activation_checkpointing"):
        checkpoint_blocks(model)
    return model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               autocast: bool = False) -> int:
    """One step as llmkit's causal-LM task and loop take it: fp32 cross entropy (under bf16 autocast
    where asked), clip, AdamW, zero. Returns the state bytes (parameters, gradients, optimizer
    state) right after the optimizer step, the gradients still there."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        del logits
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    state = storage_bytes([*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                           *(v for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0)])
    optimizer.zero_grad(set_to_none=True)
    return state


def measure(model: torch.nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """Peak live bytes of one training step (after a step that makes the optimizer state and one
    that registers every storage living across steps), the operator at the peak, and the state bytes."""
    g = torch.Generator().manual_seed(1)
    vocab, B, T = spec["model"]["vocab_size"], spec["batch_size"], spec["seq_len"]
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = spec.get("dtype") == "bf16"
    state = train_step(model, optimizer, x, y, autocast)
    tracker = LiveBytes()
    tracker.track(state_tensors(model, optimizer))
    with tracker:
        train_step(model, optimizer, x, y, autocast)
        tracker.reset_peak()
        train_step(model, optimizer, x, y, autocast)
    return {"peak": tracker.peak, "state": state, "at_peak": tracker.at_peak}


def wrap(model: torch.nn.Module, spec: dict[str, Any]) -> torch.nn.Module:
    """The spec's parallelism: ddp (DistributedDataParallel), fsdp (fully_shard per block and root), or none."""
    parallel = spec.get("parallel", "none")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        reshard = spec.get("zero", 3) == 3
        mp = MixedPrecisionPolicy()
        if spec.get("mixed_precision") == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, reshard_after_forward=reshard, mp_policy=mp)
    return model


def main(specs_path: str, out_path: str) -> None:
    """Measure each spec of the JSON list in `specs_path` in turn (one process group for all of
    them: torchrun starts once); rank 0 writes, per spec, every rank's numbers to `out_path`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    with open(specs_path) as f:
        specs = json.load(f)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = []
    for spec in specs:
        model = wrap(build(spec), spec)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, measure(model, spec))
        results.append(everyone)
        del model
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "results": results}, f)
    dist.barrier()  # no rank tears its group down while another still uses it (gloo aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
