"""The Mixture-of-Experts feed-forward (llmkit.nn.moe): against the dense MLP, a per-token loop and
transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 blocks given the same weights (1e-5);
its auxiliary losses, capacity drops and gradients; and in a DecoderLM that trains, decodes through
the KV cache as it recomputes and logs its expert metrics."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models import DecoderLM
from llmkit.nn.blocks import build_feedforward
from llmkit.nn.mlp import MLPS
from llmkit.nn.moe import MoE, load_balancing_loss, route, router_z_loss
from llmkit.objectives.clm import CausalLMTask

D, FF = 32, 48


def moe_config(mlp: str = "swiglu", **moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, context_length=32, n_layers=2, d_model=D, n_heads=4, d_ff=FF, mlp=mlp,
                       norm="rmsnorm", position="rope", bias=False, moe=moe)


def randomized(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter (and the score-bias buffer) drawn at random: no test passes on zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for n, b in module.named_buffers() if "bias" in n]:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return module


def tokens(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def task_loss(model, batch):
    """CausalLMTask.loss, which needs no set-up state."""
    return CausalLMTask.loss(CausalLMTask.__new__(CausalLMTask), model, batch)


# --- against the dense MLP and a per-token loop ---------------------------------------------------

@pytest.mark.parametrize("mlp", ["swiglu", "geglu", "gelu", "gelu_tanh"])
def test_one_expert_top1_equals_the_dense_mlp(mlp):
    moe = randomized(MoE(moe_config(mlp, n_experts=1, top_k=1), 0)).eval()
    dense = MLPS[mlp](D, FF, bias=False)
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            if hasattr(dense, name):
                getattr(dense, name).weight.copy_(getattr(moe.experts, name)[0])
    x = tokens().view(4, 10, D)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-6)


def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE output token by token, routing in plain Python over the expert scores."""
    s = moe.moe
    E, k = s["n_experts"], s["top_k"]
    out = []
    for h in x:
        logits = moe.router.weight @ h
        scores = (logits.sigmoid() if s["router"] == "sigmoid" else logits.softmax(-1)).tolist()
        bias = moe.score_bias.tolist() if s["score_bias"] else [0.0] * E
        biased = [scores[e] + bias[e] for e in range(E)]
        size = E // s["n_groups"]
        groups = sorted(range(s["n_groups"]), reverse=True,
                        key=lambda g: sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]))
        eligible = [e for e in range(E) if e // size in groups[:s["topk_groups"]]]
        chosen = sorted(eligible, key=lambda e: biased[e], reverse=True)[:k]
        total = sum(scores[e] for e in chosen) if s["norm_topk"] else 1.0
        y = torch.zeros(D)
        for e in chosen:
            g, u, d = moe.experts.gate[e], moe.experts.up[e], moe.experts.down[e]
            y += scores[e] / total * s["routed_scale"] * (d @ (F.silu(g @ h) * (u @ h)))
        if s["n_shared"]:
            shared = moe.shared(h)
            y += torch.sigmoid(moe.shared_gate(h)) * shared if s["shared_gate"] else shared
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("settings", [
    dict(n_experts=6, top_k=2),
    dict(n_experts=6, top_k=3, norm_topk=False, n_shared=1, shared_gate=True),
    dict(n_experts=8, top_k=2, router="sigmoid", score_bias=True, n_groups=4, topk_groups=2, routed_scale=2.5,
         n_shared=2),
], ids=["mixtral", "qwen2-moe", "deepseek-v3"])
def test_topk_routing_equals_a_per_token_loop(settings):
    moe = randomized(MoE(moe_config(**settings), 0), std=0.3).eval()
    x = tokens(30)
    torch.testing.assert_close(moe(x), loop_reference(moe, x), atol=1e-5, rtol=1e-5)


def test_routing_depends_on_nothing_but_the_token():
    """Permuting the tokens permutes the outputs (no capacity): each token is routed on its own."""
    moe = randomized(MoE(moe_config(n_experts=4, top_k=2), 0)).eval()
    x = tokens(24)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(moe(x[perm]), moe(x)[perm], atol=1e-6, rtol=1e-6)


# --- against transformers -------------------------------------------------------------------------

def copy_experts(moe: MoE, gate_up: torch.Tensor, down: torch.Tensor, router: torch.Tensor) -> None:
    ff = gate_up.shape[1] // 2
    with torch.no_grad():
        moe.experts.gate.copy_(gate_up[:, :ff])
        moe.experts.up.copy_(gate_up[:, ff:])
        moe.experts.down.copy_(down)
        moe.router.weight.copy_(router)


def copy_mlp(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate_proj.weight)
        ours.up.weight.copy_(theirs.up_proj.weight)
        ours.down.weight.copy_(theirs.down_proj.weight)


def hf_input() -> torch.Tensor:
    return torch.randn(2, 15, D, generator=torch.Generator().manual_seed(5))


def test_equals_transformers_mixtral_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    theirs = randomized(MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=8,
                                                            num_experts_per_tok=2))).eval()
    ours = MoE(moe_config(n_experts=8, top_k=2), 0).eval()
    copy_experts(ours, theirs.experts.gate_up_proj, theirs.experts.down_proj, theirs.gate.weight)
    x = hf_input()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_topk", [False, True])
def test_equals_transformers_qwen2_moe_sparse_moe_block(norm_topk):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=FF, shared_expert_intermediate_size=40,
                            num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm_topk)
    theirs = randomized(Qwen2MoeSparseMoeBlock(hf_cfg)).eval()
    ours = MoE(moe_config(n_experts=6, top_k=3, norm_topk=norm_topk, n_shared=1, shared_d_ff=40,
                          shared_gate=True), 0).eval()
    copy_experts(ours, theirs.experts.gate_up_proj, theirs.experts.down_proj, theirs.gate.weight)
    copy_mlp(ours.shared, theirs.shared_expert)
    with torch.no_grad():
        ours.shared_gate.weight.copy_(theirs.shared_expert_gate.weight)
    x = hf_input()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_equals_transformers_qwen3_moe_sparse_moe_block():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=FF, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=True)
    theirs = randomized(Qwen3MoeSparseMoeBlock(hf_cfg)).eval()
    ours = MoE(moe_config(n_experts=8, top_k=2), 0).eval()
    copy_experts(ours, theirs.experts.gate_up_proj, theirs.experts.down_proj, theirs.gate.weight)
    x = hf_input()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups, topk_groups, norm_topk", [(4, 2, True), (1, 1, False)])
def test_equals_transformers_deepseek_v3_moe(groups, topk_groups, norm_topk):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=FF, n_routed_experts=8, num_experts_per_tok=2,
                              n_shared_experts=2, n_group=groups, topk_group=topk_groups, routed_scaling_factor=2.5,
                              norm_topk_prob=norm_topk)
    theirs = randomized(DeepseekV3MoE(hf_cfg)).eval()
    ours = MoE(moe_config(n_experts=8, top_k=2, router="sigmoid", score_bias=True, n_groups=groups,
                          topk_groups=topk_groups, routed_scale=2.5, norm_topk=norm_topk, n_shared=2), 0).eval()
    copy_experts(ours, theirs.experts.gate_up_proj, theirs.experts.down_proj, theirs.gate.weight)
    copy_mlp(ours.shared, theirs.shared_experts)
    with torch.no_grad():
        ours.score_bias.copy_(theirs.gate.e_score_correction_bias)
    assert ours.score_bias.abs().sum() > 0  # the bias changes which experts are chosen here
    x = hf_input()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_parameter_layout_is_the_loaders_contract():
    moe = MoE(moe_config(n_experts=4, top_k=2, n_shared=1, shared_gate=True, score_bias=True, d_ff=24), 0)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {"router.weight": (4, D), "score_bias": (4,), "experts.gate": (4, 24, D),
                      "experts.up": (4, 24, D), "experts.down": (4, D, 24), "shared.gate.weight": (24, D),
                      "shared.up.weight": (24, D), "shared.down.weight": (D, 24), "shared_gate.weight": (1, D)}
    gelu = MoE(moe_config("gelu", n_experts=4, top_k=1), 0)
    assert sorted(gelu.state_dict()) == ["experts.down", "experts.up", "router.weight"]


# --- auxiliary losses, capacity, gradients --------------------------------------------------------

def test_load_balancing_loss_is_one_at_uniform_routing_and_larger_when_skewed():
    E, N, k = 4, 64, 2
    balanced = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)
    uniform = torch.full((N, E), 1 / E)
    assert load_balancing_loss(uniform, balanced, E).item() == pytest.approx(1.0, abs=1e-6)
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(N, E)
    skewed = torch.stack([torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)], dim=1)
    # f = (1/2, 1/2, 0, 0), P = (0.7, 0.1, 0.1, 0.1): 4 * (0.35 + 0.05) = 1.6
    assert load_balancing_loss(skewed_probs, skewed, E).item() == pytest.approx(1.6, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # any routing whose probabilities follow its assignments costs at least 1
        logits = torch.randn(N, E, generator=g) * 3
        weights, experts, probs = route(logits, moe_config(n_experts=E, top_k=k).moe)
        assert load_balancing_loss(probs, experts, E).item() >= 1.0 - 1e-6


def test_aux_loss_is_the_weighted_sum_in_training_and_none_in_eval():
    moe = randomized(MoE(moe_config(n_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01), 0))
    x = tokens(32)
    moe.train()
    moe(x)
    logits = x @ moe.router.weight.T
    weights, experts, probs = route(logits, moe.moe)
    want = 0.1 * load_balancing_loss(probs, experts, 4) + 0.01 * router_z_loss(logits)
    assert moe.aux_loss.dim() == 0 and moe.aux_loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert router_z_loss(logits).item() == pytest.approx(
        sum(torch.logsumexp(row, 0).item() ** 2 for row in logits) / 32, rel=1e-5)
    assert moe.last_counts.dtype == torch.long and moe.last_counts.sum().item() == 32 * 2
    moe.eval()
    moe(x)
    assert moe.aux_loss is None
    silent = MoE(moe_config(n_experts=4, top_k=2, aux_loss_coef=0.0), 0).train()
    silent(x)
    assert silent.aux_loss is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_exactly_the_overflow_in_token_order(top_k):
    """A router that sends every token to expert 0 (and, with k=2, to expert 1 next): with capacity
    factor 1 an expert takes ceil(16 * k / 4) assignments; the first tokens keep their experts, the
    later ones get nothing (no shared expert: a zero output)."""
    moe = randomized(MoE(moe_config(n_experts=4, top_k=top_k, capacity_factor=1.0), 0))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
        moe.router.weight[1] = 0.5
    x = tokens(16).abs()
    cap = math.ceil(16 * top_k / 4)
    full = moe.eval()(x)  # inference drops nothing
    assert moe.last_dropped == 0
    dropped = moe.train()(x)
    assert moe.last_dropped == (16 - cap) * top_k
    assert moe.last_counts.tolist()[:top_k] == [16] * top_k  # routed, before the drops
    torch.testing.assert_close(dropped[:cap], full[:cap])
    assert dropped[cap:].abs().max().item() == 0.0
    assert full[cap:].abs().min().item() > 0.0


def test_gradients_reach_router_experts_and_shared_experts():
    moe = randomized(MoE(moe_config(n_experts=4, top_k=2, n_shared=1, shared_gate=True, z_loss_coef=0.01), 0))
    moe.train()
    x = tokens(32).requires_grad_()
    (moe(x).square().sum() + moe.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    used = moe.last_counts > 0
    assert (moe.experts.down.grad.flatten(1).abs().sum(1) > 0).tolist() == used.tolist()
    assert x.grad.abs().sum() > 0


def test_bad_settings_are_one_user_error_naming_the_field():
    with pytest.raises(UserError, match="topk_groups"):
        MoE(moe_config(n_experts=8, top_k=4, n_groups=4, topk_groups=1), 0)
    with pytest.raises(UserError, match="shared_gate"):
        MoE(moe_config(n_experts=4, top_k=2, shared_gate=True), 0)


# --- in the model ---------------------------------------------------------------------------------

def tiny_moe_lm(**moe) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, context_length=32, n_layers=2, d_model=32, n_heads=4, mlp="swiglu", d_ff=64,
                      norm="rmsnorm", position="rope", bias=False, moe={"n_experts": 4, "top_k": 2, **moe})
    return DecoderLM(cfg)


def test_moe_layers_sit_where_first_dense_and_every_say():
    cfg = ModelConfig.from_preset("tiny", n_layers=6, moe={"n_experts": 4, "top_k": 2, "first_dense": 1, "every": 2})
    kinds = [type(build_feedforward(cfg, i)).__name__ for i in range(6)]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "MoE", "SwiGLU", "MoE"]


def test_a_tiny_moe_decoder_learns_a_repeated_pattern():
    """4 experts, top-2, 2 layers: the loss (cross entropy + aux) on a period-7 stream falls from
    ln(32) = 3.47 to below 0.3 in 40 AdamW steps (about 0.08 measured), with the aux loss near its
    minimum (2 layers x 0.01 x 1, plus the z-loss's 2 x 0.001 x ln(4)^2 ~ 0.004 at small logits)."""
    model = tiny_moe_lm(z_loss_coef=1e-3)
    stream = torch.tensor([3, 17, 5, 9, 22, 1, 30] * 40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        starts = torch.randint(0, len(stream) - 33, (8,), generator=g)
        batch = torch.stack([stream[s:s + 33] for s in starts])
        loss, metrics = task_loss(model, (batch[:, :-1], batch[:, 1:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    assert 0.02 <= metrics["aux_loss"].item() < 0.035


def test_kv_cache_decoding_equals_full_recompute():
    model = tiny_moe_lm(n_shared=1, capacity_factor=1.0).eval()
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(idx)
    cache = model.make_cache(2, 16)
    steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_task_loss_adds_the_aux_loss_and_reports_expert_metrics():
    model = tiny_moe_lm(capacity_factor=1.0).train()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    loss, metrics = task_loss(model, (x, y))
    ce = F.cross_entropy(model(x).view(-1, 32), y.reshape(-1))  # the same weights, training mode
    torch.testing.assert_close(loss, ce + model.aux_loss())
    n = model.cfg.moe["n_experts"]
    assert set(metrics) == {"aux_loss", "expert_load_max", "dropped_share", *(f"expert_share_{j}" for j in range(n))}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert metrics["expert_load_max"].item() >= 1.0 and 0.0 <= metrics["dropped_share"].item() < 1.0
    model.eval()
    loss, metrics = task_loss(model, (x, y))
    torch.testing.assert_close(loss, F.cross_entropy(model(x).view(-1, 32), y.reshape(-1)))
    assert "aux_loss" not in metrics
    dense = DecoderLM(ModelConfig.from_preset("tiny"))
    assert task_loss(dense, (x, y))[1] == {}


def test_training_logs_expert_metrics_to_metrics_jsonl(tmp_path):
    from llmkit.training.config import TrainConfig
    from llmkit.training.loop import train

    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), preset="tiny", context_length=16,
                      model={"moe": {"n_experts": 4, "top_k": 2, "capacity_factor": 1.25}}, batch_size=4,
                      max_steps=4, log_every=2, eval_every=0, eval_batches=1, ckpt_every=0, warmup_steps=0,
                      device="cpu", dtype="fp32", progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("event") == "train"]
    assert logged and all({"aux_loss", "expert_load_max", "dropped_share"} <= r.keys() for r in logged)
    assert all(r["aux_loss"] > 0 and r["expert_load_max"] >= 1.0 for r in logged)
    for r in logged:  # each expert's share of the assignments: the per-expert token counts, normalised
        shares = [v for k, v in r.items() if k.startswith("expert_share_")]
        assert len(shares) == 4 and abs(sum(shares) - 1.0) < 1e-4, r
