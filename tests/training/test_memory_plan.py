"""`llmkit plan` and `llmkit.training.memory_plan`: the planned per-rank peak against the peak of real
CPU training steps (live tensor bytes counted by tests/training/memory_worker.py), within 15%, on one
process, two-process FSDP2 ZeRO-3 and two-process DDP with activation checkpointing; sharding halves
the measured state per rank; the CLI's table, verdict, JSON and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.cli.main import main
from llmkit.config import ModelConfig


@pytest.fixture(autouse=True)
def fast_paths_back():
    """The worker's `build` turns llmkit's fast paths off for the whole process: back on after each test."""
    yield
    import llmkit.accel
    llmkit.accel.register()
from llmkit.errors import UserError
from llmkit.models import kinds
from llmkit.training.memory_plan import GIB, gpu_memory, parse_size, plan

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from memory_worker import build, measure  # noqa: E402

TOLERANCE = 0.15
MODEL = dict(vocab_size=256, context_length=128, n_layers=4, d_model=256, n_heads=4, mlp="gelu", norm="layernorm",
             position="learned", bias=True, dropout=0.0)
LLAMA_LIKE = dict(MODEL, n_kv_heads=2, mlp="swiglu", norm="rmsnorm", position="rope", bias=False)
BATCH, SEQ = 4, 128


def spec(**extra) -> dict:
    return {"model": dict(extra.pop("model", MODEL)), "batch_size": BATCH, "seq_len": SEQ, **extra}


def planned(s: dict, **options) -> int:
    return plan(ModelConfig(**s["model"]), batch_size=BATCH, seq_len=SEQ, dtype=s.get("dtype", "fp32"),
                activation_checkpointing=s.get("activation_checkpointing", False), **options).peak


def assert_close(predicted: int, measured: int) -> None:
    assert abs(predicted - measured) / measured <= TOLERANCE, (predicted, measured)


@pytest.fixture
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- measured peaks --------------------------------------------------------------------------

@pytest.mark.usefixtures("single_thread")
def test_one_process_peak_matches_measured_within_15_percent():
    s = spec()
    measured = measure(build(s), s)
    assert_close(planned(s), measured["peak"])
    assert measured["state"] == 16 * sum(p.numel() for p in build(s).parameters())  # fp32 weights, grads, 2 moments


@pytest.mark.usefixtures("single_thread")
def test_one_process_llama_like_bf16_autocast_with_checkpointing_matches_measured():
    s = spec(model=LLAMA_LIKE, dtype="bf16", activation_checkpointing=True)
    assert_close(planned(s), measure(build(s), s)["peak"])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """One torchrun of two processes measuring FSDP2 ZeRO-3, then DDP with activation checkpointing."""
    folder = tmp_path_factory.mktemp("memory")
    specs = [spec(parallel="fsdp", zero=3), spec(parallel="ddp", activation_checkpointing=True)]
    (folder / "specs.json").write_text(json.dumps(specs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29683",
           str(HERE / "memory_worker.py"), str(folder / "specs.json"), str(folder / "out.json")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((folder / "out.json").read_text())
    return {"specs": specs, "fsdp": out["results"][0], "ddp": out["results"][1]}


@pytest.mark.slow
def test_fsdp_zero3_two_ranks_peak_matches_measured_within_15_percent(two_ranks):
    s = two_ranks["specs"][0]
    for rank in two_ranks["fsdp"]:
        assert_close(planned(s, parallel="fsdp", world=2, zero=3), rank["peak"])


@pytest.mark.slow
def test_ddp_two_ranks_with_checkpointing_peak_matches_measured_within_15_percent(two_ranks):
    s = two_ranks["specs"][1]
    for rank in two_ranks["ddp"]:
        assert_close(planned(s, parallel="ddp", world=2), rank["peak"])


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_fsdp_halves_the_measured_state_per_rank(two_ranks):
    one = measure(build(spec()), spec())["state"]
    for rank in two_ranks["fsdp"]:
        assert rank["state"] == pytest.approx(one / 2, rel=0.02)
    p1, p2 = (plan(ModelConfig(**MODEL), parallel=par, world=w) for par, w in (("none", 1), ("fsdp", 2)))
    for part in ("parameters", "gradients", "optimizer"):
        assert getattr(p2, part) == pytest.approx(getattr(p1, part) / 2, rel=1e-6)


# --- the plan's own properties ---------------------------------------------------------------

@pytest.mark.parametrize("preset, n", [("gpt2", 124_439_808), ("llama-small", 134_515_008)])
def test_parameter_count_is_the_published_one(preset, n):
    assert plan(kinds.config_from_preset(preset), batch_size=1, seq_len=8).n_params == n  # GPT-2 small, SmolLM-135M


@pytest.mark.parametrize("preset", ["bert-tiny", "t5-tiny", "tiny"])
def test_parameter_count_is_the_built_models(preset):
    cfg = kinds.config_from_preset(preset)
    assert plan(cfg, batch_size=1, seq_len=8).n_params == kinds.num_params(kinds.build_model(cfg))


def test_fp32_state_is_16_bytes_per_parameter_shared_by_fsdp_and_whole_under_ddp():
    cfg = ModelConfig(**MODEL)
    n = plan(cfg).n_params
    whole = plan(cfg, parallel="ddp", world=8, batch_size=2, seq_len=64)
    sharded = plan(cfg, parallel="fsdp", world=8, batch_size=2, seq_len=64)
    assert whole.parameters + whole.gradients + whole.optimizer == 16 * n
    assert sharded.parameters + sharded.gradients + sharded.optimizer == pytest.approx(16 * n / 8)
    assert whole.temporaries >= 4 * n  # DDP's gradient buckets
    assert sharded.peak < whole.peak


def test_zero2_keeps_parameters_gathered_so_it_needs_more_than_zero3():
    cfg = kinds.config_from_preset("gpt2")
    z2, z3 = (plan(cfg, parallel="fsdp", world=8, batch_size=1, seq_len=256, zero=z) for z in (2, 3))
    assert z2.peak - z3.peak > 0.5 * 4 * z2.n_params  # most of the fp32 weights more


def test_activation_checkpointing_cuts_activations_and_peak():
    cfg = kinds.config_from_preset("gpt2")
    full, ac = (plan(cfg, batch_size=8, seq_len=1024, activation_checkpointing=a) for a in (False, True))
    assert ac.activations < full.activations / 3 and ac.peak < full.peak


def test_activations_grow_linearly_with_the_batch():
    cfg = kinds.config_from_preset("llama-small")
    a = [plan(cfg, batch_size=b, seq_len=512).activations for b in (1, 2, 4)]
    assert a[2] - a[1] == pytest.approx(2 * (a[1] - a[0]), rel=0.01)


def test_tensor_parallel_splits_the_blocks_weights():
    cfg = kinds.config_from_preset("gpt2")
    one, tp = plan(cfg, batch_size=1, seq_len=128), plan(cfg, parallel="tp", world=4, tp_size=4, batch_size=1, seq_len=128)
    embeddings = cfg.vocab_size * cfg.d_model + cfg.context_length * cfg.d_model
    blocks = one.n_params - embeddings - 2 * cfg.d_model  # the final norm's weight and bias
    assert tp.parameters == pytest.approx(4 * (embeddings + 2 * cfg.d_model + blocks / 4), rel=0.01)


def test_bad_options_are_one_line_user_errors():
    cfg = ModelConfig(**MODEL)
    with pytest.raises(UserError, match="multiple of --tp-size"):
        plan(cfg, parallel="fsdp+tp", world=6, tp_size=4)
    with pytest.raises(UserError, match="--zero must be 2 or 3"):
        plan(cfg, parallel="fsdp", world=2, zero=1)
    with pytest.raises(UserError, match="needs a parallelism"):
        plan(cfg, parallel="none", world=2)
    with pytest.raises(UserError, match="--cpu-offload"):
        plan(cfg, parallel="ddp", world=2, cpu_offload=True)


def test_sizes_and_gpu_names():
    assert parse_size("80GB") == parse_size("80GiB") == 80 * GIB
    assert parse_size("512MB") == 512 << 20
    assert gpu_memory("h100") == 80 * GIB and gpu_memory("A100-40GB") == 40 * GIB
    with pytest.raises(UserError):
        parse_size("lots")
    with pytest.raises(UserError, match="--gpu"):
        gpu_memory("Z9000")


# --- the CLI ---------------------------------------------------------------------------------

def test_cli_prints_the_table_and_a_fitting_verdict(capsys):
    assert main(["plan", "--preset", "gpt2", "--parallel", "fsdp", "--world", "8", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer", "activations", "temporaries", "peak"):
        assert row in out
    assert "fits in 80 GiB with" in out


def test_cli_says_what_to_try_when_it_does_not_fit(capsys):
    assert main(["plan", "--preset", "llama-small", "--batch-size", "64", "--gpu", "L4"]) == 0
    out = capsys.readouterr().out
    assert "does not fit in 24 GiB" in out and "--batch-size" in out and "--activation-checkpointing" in out


def test_cli_json_matches_the_library(capsys):
    assert main(["plan", "--preset", "tiny", "--world", "2", "--parallel", "fsdp", "--batch-size", "4",
                 "--dtype", "fp32", "--device-memory", "1GB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = plan(kinds.config_from_preset("tiny"), parallel="fsdp", world=2, batch_size=4)
    assert got["peak"] == want.peak and got["fits"] and got["free"] == GIB - want.peak


@pytest.mark.parametrize("argv, message", [
    (["--parallel", "tp", "--world", "6", "--tp-size", "4"], "multiple of --tp-size"),
    (["--device-memory", "eighty"], "is not a size"),
    (["--preset", "nope"], "unknown preset"),
    (["--seq-len", "100000"], "longer than the model's context"),
    (["--tp-size", "2"], "needs --parallel tp"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
