"""--parallel: FSDP2 (ZeRO-3, ZeRO-2, mixed precision, CPU offload) trains what one process trains
with the same global batch; sharded checkpoints load at another world size and layout (and in one
plain process) with equal logits and resume exactly; the options are refused where they do not apply;
the native fast paths step aside for DTensor shards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.cli.demo import builtin_corpus
from llmkit.errors import UserError
from llmkit.model_io import load_model
from llmkit.training.config import build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog

PORT = 29540  # this file's torchrun ports: 29540-29559


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:60_000], encoding="utf-8")
    return path


def flags(corpus: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(out), "--preset", "baby-gpt", "--n-layers", "2", "--d-model",
            "64", "--n-heads", "4", "--context-length", "32", "--max-steps", str(steps), "--log-every", "1",
            "--eval-every", "0", "--eval-batches", "2", "--ckpt-every", "3", "--warmup-steps", "2", "--dropout", "0",
            "--lr", "3e-3", "--no-progress", *extra]


def run_cli(args: list[str], nproc: int = 1, port: int = PORT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "llmkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "llmkit", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one(corpus, tmp_path_factory) -> Path:
    """The reference: one plain process on the global batch of 8 (the runs below split it)."""
    out = tmp_path_factory.mktemp("one") / "run"
    run_cli(flags(corpus, out, "--batch-size", "8"))
    return out


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["event"] == "train"]


def assert_close(got: list[float], want: list[float], tol: float = 2e-5) -> None:
    assert len(got) == len(want) and got, (got, want)
    assert max(abs(a - b) for a, b in zip(got, want)) <= tol, (got, want)


def test_fsdp_in_one_process_equals_plain_training(corpus, tmp_path):
    base = dict(data=str(corpus), preset="baby-gpt", n_layers=2, d_model=64, n_heads=4, context_length=32,
                batch_size=8, max_steps=5, log_every=1, eval_every=0, ckpt_every=0, warmup_steps=2, dropout=0.0,
                lr=3e-3, progress=False)
    train(build_train_config(out=str(tmp_path / "plain"), **base))
    train(build_train_config(out=str(tmp_path / "fsdp"), parallel="fsdp", **base))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"))
    x = torch.randint(0, 50, (2, 16))
    a, b = load_model(tmp_path / "plain"), load_model(tmp_path / "fsdp")  # the gathered model, one file
    assert (a(x) - b(x)).abs().max().item() < 1e-5


def test_two_processes_fsdp_zero3_zero2_and_ddp_equal_one_process(corpus, tmp_path, one):
    want = losses(one)
    for i, extra in enumerate([("--parallel", "fsdp"), ("--parallel", "fsdp", "--zero", "2"), ("--parallel", "ddp")]):
        out = tmp_path / f"two{i}"
        run_cli(flags(corpus, out, "--batch-size", "4", *extra), nproc=2, port=PORT + i)
        assert_close(losses(out), want)
        start = MetricsLog.read(out / "metrics.jsonl")[0]
        assert start["world"] == 2 and start["parallel"] == extra[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("--batch-size", "2", "--parallel", "ddp"), ("--batch-size", "2", "--parallel", "fsdp"),
                                   ("--batch-size", "8", "--parallel", "tp", "--tp-size", "4")], ids=lambda e: e[3])
def test_four_processes_equal_one_process(corpus, tmp_path, one, extra):
    """DDP and FSDP2 split the batch of 8 four ways; TP over 4 ranks splits every block's heads
    (4 heads: one each) and MLP, each rank seeing the whole batch."""
    port = PORT + {"ddp": 15, "fsdp": 5, "tp": 16}[extra[3]]
    run_cli(flags(corpus, tmp_path / "four", *extra), nproc=4, port=port)
    assert_close(losses(tmp_path / "four"), losses(one))
    assert MetricsLog.read(tmp_path / "four" / "metrics.jsonl")[0]["world"] == 4


def test_sharded_checkpoint_of_two_processes_loads_at_one_and_four_and_resumes_exactly(corpus, tmp_path):
    whole = tmp_path / "whole"
    run_cli(flags(corpus, whole, "--batch-size", "4", "--parallel", "fsdp"), nproc=2, port=PORT + 6)
    step3 = whole / "checkpoints" / "step-0000003"
    assert (step3 / "dcp" / ".metadata").is_file() and not (step3 / "model.safetensors").exists()
    x = torch.randint(0, 50, (2, 16))
    at3 = load_model(step3)(x)  # one plain process reads every rank's shards
    # resume from step 3 in one plain process and as 4 FSDP processes: the same losses to the end
    for name, nproc, extra in [("plain1", 1, ("--batch-size", "8")),
                               ("fsdp4", 4, ("--batch-size", "2", "--parallel", "fsdp"))]:
        cut = tmp_path / name
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "checkpoints" / "step-0000006")
        run_cli(flags(corpus, cut, *extra, "--resume"), nproc=nproc, port=PORT + 7)
        assert_close(losses(cut), losses(whole))
        assert (load_model(cut / "checkpoints" / "step-0000003")(x) - at3).abs().max().item() == 0
        assert (load_model(cut)(x) - load_model(whole)(x)).abs().max().item() < 1e-5


def test_mixed_precision_and_cpu_offload(corpus, tmp_path):
    run_cli(flags(corpus, tmp_path / "ref", "--batch-size", "4", "--parallel", "fsdp"), nproc=2, port=PORT + 8)
    run_cli(flags(corpus, tmp_path / "off", "--batch-size", "4", "--parallel", "fsdp", "--cpu-offload"), nproc=2,
            port=PORT + 9)
    assert_close(losses(tmp_path / "off"), losses(tmp_path / "ref"))  # on a CPU run offloading moves nothing
    run_cli(flags(corpus, tmp_path / "bf16", "--batch-size", "4", "--parallel", "fsdp", "--mixed-precision", "bf16"),
            nproc=2, port=PORT + 10)
    got, want = losses(tmp_path / "bf16"), losses(tmp_path / "ref")
    assert all(abs(a - b) < 0.05 for a, b in zip(got, want)) and got != want  # bf16 rounding, same run
    assert got[-1] < got[0] - 0.3  # and it learns


@pytest.mark.parametrize("kw, needle", [
    (dict(zero=2), "--zero is a setting of --parallel fsdp"),
    (dict(parallel="ddp", mixed_precision="bf16"), "--mixed-precision is a setting of --parallel fsdp"),
    (dict(parallel="fsdp", sequence_parallel=True), "--sequence-parallel is a setting of --parallel tp"),
    (dict(parallel="fsdp", tp_size=2), "--tp-size is a setting of --parallel fsdp+tp"),
    (dict(parallel="fsdp", mixed_precision="bf16", dtype="bf16"), "drop --dtype bf16"),
])
def test_parallel_options_refused_where_they_do_not_apply(corpus, tmp_path, kw, needle):
    with pytest.raises(UserError, match=needle.replace("+", r"\+")):
        build_train_config(data=str(corpus), out=str(tmp_path / "r"), **kw)


def test_resuming_a_one_file_checkpoint_sharded_is_refused(corpus, tmp_path):
    base = dict(data=str(corpus), out=str(tmp_path / "r"), preset="baby-gpt", n_layers=1, d_model=32, n_heads=2,
                context_length=16, batch_size=2, max_steps=2, eval_every=0, ckpt_every=1, progress=False)
    train(build_train_config(**base))
    with pytest.raises(UserError, match="--parallel ddp run"):
        train(build_train_config(**{**base, "max_steps": 3}, resume=True, parallel="fsdp"))


def test_native_fast_paths_step_aside_for_dtensor_shards():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from llmkit import kernels
    from llmkit.accel.guards import fp32_cpu_autograd

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
        assert not fp32_cpu_autograd(w) and fp32_cpu_autograd(torch.randn(2, requires_grad=True))
        with torch.no_grad():
            assert kernels.linear(torch.randn(1, 4), w) is None
        assert kernels.clip_grad_norm([w], 1.0) is None
    finally:
        if own:
            dist.destroy_process_group()


def test_tensor_parallel_with_and_without_sequence_parallel_equals_one_process(corpus, tmp_path, one):
    want = losses(one)
    for i, extra in enumerate([(), ("--sequence-parallel",)]):
        out = tmp_path / f"tp{i}"
        run_cli(flags(corpus, out, "--batch-size", "8", "--parallel", "tp", *extra), nproc=2, port=PORT + 11 + i)
        assert_close(losses(out), want)
    # the TP run's checkpoint holds q|k|v in the model's own order: it loads in one plain process
    x = torch.randint(0, 50, (2, 16))
    got = load_model(tmp_path / "tp0" / "checkpoints" / "step-0000006")(x)
    assert (got - load_model(one)(x)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_fsdp_by_tp_on_a_two_by_two_mesh_equals_one_process(corpus, tmp_path, one):
    run_cli(flags(corpus, tmp_path / "2d", "--batch-size", "4", "--parallel", "fsdp+tp", "--tp-size", "2"), nproc=4,
            port=PORT + 13)
    assert_close(losses(tmp_path / "2d"), losses(one))


def test_lora_under_fsdp_equals_one_process_and_saves_the_same_adapter(corpus, tmp_path):
    from safetensors.torch import load_file

    run_cli(flags(corpus, tmp_path / "base", "--batch-size", "8", steps=3))
    tune = ["--data", str(corpus), "--max-steps", "4", "--log-every", "1", "--eval-every", "0", "--eval-batches", "2",
            "--ckpt-every", "2", "--warmup-steps", "1", "--lr", "3e-3", "--context-length", "32", "--no-progress"]
    run_cli(["finetune", str(tmp_path / "base"), *tune, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    run_cli(["finetune", str(tmp_path / "base"), *tune, "--out", str(tmp_path / "two"), "--batch-size", "4",
             "--parallel", "fsdp"], nproc=2, port=PORT + 14)
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000004" / "dcp"
    assert ckpt.is_dir()  # only the adapter's tensors are in it
    from llmkit.model_io import read_sharded
    assert set(read_sharded(ckpt)) == {n for n in read_sharded(ckpt) if "lora" in n}


def test_tensor_parallel_refuses_adapters(corpus, tmp_path):
    run = tmp_path / "base"
    train(build_train_config(data=str(corpus), out=str(run), preset="baby-gpt", n_layers=1, d_model=32, n_heads=2,
                             context_length=16, batch_size=2, max_steps=1, eval_every=0, ckpt_every=0, progress=False))
    cfg = build_train_config(data=str(corpus), out=str(tmp_path / "tune"), init_from=str(run), method="lora",
                             parallel="tp", context_length=16, max_steps=1, progress=False)
    with pytest.raises(UserError, match="--parallel tp trains the whole model"):
        train(cfg)


@pytest.mark.parametrize("method", ["qlora", "prompt", "ia3"])
def test_adapter_methods_train_save_and_resume_under_fsdp(corpus, tmp_path, method):
    base = tmp_path / "base"
    train(build_train_config(data=str(corpus), out=str(base), preset="baby-gpt", n_layers=1, d_model=32, n_heads=2,
                             context_length=24, batch_size=2, max_steps=1, eval_every=0, ckpt_every=0, progress=False))
    kw = dict(data=str(corpus), init_from=str(base), method=method, context_length=4 if method == "prompt" else 24,
              batch_size=4, max_steps=4, log_every=1, eval_every=0, ckpt_every=2, warmup_steps=1, lr=3e-3,
              progress=False, **({"virtual_tokens": 20} if method == "prompt" else {}))
    train(build_train_config(out=str(tmp_path / "plain"), **kw))
    train(build_train_config(out=str(tmp_path / "fsdp"), parallel="fsdp", **kw))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"), tol=1e-4)
    assert (tmp_path / "fsdp" / "adapter_model.safetensors").is_file()
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-0000004")
    train(build_train_config(out=str(tmp_path / "fsdp"), parallel="fsdp", resume=True, **kw))
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"), tol=1e-4)


def test_prompt_tuning_that_overflows_learned_positions_is_refused(corpus, tmp_path):
    base = tmp_path / "base"
    train(build_train_config(data=str(corpus), out=str(base), preset="baby-gpt", n_layers=1, d_model=32, n_heads=2,
                             context_length=24, batch_size=2, max_steps=1, eval_every=0, ckpt_every=0, progress=False))
    cfg = build_train_config(data=str(corpus), out=str(tmp_path / "t"), init_from=str(base), method="prompt",
                             max_steps=1, progress=False)
    with pytest.raises(UserError, match="give --context-length 4 or less"):
        train(cfg)
    assert not (tmp_path / "t").exists()
