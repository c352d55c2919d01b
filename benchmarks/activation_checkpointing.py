"""Peak memory and tokens/s of a training step with and without activation checkpointing per block
(`llmkit.training.activation_checkpointing`, Chen et al. 2016).

Model: a GPT-2-shaped decoder, smaller for a 2-core CPU by default: 6 layers, d_model 384, 6 heads,
d_ff 1536, learned positions, LayerNorm, GELU, dropout 0.1, vocab 8192, tied embeddings; fp32, CPU.
Step: batch 4 x 256 tokens, forward, next-token cross entropy, backward, AdamW step.

Each measurement is a fresh subprocess (one side, one round): build the model (seed 0), one
warm-up step (AdamW state allocated), then `--steps` timed steps (median). Two memory measures:

- peak tensor memory: torch's `MemTracker` (`torch.distributed._tools.mem_tracker`, a
  TorchDispatchMode that records every storage an op allocates and when it is freed) over one
  more step after the timed ones (it slows ops, so it is never timed): the bytes of the tensors
  alive at once, split into parameters, gradients, optimizer state and activations. This is what
  checkpointing changes, free of allocator effects.
- peak RSS: VmHWM minus VmRSS after the warm-up step (the model, its gradients' first
  allocation and AdamW's state are then resident), with glibc's mmap threshold fixed
  (MALLOC_MMAP_THRESHOLD_, as benchmarks/lora_step.py explains) so freed tensors go back to the
  system and the peak follows the live tensors.

Sides alternate A B B A ... for `--rounds` rounds; medians reported, with the ratios. The first
timed step's loss is printed for both: checkpointing recomputes the same numbers, so it must agree.

    python benchmarks/activation_checkpointing.py [--rounds 3] [--steps 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

SHAPE = dict(vocab_size=8192, context_length=256, n_layers=6, d_model=384, n_heads=6, d_ff=1536, dropout=0.1)
BATCH = 4
MMAP_THRESHOLD = 65536  # see benchmarks/lora_step.py: freed tensors of 64 KiB or more leave the resident set


def _status(field: str) -> int:
    return int(open("/proc/self/status").read().split(f"{field}:")[1].split()[0]) * 1024


def child(side: str, steps: int, threads: int, shape: dict) -> None:
    """One measurement (see the module docstring), printed as one JSON line."""
    import torch
    import torch.nn.functional as F
    from torch.distributed._tools.mem_tracker import MemTracker

    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM
    from llmkit.training.activation_checkpointing import apply_activation_checkpointing

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**shape)).train()
    blocks = apply_activation_checkpointing(model) if side == "checkpointed" else 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    T = shape["context_length"]
    w = torch.randint(0, shape["vocab_size"], (BATCH, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = w[:, :-1], w[:, 1:]

    def step() -> float:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 0.0  # warm-up: kernels and optimizer state, weights unchanged
    torch.manual_seed(2)
    step()
    opt.param_groups[0]["lr"] = lr
    rss_before = _status("VmRSS")
    times, losses = [], []
    for i in range(steps):
        torch.manual_seed(3 + i)  # the same dropout masks on both sides
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    peak_rss = _status("VmHWM")
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    peak = {getattr(kind, "value", str(kind)): n for kind, n in snapshot.items()}  # "Total", "Activation", ...
    times.sort()
    print(json.dumps({"side": side, "blocks": blocks, "tokens_per_s": BATCH * T / times[len(times) // 2],
                      "step_s": times, "first_loss": losses[0], "peak_rss_above_start": peak_rss - rss_before,
                      "peak_rss": peak_rss, "tensor_peak": peak}))


def measure(side: str, steps: int, threads: int, shape: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run([sys.executable, __file__, "--child", side, str(steps), str(threads), json.dumps(shape)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median taken)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=SHAPE["n_layers"])
    ap.add_argument("--d-model", type=int, default=SHAPE["d_model"])
    ap.add_argument("--seq", type=int, default=SHAPE["context_length"])
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "STEPS", "THREADS", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, steps, threads, shape = args.child
        child(side, int(steps), int(threads), json.loads(shape))
        return
    from _common import machine, median, table

    shape = {**SHAPE, "n_layers": args.layers, "d_model": args.d_model, "d_ff": 4 * args.d_model,
             "n_heads": max(1, args.d_model // 64), "context_length": args.seq}
    runs: dict[str, list[dict]] = {"stored": [], "checkpointed": []}
    for r in range(args.rounds):
        for side in (("stored", "checkpointed") if r % 2 == 0 else ("checkpointed", "stored")):
            m = measure(side, args.steps, args.threads, shape)
            runs[side].append(m)
            print(f"round {r} {side}: {m['tokens_per_s']:.0f} tok/s, tensor peak "
                  f"{m['tensor_peak']['Total'] / 2**20:.1f} MiB, peak RSS above start "
                  f"{m['peak_rss_above_start'] / 2**20:.1f} MiB", flush=True)
    print(f"\n{machine()}; children run {args.threads} threads; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"decoder {shape['n_layers']} layers, d_model {shape['d_model']}, {shape['n_heads']} heads, vocab "
          f"{shape['vocab_size']}, dropout {shape['dropout']}; batch {BATCH} x {shape['context_length']}, fp32, "
          f"AdamW; {args.rounds} rounds x {args.steps} steps\n")
    mib = 2 ** 20
    rows = []
    for side, ms in runs.items():
        rows.append([side, median([m["tokens_per_s"] for m in ms]),
                     median([m["tensor_peak"]["Total"] for m in ms]) / mib,
                     median([m["tensor_peak"]["Activation"] for m in ms]) / mib,
                     median([m["peak_rss_above_start"] for m in ms]) / mib,
                     median([m["peak_rss"] for m in ms]) / mib, f"{ms[0]['first_loss']:.6f}"])
    print(table(["side", "tokens/s", "tensor peak MiB", "of it activations MiB", "peak RSS above start MiB",
                 "peak RSS MiB", "first loss"], rows))
    s, c = rows
    print(f"\ncheckpointed / stored: tokens/s {c[1] / s[1]:.2f}x, tensor peak {c[2] / s[2]:.2f}x, "
          f"activations {c[3] / s[3]:.2f}x, peak RSS above start {c[4] / s[4]:.2f}x")


if __name__ == "__main__":
    main()
