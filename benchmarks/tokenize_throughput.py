"""tokenize_throughput: MB/s of `llmkit data prepare` (GPT-2 BPE from vocab.json + merges.txt, all
cores) vs tiktoken's gpt2 encoding the same text in one thread, in the same run.

Sides alternate A B A B ...; the table quotes medians and their ratio. The tiktoken reference is
built from ../shared/data/tokenizers/gpt2/gpt2.tiktoken with GPT-2's regex (no hub download).

    python benchmarks/tokenize_throughput.py            # 100 MB, 3 rounds
    python benchmarks/tokenize_throughput.py --mb 20 --rounds 2
"""
from __future__ import annotations

import argparse
import base64
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GPT2 = DATA / "tokenizers" / "gpt2"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiktoken_gpt2():
    import tiktoken

    ranks = {}
    for line in (GPT2 / "gpt2.tiktoken").read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def make_corpus(directory: Path, mb: float) -> Path:
    """tinyshakespeare repeated to `mb` MB, one file (one document, split at safe newlines)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    reps = max(1, round(mb * 1e6 / len(text.encode())))
    path = directory / "shakespeare_x.txt"
    path.write_text(text * reps, encoding="utf-8")
    return path


def run_llmkit(corpus: Path, out: Path, workers: int) -> tuple[float, int, str]:
    """Seconds for the whole `llmkit data prepare` call (load tokenizer, read, encode, write shards)."""
    from llmkit.cli import data as cli

    shutil.rmtree(out, ignore_errors=True)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["data", "prepare", str(corpus), "--tokenizer", str(GPT2), "--out", str(out),
                              "--workers", str(workers), "--quiet"])
    t = time.perf_counter()
    cli.run(args)
    seconds = time.perf_counter() - t
    from llmkit.data.prepare import open_prepared

    tokens = open_prepared(out)
    return seconds, len(tokens) - 1, tokens.index["engine"]  # minus the closing EOS


def run_tiktoken(enc, corpus: Path) -> tuple[float, int]:
    """Seconds for tiktoken to read and encode the same text in one thread."""
    t = time.perf_counter()
    text = corpus.read_text(encoding="utf-8")
    n = len(enc.encode_ordinary(text))
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    enc = tiktoken_gpt2()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp), args.mb)
        mb = corpus.stat().st_size / 1e6
        a, b = [], []
        for r in range(args.rounds):
            sec, n_ours, engine = run_llmkit(corpus, Path(tmp) / "out", args.workers)
            a.append(mb / sec)
            sec_t, n_ref = run_tiktoken(enc, corpus)
            b.append(mb / sec_t)
            assert n_ours == n_ref, f"token counts differ: llmkit {n_ours} vs tiktoken {n_ref}"
            print(f"round {r + 1}: llmkit {a[-1]:.2f} MB/s   tiktoken {b[-1]:.2f} MB/s")
    print(f"\ncorpus: tinyshakespeare x{round(mb * 1e6 / SHAKESPEARE.stat().st_size)} = {mb:.1f} MB, {n_ref:,} GPT-2 tokens "
          f"(identical counts); machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'side':<52} {'median MB/s':>12} {'rounds':>24}")
    print(f"{'A  llmkit data prepare, ' + str(args.workers) + ' workers [' + engine + ']':<52} {statistics.median(a):>12.2f} "
          f"{' '.join(f'{x:.2f}' for x in a):>24}")
    print(f"{'B  tiktoken gpt2 encode_ordinary, 1 thread':<52} {statistics.median(b):>12.2f} "
          f"{' '.join(f'{x:.2f}' for x in b):>24}")
    print(f"ratio A/B (medians): {statistics.median(a) / statistics.median(b):.2f}x  (target >= 1.0x)")


if __name__ == "__main__":
    main()
