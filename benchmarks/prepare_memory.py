"""prepare_memory: peak RSS of `prepare` + one epoch of packed windows stays flat while the corpus
grows 10x (10 -> 100 MB of text by default), i.e. memory does not scale with the corpus.

Each size runs in a fresh child process so peaks are independent; the child reports its own peak
RSS (ru_maxrss, which counts touched memory-mapped shard pages too) and the largest worker's.
Sizes alternate small/large twice (A B A B) and the table quotes medians.

    python benchmarks/prepare_memory.py                 # 10, 100 MB
    python benchmarks/prepare_memory.py --sizes 5 50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GPT2 = DATA / "tokenizers" / "gpt2"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


def peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def child(mb: float, workdir: Path, context: int) -> dict:
    """Prepare `mb` MB of text, then read one epoch of packed windows; report peaks."""
    from llmkit.data.prepare import open_prepared, packed_windows, prepare

    base = peak_mb(resource.RUSAGE_SELF)  # interpreter + torch/numpy/tokenizers imports
    corpus = workdir / "corpus.txt"
    text = SHAKESPEARE.read_text(encoding="utf-8")
    with open(corpus, "w", encoding="utf-8") as f:  # written piecewise: the corpus never sits in memory
        for _ in range(max(1, round(mb * 1e6 / len(text.encode())))):
            f.write(text)
    del text
    t = time.perf_counter()
    s = prepare([corpus], GPT2, workdir / "out", shard_tokens=1 << 22, progress=False)
    t_prep = time.perf_counter() - t
    after_prepare = peak_mb(resource.RUSAGE_SELF)
    tokens = open_prepared(workdir / "out", max_open=2)  # at most 2 x 8 MB of shard pages mapped
    t = time.perf_counter()
    n = checksum = 0
    for window in packed_windows(tokens, context, seed=0):
        n += 1
        checksum += int(window[0])
    return {"mb": corpus.stat().st_size / 1e6, "tokens": s.tokens, "windows": n, "prepare_s": t_prep,
            "epoch_s": time.perf_counter() - t, "base": base, "after_prepare": after_prepare,
            "peak": peak_mb(resource.RUSAGE_SELF), "workers_peak": peak_mb(resource.RUSAGE_CHILDREN)}


def measure(mb: float, context: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, __file__, "--child", str(mb), tmp, str(context)],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs=2, default=[10.0, 100.0], metavar=("SMALL_MB", "LARGE_MB"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(float(args.child[0]), Path(args.child[1]), int(args.child[2]))))
        return
    runs: dict[float, list[dict]] = {m: [] for m in args.sizes}
    for r in range(args.rounds):
        for mb in args.sizes:  # A B A B
            runs[mb].append(measure(mb, args.context))
            x = runs[mb][-1]
            print(f"round {r + 1}, {mb:g} MB: peak RSS {x['peak']:.0f} MB (workers {x['workers_peak']:.0f} MB)")
    med = lambda mb, k: statistics.median(x[k] for x in runs[mb])  # noqa: E731
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; GPT-2 BPE; shards of 4 Mi tokens, 2 mapped at a time; "
          f"epoch = packed windows of {args.context + 1} tokens; medians of {args.rounds} runs")
    cols = ("corpus MB", "tokens", "windows", "prepare s", "epoch s", "RSS after imports", "peak RSS main",
            "peak RSS worker")
    print(" | ".join(cols))
    for mb in args.sizes:
        x = runs[mb][0]
        print(" | ".join([f"{x['mb']:.0f}", f"{x['tokens']:,}", f"{x['windows']:,}", f"{med(mb, 'prepare_s'):.1f}",
                          f"{med(mb, 'epoch_s'):.1f}", f"{med(mb, 'base'):.0f} MB", f"{med(mb, 'peak'):.0f} MB",
                          f"{med(mb, 'workers_peak'):.0f} MB"]))
    small, large = args.sizes
    grow = (med(large, "peak") - med(large, "base")) / max(med(small, "peak") - med(small, "base"), 1e-9)
    print(f"corpus grew {large / small:.0f}x; peak RSS above the import baseline grew {grow:.2f}x "
          f"(main {med(small, 'peak'):.0f} -> {med(large, 'peak'):.0f} MB)")


if __name__ == "__main__":
    main()
