"""Per-layer gradient norms (llmkit.training.grad_norms): a hand computation in one process, and
under FSDP2 and tensor parallelism in two (this file is also their torchrun worker: `python
test_grad_norms.py OUT.json`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM
from llmkit.training.grad_norms import flag_layers, layer_grad_norms, layer_group, plot_grad_norms, total_norm

CFG = dict(vocab_size=48, context_length=16, n_layers=3, d_model=32, n_heads=4, dropout=0.0)


def tiny_model(seed: int = 0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(**{**CFG, **kw}))


def batch(seed: int = 1, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (rows, CFG["context_length"] + 1),
                         generator=torch.Generator().manual_seed(seed))


def backward(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()


def test_layer_groups_follow_the_first_name_components_and_strip_wrappers():
    assert layer_group("tok_emb.weight") == "embeddings"
    assert layer_group("pos.weight") == "embeddings"
    assert layer_group("blocks.11.attn.qkv.weight") == "blocks.11"
    assert layer_group("norm.bias") == "norm"
    assert layer_group("lm_head.weight") == "head"
    assert layer_group("module._orig_mod.blocks.0.mlp.up.weight") == "blocks.0"  # DDP over torch.compile
    assert layer_group("base_model.model.blocks.2.attn.qkv.lora_A.weight") == "blocks.2"  # HF peft style
    assert layer_group("base_model.blocks.1.norm1.weight") == "blocks.1"  # llmkit's prompt-tuning wrapper
    assert layer_group("prompt") == "prompt"
    assert layer_group("encoder.2.attn.qkv.weight") == "encoder.2"  # T5
    assert layer_group("vision.blocks.0.mlp.up.weight") == "vision.blocks.0"  # CLIP's towers
    assert layer_group("vision.patch.proj.weight") == "vision"


def test_single_process_norms_equal_a_hand_computation_and_total_equals_get_total_norm():
    model = tiny_model(tie_embeddings=False)
    backward(model, batch())
    norms = layer_grad_norms(model)
    assert list(norms) == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "norm", "head"]
    by_hand = {
        "embeddings": torch.cat([model.tok_emb.weight.grad.flatten(), model.pos.weight.grad.flatten()]).norm(),
        **{f"blocks.{i}": torch.cat([p.grad.flatten() for p in b.parameters()]).norm() for i, b in enumerate(model.blocks)},
        "norm": torch.cat([model.norm.weight.grad, model.norm.bias.grad]).norm(),
        "head": model.lm_head.weight.grad.norm(),
    }
    for layer, value in by_hand.items():
        assert norms[layer] == pytest.approx(value.item(), rel=1e-6), layer
    reference = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert total_norm(norms) == pytest.approx(reference, rel=1e-6)


def test_tied_head_counts_once_and_frozen_layers_are_left_out():
    model = tiny_model()  # lm_head.weight is tok_emb.weight: one parameter, named by the embedding
    model.blocks[1].requires_grad_(False)
    backward(model, batch())
    norms = layer_grad_norms(model)
    assert "head" not in norms and "blocks.1" not in norms
    reference = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
    assert total_norm(norms) == pytest.approx(reference, rel=1e-6)


def test_no_gradients_give_no_norms():
    assert layer_grad_norms(tiny_model()) == {}


def test_flag_layers_names_vanishing_exploding_and_non_finite_layers():
    base = {f"blocks.{i}": 1.0 + 0.1 * i for i in range(6)}
    assert flag_layers(base) == []
    flagged = flag_layers({**base, "blocks.2": 1e-9, "head": 5e3, "norm": float("nan")})
    assert len(flagged) == 3
    assert any(w.startswith("blocks.2: vanishing") for w in flagged)
    assert any(w.startswith("head: exploding") for w in flagged)
    assert any(w.startswith("norm:") and "nan" in w for w in flagged)
    # the bounds are relative to the median: just inside them nothing is flagged
    median = sorted(base.values())[3]  # of 7 values with the two below
    assert flag_layers({**base, "a": 2e-7 * median}) == []
    assert flag_layers({**base, "b": 9e2 * median}) == []
    assert "median layer gradient norm is 0" in flag_layers({"a": 0.0, "b": 0.0, "c": 1.0})[0]


def test_plot_grad_norms_writes_a_png_from_the_train_records(tmp_path):
    lines = [{"event": "start", "step": 0}]
    lines += [{"event": "train", "step": s, "loss": 1.0, "grad_norms": {"embeddings": 0.1 * s, "blocks.0": 1.0 / s}}
              for s in range(1, 6)]
    lines += [{"event": "train", "step": 6, "loss": 1.0}]  # a record without norms is skipped
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_grad_norms(path, tmp_path / "grad_norms.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
    path.write_text(json.dumps({"event": "train", "step": 1, "loss": 1.0}) + "\n")
    assert plot_grad_norms(path, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    """One torchrun of two ranks: the norms under FSDP2 and under tensor parallelism, per rank."""
    out = tmp_path_factory.mktemp("grad_norms") / "norms.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29720",
           __file__, str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_fsdp2_sharded_norms_equal_the_single_process_ones_with_one_collective(sharded):
    model = tiny_model(tie_embeddings=False)
    backward(model, batch(rows=4))  # the two ranks' halves together: FSDP averages their gradients
    reference = layer_grad_norms(model)
    for rank in ("0", "1"):  # every rank gets the same numbers
        got = sharded["fsdp"][rank]
        assert got["norms"].keys() == reference.keys()
        for layer in reference:
            assert got["norms"][layer] == pytest.approx(reference[layer], abs=1e-5, rel=1e-5), layer
        assert total_norm(got["norms"]) == pytest.approx(got["get_total_norm"], rel=1e-5)
        assert got["sharded"] and got["all_reduces"] == 1  # every grad is (mesh, Shard(0)): one collective


def test_tensor_parallel_norms_equal_the_single_process_ones(sharded):
    model = tiny_model(tie_embeddings=False)
    backward(model, batch(rows=4))  # tensor parallel ranks all see the whole batch
    reference = layer_grad_norms(model)
    for rank in ("0", "1"):
        got = sharded["tp"][rank]
        assert got["norms"].keys() == reference.keys()
        for layer in reference:
            assert got["norms"][layer] == pytest.approx(reference[layer], abs=1e-5, rel=1e-5), layer
        # Shard(0) (colwise up) and Shard(1) (rowwise down) share one collective; plain tensors need none
        assert got["sharded"] and got["all_reduces"] == 1
        assert total_norm(got["norms"]) == pytest.approx(got["get_total_norm"], rel=1e-5)


def _sharded_norms(mode: str, mesh, rank: int) -> dict:
    """This rank's norms of the tiny model sharded by `mode` (FSDP2 per block + root, or
    tensor-parallel MLPs) after a backward pass on its part of the batch."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    model = tiny_model(tie_embeddings=False)
    tokens = batch(rows=4)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        tokens = tokens[2 * rank:2 * rank + 2]
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        for block in model.blocks:
            parallelize_module(block.mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    backward(model, tokens)
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    norms = layer_grad_norms(model)
    dist.all_reduce = real
    grads = [p.grad for p in model.parameters()]
    if all(isinstance(g, DTensor) for g in grads):  # FSDP2: torch's own norm of DTensor gradients
        total = torch.nn.utils.get_total_norm(grads).full_tensor()
    else:  # get_total_norm refuses a mix of DTensors and tensors: the full gradients then
        total = torch.nn.utils.get_total_norm([g.full_tensor() if isinstance(g, DTensor) else g for g in grads])
    return {"norms": norms, "all_reduces": len(calls), "get_total_norm": total.item(),
            "sharded": any(isinstance(g, DTensor) for g in grads)}


def _worker(out: str) -> None:
    """One rank of the `sharded` fixture: both modes' norms, gathered and written by rank 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    result = {}
    for mode in ("fsdp", "tp"):
        everyone = [None, None]
        dist.all_gather_object(everyone, _sharded_norms(mode, mesh, rank))
        result[mode] = {str(r): v for r, v in enumerate(everyone)}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
