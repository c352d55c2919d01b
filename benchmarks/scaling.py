"""Claim under test: how `llmkit train --parallel ddp|fsdp|tp` scales from 1 to 2 processes, in
training tokens/s (all ranks together) and peak memory (RSS) per rank, each a ratio to DDP on one
process (plain single-process training).

Every row is the CLI itself: `python -m torch.distributed.run --nproc_per_node N
benchmarks/scaling.py --worker DIR -- train ...`, this file as torchrun's script so that each rank,
after `llmkit train` returns in-process, writes to DIR its RSS before `llmkit train` ran (Python,
torch and llmkit loaded: a fixed ~0.2 GiB), its peak RSS during the training steps (sampled every
20 ms until the last step's metrics line; "growth" is that peak less the RSS at the start) and its
peak over the whole run (`resource.getrusage`, with the final checkpoint and model save).

The model is GPT-2 small's shape (`--preset gpt2`: width 768, 12 heads, GELU, LayerNorm, learned
positions) with fewer layers (`--n-layers`, default 2) and a character vocabulary (a fixed random
text, or `--data`), fp32 on the CPU. Tokens/s is the median of the run's `train` events in
metrics.jsonl, the first window (warm-up) left out. The cores are split evenly between the ranks
(OMP_NUM_THREADS = --threads / N; the row ddp/1-1thread gives one process one thread: the
per-core reference when other work loads the machine). Rows alternate within each round
(A B C .. A B C ..); medians over the rounds are reported.

    python benchmarks/scaling.py [--rounds 3] [--steps 8] [--n-layers 2] [--rows ddp/1,ddp/2,fsdp/2,tp/2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, median, table  # noqa: E402

# row name -> (processes, threads per rank (None: --threads / processes), the --parallel options)
ROWS: dict[str, tuple[int, int | None, list[str]]] = {
    "ddp/1": (1, None, ["--parallel", "ddp"]),
    "ddp/1-1thread": (1, 1, ["--parallel", "ddp"]),
    "ddp/2": (2, None, ["--parallel", "ddp"]),
    "fsdp/2": (2, None, ["--parallel", "fsdp"]),
    "fsdp-zero2/2": (2, None, ["--parallel", "fsdp", "--zero", "2"]),
    "tp/2": (2, None, ["--parallel", "tp"]),
}


def rss_now_kib() -> int:
    """This process's resident memory now (VmRSS), KiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


class TrainingPeak(threading.Thread):
    """Samples this process's RSS every 20 ms until the run's metrics.jsonl shows its last training
    step: the peak of the training steps alone, without the final checkpoint and model save
    (which gather or copy the state and would dominate a small model's peak)."""

    def __init__(self, metrics: Path, last_step: int):
        super().__init__(daemon=True)
        self.metrics, self.last_step, self.peak_kib, self.done = metrics, last_step, 0, threading.Event()

    def trained(self) -> bool:
        try:
            text = self.metrics.read_text()
        except OSError:
            return False
        return any(f'"step": {self.last_step},' in line and '"event": "train"' in line for line in text.splitlines())

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, rss_now_kib())
            if self.trained():
                return
            time.sleep(0.02)


def worker(rss_dir: str, argv: list[str]) -> int:
    """One rank: run the llmkit CLI in this process, then record its RSS at the start, its peak
    during the training steps and its peak over the whole run."""
    import importlib

    importlib.import_module("torch")  # the baseline: Python, torch and llmkit loaded, nothing built
    from llmkit.cli.main import main

    start_kib = rss_now_kib()
    sampler = TrainingPeak(Path(_arg(argv, "--out")) / "metrics.jsonl", int(_arg(argv, "--max-steps")))
    sampler.start()
    rc = main(argv)
    sampler.done.set()
    sampler.join()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(rss_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"peak_rss_kib": peak_kib, "start_rss_kib": start_kib, "train_peak_kib": sampler.peak_kib}))
    return rc


def corpus(path: Path, chars: int = 200_000) -> Path:
    """A fixed text to train on (speed and memory do not depend on what it says): seeded random
    words of printable ASCII, a character vocabulary of ~96."""
    if not path.exists():
        rng = random.Random(0)
        alphabet = string.printable[:95]
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(chars // 6)]
        path.write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)))
    return path


def run_row(name: str, args: argparse.Namespace, work: Path, data: Path, port: int) -> dict:
    """One run of one row: tokens/s (median of the train windows after the first), peak RSS per rank (MiB)."""
    world, threads, parallel = ROWS[name]
    out, rss = work / f"run-{name.replace('/', '-')}", work / f"rss-{name.replace('/', '-')}"
    rss.mkdir(parents=True, exist_ok=True)
    for f in [*rss.glob("*.json"), out / "metrics.jsonl"]:  # a previous round's
        f.unlink(missing_ok=True)
    train = ["train", "--data", str(data), "--out", str(out), "--force", "--preset", "gpt2",
             "--n-layers", str(args.n_layers), "--context-length", str(args.context), "--batch-size", str(args.batch),
             "--max-steps", str(args.steps), "--log-every", str(args.log_every), "--eval-every", "0",
             "--eval-batches", "1", "--warmup-steps", "1", "--device", "cpu", "--dtype", "fp32", "--no-progress",
             *parallel]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           __file__, "--worker", str(rss), "--", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or max(1, args.threads // world))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["exit %d" % proc.returncode]}
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [e["tokens_per_sec"] for e in events if e.get("event") == "train"][1:]
    mem = [json.loads((rss / f"rank{r}.json").read_text()) for r in range(world)]
    return {"tokens_per_sec": median(tps), "train_peak_mib": [m["train_peak_kib"] / 1024 for m in mem],
            "train_growth_mib": [(m["train_peak_kib"] - m["start_rss_kib"]) / 1024 for m in mem],
            "run_peak_mib": [m["peak_rss_kib"] / 1024 for m in mem]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        rest = sys.argv[3:]
        raise SystemExit(worker(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--log-every", type=int, default=2, help="steps per tokens/s window")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="windows per rank per step")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the ranks")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--port", type=int, default=29785)
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--data", help="text file to train on (default: a fixed random text)")
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = p.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="llmkit-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else corpus(work / "corpus.txt")
    results: dict[str, list[dict]] = {r: [] for r in rows}
    for rnd in range(args.rounds):
        for i, name in enumerate(rows):
            res = run_row(name, args, work, data, args.port + (rnd * len(rows) + i) % 10)
            results[name].append(res)
            print(f"round {rnd + 1} {name}: {res}", flush=True)
    ok = {n: [r for r in rs if "error" not in r] for n, rs in results.items()}
    base = median([r["tokens_per_sec"] for r in ok.get("ddp/1", [])]) if ok.get("ddp/1") else None
    base_mem = median([r["train_growth_mib"][0] for r in ok["ddp/1"]]) if base else None
    lines = []
    for name in rows:
        world = ROWS[name][0]
        if not ok[name]:
            lines.append([name, world, "failed: " + " ".join(results[name][-1]["error"])] + [""] * 5)
            continue
        tps = median([r["tokens_per_sec"] for r in ok[name]])
        per_rank = {key: [median([r[key][k] for r in ok[name]]) for k in range(world)]
                    for key in ("train_peak_mib", "train_growth_mib", "run_peak_mib")}
        lines.append([name, world, tps, f"{tps / base:.2f}x" if base else "-",
                      *(" / ".join(f"{m:,.0f}" for m in per_rank[key]) for key in ("train_peak_mib", "train_growth_mib")),
                      f"{max(per_rank['train_growth_mib']) / base_mem:.2f}x" if base else "-",
                      " / ".join(f"{m:,.0f}" for m in per_rank["run_peak_mib"])])
    print(f"\n{machine()}; cores shared by the ranks: {args.threads}")
    print(f"gpt2 shape, {args.n_layers} layers, context {args.context}, batch {args.batch} per rank, "
          f"{args.steps} steps, {args.rounds} rounds (medians)\n")
    print(table(["row", "ranks", "tokens/s", "vs ddp/1", "train peak RSS/rank MiB", "train growth/rank MiB",
                 "growth vs ddp/1", "whole-run peak/rank MiB"], lines))


if __name__ == "__main__":
    main()
