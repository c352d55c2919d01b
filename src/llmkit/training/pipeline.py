"""Pipeline parallelism for the decoder: its blocks split into consecutive stages, one per process,
each batch cut into microbatches that flow through the stages (Huang et al. 2019, "GPipe: Efficient
Training of Giant Neural Networks using Pipeline Parallelism"; one-forward-one-backward: Narayanan
et al. 2019, "PipeDream"). The schedules, the sends and receives between stages and the per-stage
backward are `torch.distributed.pipelining`'s (`PipelineStage`, `ScheduleGPipe`, `Schedule1F1B`;
https://pytorch.org/docs/stable/distributed.pipelining.html); this module only cuts the model.

The cut is manual: `DecoderStage` holds its slice of the model's own submodules under the model's
own names (stage 0: `tok_emb`, the positions, `emb_norm`, `drop`; every stage: its `blocks.<i>`;
the last: `norm`, `lm_head`), so a stage's state dict is a piece of the model's and the pieces of
all stages together are the whole model's. The positions are computed in every stage that needs
them (rotary angles, ALiBi's bias: buffers, no parameters); the attention masks too.

Tied embeddings (`tie_embeddings`, GPT-2's default) put the one matrix in the first stage (the
lookup) and the last (the LM head). Each keeps a copy and, after the backward, the two copies' gradients
are summed across the two stages (Megatron-LM's way, Shoeybi et al. 2019), which is the tied
weight's gradient: with equal starting values and the same optimizer the copies stay equal.

Not supported (refused): Mixture-of-Experts and Mixture-of-Depths layers (their auxiliary losses
stay on the stage that computes them, outside the pipeline's loss), KV caches, padding masks and
the other inputs of `DecoderLM.forward` beyond the token ids: a training step of causal LM only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.nn import seams
from llmkit.nn.attention import soft_cap
from llmkit.nn.masks import layer_mask

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


SCHEDULE_NAMES = ("gpipe", "1f1b")  # the schedules with one stage per process


def _schedules() -> dict[str, type]:
    """Schedule name -> its torch.distributed.pipelining class (imported when a pipeline is built)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of logits [B, T, V] against targets [B, T] (as causal LM's
    task computes it, in fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """[start, stop) of the blocks of each stage: consecutive, as even as they go, the earlier
    stages taking one more where n_layers does not divide (the last stage also runs the LM head)."""
    if not 1 <= n_stages <= n_layers:
        raise UserError(f"pipeline: {n_stages} stages for {n_layers} layers: use 1 to {n_layers} stages "
                        f"(each stage needs at least one block)")
    size, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + size + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def check_pipelinable(model: nn.Module) -> None:
    """Refuse, in one line each, a model this pipeline cannot cut exactly."""
    if not isinstance(model, DecoderLM):
        raise UserError(f"pipeline parallelism splits a decoder LM, got {type(model).__name__}: "
                        f"use --parallel ddp or fsdp for this model kind")
    cfg = model.cfg
    if cfg.moe is not None or cfg.mod is not None:
        raise UserError("pipeline parallelism does not carry the auxiliary losses of Mixture-of-Experts / "
                        "Mixture-of-Depths layers between stages: use --parallel ddp or fsdp for this model")
    if any(True for _ in model.pos.parameters()) and not model.pos.additive:
        raise UserError(f"pipeline: the {cfg.position} positions have parameters every stage would need: "
                        f"use --parallel ddp or fsdp")


def training_layer_inputs(cfg, pos: nn.Module | None, T: int, device: torch.device
                          ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """layer type -> (bool mask or None for plain causal, additive scores bias or None) of a training
    forward over T tokens from position 0 (no cache, padding or prefix): `DecoderLM._layer_inputs`
    for that case, computed again in each stage."""
    q_pos = torch.arange(T, device=device)
    out = {}
    for kind in dict.fromkeys(cfg.layer_type(i) for i in range(cfg.n_layers)):
        needs_window = kind == "sliding" and T > cfg.sliding_window
        mask = layer_mask(kind, q_pos, q_pos, cfg) if kind == "sparse" or needs_window else None
        bias = pos.scores_bias(q_pos, q_pos) if pos is not None and pos.biased else None
        out[kind] = (mask, bias)
    return out


class DecoderStage(nn.Module):
    """Stage `stage_index` of `n_stages` of a `DecoderLM`: the first maps token ids [B, T] to hidden
    states [B, T, d_model], a middle one hidden states to hidden states, the last to logits
    [B, T, vocab]; chained, the stages compute `model(idx)`. Holds the model's own submodules
    (not copies) under the model's names."""

    def __init__(self, model: DecoderLM, stage_index: int, n_stages: int):
        super().__init__()
        check_pipelinable(model)
        cfg = model.cfg
        self.cfg = cfg
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        self.start, self.stop = stage_bounds(cfg.n_layers, n_stages)[stage_index]
        if self.is_first:
            self.tok_emb = model.tok_emb
            if cfg.embedding_norm:
                self.emb_norm = model.emb_norm
            self.drop = model.drop
        if self.is_first or model.pos.rotary or model.pos.biased:
            self.pos = model.pos
        else:
            self.pos = None
        # keyed by the model's layer index: names (and state-dict keys) are the model's own
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(self.start, self.stop)})
        if self.is_last:
            self.norm = model.norm
            self.lm_head = model.lm_head
        self.tied = cfg.tie_embeddings and n_stages > 1

    embed = DecoderLM.embed  # the same scaling and norm of the token embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        position_ids = torch.arange(T, device=x.device)
        if self.is_first:
            x = self.embed(x)
            if self.pos.additive:
                x = x + self.pos(position_ids, T)
            x = self.drop(x)
        rope = self.pos(position_ids, T) if self.pos is not None and self.pos.rotary else None
        inputs = training_layer_inputs(self.cfg, self.pos, T, x.device)
        for i in range(self.start, self.stop):
            mask, bias = inputs[self.cfg.layer_type(i)]
            x = self.blocks[str(i)](x, rope, mask, None, bias)
        if self.is_last:
            x = seams.normed_head(self.norm, self.lm_head, x)
            if self.cfg.final_softcap is not None:
                x = soft_cap(x, self.cfg.final_softcap)
        return x

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the tied embedding / LM-head matrix (None where it holds none)."""
        if not self.tied:
            return None
        return self.tok_emb.weight if self.is_first else self.lm_head.weight if self.is_last else None


@dataclass
class Pipeline:
    """What one process runs of a pipeline: its stage's module (give its parameters to the optimizer),
    the `PipelineStage` around it and the schedule that runs the microbatches."""

    module: DecoderStage
    stage: object  # torch.distributed.pipelining.PipelineStage
    schedule: object  # ScheduleGPipe or Schedule1F1B
    n_microbatches: int
    group: dist.ProcessGroup | None  # the pipeline's processes, stage i = group rank i
    tie_group: dist.ProcessGroup | None  # first and last stage, when embeddings are tied


def build_pipeline(model: DecoderLM, stage_index: int, n_stages: int, n_microbatches: int,
                   device: torch.device | str, loss_fn: LossFn = next_token_loss, schedule: str = "gpipe",
                   group: dist.ProcessGroup | None = None) -> Pipeline:
    """This process's part of an `n_stages` pipeline over `model` (built alike, same seed, on every
    process): its `DecoderStage` moved to `device`, the `PipelineStage` and the schedule
    (`gpipe` or `1f1b`) with `loss_fn(logits, targets)` per microbatch. Collective: every process of
    `group` (default: the world, stage i on rank i) calls it. The model's other stages' parts are
    not referenced afterwards: drop `model` to free them."""
    from torch.distributed.pipelining import PipelineStage

    if schedule not in SCHEDULE_NAMES:
        raise UserError(f"pipeline: unknown schedule {schedule!r}: choose from {', '.join(SCHEDULE_NAMES)}")
    world = dist.get_world_size(group)
    if world != n_stages:
        raise UserError(f"pipeline: {n_stages} stages on {world} processes: run one stage per process "
                        f"(torchrun --nproc_per_node {n_stages})")
    if n_microbatches < 1:
        raise UserError(f"pipeline: n_microbatches={n_microbatches}: use at least 1 (GPipe: a few times the stages)")
    device = torch.device(device)
    module = DecoderStage(model, stage_index, n_stages).to(device)
    tie_group = None
    if module.tied:  # every process makes the group, as new_group requires
        ends = [dist.get_global_rank(group, 0), dist.get_global_rank(group, n_stages - 1)] if group is not None \
            else [0, n_stages - 1]
        tie_group = dist.new_group(ends)
    stage = PipelineStage(module, stage_index, n_stages, device, group=group)
    sched = _schedules()[schedule](stage, n_microbatches=n_microbatches, loss_fn=loss_fn)
    return Pipeline(module, stage, sched, n_microbatches, group, tie_group)


def pipeline_step(pipe: Pipeline, idx: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
    """Forward and backward of one batch through the pipeline: afterwards each stage's parameters
    hold the gradient of the batch's mean loss (the mean of the microbatches' mean losses, equal
    microbatches). `idx` is read on the first stage, `targets` on the last (others may pass None).
    Returns that mean loss on every process (a 0-d fp32 tensor). Zero the gradients before."""
    loss = _run(pipe, idx, targets, train=True)
    w = pipe.module.tied_weight()
    if pipe.tie_group is not None and w is not None and w.grad is not None:
        dist.all_reduce(w.grad, group=pipe.tie_group)  # lookup's gradient + head's gradient
    return loss


@torch.no_grad()
def pipeline_eval(pipe: Pipeline, idx: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
    """The batch's mean loss through the pipeline, forward only (validation); on every process."""
    return _run(pipe, idx, targets, train=False)


def _run(pipe: Pipeline, idx: torch.Tensor | None, targets: torch.Tensor | None, train: bool) -> torch.Tensor:
    m = pipe.module
    batch = idx if m.is_first else targets
    if batch is not None and batch.shape[0] % pipe.n_microbatches:
        raise UserError(f"pipeline: batch of {batch.shape[0]} rows does not split into "
                        f"{pipe.n_microbatches} equal microbatches: use a batch size divisible by it")
    run = pipe.schedule.step if train else pipe.schedule.eval
    losses: list[torch.Tensor] = []
    args = (idx,) if m.is_first else ()
    kwargs = {"target": targets, "losses": losses} if m.is_last else {}
    run(*args, **kwargs)
    device = next(m.parameters()).device
    loss = torch.stack([x.detach().float() for x in losses]).mean() if losses else torch.zeros((), device=device)
    last = dist.get_global_rank(pipe.group, m.n_stages - 1) if pipe.group is not None else m.n_stages - 1
    dist.broadcast(loss, src=last, group=pipe.group)
    return loss


def clip_grad_norm(pipe: Pipeline, max_norm: float) -> torch.Tensor:
    """Clip the whole model's gradient norm, across the stages, to `max_norm` (as
    `torch.nn.utils.clip_grad_norm_` on the unsplit model; 0: only measure it); returns the norm
    before clipping. The tied matrix counts once (the first stage's copy)."""
    m = pipe.module
    tied = m.tied_weight()
    grads = [p.grad for p in m.parameters() if p.grad is not None and not (p is tied and not m.is_first)]
    device = next(m.parameters()).device
    sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=device)
    dist.all_reduce(sq, group=pipe.group)
    norm = sq.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in m.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
    return norm
