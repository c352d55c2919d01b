"""Attention variants at one model size: KV-cache memory, decode speed at short and long context,
training throughput.

MHA (8 KV heads), GQA (4 groups: 2 KV heads), MQA (1 KV head), a sliding window of 64 (GQA 2) with
the full-length cache `make_cache` gives it and with a ring buffer of the window
(`llmkit.nn.kv_cache.RollingKVCache`), and multi-head latent attention (when
`"mla"` is in `llmkit.nn.blocks.ATTENTIONS`; DeepSeek-V2, caching one latent per position), all on
a LLaMA-shaped model: vocab 2048, 4 layers, width 256, 8 heads of 32, SwiGLU 768, RoPE, fp32.

- cache bytes/token: what one more position costs across all layers (`cache.bytes_per_token`: a ring
  costs nothing more); the measured bytes of the cache decoding at 2k context are shown too.
- decode tokens/s at 128 and 2048 positions of context: prefill that many, then time 32 greedy
  one-token steps, batch 1, through `model.make_cache` (as llmkit.generation does). The "decode path"
  column says whether the native C step ran (it takes exactly `KVCache`) or the PyTorch reference,
  which decodes with `--decode-threads` PyTorch threads (default 1: a one-row step's OpenMP regions
  cost more than they bring on a shared 2-core machine: ~13 vs ~140 tok/s measured here).
- training tokens/s: batch 8 x 256 tokens, forward, cross-entropy, backward, AdamW step.

Rounds alternate the variants (A B C A B C ...); medians reported, since the machine may be shared.

    python benchmarks/attention_variants.py [--rounds 3] [--steps 32]
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

import llmkit  # noqa: E402,F401  (fills the fast-path seams, as every llmkit entry point does)
from llmkit.config import ModelConfig  # noqa: E402
from llmkit.models.decoder import DecoderLM  # noqa: E402
from llmkit.nn.blocks import ATTENTIONS  # noqa: E402
from llmkit.nn.kv_cache import KVCache, RollingKVCache  # noqa: E402

BASE = dict(vocab_size=2048, context_length=2048 + 64, n_layers=4, d_model=256, n_heads=8, d_ff=768, mlp="swiglu",
            norm="rmsnorm", position="rope", bias=False)
CONTEXTS = (128, 2048)
TRAIN_B, TRAIN_T = 8, 256


def variants() -> dict[str, dict]:
    out = {"MHA": dict(n_kv_heads=8), "GQA (4 groups)": dict(n_kv_heads=2), "MQA": dict(n_kv_heads=1),
           "sliding 64": dict(n_kv_heads=2, sliding_window=64), "sliding 64, ring": dict(n_kv_heads=2, sliding_window=64)}
    if "mla" in ATTENTIONS:
        out["MLA (latent 64 + rope 16)"] = dict(attention="mla", mla={
            "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}, rotary_dim=16)
    return out


def cache_bytes(cache) -> int:
    """Bytes of the tensors a cache holds (its own count where it keeps one)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for t in vars(cache).values() if isinstance(t, torch.Tensor))


@torch.inference_mode()
def decode_rate(model: DecoderLM, context: int, steps: int, ring: bool) -> tuple[float, str, int, int]:
    """(tokens/s over `steps` one-token steps after a `context`-token prefill, decode path, cache
    bytes, cache bytes per further position)."""
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    max_len = context + steps + 2
    cache = (RollingKVCache(model.cfg, 1, max_len, torch.float32, "cpu") if ring else model.make_cache(1, max_len))
    logits = model(prompt, cache=cache, logits_to_keep=1)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    nxt = model(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)  # builds the native step
    start = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
    rate = steps / (time.perf_counter() - start)
    native = type(cache) is KVCache and cache.native is not None and cache.native[2] is not None
    return rate, "native" if native else "reference", cache_bytes(cache), cache.bytes_per_token


def train_rate(model: DecoderLM, opt: torch.optim.Optimizer, steps: int) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (TRAIN_B, TRAIN_T + 1), generator=g)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    model.eval()
    return TRAIN_B * TRAIN_T * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--decode-threads", type=int, default=1, help="PyTorch threads while decoding")
    args = ap.parse_args()
    models, opts = {}, {}
    for name, kw in variants().items():
        torch.manual_seed(0)
        models[name] = DecoderLM(ModelConfig(**BASE, **kw)).eval()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    decode = {(n, c): [] for n in models for c in CONTEXTS}
    train = {n: [] for n in models}
    paths, nbytes, per_token = {}, {}, {}
    for _ in range(args.rounds):  # A B C A B C
        for name, model in models.items():
            threads = torch.get_num_threads()
            torch.set_num_threads(args.decode_threads)
            for c in CONTEXTS:
                rate, paths[name, c], nbytes[name, c], per_token[name] = decode_rate(model, c, args.steps, ring=name.endswith("ring"))
                decode[name, c].append(rate)
            torch.set_num_threads(threads)
            train[name].append(train_rate(model, opts[name], args.train_steps))
    print(f"machine: {machine()}")
    print(f"model: vocab {BASE['vocab_size']}, {BASE['n_layers']} layers, width {BASE['d_model']}, "
          f"{BASE['n_heads']} heads, SwiGLU {BASE['d_ff']}, RoPE, fp32; {args.rounds} alternating rounds, "
          f"decode {args.steps} steps at batch 1 ({args.decode_threads} PyTorch thread(s)), "
          f"training batch {TRAIN_B} x {TRAIN_T}\n")
    rows = []
    for name, model in models.items():
        rows.append([name, f"{per_token[name]:,}", f"{nbytes[name, 2048] / 2**20:.2f}",
                     median(decode[name, 128]), median(decode[name, 2048]),
                     "/".join(dict.fromkeys(paths[name, c] for c in CONTEXTS)), median(train[name])])
    print(table(["attention", "cache bytes/token", "cache MiB at 2k", "decode tok/s @128", "decode tok/s @2k",
                 "decode path", "train tok/s"], rows))


if __name__ == "__main__":
    main()
