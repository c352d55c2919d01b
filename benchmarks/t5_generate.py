"""T5 greedy decoding speed: llmkit's seq2seq path vs transformers' `T5ForConditionalGeneration.generate`
on the same random t5-small-shaped weights (6+6 layers, d_model 512, 8 heads, ReLU, vocab 32128),
both loaded from one saved Hugging Face folder.

fp32 on CPU, greedy, a batch of 1 and of 4 sources of 32 tokens, 64 new tokens forced (no EOS stop:
transformers with min_new_tokens=64, llmkit with no stop id), the source encoded inside the timed
call on both sides. Rounds alternate llmkit / transformers / transformers on one thread and medians
are reported, because the machine may be shared. llmkit runs its one-token steps on one thread
(`decode_loop.DECODE_THREADS`: OpenMP barriers stall on a busy shared machine), so transformers is
timed both with torch's thread setting and with one thread; the ratio is to the faster of the two.

What llmkit does per new token: one decoder pass over a preallocated self-attention KV cache, the
cross-attention keys/values of the source projected once at the first step (one fused k|v
product), the decoder's relative bias sliced from a table built once (no bucketing per step), no
re-encoding and no growing concatenations, and the LM head's weight laid out column-major once
(`T5Model.use_decode_layout`: the head is ~43% of a t5-small step's weights, and F.linear reads
it ~1.3-1.8x faster that way for a few rows). Every step is still PyTorch matrix products
(~80% of llmkit's time in aten::mm), the same products transformers runs.

Measured on the shared 2-core AMD EPYC machine (load average ~1.5-3), last two runs: batch 1
44.7-45.4 vs 31.8-36.7 tok/s (1.24x, 1.41x), batch 4 106.5-118.7 vs 87.9-99.2 tok/s (1.21x, 1.20x),
against transformers' faster thread setting; against transformers at torch's 2 threads under heavy
load (load average ~10) 3.5x-12x, which is OpenMP stalling, not design. The 1.5x target is not
reached: both sides are bound by the same matrix products.

    python benchmarks/t5_generate.py [--rounds 3] [--new 64] [--source 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, table  # noqa: E402

from llmkit.generation.generate import GenerationConfig  # noqa: E402
from llmkit.generation.seq2seq import generate_seq2seq  # noqa: E402
from llmkit.interop.hf import load_hf  # noqa: E402

NO_STOP = -1  # an id no token has: decoding runs the full length


def build(folder: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                   feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--source", type=int, default=32)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="t5-bench-") as tmp:
        build(Path(tmp))
        ref = T5ForConditionalGeneration.from_pretrained(tmp).eval()
        ours = load_hf(tmp)
        for p in ours.parameters():  # own the memory: the folder goes away
            p.data = p.data.clone()
    gen = torch.Generator().manual_seed(1)
    print(f"# T5 greedy decoding, t5-small shape, fp32, {args.source}-token sources, {args.new} new tokens")
    print(f"# {machine()}")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        sources = torch.randint(3, 32000, (batch, args.source), generator=gen)
        sources[:, -1] = 1  # EOS ends each source, as the tokenizer writes it
        mask = torch.ones_like(sources)
        cfg = GenerationConfig(temperature=0.0, max_new_tokens=args.new)

        def run_ours() -> int:
            out = generate_seq2seq(ours, sources.tolist(), cfg, eos_id=NO_STOP)
            return sum(len(r) for r in out)

        def run_ref_1() -> int:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return run_ref()
            finally:
                torch.set_num_threads(before)

        def run_ref() -> int:
            with torch.inference_mode():
                out = ref.generate(input_ids=sources, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=args.new, min_new_tokens=args.new)
            return int((out.shape[1] - 1) * batch)

        run_ours(), run_ref()  # warm-up
        times: dict[str, list[float]] = {"llmkit": [], "transformers": [], "transformers 1t": []}
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, fn in (("llmkit", run_ours), ("transformers", run_ref), ("transformers 1t", run_ref_1)):
                t0 = time.perf_counter()
                counts[name] = fn()
                times[name].append(time.perf_counter() - t0)
        tps = {name: counts[name] / median(t) for name, t in times.items()}
        best_ref = max(tps["transformers"], tps["transformers 1t"])
        rows.append([batch, tps["llmkit"], tps["transformers"], tps["transformers 1t"],
                     f"{tps['llmkit'] / best_ref:.2f}x"])
    print(table(["batch", "llmkit tok/s", "transformers tok/s", "transformers 1 thread", "ratio"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
