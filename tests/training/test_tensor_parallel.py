"""Tensor parallelism (llmkit.training.tensor_parallel): the shard-major layout of the fused qkv
projection, the refusals, and, under torchrun (gloo, CPU), a tensor-parallel DecoderLM against the
same model in one process: logits, loss, every gradient, clipping and AdamW steps equal, with and
without sequence parallelism, and on a 2 x 2 (FSDP x TP) mesh. The multi-process cases run a few
per launch (tests/training/tp_worker.py) to keep torchrun's start-up cost down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.nn.linear import Linear
from llmkit.training.tensor_parallel import (apply_tensor_parallel, canonical, check_tensor_parallel,
                                             fused_params, shard_major)

WORKER = Path(__file__).with_name("tp_worker.py")
BASE = dict(vocab_size=64, context_length=16, n_layers=2, d_model=32, n_heads=4)

# (launch, cases): each launch one torchrun; ports from this file's range 29610-29619
PLAIN = ["gpt2", "llama", "gqa", "variants", "post_norm"]
SEQUENCE_PARALLEL = [f"{c}_sp" for c in PLAIN]  # gqa_sp: an odd sequence; variants_sp: llmkit's AdamW
FSDP_TP = ["fsdp_tp_gpt2", "fsdp_tp_llama_sp"]
HEADS = {"gpt2": [2, 2], "llama": [2, 2], "gqa": [2, 1], "variants": [2, 1], "post_norm": [2, 2]}


def _launch(cases: list[str], nproc: int, port: int) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(WORKER), *cases]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, payload = line.split(" ", 2)
            out[name] = json.loads(payload)
    assert sorted(out) == sorted(cases), done.stdout[-2000:]
    return out


@pytest.fixture(scope="module")
def plain_runs() -> dict[str, dict]:
    return _launch(PLAIN + ["state_dict_gpt2", "dropout"], 2, 29610)


@pytest.fixture(scope="module")
def sp_runs() -> dict[str, dict]:
    return _launch(SEQUENCE_PARALLEL + ["state_dict_gqa", "dropout_sp"], 2, 29611)


@pytest.fixture(scope="module")
def fsdp_tp_runs() -> dict[str, dict]:
    return _launch(FSDP_TP, 4, 29612)


def _assert_equals_single_process(r: dict) -> None:
    assert r["logits"] < 1e-5 and r["loss"] < 1e-5
    assert r["grad"] < 1e-5 * max(1.0, r["grad_scale"])  # every parameter's gradient, qkv mapped back
    assert r["clip_norm"] < 1e-5 and r["clipped_grad"] < 1e-5
    assert r["grad_placements_partial"] == []  # replicated weights' gradients summed once, in backward
    # three AdamW steps of lr 1e-2: the weights agree to 1% of one step (AdamW divides by the
    # gradients' size, so rounding in tiny gradients shows up at that scale), and they did move
    assert r["params_after_steps"] < 1e-4 and r["moved"] > 1e-2
    assert r["tp_ranks_agree"] == 0.0  # every rank holds the same, whole logits
    assert r["fast_paths_on_dtensor"] == []  # no native fast path ran on a DTensor weight


@pytest.mark.slow
@pytest.mark.parametrize("case", PLAIN)
def test_tensor_parallel_equals_single_process(plain_runs, case):
    r = plain_runs[case]
    _assert_equals_single_process(r)
    assert r["local_heads"] == HEADS[case]  # each of 2 ranks computes half the (query, kv) heads


@pytest.mark.slow
@pytest.mark.parametrize("case", SEQUENCE_PARALLEL)
def test_sequence_parallel_equals_single_process(sp_runs, case):
    _assert_equals_single_process(sp_runs[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", FSDP_TP)
def test_fsdp_by_tensor_parallel_2x2_equals_single_process_on_the_whole_batch(fsdp_tp_runs, case):
    _assert_equals_single_process(fsdp_tp_runs[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["state_dict_gpt2", "state_dict_gqa"])
def test_canonical_state_dict_is_the_single_process_one_and_loads_back(plain_runs, sp_runs, case):
    r = {**plain_runs, **sp_runs}[case]
    assert r["saved_vs_ref"] == 0.0
    assert r["loaded_logits"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dropout", "dropout_sp"])
def test_dropout_seeded_alike_on_tensor_parallel_ranks_keeps_them_in_step(plain_runs, sp_runs, case):
    r = {**plain_runs, **sp_runs}[case]
    assert r["tp_ranks_agree"] == 0.0
    assert r["dropout_changed"] > 1e-2  # dropout was on


# --- single process ------------------------------------------------------------------------------

def test_shard_major_puts_each_ranks_heads_q_k_v_together():
    rows = torch.arange(8.0)  # q = 0..3, k = 4..5, v = 6..7
    assert shard_major(rows, [4, 2, 2], 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    full = torch.randn(16 + 8 + 8, 5)
    q, k, v = full.split([16, 8, 8])
    for rank, chunk in enumerate(shard_major(full, [16, 8, 8], 4).chunk(4)):
        assert torch.equal(chunk, torch.cat([q.chunk(4)[rank], k.chunk(4)[rank], v.chunk(4)[rank]]))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("shape", [(32,), (32, 3)])
def test_canonical_inverts_shard_major(tp, shape):
    full = torch.randn(shape)
    sizes = [16, 8, 8]
    assert torch.equal(canonical(shard_major(full, sizes, tp), sizes, tp), full)
    assert torch.equal(shard_major(canonical(full, sizes, tp), sizes, tp), full)


def test_shard_major_refuses_parts_that_do_not_split():
    with pytest.raises(ValueError):
        shard_major(torch.zeros(12), [6, 3, 3], 2)


def test_fused_params_names_each_qkv_weight_and_bias_with_its_parts():
    model = DecoderLM(ModelConfig(**BASE, n_kv_heads=2, qkv_bias=True))
    assert fused_params(model) == {f"blocks.{i}.attn.qkv.{p}": [32, 16, 16]
                                   for i in range(2) for p in ("weight", "bias")}


def test_check_tensor_parallel_accepts_a_splittable_llama():
    check_tensor_parallel(ModelConfig(**BASE, n_kv_heads=2, mlp="swiglu", position="rope", qk_norm="head"), 2)


@pytest.mark.parametrize("kw, tp, words", [
    (dict(n_heads=6, d_model=48), 4, "n_heads=6"),
    (dict(n_kv_heads=1), 2, "n_kv_heads=1"),
    (dict(d_ff=90), 4, "d_ff=90"),
    (dict(attention="mla", position="rope", mla={}), 2, "attention='mla'"),
    (dict(moe={"n_experts": 4, "top_k": 2}), 2, "Mixture-of-Experts"),
    (dict(mod={}), 2, "Mixture-of-Depths"),
    (dict(qk_norm="full"), 2, "qk_norm='full'"),
    (dict(position="alibi"), 2, "ALiBi"),
    (dict(), 0, "positive"),
])
def test_check_tensor_parallel_refuses_what_the_plan_cannot_split(kw, tp, words):
    with pytest.raises(UserError, match=words) as err:
        check_tensor_parallel(ModelConfig(**{**BASE, **kw}), tp)
    assert "\n" not in str(err.value) and ": " in str(err.value)  # one line, then the fix


class _Mesh:
    """A stand-in for a 1-D device mesh of 2 ranks: the refusals come before any communication."""
    ndim = 1

    def size(self) -> int:
        return 2


class _Adapter(Linear):
    pass


def test_apply_tensor_parallel_refuses_a_replaced_linear_and_other_models():
    model = DecoderLM(ModelConfig(**BASE))
    model.blocks[1].attn.qkv = _Adapter(32, 96)
    with pytest.raises(UserError, match="block 1"):
        apply_tensor_parallel(model, _Mesh())
    with pytest.raises(UserError, match="DecoderLM"):
        apply_tensor_parallel(torch.nn.Linear(2, 2), _Mesh())


def test_apply_tensor_parallel_refuses_an_unsplittable_config_before_touching_weights():
    model = DecoderLM(ModelConfig(**BASE, n_kv_heads=1))
    before = model.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(UserError, match="n_kv_heads=1"):
        apply_tensor_parallel(model, _Mesh())
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)
