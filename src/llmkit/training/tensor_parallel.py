"""Tensor parallelism for a decoder: each block's attention and feed-forward weights split over
the ranks of a device mesh (Shoeybi et al. 2019, "Megatron-LM"), optionally with the norms and the
residual stream split over the sequence (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"), by PyTorch's own `parallelize_module` with
`ColwiseParallel`, `RowwiseParallel`, `SequenceParallel` and `PrepareModuleInput` / `...Output`
(https://pytorch.org/docs/stable/distributed.tensor.parallel.html).

Per block: the fused query/key/value projection and the MLP's up (and gate) projections are split
by output rows (column-parallel), the attention's output projection and the MLP's down projection
by input columns (row-parallel): one all-reduce per sublayer in the forward, one in the backward.
Each rank then computes its own heads; the attention module's `n_heads` / `n_kv_heads` become the
local counts. Embeddings, the final norm and the LM head stay whole on every rank (plain tensors).

The fused projection's rows are [q | k | v]; split as they are, rank 0 would get all of q. They are
permuted first into "shard-major" order, [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...], so that rank
i's contiguous chunk is its heads' q, k and v and the unchanged forward runs on local heads.
`fused_params` names these parameters; a checkpoint stores them in the canonical order
(`canonical(full_tensor())`) and loads any order back (`shard_major`, then distribute).

Dropout: activations outside the split (the embeddings, each sublayer's output before the residual
add) are the same on every rank of a tensor-parallel group, so the ranks of one group must draw the
same dropout masks: seed the RNG by data-parallel rank only (every tensor-parallel rank of a group
the same seed). Attention-weight dropout then draws the same pattern for the heads of different
ranks (Megatron draws them from a separate per-rank stream); it is still a valid dropout.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.nn.attention import Attention
from llmkit.nn.linear import Linear
from llmkit.nn.mlp import MLPS
from llmkit.nn.norms import NORMS

_MLP_ROWS = ("gate", "up")  # column-parallel: their outputs split the hidden units
_MLP_COLS = ("down",)  # row-parallel: it sums the hidden units' contributions


def check_tensor_parallel(cfg: Any, tp: int) -> None:
    """Raise UserError (one line naming the fix) where the model `cfg` describes cannot be split
    over `tp` tensor-parallel ranks by `apply_tensor_parallel`."""
    if tp < 1:
        raise UserError(f"--tp-size {tp}: give a positive number of tensor-parallel ranks")
    n_kv = cfg.n_kv_heads or cfg.n_heads
    attention = getattr(cfg, "attention", "mha")
    if attention != "mha":
        raise UserError(f"tensor parallelism splits only multi-head attention (attention='mha'), not "
                        f"attention={attention!r}: use --parallel fsdp or ddp for this model")
    if getattr(cfg, "moe", None) is not None:
        raise UserError("tensor parallelism does not split Mixture-of-Experts layers (moe): use --parallel fsdp "
                        "or ddp for this model")
    if getattr(cfg, "mod", None) is not None:
        raise UserError("tensor parallelism does not handle Mixture-of-Depths routing (mod): use --parallel "
                        "fsdp or ddp for this model")
    if getattr(cfg, "qk_norm", None) == "full":
        raise UserError("qk_norm='full' normalises over all heads, which tensor parallelism splits: use "
                        "qk_norm='head' or --parallel fsdp")
    if getattr(cfg, "position", None) == "alibi":
        raise UserError("ALiBi's scores bias spans all heads, which tensor parallelism splits: use "
                        "position='rope' or --parallel fsdp")
    if cfg.n_heads % tp:
        raise UserError(f"n_heads={cfg.n_heads} is not divisible by --tp-size {tp}: pick a tp-size that "
                        f"divides {cfg.n_heads}")
    if n_kv % tp:
        raise UserError(f"n_kv_heads={n_kv} is not divisible by --tp-size {tp}: pick a tp-size that divides "
                        f"{n_kv} (or use more key/value heads)")
    if cfg.d_ff % tp:
        raise UserError(f"d_ff={cfg.d_ff} is not divisible by --tp-size {tp}: pick a tp-size that divides it")


def shard_major(full: torch.Tensor, sizes: list[int], tp: int) -> torch.Tensor:
    """Rows of `full` [sum(sizes), ...] in parts of `sizes` (q, k, v) reordered so that the i-th of
    `tp` equal chunks holds the i-th tp-th of every part: [p0_0 | p1_0 | ... | p0_1 | p1_1 | ...]."""
    if sum(sizes) != full.shape[0] or any(s % tp for s in sizes):
        raise ValueError(f"rows {full.shape[0]} in parts {sizes} do not split into {tp} equal chunks")
    pieces = [part.chunk(tp) for part in full.split(sizes)]
    return torch.cat([p[rank] for rank in range(tp) for p in pieces])


def canonical(permuted: torch.Tensor, sizes: list[int], tp: int) -> torch.Tensor:
    """The inverse of `shard_major`: rows back in the order [part 0 | part 1 | ...]."""
    if sum(sizes) != permuted.shape[0] or any(s % tp for s in sizes):
        raise ValueError(f"rows {permuted.shape[0]} in parts {sizes} do not split into {tp} equal chunks")
    local = [s // tp for s in sizes]
    per_rank = [chunk.split(local) for chunk in permuted.chunk(tp)]
    return torch.cat([per_rank[rank][j] for j in range(len(sizes)) for rank in range(tp)])


def _qkv_sizes(attn: nn.Module, tp: int = 1) -> list[int]:
    """The fused projection's parts [q rows, k rows, v rows] of all heads (attn's counts times tp)."""
    q, kv = attn.n_heads * attn.head_dim * tp, attn.n_kv_heads * attn.head_dim * tp
    return [q, kv, kv]


def fused_params(model: nn.Module) -> dict[str, list[int]]:
    """FQN of each parameter `apply_tensor_parallel` stores in shard-major order -> its parts'
    sizes, e.g. "blocks.0.attn.qkv.weight" -> [q_rows, k_rows, v_rows] (the whole model's)."""
    tp = model._tp_mesh.size() if getattr(model, "_tp_mesh", None) is not None else 1
    out = {}
    for name, module in model.named_modules():
        if type(module) is Attention:
            for pname, _ in module.qkv.named_parameters(recurse=False):
                out[f"{name}.qkv.{pname}"] = _qkv_sizes(module, tp)
    return out


def _check_structure(model: nn.Module, sequence_parallel: bool) -> None:
    """UserError where a module of the model is not one the plan splits (an adapter, another class)."""
    if getattr(model, "_tp_mesh", None) is not None:
        raise UserError("the model is already tensor-parallel: apply tensor parallelism once")
    for i, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if type(attn) is not Attention or type(mlp) not in MLPS.values():
            raise UserError(f"block {i} has {type(attn).__name__} / {type(mlp).__name__}, which tensor "
                            "parallelism does not split (an adapter or another layer): merge or drop adapters "
                            "first, or use --parallel fsdp")
        linears = [attn.qkv, attn.proj, *(getattr(mlp, n) for n in _MLP_ROWS + _MLP_COLS if hasattr(mlp, n))]
        if "out_gate" in attn._modules:
            linears.append(attn.out_gate)
        if any(type(m) is not Linear for m in linears):
            raise UserError(f"block {i} has a linear layer replaced (an adapter or quantized layer): apply tensor "
                            "parallelism to the plain model")
        if sequence_parallel:
            others = [n for n, m in block.named_children() if n not in ("attn", "mlp")
                      and type(m) not in NORMS.values()]
            if others:
                raise UserError(f"block {i} has {others} besides norms, attention and MLP: sequence "
                                "parallelism needs plain blocks; drop --sequence-parallel")


def block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, Any]:
    """The `parallelize_module` plan of one block (names relative to it): attention and MLP split by
    heads / hidden units; with sequence parallelism also the norms and sublayer outputs split on the
    sequence dim (the residual stream a DTensor sharded on dim 1 between sublayers)."""
    mlp = block.mlp

    def row() -> RowwiseParallel:  # the sum over ranks: all-reduced, or reduce-scattered over the sequence
        if sequence_parallel:
            return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        return RowwiseParallel()

    plan: dict[str, Any] = {"attn.qkv": ColwiseParallel(), "attn.proj": row()}
    if "out_gate" in block.attn._modules:
        plan["attn.out_gate"] = ColwiseParallel()
    if "q_norm" in block.attn._modules:  # per-head query-key norms: one weight, applied to the local heads
        # (dim 1 of [B, H, T, d]); a replicated DTensor weight sums its gradient over the ranks' heads
        for name in ("q_norm", "k_norm"):
            plan[f"attn.{name}"] = SequenceParallel(sequence_dim=1, use_local_output=True)
    for name in _MLP_ROWS:
        if hasattr(mlp, name):
            plan[f"mlp.{name}"] = ColwiseParallel()
    plan["mlp.down"] = row()
    if sequence_parallel:
        for name in ("attn", "mlp"):  # gather the sequence before the sublayer reads it whole
            plan[name] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        for name, child in block.named_children():
            if name not in ("attn", "mlp"):
                plan[name] = SequenceParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """Split `model` (a DecoderLM) over the 1-D device mesh `mesh` in place and return it.

    Every rank must hold the same weights beforehand (build from one seed, or load, first). Each
    block's qkv rows are put in shard-major order (`shard_major`), then its attention and MLP are
    distributed (`block_plan`); the attention's `n_heads` / `n_kv_heads` become the local counts.
    With `sequence_parallel` the embeddings' dropout output is cut on the sequence dim (dim 1, no
    communication), the blocks keep the residual stream so, and the LM head gathers it whole
    again; logits are plain, whole tensors either way. The model is marked: `model._tp_mesh`."""
    if type(model) is not DecoderLM:
        raise UserError(f"tensor parallelism splits a DecoderLM, not {type(model).__name__}: use --parallel "
                        "fsdp or ddp for this model")
    if mesh.ndim != 1:
        raise ValueError("apply_tensor_parallel takes the 1-D tensor-parallel mesh (e.g. mesh['tp'])")
    tp = mesh.size()
    check_tensor_parallel(model.cfg, tp)
    _check_structure(model, sequence_parallel)
    for block in model.blocks:
        attn = block.attn
        sizes = _qkv_sizes(attn)
        with torch.no_grad():
            for p in attn.qkv.parameters(recurse=False):
                p.copy_(shard_major(p, sizes, tp))
        parallelize_module(block, mesh, block_plan(block, sequence_parallel))
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
    if sequence_parallel:
        parallelize_module(model, mesh, {
            # the embeddings (and positions) whole on every rank; from here on each rank its tokens
            "drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                        use_local_output=False),
            "norm": SequenceParallel(),
            "lm_head": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                          use_local_output=True),
        })
    for p in model.parameters():
        if isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements):
            p.register_post_accumulate_grad_hook(_reduce_partial_grad)
    model._tp_mesh = mesh
    model._tp_sequence_parallel = sequence_parallel
    return model


def _reduce_partial_grad(p: torch.Tensor) -> None:
    """Sum a replicated weight's gradient over the ranks once, as it is accumulated: a norm weight
    under sequence parallelism (or a per-head query-key norm) gets a partial sum from each rank's
    tokens or heads (Korthikanti et al. 2022, sec. 4.2.2), which every later use of the gradient
    (optimizer, clipping) would otherwise reduce again."""
    if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(placements=p.placements)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose gradients mix plain tensors and DTensors
    (tensor parallelism, FSDP2 with it), which torch's one refuses: the L2 norm over all gradients
    as a plain tensor (the same on every rank), each gradient scaled by max_norm / (norm + 1e-6)
    where that is below 1. Gradients of one layout are normed together (one reduction each)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norms = []
    for key, group in groups.items():
        n = torch.nn.utils.get_total_norm(group, foreach=False)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return total
