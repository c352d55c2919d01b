"""Faults of a multi-process run, against the CLI under torchrun: a rank SIGKILLed at random points
(some inside a checkpoint write) and the run resumed repeats the uninterrupted run's losses; a rank
that dies makes the other ranks and torchrun exit, nonzero and soon, saying which rank it was."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmkit.cli.demo import builtin_corpus
from llmkit.training.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints
from llmkit.training.config import TrainConfig, build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog

# master ports of this file: 29730-29779 (test_grad_norms.py has 29720); each launch its own
PORTS = {"chaos": 29730, "chaos-fsdp": 29742, "fast": 29754, "fast-fsdp": 29756, "dead": 29758, "dead-fsdp": 29760,
         "alone": 29762}
HAS_FSDP = "parallel" in {f for f in TrainConfig.__dataclass_fields__}
NO_FSDP = pytest.mark.skipif(not HAS_FSDP, reason="--parallel fsdp is not in the loop yet")
PARALLEL = ["ddp", pytest.param("fsdp", marks=NO_FSDP)]
PARALLEL_SLOW_FSDP = ["ddp", pytest.param("fsdp", marks=[NO_FSDP, pytest.mark.slow])]  # fsdp: > 20 s here
EXIT_BOUND = 60  # seconds from a rank's death to the exit of torchrun and every rank
CHAOS_STEPS, CKPT_EVERY = 20, 2
SAFE_END = 4  # a step kill lands at most at step CHAOS_STEPS - SAFE_END (plus its delay)


@pytest.fixture(autouse=True)
def no_stray_processes():
    """Whatever a test leaves running when it fails (a reference run, a hung rank) is killed."""
    yield
    while Torchrun.launched:
        Torchrun.launched.pop().stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:60_000], encoding="utf-8")
    return path


def flags(corpus: Path, out: Path, parallel: str, max_steps: int = CHAOS_STEPS, **kw) -> list[str]:
    """The `llmkit train` flags of these runs: a tiny model, a checkpoint every 2 steps, a log line
    every step, evaluation at the last step only."""
    opts = {"data": corpus, "out": out, "preset": "tiny", "context-length": 32, "batch-size": 4,
            "max-steps": max_steps, "warmup-steps": 2, "lr": 3e-3, "min-lr": 3e-4, "eval-every": 0,
            "eval-batches": 2, "log-every": 1, "ckpt-every": CKPT_EVERY, "dropout": 0.1, **kw}
    args = ["train", "--no-progress"] + [x for k, v in opts.items() for x in (f"--{k}", str(v))]
    return args + (["--parallel", parallel] if parallel != "ddp" else [])


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["event"] == "train"}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["event"] == "eval"}


def assert_losses_equal(got: dict[int, float], want: dict[int, float], tol: float = 2e-5) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=tol), step


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    """The child processes of `pid` (from /proc: its `children` list, else every process's parent)."""
    listed = Path(f"/proc/{pid}/task/{pid}/children")
    if listed.exists():
        return [int(c) for c in listed.read_text().split()]
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


class Torchrun:
    """`python -m torch.distributed.run --nproc_per_node 2 -m llmkit ARGS`, its output in a log file."""

    launched: list["Torchrun"] = []

    def __init__(self, args: list[str], port: int, log: Path, env: dict | None = None,
                 start_inode: int | None = None, node: int | None = None):
        self.log, self.start_inode = log, start_inode  # the inode of metrics.jsonl before this launch
        # node: one of two agents of one process each (as on two machines: no agent stops the other's rank)
        self.nproc = 2 if node is None else 1
        where = [] if node is None else ["--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(self.nproc),
               "--master_port", str(port), "-m", "llmkit", *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.pids: dict[int, int] = {}
        Torchrun.launched.append(self)

    def ranks(self, timeout: float = 120) -> dict[int, int]:
        """{rank: pid} of the agent's worker processes (their RANK environment variable)."""
        deadline = time.time() + timeout
        while len(self.pids) < self.nproc:
            for pid in children(self.proc.pid):
                try:
                    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
                except FileNotFoundError:
                    continue
                if "RANK" in env:
                    self.pids[int(env["RANK"])] = pid
            assert self.proc.poll() is None and time.time() < deadline, self.output()
            time.sleep(0.05)
        return self.pids

    def wait_for(self, ready, timeout: float = 180) -> None:
        """Poll `ready()` until true; fail when the run ends first or it takes too long."""
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the run ended (rc {self.proc.returncode}) before the kill point\n" + self.output()
            assert time.time() < deadline, "the kill point never came\n" + self.output()
            time.sleep(0.02)

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> float:
        """SIGKILL (or another signal to) one rank; the time it was sent."""
        os.kill(self.ranks()[rank], sig)
        return time.time()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running {timeout} s on: a hang\n" + self.output()) from None

    def stop(self) -> None:
        """SIGKILL the agent and its workers: no stray processes after a test."""
        for pid in [self.proc.pid, *self.pids.values()]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]


def logged_step(run_dir: Path, step: int, old_inode: int | None):
    """A kill point: this launch logged train step `step` (metrics.jsonl was rewritten by this launch:
    a new file, not the killed one's, which lists later steps until the resume cuts them off)."""
    path = run_dir / "metrics.jsonl"

    def ready() -> bool:
        try:
            if os.stat(path).st_ino == old_inode:
                return False
        except FileNotFoundError:
            return False
        return max(train_losses(run_dir), default=0) >= step
    return ready


def writing_checkpoint(run_dir: Path, step: int):
    """A kill point: checkpoint `step` is half written (its temp folder holds the config; rank 0 is
    paused there by LLMKIT_TEST_CKPT_PAUSE)."""
    return lambda: bool(list(checkpoint_dir(run_dir).glob(f".step-{step:07d}.*.tmp/config.json")))


def inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@dataclass
class KillPoint:
    """Where one launch is killed: after train step `step` is logged (plus `delay` seconds: inside
    a later step, an all-reduce or a checkpoint write) or, `in_checkpoint`, in the middle of the write
    of checkpoint `step`; `rank` is the one killed."""

    rank: int
    step: int
    in_checkpoint: bool
    delay: float


def kill_plan(seed: int, n: int) -> list[tuple[int, bool, int, float]]:
    """`n` kill points drawn with a fixed seed, as (rank, inside a checkpoint write, steps ahead, delay):
    each is placed relative to where its launch resumes (`place`), so every launch is killed."""
    rng = random.Random(seed)
    return [(rng.randrange(2), rng.random() < 0.4, rng.randrange(1, 4), rng.uniform(0.0, 0.08)) for _ in range(n)]


def place(point: tuple[int, bool, int, float], start: int, max_steps: int) -> KillPoint:
    """A drawn kill point in a launch that resumes at step `start`: `ahead` steps (or checkpoints) on,
    after the first checkpoint, before the end."""
    rank, in_ckpt, ahead, delay = point
    assert start < max_steps, f"an earlier kill fell after the last checkpoint ({start}): no launch left to kill"
    step = max(start + ahead, CKPT_EVERY + 1)
    # a step kill stays SAFE_END steps clear of the end (its delay must not let the run finish first);
    # one drawn closer becomes a kill inside a checkpoint write, which the test hook holds still
    if in_ckpt or step > max_steps - SAFE_END:
        return KillPoint(rank, min(start - start % CKPT_EVERY + CKPT_EVERY * ahead, max_steps), True, delay)
    return KillPoint(rank, step, False, delay)


def kill_and_check_exit(run: Torchrun, point: KillPoint, run_dir: Path) -> tuple[float, int]:
    """Kill `point.rank` at the kill point; torchrun and every rank must exit, nonzero, within the bound.
    Returns (the seconds from the death to torchrun's exit, the train steps logged by then)."""
    run.ranks()
    run.wait_for(writing_checkpoint(run_dir, point.step) if point.in_checkpoint else
                 logged_step(run_dir, point.step, run.start_inode))
    time.sleep(point.delay)
    died = run.kill(point.rank)
    logged = len(train_losses(run_dir))
    rc = run.wait(timeout=EXIT_BOUND)
    took = time.time() - died
    assert rc != 0, run.output()
    assert not [pid for pid in run.pids.values() if alive(pid)], "a rank outlived torchrun"
    return took, logged


def launch(corpus: Path, out: Path, parallel: str, port: int, log: Path, point: KillPoint | None = None,
           **kw) -> Torchrun:
    """Start or resume the run in `out` (a run killed before its first checkpoint starts over)."""
    again = ["--resume"] if latest_checkpoint(out) is not None else (["--force"] if out.exists() else [])
    env = {"LLMKIT_TEST_CKPT_PAUSE": f"{point.step}:2"} if point is not None and point.in_checkpoint else {}
    return Torchrun(flags(corpus, out, parallel, **kw) + again, port, log, env, inode(out / "metrics.jsonl"))


def resume_step(out: Path) -> int:
    ckpt = latest_checkpoint(out)
    return int(ckpt.name.split("-")[1]) if ckpt is not None else 0


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_ten_random_rank_kills_then_resume_repeat_the_uninterrupted_losses(corpus, tmp_path, parallel):
    base = PORTS["chaos" if parallel == "ddp" else "chaos-fsdp"]
    ports = iter(range(base, base + 12))  # the reference, 10 killed launches, the last resume
    reference = Torchrun(flags(corpus, tmp_path / "ref", parallel), next(ports), tmp_path / "ref.log")
    out, landed = tmp_path / "cut", []
    # ddp draws 10 kill points; fsdp (the sharded checkpoint's writers) the first 4 of the same draw
    for i, drawn in enumerate(kill_plan(seed=16, n=10 if parallel == "ddp" else 4)):
        point = place(drawn, resume_step(out), CHAOS_STEPS)
        run = launch(corpus, out, parallel, next(ports), tmp_path / f"kill-{i}.log", point)
        took, _ = kill_and_check_exit(run, point, out)
        landed.append((point, resume_step(out), round(took, 1)))
    print(*landed, sep="\n")  # where each kill fell and the checkpoint the next launch resumes from
    resumed = launch(corpus, out, parallel, next(ports), tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, resumed.output()
    assert reference.wait(timeout=300) == 0, reference.output()
    assert_losses_equal(train_losses(out), train_losses(tmp_path / "ref"))
    assert_losses_equal(eval_losses(out), eval_losses(tmp_path / "ref"))
    assert not list(checkpoint_dir(out).glob(".*.tmp"))  # what the killed writers left is cleaned up


@pytest.mark.parametrize("parallel", PARALLEL_SLOW_FSDP)
def test_rank_killed_inside_a_checkpoint_write_resumes_from_the_one_before_exactly(corpus, tmp_path, parallel):
    port = PORTS["fast" if parallel == "ddp" else "fast-fsdp"]
    out, point = tmp_path / "cut", KillPoint(rank=0, step=4, in_checkpoint=True, delay=0.0)
    run = launch(corpus, out, parallel, port, tmp_path / "kill.log", point, **{"max-steps": 8, "dropout": 0.0})
    kill_and_check_exit(run, point, out)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]
    assert list(checkpoint_dir(out).glob(".step-0000004.*.tmp"))  # the dead writer's half checkpoint
    resumed = launch(corpus, out, parallel, port + 1, tmp_path / "resume.log", **{"max-steps": 8, "dropout": 0.0})
    # meanwhile the reference: one process with both ranks' rows (dropout 0: the same function)
    cfg = build_train_config(data=str(corpus), out=str(tmp_path / "ref"), preset="tiny", context_length=32,
                             batch_size=8, max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=0,
                             eval_batches=2, log_every=1, ckpt_every=0, progress=False, dropout=0.0)
    train(cfg)
    assert resumed.wait(timeout=300) == 0, resumed.output()
    assert_losses_equal(train_losses(out), train_losses(tmp_path / "ref"))
    assert_losses_equal(eval_losses(out), eval_losses(tmp_path / "ref"))
    assert not list(checkpoint_dir(out).glob(".*.tmp"))


@pytest.mark.parametrize("parallel", PARALLEL_SLOW_FSDP)
@pytest.mark.parametrize("victim", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_a_dead_rank_ends_the_run_soon_and_torchrun_names_it(corpus, tmp_path, parallel, victim):
    port = PORTS["dead" if parallel == "ddp" else "dead-fsdp"] + victim
    out = tmp_path / "run"
    run = Torchrun(flags(corpus, out, parallel, max_steps=10_000), port, tmp_path / "run.log")
    took, logged = kill_and_check_exit(run, KillPoint(victim, 3, False, 0.0), out)
    assert took < EXIT_BOUND
    assert len(train_losses(out)) <= logged + 1  # the survivor did not train on alone: at most the step in flight
    text = run.output()
    assert "Root Cause" in text, text
    root_cause = text[text.index("Root Cause"):].split("=====")[0]  # torchrun's summary: the first failure
    assert re.search(rf"rank\s*: {victim} \(local_rank: {victim}\)", root_cause), root_cause
    assert "SIGKILL" in root_cause, root_cause


@pytest.mark.parametrize("fault", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_a_surviving_rank_stops_on_its_own_and_names_the_checkpoint(corpus, tmp_path, fault):
    """Two agents of one rank each (two machines): nobody stops the survivor but itself. A peer that
    died (SIGKILL) breaks its collective at once; one that hangs (SIGSTOP) times out after --dist-timeout."""
    out, timeout = tmp_path / "run", 10
    args = flags(corpus, out, "ddp", max_steps=10_000, **{"dist-timeout": timeout})
    port = PORTS["alone"] + (fault == "hung")
    nodes = [Torchrun(args, port, tmp_path / f"node{n}.log", node=n) for n in (0, 1)]
    try:
        nodes[0].wait_for(logged_step(out, 5, None))
        nodes[1].kill(1, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        sent = time.time()
        rc = nodes[0].wait(timeout=EXIT_BOUND)
        took = time.time() - sent
    finally:
        for node in nodes:
            node.stop()
    text = nodes[0].output(tail=100_000)
    assert rc != 0 and took < EXIT_BOUND, text
    assert "exitcode  : 4" in text, text  # the survivor exited by itself (PeerLost), not by a signal
    line = next(x for x in text.splitlines() if "lost contact" in x)
    assert line.startswith("error: rank 0 of 2 lost contact with the other ranks"), line
    assert f"the last complete checkpoint is {latest_checkpoint(out)}: relaunch with --resume" in line, line
    if fault == "hung":
        assert took > timeout  # it waited --dist-timeout for the peer, no longer than the bound
