"""How much memory one rank needs for a training step, planned before the run (`llmkit plan`).

The parameters are counted on the real model, built on the meta device (no memory) from its config,
so every architecture and preset is counted right; per rank they are divided as the parallelism
divides them. What a step holds (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models"; Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", whose per-layer accounting `block_activations` follows for llmkit's blocks):

- parameters: fp32 master weights (llmkit trains fp32 weights; `--dtype bf16` is autocast);
- gradients: fp32, one per parameter; optimizer: AdamW's two fp32 moments;
- activations: what autograd saves for the backward, per block (norm inputs, the q/k/v projection,
  the attention output, the MLP hidden, the residual stream) plus the head (the final norm, the
  log-softmax of the logits that cross entropy keeps); with activation checkpointing
  (`torch.utils.checkpoint`) only each block's input, and one block's activations while it is
  recomputed; autocast's bf16 copies of the weights are saved with them;
- temporaries: FSDP2's unsharded parameters in flight (ZeRO-3: in the backward the root's and two
  blocks', current and prefetched; ZeRO-2: all of them from forward to backward); DDP's gradient buckets (a second copy of the gradients); the
  gradients of the logits at the start of the backward; one block's backward working set.

A step passes through phases (the cross entropy at the end of the forward, the loss gradient, the
backward of the last and of the first block, the optimizer step); the peak is the largest of them.
Attention is PyTorch's fused `scaled_dot_product_attention` (no T x T scores kept), except where
the config asks for the eager path (logit soft-capping), which keeps the probabilities.

The numbers are checked against peaks measured on CPU training steps (tests/training/test_memory_plan.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmkit.errors import UserError

GIB = 1 << 30
PARALLELS = ("none", "ddp", "fsdp", "tp", "fsdp+tp")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}  # fp32 state tensors per parameter
# GPU name -> memory (GiB, as the makers' "80GB" means), for --gpu
GPUS: dict[str, float] = {"H100": 80, "H200": 141, "B200": 180, "A100": 80, "A100-40GB": 40, "A100-80GB": 80,
                          "L40S": 48, "L4": 24, "A10": 24, "A10G": 24, "V100": 32, "V100-16GB": 16, "T4": 16,
                          "RTX4090": 24, "RTX3090": 24, "MI300X": 192, "MI250X": 128}


@dataclass(frozen=True)
class Plan:
    """Bytes per rank of one training step: each part at its largest (parameters ... temporaries),
    and the peak, the largest phase of the step (`peak_phase`; every phase in `phases`), which is
    not their sum (the forward's activations are freed as the gradients are made): `at_peak` holds
    the parts alive then, which sum to it."""

    parallel: str
    world: int
    n_params: int  # the whole model's parameters, shared ones once
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # saved for the backward, at their largest
    temporaries: int  # in flight, at their largest: gathered parameters, buckets, logits' gradients, working set
    peak: int
    peak_phase: str
    at_peak: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Stack:
    """One `blocks` ModuleList: its blocks' parameter counts (whole and per tensor-parallel rank),
    their saved activations, input and backward working set per token (bytes)."""

    block_params: tuple[int, ...]
    block_params_tp: tuple[int, ...]
    tokens: int  # per sample
    saved: float  # bytes per token per block
    inputs: float
    working: float


def meta_model(model_cfg: Any):
    """The config's model (any kind) on the meta device: shapes without memory."""
    from llmkit.models import kinds

    with torch.device("meta"):
        return kinds.build_model(model_cfg)


def _unique_numel(params) -> int:
    seen: dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def _tp_numel(block, tp: int) -> int:
    """Parameters of one block on one tensor-parallel rank: its linear layers split (column-parallel
    ones whole rows with their bias, row-parallel `proj` / `down` columns, their bias whole), norms whole."""
    n = 0
    for name, module in block.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear):
            row_parallel = name.rsplit(".", 1)[-1] in ("proj", "down")
            n += module.weight.numel() // tp
            if module.bias is not None:
                n += module.bias.numel() if row_parallel else module.bias.numel() // tp
        else:
            n += sum(p.numel() for p in own)
    return n


def _linear_weights(model, tp: int) -> float:
    """Weights of the model's linear layers per tensor-parallel rank (those in blocks split by `tp`):
    what autocast casts to bf16 and the layers save."""
    n = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            in_block = any(part in ("blocks", "encoder", "decoder") for part in name.split("."))
            n += m.weight.numel() / (tp if in_block else 1)
    return n


def _norm_saved(norm, e_res: int) -> float:
    """Bytes per token a norm keeps beyond its input: the statistics, and RMSNorm's normalised
    input (llmkit's RMSNorm multiplies the weight after F.rms_norm)."""
    if norm is None:
        return 0.0
    extra = 8.0  # mean / rstd in fp32
    if type(norm).__name__ == "RMSNorm":
        extra += norm.weight.numel() * e_res
    return extra


def block_activations(block, seq_len: int, rotary: bool, e_res: int, e_mm: int, tp: int = 1,
                      sequence_parallel: bool = False, dropout: float = 0.0) -> tuple[float, float, float, list[str]]:
    """(saved bytes per token, input bytes per token, backward working set per token, notes) of one
    block as autograd keeps it. e_res: bytes of the residual stream and norms' elements; e_mm: of
    the matmuls' inputs and outputs. Tensor parallelism splits the heads and the MLP hidden by `tp`;
    sequence parallelism splits the residual stream and the norms too."""
    notes: list[str] = []
    inner = getattr(block, "block", block)  # Mixture-of-Depths wraps a block
    kind = type(inner).__name__
    attn, mlp = inner.attn, inner.mlp
    d = inner.norm1.weight.numel()
    sp = tp if sequence_parallel else 1
    # attention (its heads split over tensor-parallel ranks)
    if hasattr(attn, "qkv") and hasattr(attn, "n_heads"):
        H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        att = (H + 2 * KV) * hd * e_mm  # the fused projection's output: q, k, v views keep it
        if rotary:
            att += (H + KV) * hd * e_mm  # the rotated q and k
        if "q_norm" in attn._modules:
            att += 2 * (H + KV) * hd * e_res
        att += H * hd * e_mm + 4 * H  # the attention output and its log-sum-exp
        if "out_gate" in attn._modules:
            att += 2 * H * hd * e_mm
        if getattr(attn, "softcap", None) is not None:  # the eager path: T x T scores and probabilities kept
            att += H * seq_len * (4 + e_mm + (e_mm if e_mm != 4 else 0))
            if KV != H:
                att += 2 * H * hd * e_mm  # keys and values repeated per query head
    else:
        att = 6 * d * e_mm
        notes.append(f"{type(attn).__name__}: activations estimated as multi-head attention's")
    # feed-forward (its hidden units split over tensor-parallel ranks)
    ffn = type(mlp).__name__
    if hasattr(mlp, "up"):
        f = mlp.up.out_features
        hidden = {"SwiGLU": 4, "GeGLU": 4, "ReluMLP": 1, "QuickGeluMLP": 3}.get(ffn, 2)
        top = 1
    else:
        moe = getattr(getattr(block, "cfg", None), "moe", None) or {}
        experts = getattr(mlp, "experts", None)
        first = experts[0] if experts is not None and len(experts) else None
        f = first.up.out_features if first is not None and hasattr(first, "up") else 4 * d
        top = moe.get("top_k", 2)
        hidden = 4 if first is not None and hasattr(first, "gate") else 2
        notes.append(f"{ffn}: activations estimated as top-{top} dense experts")
    mlp_bytes = top * hidden * f * e_mm + (top - 1) * 2 * d * e_mm
    if dropout > 0:
        mlp_bytes += d  # the mask (bool)
        att += d
    # the residual stream and the norms (split by sequence parallelism only)
    norms = [getattr(inner, n, None) for n in ("norm1", "norm2", "post_attn_norm", "post_mlp_norm")]
    norm_bytes = sum(_norm_saved(n, e_res) for n in norms if n is not None)
    casts = d * e_mm  # a norm's output as a linear layer keeps it
    if kind == "ParallelBlock":
        resid = d * e_res + 2 * casts
    elif kind == "SharedNormParallelBlock":
        resid = d * e_res + casts
    elif kind == "PostNormBlock":
        resid = 4 * d * e_res + (2 * casts if e_mm != e_res else 0)
    else:  # pre-norm (and the sandwich block, whose extra norms keep the sublayers' outputs)
        resid = 2 * d * e_res + 2 * casts
        if kind == "SandwichBlock":
            resid += 2 * d * e_mm
        elif kind != "Block":
            notes.append(f"{kind}: activations estimated as a pre-norm block's")
    saved = (att + mlp_bytes) / tp + (resid - 2 * casts) / sp + 2 * casts + norm_bytes / sp
    inputs = d * e_res / sp
    working = (top * f * e_mm) / tp + 2 * d * e_res  # a hidden gradient beside the stream's (saved ones free as it runs)
    return saved, inputs, working, notes


def _stacks(model, seq_len: int, e_res: int, e_mm: int, tp: int, sequence_parallel: bool,
            dropout: float) -> tuple[list[_Stack], list[str]]:
    stacks, notes = [], []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "encoder", "decoder")):
            continue
        if not len(module) or not hasattr(getattr(module[0], "block", module[0]), "attn"):
            continue
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        cfg = getattr(owner, "cfg", None) or getattr(model, "cfg", None)
        tokens = seq_len
        if getattr(cfg, "image_size", None) and getattr(cfg, "patch_size", None):
            tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        rotary = bool(getattr(getattr(owner, "pos", None), "rotary", False))
        per_block = [block_activations(b, tokens, rotary, e_res, e_mm, tp, sequence_parallel, dropout) for b in module]
        for *_, n in per_block:
            notes.extend(n)
        saved = max(b[0] for b in per_block)
        stacks.append(_Stack(tuple(_unique_numel(b.parameters()) for b in module),
                             tuple(_tp_numel(b, tp) for b in module), tokens, saved,
                             max(b[1] for b in per_block), max(b[2] for b in per_block)))
    return stacks, sorted(set(notes))


def check_options(parallel: str, world: int, batch_size: int, seq_len: int, dtype: str, tp_size: int, zero: int,
                  mixed_precision: str, grad_accum: int, optimizer: str, sequence_parallel: bool = False,
                  cpu_offload: bool = False) -> None:
    """UserError, one line naming the fix, for options no run could take."""
    if parallel not in PARALLELS:
        raise UserError(f"unknown --parallel {parallel!r}: choose one of {', '.join(PARALLELS)}")
    for name, value in (("world", world), ("batch-size", batch_size), ("seq-len", seq_len), ("tp-size", tp_size),
                        ("grad-accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value!r}")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if zero not in (2, 3):
        raise UserError(f"--zero must be 2 or 3, got {zero!r}")
    if mixed_precision not in ("none", "bf16"):
        raise UserError(f"unknown --mixed-precision {mixed_precision!r}: choose none or bf16")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if "tp" in parallel:
        if world % tp_size:
            raise UserError(f"--world {world} is not a multiple of --tp-size {tp_size}: choose a tp size dividing it")
        if parallel == "tp" and tp_size != world:
            raise UserError(f"--parallel tp splits every block over all {world} ranks: give --tp-size {world}, "
                            "or --parallel fsdp+tp for a smaller tensor-parallel group")
    elif tp_size != 1:
        raise UserError(f"--tp-size {tp_size} needs --parallel tp or fsdp+tp (not {parallel})")
    if parallel == "none" and world != 1:
        raise UserError(f"--world {world} needs a parallelism: give --parallel ddp, fsdp, tp or fsdp+tp")
    if mixed_precision != "none" and "fsdp" not in parallel:
        raise UserError("--mixed-precision is FSDP's (gather and compute in bf16): use --parallel fsdp, "
                        "or --dtype bf16 (autocast) for other parallelisms")
    if cpu_offload and "fsdp" not in parallel:
        raise UserError("--cpu-offload moves FSDP's shards to host memory: use it with --parallel fsdp or fsdp+tp")
    if sequence_parallel and "tp" not in parallel:
        raise UserError("--sequence-parallel splits tensor-parallel activations: use it with --parallel tp or fsdp+tp")


def plan(model_cfg: Any, parallel: str = "none", world: int = 1, batch_size: int = 1, seq_len: int | None = None,
         dtype: str = "fp32", tp_size: int = 1, zero: int = 3, mixed_precision: str = "none",
         activation_checkpointing: bool = False, optimizer: str = "adamw", grad_accum: int = 1,
         sequence_parallel: bool = False, cpu_offload: bool = False, optimizer_impl: str = "fused") -> Plan:
    """The per-rank memory of one training step of `model_cfg`'s model (see the module docstring).

    parallel: none (one process), ddp, fsdp (FSDP2 per block and root; `zero` 3 or 2), tp (all
    `world` ranks one tensor-parallel group), fsdp+tp (`tp_size` ranks per group). batch_size:
    sequences per rank per micro-step; seq_len: tokens per sequence (default: the context).
    dtype: the compute dtype (bf16 / fp16: autocast over fp32 weights); mixed_precision bf16:
    FSDP2 gathers, computes and keeps activations in bf16. optimizer_impl: fused (llmkit's AdamW,
    no temporaries) or foreach (one fp32 copy of the local parameters during the step)."""
    seq_len = seq_len or getattr(model_cfg, "context_length", None) or 1
    check_options(parallel, world, batch_size, seq_len, dtype, tp_size, zero, mixed_precision, grad_accum, optimizer,
                  sequence_parallel, cpu_offload)
    model = meta_model(model_cfg)
    tp = tp_size if "tp" in parallel else 1
    dp = world // tp
    fsdp = "fsdp" in parallel
    bf16_gather = fsdp and mixed_precision == "bf16"
    autocast = DTYPE_BYTES[dtype] < 4 and not bf16_gather
    e_res = 2 if bf16_gather else 4
    e_mm = 2 if (bf16_gather or autocast) else 4
    e_p = 2 if bf16_gather else 4  # gathered parameters' element size
    dropout = float(getattr(model_cfg, "dropout", 0.0) or 0.0)
    stacks, notes = _stacks(model, seq_len, e_res, e_mm, tp, sequence_parallel, dropout)

    n_params = _unique_numel(model.parameters())
    n_blocks = sum(sum(s.block_params) for s in stacks)
    n_blocks_tp = sum(sum(s.block_params_tp) for s in stacks)
    root = n_params - n_blocks
    shard = dp if fsdp else 1
    n_local = (root + n_blocks_tp) / shard
    params = 0 if cpu_offload else 4 * n_local
    grads = 0 if cpu_offload else 4 * n_local
    states = OPTIMIZERS[optimizer]
    opt = 0 if cpu_offload else 4 * states * n_local
    persist = params + opt
    buckets = 4 * n_params if parallel == "ddp" and world > 1 else 0  # DDP's (gradient_as_bucket_view=False)
    persist += buckets
    block_grad = 4 * max((max(s.block_params_tp) for s in stacks), default=0) / shard

    # activations (per rank: every rank of a tensor-parallel group computes the same batch)
    stored = inputs = recompute = working = 0.0
    for s in stacks:
        n_tok = batch_size * s.tokens
        stored += n_tok * (s.inputs if activation_checkpointing else s.saved) * len(s.block_params)
        inputs += n_tok * s.inputs
        recompute = max(recompute, n_tok * s.saved)
        working = max(working, n_tok * s.working)
    tokens = batch_size * seq_len
    head = getattr(model, "lm_head", None)
    vocab = head.out_features if isinstance(head, nn.Linear) else 0
    norm = getattr(model, "norm", None)
    d = getattr(model_cfg, "d_model", 0)
    if norm is not None and hasattr(norm, "weight"):
        stored += tokens * (d * (e_res + e_mm) + _norm_saved(norm, e_res))
    logits = tokens * vocab
    stored += 4 * logits  # log-softmax's output, fp32
    if autocast:  # autocast's bf16 copies of the matmul weights, saved by their layers
        stored += e_mm * _linear_weights(model, tp)
    ce_forward = logits * (e_mm + (4 if e_mm != 4 else 0))  # the logits and their fp32 copy
    ce_backward = logits * (8 + (e_mm if e_mm != 4 else 0))  # the gradient into log-softmax and out of it

    # FSDP2's gathered parameters: the root's for the whole step, and the blocks'
    root_unsharded = e_p * root if fsdp else 0
    big_block = max((max(s.block_params_tp) for s in stacks), default=0)
    if fsdp and zero == 2:
        forward_gathered = backward_gathered = e_p * (root + n_blocks_tp)
    elif fsdp:  # the root reshards after its forward too (llmkit gives every module reshard_after_forward);
        # a block's unsharded gradients take the place of its activations as those are freed
        forward_gathered = 0
        backward_gathered = root_unsharded + 2 * e_p * big_block
    else:
        forward_gathered = backward_gathered = 0
    accumulated = grads if grad_accum > 1 else 0
    opt_temp = 4 * n_local if optimizer_impl == "foreach" and not cpu_offload else 0

    ac_recompute = recompute if activation_checkpointing else 0
    head_grads = 4 * root / shard
    last_grads = max(accumulated, head_grads)
    # phase -> (gradients, activations, temporaries) alive then, beside the parameters and optimizer state
    phases = {
        "forward (cross entropy)": (accumulated, stored, forward_gathered + ce_forward),
        "backward (loss gradient)": (accumulated, stored, forward_gathered + ce_backward),
        "backward (last block)": (last_grads, stored - 4 * logits + ac_recompute, backward_gathered + working),
        "backward (first block)": (grads - block_grad, (inputs + ac_recompute) if activation_checkpointing else recompute,
                                   backward_gathered + working),
        "optimizer step": (grads, 0.0, opt_temp),
    }
    totals = {name: int(params + opt + buckets + sum(parts)) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    g, a, t = phases[peak_phase]
    at_peak = {"parameters": int(params), "gradients": int(g), "optimizer": int(opt), "activations": int(a),
               "temporaries": int(t + buckets)}
    if cpu_offload:
        notes.append(f"--cpu-offload keeps {4 * (2 + states) * n_local / GIB:.2f} GiB of shards, gradients and "
                     "optimizer state in host memory")
    return Plan(parallel=parallel, world=world, n_params=n_params, parameters=int(params), gradients=int(grads),
                optimizer=int(opt), activations=int(max(p[1] for p in phases.values())),
                temporaries=int(max(p[2] for p in phases.values()) + buckets), peak=totals[peak_phase],
                peak_phase=peak_phase, at_peak=at_peak, phases=totals, notes=tuple(notes))


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '24G', '512MB' -> bytes (GB and GiB both 2^30 bytes, as GPU makers' sizes are meant)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--device-memory {text!r} is not a size: give e.g. 80GB, 24GiB or 512MB")
    unit = {"": 30, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    if m.group(2) == "" and m.group(3):  # plain bytes ("1000B")
        unit = 0
    return int(float(m.group(1)) * (1 << unit))


def gpu_memory(name: str) -> int:
    """Bytes of a GPU named like H100, A100-40GB, RTX4090 (case and dashes aside)."""
    key = {k.upper().replace("-", "").replace(" ", ""): k for k in GPUS}
    found = key.get(name.upper().replace("-", "").replace(" ", ""))
    if found is None:
        raise UserError(f"unknown --gpu {name!r}: choose one of {', '.join(GPUS)}, or give --device-memory SIZE")
    return int(GPUS[found] * GIB)


def suggestions(model_cfg: Any, current: Plan, device_bytes: int, options: dict[str, Any]) -> list[str]:
    """Changes that would make the plan fit, the ones that fit alone first: sharding, activation
    checkpointing, bf16, a smaller batch (the largest that fits)."""
    tries: list[tuple[str, dict[str, Any]]] = []
    if options["parallel"] in ("none", "ddp") and options["world"] > 1:
        tries.append(("--parallel fsdp", {"parallel": "fsdp", "zero": 3}))
    if options["parallel"] == "fsdp" and options["zero"] == 2:
        tries.append(("--zero 3", {"zero": 3}))
    if not options["activation_checkpointing"]:
        tries.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if "fsdp" in options["parallel"] and options["mixed_precision"] == "none":
        tries.append(("--mixed-precision bf16", {"mixed_precision": "bf16"}))
    elif "fsdp" not in options["parallel"] and options["dtype"] == "fp32":
        tries.append(("--dtype bf16", {"dtype": "bf16"}))
    fit, helps = [], []
    for label, change in tries:
        p = plan(model_cfg, **{**options, **change})
        (fit if p.peak <= device_bytes else helps).append((p.peak, label))
    batch = options["batch_size"]
    while batch > 1:
        batch //= 2
        if plan(model_cfg, **{**options, "batch_size": batch}).peak <= device_bytes:
            accum = options["grad_accum"] * (options["batch_size"] // batch)
            fit.append((0, f"--batch-size {batch} (with --grad-accum {accum} for the same tokens per step)"))
            break
    out = [label for _, label in sorted(fit)] + [label for _, label in sorted(helps) if label not in {f for _, f in fit}]
    if not fit:
        out.append("more ranks (--world) with --parallel fsdp")
    return out
