"""Data parallelism under `torchrun`: every rank holds the whole model, draws its slice of the
global batch and DDP averages the gradients; rank 0 alone logs and writes files."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def main_process() -> bool:
    """Whether this process is rank 0 of a torchrun launch (or not launched by torchrun at all)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_type: str, timeout: float = 600) -> DistEnv:
    """Start the process group when launched by torchrun (WORLD_SIZE set), else a single process.
    `timeout`: seconds a collective waits for the other ranks (a dead or hung rank) before failing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistEnv(rank, world, local_rank)


def wrap_model(model: torch.nn.Module, env: DistEnv, device_type: str) -> torch.nn.Module:
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[env.local_rank] if device_type == "cuda" else None)


def mean_across(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world
    return value


def broadcast_flag(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """Rank 0's decision (e.g. early stop) for every rank."""
    if not env.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


# what gloo / NCCL / the store say when the other end of a collective is gone
_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
         "NCCL communicator was aborted", "Socket Timeout", "failed to recv", "failed to send")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank died or hangs."""
    dist_error = getattr(dist, "DistError", ())
    return (dist_error and isinstance(error, dist_error)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in _LOST))


def peer_lost_message(env: DistEnv, error: BaseException, checkpoint) -> str:
    """The one line every surviving rank prints."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:160]  # gloo's "[.../pair.cc:553] " prefix off
    where = (f"the last complete checkpoint is {checkpoint}: relaunch with --resume" if checkpoint is not None
             else "no checkpoint was written yet")
    return (f"rank {env.rank} of {env.world} lost contact with the other ranks (one died, was killed or hangs past "
            f"--dist-timeout): {first}; {where}")


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
