"""`llmkit plan`: the per-rank memory a training run would need (parameters, gradients, optimizer
state, activations, temporaries, peak), and whether it fits a device, before starting it.
The options are `llmkit train`'s names; the library is `llmkit.training.memory_plan`."""
from __future__ import annotations

import argparse
import json
from typing import Any


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan the per-rank memory of a training run",
                       description="Plan the memory each rank needs for one training step of a preset's model: "
                                   "parameters, gradients, AdamW state, activations and temporaries (gathered "
                                   "FSDP parameters, DDP buckets, the logits' gradients), the peak, and whether it "
                                   "fits the device. The options are `llmkit train`'s.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="baby-gpt", help="model preset (see `llmkit presets`)")
    for name in ("n-layers", "d-model", "n-heads", "context-length", "vocab-size"):
        p.add_argument(f"--{name}", type=_positive, default=None, help=f"override the preset's {name.replace('-', ' ')}")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp", "tp", "fsdp+tp"),
                   help="how the run spreads over ranks (ddp with --world 1: one process)")
    p.add_argument("--world", type=_positive, default=1, help="ranks (processes, one GPU each)")
    p.add_argument("--batch-size", type=_positive, default=12, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--seq-len", type=_positive, default=None, help="tokens per sequence (default: the context length)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"),
                   help="compute dtype (bf16 / fp16: autocast over fp32 weights; auto on a GPU is bf16)")
    p.add_argument("--tp-size", type=_positive, default=1, help="tensor-parallel group size (tp, fsdp+tp)")
    p.add_argument("--zero", type=lambda v: int(v) if v in ("2", "3") else _bad_zero(v), default=3, help="FSDP's ZeRO stage: 3 shards parameters too")
    p.add_argument("--mixed-precision", default="none", choices=("none", "bf16"),
                   help="FSDP: gather and compute in bf16, reduce gradients in fp32")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in the backward")
    p.add_argument("--cpu-offload", action=argparse.BooleanOptionalAction, default=False,
                   help="FSDP: keep shards, gradients and optimizer state in host memory")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False,
                   help="tp: split the norms and the residual stream over the sequence too")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GB (GB = GiB here) "
                                                              "(default: --gpu H100's 80 GiB)")
    device.add_argument("--gpu", default=None, help="a GPU by name (H100, A100-40GB, L4, RTX4090, ...)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=run)


def _model_config(args: argparse.Namespace) -> Any:
    from llmkit.models import kinds

    overrides = {k: getattr(args, k) for k in ("n_layers", "d_model", "n_heads", "context_length", "vocab_size")
                 if getattr(args, k) is not None}
    return kinds.config_from_preset(args.preset, **overrides)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import UserError
    from llmkit.training.memory_plan import gpu_memory, parse_size, plan, suggestions

    if args.parallel != "fsdp+tp" and args.parallel != "tp" and args.tp_size != 1:
        raise UserError(f"--tp-size {args.tp_size} needs --parallel tp or fsdp+tp")
    model_cfg = _model_config(args)
    context = getattr(model_cfg, "context_length", None)
    if args.seq_len is not None and context and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's context ({context}): "
                        f"give --context-length {args.seq_len} too, or a shorter --seq-len")
    options = dict(parallel=args.parallel if args.world > 1 or args.parallel != "ddp" else "none",
                   world=args.world, batch_size=args.batch_size, seq_len=args.seq_len or context, dtype=args.dtype,
                   tp_size=args.tp_size, zero=args.zero, mixed_precision=args.mixed_precision,
                   activation_checkpointing=args.activation_checkpointing, grad_accum=args.grad_accum,
                   sequence_parallel=args.sequence_parallel, cpu_offload=args.cpu_offload)
    if args.parallel == "tp" and args.tp_size == 1:
        options["tp_size"] = args.world
    device_bytes = parse_size(args.device_memory) if args.device_memory else gpu_memory(args.gpu or "H100")
    p = plan(model_cfg, **options)
    fits = p.peak <= device_bytes
    tips = [] if fits else suggestions(model_cfg, p, device_bytes, options)
    if args.json:
        print(json.dumps({**p.to_dict(), "device_memory": device_bytes, "fits": fits,
                          "free": device_bytes - p.peak, "suggestions": tips}))
        return 0
    mode = args.parallel + (f" --zero {args.zero}" if "fsdp" in args.parallel else "") + (
        f" --tp-size {options['tp_size']}" if "tp" in args.parallel else "")
    print(f"{args.preset}: {p.n_params / 1e6:.1f}M parameters; --parallel {mode}, world {args.world}, "
          f"batch {args.batch_size} x {options['seq_len']} tokens per rank, {args.dtype}"
          + (", mixed precision bf16" if args.mixed_precision == "bf16" else "")
          + (", activation checkpointing" if args.activation_checkpointing else ""))
    print(f"{'per rank, GiB':<18}{'largest':>10}{'at peak':>10}")
    for label in ("parameters", "gradients", "optimizer", "activations", "temporaries"):
        print(f"  {label:<16}{_gib(getattr(p, label)):>10}{_gib(p.at_peak[label]):>10}")
    print(f"  {'peak':<16}{'':>10}{_gib(p.peak):>10}   ({p.peak_phase})")
    for note in p.notes:
        print(f"note: {note}")
    size = f"{device_bytes / (1 << 30):g} GiB"
    if fits:
        print(f"fits in {size} with {_gib(device_bytes - p.peak)} GiB free")
    else:
        print(f"does not fit in {size} ({_gib(p.peak - device_bytes)} GiB over): try {', '.join(tips)}")
    return 0


def _bad_zero(value: str) -> int:
    raise argparse.ArgumentTypeError(f"--zero takes 2 or 3, not {value!r}")
