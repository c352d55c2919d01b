"""Peak memory of one fine-tuning step per method, llmkit side: full fine-tuning, LoRA, QLoRA and
prompt tuning (and every other method `llmkit.peft` has: DoRA, adapters, prefix, IA3, VeRA) on a
SmolLM-135M-shaped Llama (`benchmarks/lora_step.py`: hidden 576, 30 layers, vocab 49152, tied
embeddings, random weights), fp32, CPU, batch 4 x 256.

Each method runs in a fresh subprocess: `load_hf`, `method.apply` with the TrainConfig defaults
(LoRA family r=8 on q,v; prompt/prefix 20 virtual tokens; adapter size 64), llmkit's optimizer
builder (AdamW over the trainable parameters, the method's groups), then two steps (forward,
cross entropy, backward, clip, AdamW step): the second runs with the optimizer state allocated.
Reported (children run with a fixed malloc mmap threshold: see lora_step.MMAP_THRESHOLD): the
peak resident set (VmHWM), the resident set once the method is applied (QLoRA's
4-bit base shows here), the peak minus the resident set after loading (what training added:
gradients, optimizer state, activations), trainable parameters and the second
step's time. An "inference" row (no_grad forward of the same batch) is the floor.

    python benchmarks/finetune_memory.py [--methods full,lora,qlora,prompt] [--layers 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from lora_step import BATCH, MMAP_THRESHOLD, T, current_rss, peak_rss, save_smollm_shaped  # noqa: E402

MAIN = ("full", "lora", "qlora", "prompt")
OTHERS = ("dora", "adapter", "prefix", "ia3", "vera")


def child(method_name: str, path: str, threads: int) -> None:
    import torch
    import torch.nn.functional as F

    from llmkit.interop.hf import load_hf

    torch.set_num_threads(threads)
    before = current_rss()
    model = load_hf(path)
    after_load = current_rss()
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, model.cfg.vocab_size, (BATCH, T + 1), generator=g)
    x, y = w[:, :-1], w[:, 1:]
    out: dict = {"method": method_name, "rss_before": before, "rss_after_load": after_load}
    if method_name == "inference":
        model.eval()
        t = time.perf_counter()
        with torch.no_grad():
            model(x)
        out.update(step_s=time.perf_counter() - t, trainable=0, total=sum(p.numel() for p in model.parameters()))
    else:
        from llmkit.peft import count_parameters, get_method
        from llmkit.training.config import TrainConfig
        from llmkit.training.optim import build_optimizer, clip_grad_norm_

        opts = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        method = get_method(method_name)(opts)
        model = method.apply(model)
        model.train()
        after_apply = current_rss()
        opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.99), "cpu", groups=method.param_groups(model, 0.1))
        params = [p for p in model.parameters() if p.requires_grad]
        times, losses, peaks = [], [], []
        for _ in range(2):
            t = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
            peaks.append(peak_rss())
        trainable, total = count_parameters(model)
        out.update(step_s=times[-1], trainable=trainable, total=total, rss_after_apply=after_apply, losses=losses,
                   peak_after_each_step=peaks)
    out["peak_rss"] = peak_rss()
    print(json.dumps(out))


def measure(method: str, path: Path, threads: int) -> dict | str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run([sys.executable, __file__, "--child", method, str(path), str(threads)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(("inference",) + MAIN + OTHERS))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "PATH", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    from _common import machine, table

    from llmkit.peft import method_names

    known = set(method_names()) | {"inference"}
    methods = [m for m in args.methods.split(",") if m in known]
    skipped = [m for m in args.methods.split(",") if m not in known]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_smollm_shaped(Path(tmp) / "smollm", args.layers)
        weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for m in methods:
            r = measure(m, path, args.threads)
            if isinstance(r, str):
                rows.append([m, "failed: " + r[:80], "", "", "", "", ""])
            else:
                rows.append([m, r["peak_rss"] / 2**20, r.get("rss_after_apply", r["rss_after_load"]) / 2**20,
                             (r["peak_rss"] - r["rss_after_load"]) / 2**20,
                             f"{r['trainable']:,}", f"{100 * r['trainable'] / max(r['total'], 1):.3g}%",
                             f"{r['step_s']:.1f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(f"\n{machine()}; children run {args.threads} threads; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"SmolLM-135M-shaped Llama ({args.layers} layers, safetensors {weights / 2**20:.0f} MiB fp32), "
          f"batch {BATCH} x {T}, fp32" + (f"; methods not installed: {', '.join(skipped)}" if skipped else "") + "\n")
    print(table(["method", "peak RSS MiB", "RSS after apply MiB", "peak - RSS after load MiB", "trainable", "share",
                 "step s"], rows))


if __name__ == "__main__":
    main()
