"""Worker of test_pipeline.py, run by torchrun with 2 processes (gloo, CPU): for each model and
schedule, a 2-stage pipeline and the unsplit model (every process keeps one) take the same batches;
each process writes, for its stage, the largest differences of the loss, of every parameter's
gradient, of every parameter after 3 clipped AdamW steps and of a forward-only (validation)
loss after them, to OUT/rank<r>.json."""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM
from llmkit.training.pipeline import build_pipeline, clip_grad_norm, next_token_loss, pipeline_eval, pipeline_step

MODELS = {
    "gpt2-tied": dict(vocab_size=64, context_length=16, n_layers=4, d_model=32, n_heads=4),
    "llama-rope": dict(vocab_size=64, context_length=16, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2,
                       position="rope", mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False),
}
SCHEDULES = ("gpipe", "1f1b")
BATCH, T, MICROBATCHES, STEPS, CLIP = 8, 16, 4, 3, 0.5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_case(model_kw: dict, schedule: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**model_kw))
    ref = copy.deepcopy(model)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    pipe = build_pipeline(model, rank, world, MICROBATCHES, "cpu", next_token_loss, schedule=schedule)
    del model
    params = dict(pipe.module.named_parameters())
    # Adam divides by sqrt(v) + eps: a gradient difference dg (float rounding: the microbatches sum in
    # another order) moves a parameter by up to lr * dg / max(|g|, eps), large for the near-zero
    # gradients (the key bias's is zero in exact arithmetic); lr 1e-3 and eps 1e-6 keep that
    # under 1e-5 while each step still moves the parameters by about lr
    opt = torch.optim.AdamW(pipe.module.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-6)
    start = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(1)
    out = {"names": sorted(params), "loss": [], "norm": [], "grad": 0.0, "param": []}
    for step in range(STEPS):
        tokens = torch.randint(0, model_kw["vocab_size"], (BATCH, T + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = next_token_loss(ref(x), y)
        ref_loss.backward()
        opt.zero_grad(set_to_none=True)
        loss = pipeline_step(pipe, x, y)
        out["loss"].append(abs(loss.item() - ref_loss.item()))
        if step == 0:
            out["grad"] = max(max_diff(p.grad, ref_params[n].grad) for n, p in params.items())
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        norm = clip_grad_norm(pipe, CLIP)
        out["norm"].append(abs(norm.item() - ref_norm.item()))
        ref_opt.step()
        opt.step()
        out["param"].append(max(max_diff(p.detach(), ref_params[n].detach()) for n, p in params.items()))
    with torch.no_grad():
        ref_eval = next_token_loss(ref(x), y)
    out["eval"] = abs(pipeline_eval(pipe, x, y).item() - ref_eval.item())
    out["moved"] = min(max_diff(p.detach(), start[n]) for n, p in params.items())
    out["all_names"] = sorted(ref_params)
    out["clipped"] = ref_norm.item() > CLIP
    return out


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f"{m}/{s}": run_case(kw, s, rank, world) for m, kw in MODELS.items() for s in SCHEDULES}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
