"""How one training run spreads over processes (`--parallel`): the one place the loop asks what
sharding changes. Every strategy is PyTorch's own part, not a home-made one:

- `ddp` (the default): every rank holds the whole model, DistributedDataParallel averages the
  gradients (Li et al. 2020, "PyTorch Distributed"); one process: nothing at all.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) per block and for the root, the ZeRO stages
  of Rajbhandari et al. 2020: `--zero 3` shards parameters, gradients and optimizer state (the
  parameters are gathered block by block for forward and again for backward); `--zero 2` keeps the
  parameters whole after the forward (`reshard_after_forward=False`), sharding gradients and
  optimizer state; `--mixed-precision bf16` gathers and computes in bf16 and reduces gradients in
  fp32 (`MixedPrecisionPolicy`); `--cpu-offload` keeps the shards and their optimizer state on the CPU.
- `tp`: tensor parallelism (Shoeybi et al. 2019, "Megatron-LM") through DTensor's
  `parallelize_module` (`training/tensor_parallel.py`): every rank holds its heads and its slice of
  the MLP; all ranks see the same batch.
- `fsdp+tp`: a 2-D mesh (data-parallel x tensor-parallel, `--tp-size`): TP inside each group,
  FSDP across the groups.

A strategy answers: which batch a rank draws (`data_rank`, `data_world`), how the model is
prepared (`prepare`, before the optimizer exists) and wrapped (`wrap`), how gradients are clipped
and weights checked when they are DTensors, and whether checkpoints are sharded
(`torch.distributed.checkpoint`, `training/sharded_checkpoint.py`) and how a whole copy of the
weights reaches rank 0 (`full_state`) for the run's saved model.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from llmkit.errors import UserError
from llmkit.training import distributed as D

PARALLELISMS: dict[str, type["Parallelism"]] = {}


def register_parallelism(name: str) -> Callable[[type["Parallelism"]], type["Parallelism"]]:
    def add(cls: type["Parallelism"]) -> type["Parallelism"]:
        cls.name = name
        PARALLELISMS[name] = cls
        return cls
    return add


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a shard of a global tensor, or a replica of one)."""
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every `blocks` ModuleList in the model (a decoder's, both stacks of an encoder-decoder, both
    towers of CLIP; inside a fine-tuning wrapper too): the units FSDP shards one by one."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks"]


class Parallelism:
    """One process or DDP; the base of the sharded strategies."""

    name = "ddp"
    sharded = False  # checkpoints through torch.distributed.checkpoint (every rank writes its shards)
    adapters = True  # runs fine-tuning methods that save adapters

    def __init__(self, cfg: Any, env: D.DistEnv, device: torch.device) -> None:
        self.cfg, self.env, self.device = cfg, env, device
        self.own_group = False  # a process group of one started here (a sharded strategy without torchrun)
        self.replica: nn.Module | None = None  # rank 0's unsharded meta copy, for saving (sharded only)
        self.method: Any = None  # the fine-tuning method (its copy bound to the replica, once sharded)

    # --- which batch ---
    @property
    def data_rank(self) -> int:
        return self.env.rank

    @property
    def data_world(self) -> int:
        return self.env.world

    # --- the model ---
    def prepare(self, model: nn.Module, method: Any = None) -> nn.Module:
        """Before the optimizer is built: activation checkpointing when asked (names unchanged).
        `method`: the fine-tuning method applied to `model` (a sharded strategy keeps a copy of it
        bound to its replica, to save the adapter from)."""
        self.method = method if self.method is None else self.method
        if getattr(self.cfg, "activation_checkpointing", False):
            from llmkit.training.activation_checkpointing import apply_activation_checkpointing
            apply_activation_checkpointing(model)
        return model

    def optimizer_options(self) -> dict[str, Any]:
        """Extra AdamW arguments this layout needs (DTensor parameters: no fused kernel)."""
        return {}

    def wrap(self, model: nn.Module) -> nn.Module:
        """What runs forward: DDP around the (compiled) model under torchrun."""
        return D.wrap_model(model, self.env, self.device.type)

    def accumulating(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: DDP syncs gradients on the last one only."""
        return contextlib.nullcontext() if not self.env.enabled or last else model.no_sync()

    # --- gradients and weights ---
    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The L2 norm of all gradients, as one full tensor (DTensor shards summed over their ranks)."""
        return total_grad_norm(params)

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Scale the gradients to norm <= max_norm (torch's rule); the norm before clipping."""
        from llmkit.training.optim import clip_grad_norm_
        return clip_grad_norm_(params, max_norm)

    def weights_finite(self, model: nn.Module) -> bool:
        from llmkit.model_io import non_finite
        return not non_finite(model)

    def close(self) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()
            self.own_group = False


@register_parallelism("ddp")
class DataParallel(Parallelism):
    """Every rank the whole model; DDP averages the gradients (one process: plain training)."""


class Sharded(Parallelism):
    """The strategies whose parameters are DTensors: a device mesh, DTensor-aware clipping and
    finiteness checks, sharded checkpoints, and a meta replica of the model on rank 0 into which
    the gathered weights are loaded to save the run's model (or adapter) as one file."""

    sharded = True

    def __init__(self, cfg: Any, env: D.DistEnv, device: torch.device) -> None:
        super().__init__(cfg, env, device)
        if not dist.is_initialized():  # --parallel fsdp|tp without torchrun: a group of one
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(),
                                    rank=0, world_size=1)
            self.own_group = True
        self.mesh = self.build_mesh()

    def build_mesh(self):
        raise NotImplementedError

    def optimizer_options(self) -> dict[str, Any]:
        return {"fused": False, "foreach": False}  # DTensor and plain parameters may mix (TP)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard / parallelize_module changed the model itself

    def accumulating(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 reduce-scatters every micro-batch into sharded grads

    def keep_replica(self, model: nn.Module, method: Any) -> None:
        """Before sharding: rank 0 keeps the model's structure on the meta device (no memory), and
        a copy of the fine-tuning method that points into it."""
        if self.env.is_main:
            self.replica, self.method = meta_replica(model, method)

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        norm = total_grad_norm(params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        with torch.no_grad():
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return norm

    def weights_finite(self, model: nn.Module) -> bool:
        """Every rank checks its shards (and the replicated tensors), then all agree."""
        from llmkit.model_io import non_finite
        local = [p.to_local() if is_dtensor(p) else p for p in model.parameters()]
        holder = nn.ParameterList([nn.Parameter(t.detach(), requires_grad=False) for t in local if t.numel()])
        bad = torch.tensor(float(bool(non_finite(holder))))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bad.item()

    def canonical(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """A gathered tensor in the model's own layout (tensor parallelism permutes fused rows)."""
        return full

    def full_state(self, model: nn.Module, only_trainable: bool = False) -> dict[str, torch.Tensor] | None:
        """Every tensor of the model, gathered whole onto rank 0's CPU, in the model's own layout
        (a collective: every rank calls it; the others get None)."""
        out: dict[str, torch.Tensor] = {}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for name, t in model.state_dict().items():
            if only_trainable and name not in trainable:
                continue
            full = t.full_tensor() if is_dtensor(t) else t
            if self.env.is_main:
                out[name] = self.canonical(name, full.detach()).cpu().clone()
        return out if self.env.is_main else None

    def plain_model(self, model: nn.Module) -> nn.Module | None:
        """Rank 0: the replica holding the gathered weights (a plain, unsharded model on the CPU);
        a collective, None on the other ranks."""
        state = self.full_state(model)
        if not self.env.is_main:
            return None
        from llmkit.models.kinds import tie_weights
        replica = self.replica
        missing, unexpected = replica.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"the gathered weights do not fit the model: missing {missing[:3]}, extra {unexpected[:3]}")
        tie_weights(getattr(replica, "base_model", replica))  # a prompt / prefix wrapper holds the model inside
        return replica


@register_parallelism("fsdp")
class FullyShardedDataParallel(Sharded):
    """FSDP2 over all ranks: `fully_shard` per block, then the root."""

    def build_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(self.device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))

    def fsdp_options(self) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
        opts: dict[str, Any] = {"reshard_after_forward": self.cfg.zero == 3}
        if self.cfg.mixed_precision == "bf16":
            opts["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            opts["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        return opts

    def dp_mesh(self):
        return self.mesh

    def prepare(self, model: nn.Module, method: Any = None) -> nn.Module:
        from torch.distributed.fsdp import fully_shard
        self.keep_replica(model, method)
        self.tensor_parallel(model)  # TP first: its plan finds attn / mlp / norms by name
        model = super().prepare(model, method)
        opts = self.fsdp_options()
        for blocks in block_lists(model):
            for block in blocks:
                fully_shard(block, mesh=self.dp_mesh(), **opts)
        fully_shard(model, mesh=self.dp_mesh(), **opts)
        return model

    def tensor_parallel(self, model: nn.Module) -> None:
        """fsdp+tp splits each block over the tensor-parallel ranks first."""

    def optimizer_options(self) -> dict[str, Any]:
        return {"fused": False, "foreach": True}  # every parameter is a DTensor on one mesh


class _TensorParallelMixin:
    """What TP adds to a sharded strategy: the split (`training/tensor_parallel.py`) and its
    permuted fused rows, put back in the model's layout for saving."""

    def split(self, model: nn.Module, tp_mesh) -> None:
        from llmkit.training import tensor_parallel as TP
        TP.check_tensor_parallel(model.cfg, tp_mesh.size())
        TP.apply_tensor_parallel(model, tp_mesh, sequence_parallel=self.cfg.sequence_parallel)
        self.fused = TP.fused_params(model)
        self.tp = tp_mesh.size()

    def canonical(self, name: str, full: torch.Tensor) -> torch.Tensor:
        from llmkit.training import tensor_parallel as TP
        sizes = getattr(self, "fused", {}).get(name)
        return full if sizes is None else TP.canonical(full, sizes, self.tp)


@register_parallelism("tp")
class TensorParallel(_TensorParallelMixin, Sharded):
    """Every rank one slice of each block; all see the same batch."""

    adapters = False

    @property
    def data_rank(self) -> int:
        return 0

    @property
    def data_world(self) -> int:
        return 1

    def build_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(self.device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))

    def prepare(self, model: nn.Module, method: Any = None) -> nn.Module:
        self.keep_replica(model, method)
        self.split(model, self.mesh)
        return super().prepare(model, method)


@register_parallelism("fsdp+tp")
class FullyShardedTensorParallel(_TensorParallelMixin, FullyShardedDataParallel):
    """A (data-parallel, tensor-parallel) mesh: TP within each group of `--tp-size` ranks, FSDP2
    across the groups."""

    adapters = False

    def build_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh
        world, tp = dist.get_world_size(), self.cfg.tp_size or 2
        if world % tp:
            raise UserError(f"--parallel fsdp+tp needs a world size divisible by --tp-size {tp}, got {world} "
                            "processes: change --nproc_per_node or --tp-size")
        return init_device_mesh(self.device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))

    @property
    def data_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def data_world(self) -> int:
        return self.mesh["dp"].size()

    def dp_mesh(self):
        return self.mesh["dp"]

    def tensor_parallel(self, model: nn.Module) -> None:
        self.split(model, self.mesh["tp"])

    def optimizer_options(self) -> dict[str, Any]:
        return {"fused": False, "foreach": False}


def get_parallelism(cfg: Any, env: D.DistEnv, device: torch.device) -> Parallelism:
    """The strategy `cfg.parallel` names, set up for this process."""
    cls = PARALLELISMS[cfg.parallel]
    if cls.sharded and not cls.adapters and cfg.method != "full":
        raise UserError(f"--parallel {cfg.parallel} trains the whole model (--method full): for --method "
                        f"{cfg.method} use --parallel fsdp or ddp")
    if cfg.parallel == "tp" and cfg.tp_size not in (None, env.world):
        raise UserError(f"--parallel tp splits the model over all {env.world} processes: drop --tp-size "
                        "(or use --parallel fsdp+tp for a 2-D mesh)")
    return cls(cfg, env, device)


# --- helpers ----------------------------------------------------------------------------------

def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """sqrt of the sum of every gradient's squared norm; a DTensor gradient counts whole (its
    sharded mesh dimensions summed by `full_tensor`, its replicated ones once)."""
    plain = [p.grad for p in params if p.grad is not None and not is_dtensor(p.grad)]
    shards = [p.grad for p in params if p.grad is not None and is_dtensor(p.grad)]
    sq = torch.zeros((), dtype=torch.float32)
    if plain:
        sq = sq.to(plain[0].device) + torch.nn.utils.get_total_norm(plain, 2.0).float() ** 2
    if shards:
        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for g in shards:
            by_mesh.setdefault((g.device_mesh, tuple(g.placements)), []).append(g)
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm(group, 2.0)
            norm = norm.full_tensor() if is_dtensor(norm) else norm
            sq = sq.to(norm.device) + norm.float() ** 2
    return sq.sqrt()


def meta_replica(model: nn.Module, method: Any = None) -> tuple[nn.Module, Any]:
    """A deep copy of `model` whose parameters are on the meta device (no memory): the structure
    into which gathered weights are loaded (`load_state_dict(assign=True)`); tied parameters stay
    tied. With it a copy of the fine-tuning `method`, whose references to wrapped modules point
    into the copy (its tokenizer shared, not copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    tokenizer = getattr(method, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    return copy.deepcopy((model, method), memo)  # buffers (RoPE tables, small) are copied as they are


def world_tokens(cfg: Any, strategy: Parallelism, tokens_per_example: int) -> int:
    """Tokens one optimizer step trains on across all ranks (every data-parallel rank its batch)."""
    return cfg.batch_size * cfg.grad_accum * strategy.data_world * tokens_per_example

