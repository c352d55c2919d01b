"""Run metrics: `metrics.jsonl` (one JSON object per event), the loss-curve PNG, and model-FLOPs
utilisation against the device's peak."""
from __future__ import annotations

import functools

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from llmkit.outputs import temp_path
from llmkit.utils import atomic_write_text

# dense bf16 peak FLOP/s by GPU name fragment (vendor data sheets)
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12, "V100": 125e12}


@functools.lru_cache(maxsize=None)  # measured once per process (a search runs many trainings)
def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's peak: a data-sheet figure for known GPUs, else a measured large matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2
    return measured_matmul_flops(device, dtype)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, trials: int = 5,
                          seconds: float = 0.06) -> float:
    """Best of a few short square-matmul timings (the best is the least disturbed by other load)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


class MetricsLog:
    """Append-only JSONL log; on resume, events after the checkpoint's step are dropped (they will
    be logged again), so the file of a resumed run equals that of an uninterrupted one."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            kept = [line for line in self.read(self.path) if line.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, **record: Any) -> None:
        """Append one line, whole or not at all: a write that fails (a full disk) is cut off again."""
        data = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
            except BaseException:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The records; a last line cut short (the process was killed while writing it) is left out."""
        if not Path(path).is_file():
            return []
        text = Path(path).read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and not text.endswith("\n"):
            try:
                json.loads(lines[-1])
            except ValueError:
                lines.pop()
        return [json.loads(line) for line in lines]


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Train and validation loss against step, as a PNG."""
    records = MetricsLog.read(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = temp_path(out_png)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return Path(out_png)
