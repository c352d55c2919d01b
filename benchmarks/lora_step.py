"""Tokens/s and peak memory of a LoRA training step: llmkit against peft + transformers.

Model: a SmolLM-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings; 134.5M parameters) with random weights from a transformers
`LlamaConfig`, saved once to a temporary folder; both sides read the same safetensors file.
LoRA r=8, alpha 16, no dropout, on q and v (peft: target_modules q_proj, v_proj); fp32, CPU.
Step: batch 4 x 256 tokens, forward, next-token cross entropy on the logits (the same loss code on
both sides), backward, clip the gradient norm to 1, AdamW step on the adapter only.

llmkit: `llmkit.interop.hf.load_hf` + `llmkit.peft.get_method("lora")` with `llmkit.training.optim`'s
optimizer builder and clipping (what `llmkit train --method lora` runs); peft: `from_pretrained` +
`get_peft_model`, `torch.optim.AdamW(trainable)` and `clip_grad_norm_`, as peft's users write it.

Each measurement is a fresh subprocess (one side, one round): load, apply, one warm-up step, then
`--steps` timed steps; its peak resident set is VmHWM of /proc/self/status (a fresh address space
per exec; the children run with a fixed malloc mmap threshold, see MMAP_THRESHOLD). Sides
alternate A B B A ... for `--rounds` rounds; medians reported, with the ratio.
The first timed step's loss is printed for both sides: the adapters start at B = 0, so it is the
base model's loss and must agree (a check that both ran the same computation).

    python benchmarks/lora_step.py [--rounds 3] [--steps 3] [--threads 2] [--layers 30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

SMOLLM = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
BATCH, T, RANK, ALPHA = 4, 256, 8, 16
# glibc raises its mmap threshold after a large block is freed, so later activations come from the
# heap and stay resident once freed: the peak RSS then grows with the allocation history (+700 MB
# on the second step here). A fixed threshold returns every freed tensor of 64 KiB or more to the
# system, so the peak measures the tensors alive at once (both sides get it).
MMAP_THRESHOLD = 65536


def save_smollm_shaped(directory: Path, layers: int) -> Path:
    """Random weights of the SmolLM-135M shape (with `layers` layers), saved as safetensors."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMOLLM, "num_hidden_layers": layers}))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM)."""
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) * 1024


def current_rss() -> int:
    status = open("/proc/self/status").read().split("VmRSS:")[1]
    return int(status.split()[0]) * 1024


def llmkit_side(path: str):
    """(model forward: ids -> logits, trainable parameters, optimizer, clip function)."""
    from llmkit.interop.hf import load_hf
    from llmkit.peft import get_method
    from llmkit.training.config import TrainConfig
    from llmkit.training.optim import build_optimizer, clip_grad_norm_
    import dataclasses

    opts = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    opts.update(rank=RANK, alpha=float(ALPHA), target_modules="q,v")
    method = get_method("lora")(opts)
    model = method.apply(load_hf(path))
    model.train()
    opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.99), "cpu", groups=method.param_groups(model, 0.0))
    return model, [p for p in model.parameters() if p.requires_grad], opt, clip_grad_norm_


def peft_side(path: str):
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    base = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)

    def forward(x):
        return model(input_ids=x, use_cache=False).logits

    return forward, trainable, opt, torch.nn.utils.clip_grad_norm_


def child(side: str, path: str, steps: int, threads: int) -> None:
    """One measurement (see the module docstring), printed as one JSON line."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    before = current_rss()
    t0 = time.perf_counter()
    forward, trainable, opt, clip = (llmkit_side if side == "llmkit" else peft_side)(path)
    load_s = time.perf_counter() - t0
    after_load = current_rss()
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, SMOLLM["vocab_size"], (BATCH, T + 1), generator=g)
    x, y = w[:, :-1], w[:, 1:]
    params = list(trainable)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # warm-up on a short row at lr 0: first use of every kernel, optimizer state allocated, weights
    # unchanged (so the first timed step's loss is the base model's on both sides)
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    step(x[:1, :32], y[:1, :32])
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - t)
    first = losses[0]
    times.sort()
    print(json.dumps({"side": side, "tokens_per_s": BATCH * T / times[len(times) // 2], "step_s": times,
                      "first_loss": first, "trainable": sum(p.numel() for p in params), "load_s": load_s,
                      "rss_before": before, "rss_after_load": after_load, "peak_rss": peak_rss()}))


def measure(side: str, path: Path, steps: int, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run([sys.executable, __file__, "--child", side, str(path), str(steps), str(threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median taken)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="fewer layers for a quick look (SmolLM-135M: 30)")
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "PATH", "STEPS", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, path, steps, threads = args.child
        child(side, path, int(steps), int(threads))
        return
    from _common import machine, median, table

    with tempfile.TemporaryDirectory() as tmp:
        path = save_smollm_shaped(Path(tmp) / "smollm", args.layers)
        runs: dict[str, list[dict]] = {"llmkit": [], "peft": []}
        for r in range(args.rounds):
            for side in (("llmkit", "peft") if r % 2 == 0 else ("peft", "llmkit")):
                runs[side].append(measure(side, path, args.steps, args.threads))
                m = runs[side][-1]
                print(f"round {r} {side}: {m['tokens_per_s']:.0f} tok/s, peak RSS {m['peak_rss'] / 2**20:.0f} MiB",
                      flush=True)
    print(f"\n{machine()}; children run {args.threads} threads; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"SmolLM-135M-shaped Llama ({args.layers} layers), LoRA r={RANK} on q,v, batch {BATCH} x {T}, fp32, "
          f"{args.rounds} rounds x {args.steps} steps\n")
    rows = []
    for side, ms in runs.items():
        rows.append([side, median([m["tokens_per_s"] for m in ms]), median([m["peak_rss"] for m in ms]) / 2**20,
                     median([m["peak_rss"] - m["rss_after_load"] for m in ms]) / 2**20, ms[0]["trainable"],
                     f"{ms[0]['first_loss']:.6f}"])
    print(table(["side", "tokens/s (median)", "peak RSS MiB", "peak - RSS after load MiB", "trainable params",
                 "first loss"], rows))
    ratio = rows[0][1] / rows[1][1]
    print(f"\nllmkit / peft tokens/s: {ratio:.2f}x; peak RSS llmkit / peft: {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
