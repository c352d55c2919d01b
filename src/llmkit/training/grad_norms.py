"""Per-layer gradient norms: the L2 norm of the gradients of each layer group ("embeddings",
"blocks.0", ..., "norm", "head"), a check that flags vanishing or exploding layers, and a plot
of each layer's norm against step from `metrics.jsonl`.

Works on sharded models: a DTensor gradient (FSDP2's `Shard(0)`, tensor parallelism's
`Shard(0/1)`, `Replicate`) counts with its full norm. Each rank sums the squares of its local
shards, and the sums are all-reduced over the mesh dimensions where the placement is a `Shard`
(a `Replicate` dimension already holds the whole tensor), one collective per distinct set of
sharded dimensions' process groups and per such dimension, not one per parameter
(https://pytorch.org/docs/stable/distributed.tensor.html). The total, `total_norm(norms)`,
equals `torch.nn.utils.get_total_norm` over the full gradients.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


# first name component -> layer group, for the decoder's (and encoders') parts outside `blocks`
GROUP_NAMES = {"tok_emb": "embeddings", "pos": "embeddings", "emb_norm": "embeddings", "shared": "embeddings",
               "lm_head": "head"}
# wrappers that prefix every parameter name: DDP, torch.compile, a PEFT wrapper (HF peft: base_model.model.)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "base_model.")

VANISHING = 1e-7  # a layer below this share of the median layer norm
EXPLODING = 1e3  # a layer above this multiple of the median layer norm


def layer_group(name: str) -> str:
    """The layer group of a parameter name: wrapper prefixes stripped, then the path to a layer
    index in the first three components (`blocks.3`, T5's `encoder.0`, CLIP's `text.blocks.3`),
    else the first component (renamed by `GROUP_NAMES`: `tok_emb` -> `embeddings`)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    parts = name.split(".")
    for i in (1, 2):
        if len(parts) > i + 1 and parts[i].isdigit():
            return ".".join(parts[:i + 1])
    return GROUP_NAMES.get(parts[0], parts[0])


def _local_squares(grad: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """(sum of squares of this rank's part of `grad` in float32, how to complete it across ranks:
    (the mesh's device type, the process groups of the mesh dimensions where it is a Shard), or
    None when it is whole here: a plain tensor, or replicated on every mesh dimension)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(grad, DTensor):
        return torch.linalg.vector_norm(grad, dtype=torch.float32).square(), None
    if not all(isinstance(p, (Shard, Replicate)) for p in grad.placements):  # Partial: sum the parts first
        grad = grad.redistribute(grad.device_mesh, [Replicate() if not isinstance(p, Shard) else p
                                                    for p in grad.placements])
    local = torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32).square()
    mesh = grad.device_mesh
    groups = tuple(_Group(mesh.get_group(i)) for i, p in enumerate(grad.placements) if isinstance(p, Shard))
    # keyed by the groups, not the mesh: FSDP's (Shard(0),) on the "dp" submesh and (Shard(0), Replicate())
    # on the 2-D mesh sum over the same ranks, in one collective
    return local, ((mesh.device_type, groups) if groups else None)


class _Group:
    """A process group that compares by name (a submesh's handle of a group is another object)."""

    def __init__(self, group) -> None:
        self.group, self.name = group, group.group_name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Group) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


@torch.no_grad()
def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """{layer group: L2 norm of its gradients}, in the model's order; parameters without a gradient
    (frozen) are left out. Every rank must call it (it all-reduces sharded gradients) and every
    rank gets the same numbers."""
    groups: dict[str, int] = {}
    # (device type, process groups) or None -> squared sums per layer group index, in parameter order
    parts: dict[tuple | None, dict[int, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        index = groups.setdefault(layer_group(name), len(groups))
        squares, key = _local_squares(param.grad)
        bucket = parts.setdefault(key, {})
        bucket[index] = bucket[index] + squares if index in bucket else squares
    if not groups:
        return {}
    total = torch.zeros(len(groups), dtype=torch.float64)
    for key, bucket in parts.items():
        # the collective runs on the mesh's device (NCCL: CUDA, also for gradients offloaded to the CPU)
        device = key[0] if key is not None else next(iter(bucket.values())).device
        vector = torch.zeros(len(groups), dtype=torch.float32, device=device)
        for index, squares in bucket.items():
            vector[index] = squares.to(device)
        for group in key[1] if key is not None else ():  # one collective per sharded mesh dimension
            dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group.group)
        total += vector.cpu().double()
    return dict(zip(groups, total.sqrt().tolist()))


def total_norm(norms: dict[str, float]) -> float:
    """The norm of all the gradients from the per-layer norms: sqrt of the sum of their squares."""
    return math.sqrt(sum(n * n for n in norms.values()))


def flag_layers(norms: dict[str, float]) -> list[str]:
    """Warnings, one per layer whose gradient norm is not finite, vanishing (< 1e-7 of the median
    layer norm) or exploding (> 1e3 x the median), each naming the layer; [] when all look sound."""
    finite = [n for n in norms.values() if math.isfinite(n)]
    warnings = [f"{name}: gradient norm is {n}" for name, n in norms.items() if not math.isfinite(n)]
    if not finite:
        return warnings
    median = statistics.median(finite)
    if median <= 0:
        return warnings + [f"the median layer gradient norm is 0 (of {len(finite)} layers): the gradients vanish"]
    for name, n in norms.items():
        if not math.isfinite(n):
            continue
        if n < VANISHING * median:
            warnings.append(f"{name}: vanishing gradient, norm {n:.3g} < {VANISHING:g} x the median {median:.3g}")
        elif n > EXPLODING * median:
            warnings.append(f"{name}: exploding gradient, norm {n:.3g} > {EXPLODING:g} x the median {median:.3g}")
    return warnings


def grad_norm_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{layer: [(step, norm), ...]} from the `train` records that carry `grad_norms`."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("event") == "train" and isinstance(r.get("grad_norms"), dict):
            for layer, norm in r["grad_norms"].items():
                series.setdefault(layer, []).append((r["step"], float(norm)))
    return series


def plot_grad_norms(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Each layer's gradient norm against step (log scale) as a PNG, written atomically; None when
    no train record carries `grad_norms`."""
    from llmkit.training.metrics import MetricsLog, save_figure

    series = grad_norm_series(MetricsLog.read(Path(metrics_jsonl)))
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    cmap = plt.get_cmap("viridis")
    for i, (layer, points) in enumerate(series.items()):
        steps, values = zip(*[(s, v) for s, v in points if v > 0 and math.isfinite(v)] or [(None, None)])
        if steps[0] is None:
            continue
        ax.plot(steps, values, label=layer, linewidth=1, color=cmap(i / max(len(series) - 1, 1)))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(f"{Path(metrics_jsonl).parent.name}: per-layer gradient norms")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1, loc="best")
    fig.tight_layout()
    return save_figure(fig, Path(out_png))
