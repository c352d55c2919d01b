"""Pipeline parallelism (llmkit.training.pipeline): the stages chained compute the model exactly,
their state dicts split the model's, and a 2-process pipeline (torchrun, gloo) gives the unsplit
model's loss, gradients and AdamW steps."""
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
from llmkit.training.pipeline import DecoderStage, stage_bounds

BASE = dict(vocab_size=50, context_length=16, n_layers=5, d_model=32, n_heads=4)
VARIANTS = {
    "gpt2": {},
    "llama": dict(position="rope", mlp="swiglu", norm="rmsnorm", n_kv_heads=2, bias=False, tie_embeddings=False),
    "alibi-sliding-postnorm": dict(position="alibi", sliding_window=4, block="post_norm"),
    "gemma-like": dict(embedding_scale=2.0, embedding_norm=True, final_softcap=5.0, block="sandwich"),
}


def model_for(variant: str) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**BASE, **VARIANTS[variant])).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_stages", [2, 3, 5])
def test_chained_stages_equal_the_model(variant, n_stages):
    model = model_for(variant)
    idx = torch.randint(0, BASE["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(1))
    x = idx
    for s in range(n_stages):
        x = DecoderStage(model, s, n_stages)(x)
    assert torch.equal(x, model(idx))


def test_stage_state_dicts_split_the_models():
    """Each stage's keys are the model's own; together they are all of them, shared by no two
    stages but the tied embedding (the first stage's lookup, the last's head)."""
    model = model_for("gpt2")
    keys = [set(DecoderStage(model, s, 3).state_dict()) for s in range(3)]
    assert set().union(*keys) == set(model.state_dict())
    assert keys[0] & keys[1] == set() and keys[1] & keys[2] == set()
    assert keys[0] & keys[2] == set() and "tok_emb.weight" in keys[0] and "lm_head.weight" in keys[2]
    assert DecoderStage(model, 0, 3).tied_weight() is DecoderStage(model, 2, 3).tied_weight()


def test_stage_bounds_cover_the_layers_evenly():
    assert stage_bounds(12, 1) == [(0, 12)]
    assert stage_bounds(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert stage_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(UserError, match="at least one block"):
        stage_bounds(2, 3)


def test_refuses_mixture_of_experts():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**BASE, moe={"n_experts": 4, "top_k": 2}))
    with pytest.raises(UserError, match="auxiliary losses"):
        DecoderStage(model, 0, 2)


def test_refuses_other_model_kinds():
    with pytest.raises(UserError, match="decoder LM"):
        DecoderStage(torch.nn.Linear(2, 2), 0, 2)


def test_two_stage_pipeline_equals_single_process(tmp_path: Path):
    """GPipe and 1F1B over 4 microbatches, a tied GPT-2-like and an untied Llama-like model: the
    loss, every parameter's gradient and every parameter after 3 clipped AdamW steps equal the
    unsplit model's (fp32, 1e-5), and so does a forward-only loss after them; the gradient norm
    across stages equals the model's."""
    worker = Path(__file__).with_name("pp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29790",
           str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert set(ranks[0]) == {f"{m}/{s}" for m in ("gpt2-tied", "llama-rope") for s in ("gpipe", "1f1b")}
    for case in ranks[0]:
        r0, r1 = ranks[0][case], ranks[1][case]
        assert set(r0["names"]) | set(r1["names"]) == set(r0["all_names"]), case  # every parameter checked
        for r in (r0, r1):
            assert max(r["loss"]) < 1e-5, case
            assert r["grad"] < 1e-5, case
            assert max(r["norm"]) < 1e-5 and r["clipped"], case
            assert max(r["param"]) < 1e-5, case
            assert r["eval"] < 1e-5, case
            assert r["moved"] > 1e-3, case  # the steps did move every parameter
