"""torchrun worker for tests/training/test_tensor_parallel.py: for each named case, a tensor-parallel
DecoderLM (llmkit.training.tensor_parallel) against the same model in one process, same weights and
inputs. Rank 0 prints one line per case: `RESULT <case> <json of max abs differences>`. Cases
`state_dict_*` check the canonical checkpoint layout, `dropout*` that equally seeded ranks agree.

    python -m torch.distributed.run --nproc_per_node 2 tp_worker.py gpt2 llama_sp ...
    python -m torch.distributed.run --nproc_per_node 4 tp_worker.py fsdp_tp_llama   (2 x 2: dp x tp)
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM
from llmkit.nn import seams
from llmkit.training import optim as llmkit_optim
from llmkit.training.tensor_parallel import apply_tensor_parallel, canonical, clip_grad_norm_, fused_params

BASE = dict(vocab_size=64, context_length=16, n_layers=2, d_model=32, n_heads=4)
MODELS = {
    "gpt2": dict(mlp="gelu", position="learned", norm="layernorm", bias=True, tie_embeddings=True),
    "llama": dict(mlp="swiglu", position="rope", norm="rmsnorm", bias=False, tie_embeddings=False),
    "gqa": dict(mlp="swiglu", position="rope", norm="rmsnorm", bias=False, tie_embeddings=False, n_kv_heads=2),
    # Qwen-like extras: qkv bias, per-head query-key norm, output gate, a parallel block, a window
    "variants": dict(mlp="geglu", position="rope", norm="rmsnorm", bias=False, qkv_bias=True, qk_norm="head",
                     attn_gate=True, block="parallel", sliding_window=4, n_kv_heads=2),
    "post_norm": dict(mlp="gelu", position="learned", norm="layernorm", block="post_norm", embedding_norm=True),
}
B, T, STEPS = 2, 8, 3


def cases() -> dict[str, dict]:
    out = {}
    for name, kw in MODELS.items():
        out[name] = dict(model=kw, sp=False, fsdp=False)
        out[f"{name}_sp"] = dict(model=kw, sp=True, fsdp=False)
    out["gqa_sp"]["T"] = 7  # a sequence 2 ranks split unevenly (4 + 3 positions)
    # llmkit's AdamW (its native step must leave DTensors to torch) with its default (foreach) settings
    out["variants_sp"]["opt"] = "llmkit"
    for name in ("llama", "gpt2"):
        out[f"fsdp_tp_{name}"] = dict(model=MODELS[name], sp=False, fsdp=True)
        out[f"fsdp_tp_{name}_sp"] = dict(model=MODELS[name], sp=True, fsdp=True)
    return out


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def canonical_params(model, attr: str | None = None) -> dict[str, torch.Tensor]:
    """Each parameter (or its .grad) as the whole tensor in the single-process layout."""
    fused = fused_params(model)
    tp = model._tp_mesh.size()
    out = {}
    for name, p in model.named_parameters():
        t = full(p if attr is None else getattr(p, attr)).detach()
        out[name] = canonical(t, fused[name], tp) if name in fused else t
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def without_key_bias(model, *params: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The parameters less the keys' rows of each qkv bias: their true gradient is 0 (a shift of all
    of a query's scores by q.b_k leaves the softmax unchanged), so AdamW scales rounding noise up to
    steps of size lr there, in either process."""
    fused = fused_params(model)
    out = []
    for p in params:
        p = dict(p)
        for name, (q, k, v) in fused.items():
            if name.endswith("bias"):
                p[name] = torch.cat([p[name][:q], p[name][q + k:]])
        out.append(p)
    return out


class FastPathLog:
    """Wraps every registered fast path's run to record the ones that ran with a DTensor weight."""

    def __init__(self):
        self.ran_on_dtensor: list[str] = []
        self.ran: list[str] = []

    def _wrap(self, path: seams.FastPath) -> seams.FastPath:
        def run(*args, **kwargs):
            y = path.run(*args, **kwargs)
            if y is not None:
                self.ran.append(path.name)
                tensors = [t for a in (*args, *kwargs.values()) for t in
                           (list(a.parameters()) if isinstance(a, torch.nn.Module) else [a])]
                if any(isinstance(t, DTensor) for t in tensors):
                    self.ran_on_dtensor.append(path.name)
            return y
        return seams.FastPath(path.name, run, path.implements)

    def install(self) -> None:
        for reg in (seams.SUBLAYERS, seams.HEADS):
            for k, p in list(reg.items()):
                reg[k] = self._wrap(p)
        seams.ATTENTION_CORES[:] = [self._wrap(p) for p in seams.ATTENTION_CORES]


def run_case(name: str, spec: dict, log: FastPathLog) -> dict:
    world = dist.get_world_size()
    if spec["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        mesh2 = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_rank, dp_size = mesh2["tp"], mesh2["dp"].get_local_rank(), mesh2["dp"].size()
    else:
        tp_mesh, dp_rank, dp_size = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), 0, 1
    torch.manual_seed(0)
    ref = DecoderLM(ModelConfig(**BASE, **spec["model"]))
    model = copy.deepcopy(ref)  # the same weights (deepcopy keeps a tied head tied)
    init = {k: p.detach().clone() for k, p in ref.named_parameters()}
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=spec["sp"])
    if spec["fsdp"]:
        for block in model.blocks:
            fully_shard(block, mesh=mesh2["dp"])
        fully_shard(model, mesh=mesh2["dp"])
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, BASE["vocab_size"], (dp_size * B, spec.get("T", T) + 1), generator=gen)
    mine = idx[dp_rank * B:(dp_rank + 1) * B]  # this data-parallel rank's rows; the reference sees all
    if spec.get("opt") == "llmkit":
        opt_ref = llmkit_optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        opt = llmkit_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    out = {"logits": 0.0, "loss": 0.0, "grad": 0.0}
    for step in range(STEPS):
        logits_ref = ref(idx[:, :-1])
        loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), idx[:, 1:].flatten())
        logits = model(mine[:, :-1])
        assert type(logits) is torch.Tensor, type(logits)  # plain, whole logits on every rank
        loss = F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
        loss_ref.backward()
        loss.backward()
        mean_loss = loss.detach().clone()
        if spec["fsdp"]:
            dist.all_reduce(mean_loss, group=mesh2["dp"].get_group())
            mean_loss /= dp_size
        if step == 0:
            out["logits"] = (logits - logits_ref[dp_rank * B:(dp_rank + 1) * B]).abs().max().item()
            out["loss"] = (mean_loss - loss_ref).abs().item()
            grads_ref = {k: p.grad for k, p in ref.named_parameters()}
            out["grad"] = max_diff(canonical_params(model, "grad"), grads_ref)
            out["grad_scale"] = max(g.abs().max().item() for g in grads_ref.values())
            # clipping to half the norm: the same norm and the same clipped gradients
            norm_ref = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5 * norm_ref.item())
            norm = clip_grad_norm_(model.parameters(), 0.5 * norm_ref.item())
            assert type(norm) is torch.Tensor and norm.dim() == 0
            out["clip_norm"] = (norm - norm_ref).abs().item() / norm_ref.item()
            out["clipped_grad"] = max_diff(canonical_params(model, "grad"), grads_ref)
            out["grad_placements_partial"] = sorted(
                n for n, p in model.named_parameters()
                if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements))
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    ref_params = {k: p.detach() for k, p in ref.named_parameters()}
    after = canonical_params(model)
    out["params_after_steps"] = max_diff(*without_key_bias(model, after, ref_params))
    out["moved"] = max_diff(ref_params, init)  # the steps changed the weights (so the comparison means something)
    out["local_heads"] = [model.blocks[0].attn.n_heads, model.blocks[0].attn.n_kv_heads]
    out["fast_paths_on_dtensor"] = sorted(set(log.ran_on_dtensor))
    out["fast_paths_ran"] = sorted(set(log.ran))
    # every tensor-parallel rank holds the same logits (no rank computes a different answer)
    gathered = [torch.empty_like(logits) for _ in range(tp_mesh.size())]
    dist.all_gather(gathered, logits.detach().contiguous(), group=tp_mesh.get_group())
    out["tp_ranks_agree"] = max((g - gathered[0]).abs().max().item() for g in gathered)
    log.ran.clear()
    log.ran_on_dtensor.clear()
    return out


def state_dict_case(name: str) -> dict:
    """The checkpoint path the lead's code takes: a TP model's full state dict, with `canonical` on
    the fused parameters, is the single-process state dict; a single-process state dict with
    `shard_major` on them loads into a TP model (of other weights) that then computes the same."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from llmkit.training.tensor_parallel import shard_major

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    cfg = ModelConfig(**BASE, **MODELS["gqa" if "gqa" in name else "gpt2"])
    torch.manual_seed(0)
    ref = DecoderLM(cfg)
    saved = apply_tensor_parallel(copy.deepcopy(ref), mesh, sequence_parallel=True)
    full_opts = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(saved, options=full_opts)
    fused, tp = fused_params(saved), mesh.size()
    state = {k: canonical(v, fused[k], tp) if k in fused else v for k, v in state.items()}
    out = {"saved_vs_ref": max_diff(state, ref.state_dict())}
    torch.manual_seed(123)
    other = apply_tensor_parallel(DecoderLM(cfg), mesh, sequence_parallel=False)
    layout = {k: shard_major(v, fused[k], tp) if k in fused else v for k, v in ref.state_dict().items()}
    set_model_state_dict(other, layout, options=full_opts)
    idx = torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(2))
    out["loaded_logits"] = (other(idx) - ref(idx)).abs().max().item()
    return out


def dropout_case(name: str) -> dict:
    """With dropout on and the same seed on every tensor-parallel rank (what the plan needs), the
    ranks' logits agree: no rank's replicated activations drift from the others'."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = apply_tensor_parallel(DecoderLM(ModelConfig(**BASE, **MODELS["gpt2"], dropout=0.2)), mesh,
                                  sequence_parallel=name.endswith("_sp"))
    idx = torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)  # the same on every rank
    logits = model.train()(idx)
    F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    gathered = [torch.empty_like(logits) for _ in range(mesh.size())]
    dist.all_gather(gathered, logits.detach().contiguous())
    with torch.no_grad():
        plain = model.eval()(idx)
    return {"tp_ranks_agree": max((g - gathered[0]).abs().max().item() for g in gathered),
            "dropout_changed": (logits - plain).abs().max().item()}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    log = FastPathLog()
    log.install()
    all_cases = cases()
    for name in sys.argv[1:]:
        if name.startswith("state_dict"):
            result = state_dict_case(name)
        elif name.startswith("dropout"):
            result = dropout_case(name)
        else:
            result = run_case(name, all_cases[name], log)
        # the worst difference over ranks
        worst = {}
        for k, v in result.items():
            if isinstance(v, float):
                t = torch.tensor(v, dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                worst[k] = t.item()
            else:
                worst[k] = v
        if dist.get_rank() == 0:
            print("RESULT", name, json.dumps(worst), flush=True)
    dist.barrier()  # no rank tears its group down while another still uses it (gloo aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
