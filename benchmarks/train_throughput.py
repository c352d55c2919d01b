"""Claim: one llmkit training step processes >= 1.5x the tokens/s of transformers' GPT2LMHeadModel
on the same config (vocab 65, 4 layers, 4 heads, width 128, context 64, batch 12, fp32, AdamW).

Both sides run the same step: forward, cross-entropy, backward, clip the gradient norm to 1,
AdamW step. llmkit runs what `llmkit train` runs: its optimizer builder (AdamW, decay groups), its
gradient clipping and, where a C compiler is present, its native training attention, GELU and
optimizer step (kernels/attention.c, gelu.c, optimizer.c); transformers uses
`torch.optim.AdamW(model.parameters())` and `torch.nn.utils.clip_grad_norm_` as its users do. All sides run in one
process, so they share one allocator and thread pool. Sides alternate A B C A B C; medians reported.

    python benchmarks/train_throughput.py [--rounds 10] [--steps 30] [--arch gpt2|llama]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, table  # noqa: E402

V, L, H, D, T, B = 65, 4, 4, 128, 64, 12


def make_step(model, opt, loss_fn, clip=torch.nn.utils.clip_grad_norm_):
    """The step every side runs: loss, backward, clip the gradient norm to 1.0, optimizer step."""
    def step(x, y):
        loss_fn(x, y).backward()
        clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# --arch llama: the same sizes as a LLaMA (RMSNorm, RoPE, SwiGLU of width 384, 2 KV heads, no biases)
LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, n_kv_heads=2, d_ff=384)


def llmkit_side(arch: str = "gpt2"):
    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM
    from llmkit.training.optim import build_optimizer, clip_grad_norm_

    kind = LLAMA if arch == "llama" else dict(mlp="gelu", norm="layernorm", position="learned", bias=True)
    model = DecoderLM(ModelConfig(vocab_size=V, context_length=T, n_layers=L, n_heads=H, d_model=D, **kind))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu")
    return make_step(model, opt, lambda x, y: F.cross_entropy(model(x).view(-1, V), y.view(-1)), clip_grad_norm_)


def transformers_side(arch: str = "gpt2"):
    import transformers
    transformers.logging.set_verbosity_error()
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=LLAMA["d_ff"],
                                       num_hidden_layers=L, num_attention_heads=H,
                                       num_key_value_heads=LLAMA["n_kv_heads"], max_position_embeddings=T,
                                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    # labels are shifted inside (T - 1 positions); no KV cache is built in training
    return make_step(model, opt, lambda x, y: model(input_ids=x, labels=y, use_cache=False).loss)


def plain_side():
    """The same model as a minimal plain-PyTorch GPT (benchmarks/shakespeare_char.py), for context."""
    from shakespeare_char import PlainGPT

    model = PlainGPT(V, T, D, H, L)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    return make_step(model, opt, lambda x, y: F.cross_entropy(model(x).view(-1, V), y.view(-1)))


def tokens_per_second(step, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    for _ in range(5):
        step(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return B * T * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2",
                    help="gpt2: the claim's config; llama: the same sizes as a LLaMA (no plain side)")
    args = ap.parse_args()
    torch.manual_seed(0)
    sides = {"llmkit": llmkit_side(args.arch), "transformers": transformers_side(args.arch)}
    if args.arch == "gpt2":
        sides["plain PyTorch"] = plain_side()
    results: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):  # A B A B
        for name, step in sides.items():
            results[name].append(tokens_per_second(step, args.steps))
    med = {k: median(v) for k, v in results.items()}
    print(f"machine: {machine()}")
    arch = "GPT-2" if args.arch == "gpt2" else "LLaMA (RMSNorm, RoPE, SwiGLU 384, 2 KV heads)"
    print(f"config: {arch}, vocab {V}, {L} layers, {H} heads, width {D}, context {T}, batch {B}, fp32, AdamW; "
          f"{args.rounds} alternating rounds x {args.steps} steps\n")
    print(table(["side", "median tokens/s", "min", "max"],
                [[k, med[k], min(v), max(v)] for k, v in results.items()]))
    claim = "target >= 1.5x" if args.arch == "gpt2" else "no target: context"
    print(f"\nratio llmkit / transformers: {med['llmkit'] / med['transformers']:.2f}x ({claim})")
    if "plain PyTorch" in med:
        print(f"ratio plain PyTorch / transformers: {med['plain PyTorch'] / med['transformers']:.2f}x (context)")


if __name__ == "__main__":
    main()
