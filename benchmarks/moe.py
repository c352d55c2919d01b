"""Claim: llmkit's Mixture-of-Experts layer trains (forward + backward) at >= 1.5x the tokens/s of
transformers' MixtralSparseMoeBlock on the same config (8 experts, top-2, width 256, expert hidden
size 512, SwiGLU, 2048 tokens, fp32); and a tiny MoE language model beats a dense one with the same
active parameters after the same number of steps.

Throughput: both layers hold the same random weights and take the same input (requires_grad, as
inside a model); one step is forward, a scalar loss (the mean square of the output, plus llmkit's
load-balancing loss, which transformers' block does not compute), backward. transformers runs its
experts two ways: "eager" (the per-expert loop a directly built block runs) and "grouped_mm" (what
`MixtralForCausalLM` picks by default where torch has grouped_mm). Sides alternate A B C A B C;
medians reported. `--clock cpu` times with the process's CPU time, for a shared machine where
other processes steal the wall clock.

Quality: character-level tinyshakespeare, 2 layers, width 64, context 64, batch 16, AdamW lr 3e-3,
`--lm-steps` steps, both models from the same seed on the same batches: MoE 8 experts top-2 of
hidden size 128 vs a dense SwiGLU of hidden size 256 (= 2 x 128: the same active expert weights).
Validation loss on the same 20 batches of the last 10% of the text.

    python benchmarks/moe.py [--rounds 7] [--steps 5] [--clock wall|cpu] [--threads N]
                             [--data ../shared/data/tinyshakespeare/input.txt] [--lm-steps 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, table  # noqa: E402

E, K, D, FF, N = 8, 2, 256, 512, 2048


# --- throughput of one layer ----------------------------------------------------------------------

def llmkit_layer():
    from llmkit.config import ModelConfig
    from llmkit.nn.moe import MoE

    cfg = ModelConfig(vocab_size=64, context_length=N, n_layers=1, d_model=D, n_heads=4, d_ff=FF, mlp="swiglu",
                      norm="rmsnorm", position="rope", bias=False, moe={"n_experts": E, "top_k": K})
    return MoE(cfg, 0).train()


def transformers_layer(implementation: str | None):
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    transformers.logging.set_verbosity_error()
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K)
    if implementation is not None:
        cfg._experts_implementation_internal = implementation
    return MixtralSparseMoeBlock(cfg).train()


def share_weights(ours, theirs) -> None:
    """Random weights into llmkit's layer, copied into transformers' (gate and up concatenated)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate, ours.experts.up], dim=1))
        theirs.experts.down_proj.copy_(ours.experts.down)


def step_fn(layer, llmkit: bool):
    def step(x):
        x = x.detach().requires_grad_()
        out = layer(x if llmkit else x[None])
        loss = out.square().mean()
        if llmkit and layer.aux_loss is not None:
            loss = loss + layer.aux_loss
        loss.backward()
        for p in layer.parameters():
            p.grad = None
    return step


def tokens_per_second(step, x, steps: int, clock) -> float:
    for _ in range(2):
        step(x)
    start = clock()
    for _ in range(steps):
        step(x)
    return N * steps / (clock() - start)


def throughput(rounds: int, steps: int, clock) -> None:
    torch.manual_seed(0)
    ours = llmkit_layer()
    eager, grouped = transformers_layer(None), transformers_layer("grouped_mm")
    share_weights(ours, eager)
    grouped.load_state_dict(eager.state_dict())
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same function on every side
        ref = eager(x[None])[0]
        for name, out in (("llmkit", ours.eval()(x)), ("grouped_mm", grouped.eval()(x[None])[0])):
            err = (out - ref).abs().max().item()
            assert err < 1e-4, f"{name} differs from transformers' eager block by {err}"
    ours.train()
    sides = {"llmkit MoE": step_fn(ours, True), "transformers Mixtral (eager)": step_fn(eager, False),
             "transformers Mixtral (grouped_mm)": step_fn(grouped, False)}
    results: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, step in sides.items():
            results[name].append(tokens_per_second(step, x, steps, clock))
    med = {k: median(v) for k, v in results.items()}
    print(f"layer: {E} experts, top-{K}, width {D}, expert hidden {FF}, SwiGLU, {N} tokens, fp32, forward + backward; "
          f"{rounds} alternating rounds x {steps} steps\n")
    print(table(["side", "median tokens/s", "min", "max"], [[k, med[k], min(v), max(v)] for k, v in results.items()]))
    ours_tps = med["llmkit MoE"]
    print(f"\nratio llmkit / transformers eager: {ours_tps / med['transformers Mixtral (eager)']:.2f}x; "
          f"/ grouped_mm: {ours_tps / med['transformers Mixtral (grouped_mm)']:.2f}x (target >= 1.5x)\n")


# --- a tiny MoE LM against a dense one with the same active parameters ---------------------------

def lm_quality(path: Path, steps: int, clock) -> None:
    from llmkit.config import ModelConfig
    from llmkit.models import DecoderLM
    from llmkit.objectives.clm import CausalLMTask

    text = path.read_text()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text[:200_000]] if len(text) > 200_000 else
                        [vocab.index(c) for c in text])
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    T, B = 64, 16
    base = dict(vocab_size=len(vocab), context_length=T, n_layers=2, d_model=64, n_heads=4, mlp="swiglu",
                norm="rmsnorm", position="rope", bias=False)
    configs = {"MoE 8 x 128, top-2": ModelConfig(**base, d_ff=128, moe={"n_experts": 8, "top_k": 2}),
               "dense SwiGLU 256": ModelConfig(**base, d_ff=256)}
    loss_of = CausalLMTask.loss  # the training objective, aux loss included; it needs no task state
    task = CausalLMTask.__new__(CausalLMTask)

    def windows(source: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - T - 1, (B,), generator=g)
        w = torch.stack([source[s:s + T + 1] for s in starts])
        return w[:, :-1], w[:, 1:]

    rows = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = DecoderLM(cfg)
        expert_weights = sum(p.numel() for n, p in model.named_parameters() if "mlp" in n and "router" not in n)
        active = expert_weights * K // E if cfg.moe else expert_weights
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        model.train()
        start, last = clock(), []
        for i in range(steps):
            loss, metrics = loss_of(task, model, windows(train, g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if i >= steps - 20:
                last.append(loss.item() - metrics.get("aux_loss", torch.zeros(())).item())
        elapsed = clock() - start
        model.eval()
        gv = torch.Generator().manual_seed(2)
        with torch.no_grad():
            val_loss = sum(F.cross_entropy(model(x).view(-1, len(vocab)), y.reshape(-1)).item()
                           for x, y in (windows(val, gv) for _ in range(20))) / 20
        load = metrics.get("expert_load_max")
        rows.append([name, f"{model.num_params():,}", f"{active:,}", f"{sum(last) / len(last):.3f}", f"{val_loss:.3f}",
                     f"{load.item():.2f}" if load is not None else "-", elapsed / steps * 1000])
    print(f"language model: tinyshakespeare chars, 2 layers, width 64, context {T}, batch {B}, AdamW 3e-3, "
          f"{steps} steps, seed 0\n")
    print(table(["model", "params", "active MLP params", "train CE (last 20)", "val CE", "expert load max",
                 "ms/step"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt")
    ap.add_argument("--lm-steps", type=int, default=300, help="0 skips the language-model comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"machine: {machine()}; clock: {args.clock}\n")
    throughput(args.rounds, args.steps, clock)
    if args.lm_steps:
        if not args.data.is_file():
            sys.exit(f"no {args.data}: pass --data tinyshakespeare's input.txt, or --lm-steps 0")
        lm_quality(args.data, args.lm_steps, clock)


if __name__ == "__main__":
    main()
