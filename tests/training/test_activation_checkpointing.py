"""Activation checkpointing per block (llmkit.training.activation_checkpointing): the loss and every
gradient equal without it (decoder with dropout, MoE and Mixture-of-Depths, encoder, T5's two
stacks, ViT, CLIP, LoRA, prefix and prompt tuning), names unchanged, eval / no-grad / KV-cache forwards not
recomputed, measured tensor memory lower, and FSDP2 and DDP over checkpointed blocks in two
processes equal to one process (this file is also the torchrun worker: `python
test_activation_checkpointing.py parallel OUT.json`)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.training.activation_checkpointing import (
    apply_activation_checkpointing, is_checkpointed, layer_stacks, remove_activation_checkpointing,
)

CFG = dict(vocab_size=48, context_length=16, n_layers=3, d_model=32, n_heads=4, dropout=0.0)
ATOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared machine


def tiny_decoder(seed: int = 0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(**{**CFG, **kw})).train()


def tokens(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (rows, CFG["context_length"] + 1),
                         generator=torch.Generator().manual_seed(seed))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    aux = model.aux_loss() if hasattr(model, "aux_loss") else None
    return loss if aux is None else loss + aux


def loss_and_grads(model: nn.Module, loss_fn, seed: int = 7) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward from the same RNG state (dropout draws alike on both sides)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(model: nn.Module, loss_fn, expected_blocks: int) -> None:
    """`model` and a checkpointed copy give the same loss and every gradient (to ATOL), and the
    copy recomputes: each block's forward runs twice per step."""
    plain = copy.deepcopy(model)
    assert apply_activation_checkpointing(model) == expected_blocks
    ref_loss, ref_grads = loss_and_grads(plain, loss_fn)
    loss, grads = loss_and_grads(model, loss_fn)
    assert loss == pytest.approx(ref_loss, abs=ATOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=0, msg=name)
    calls = count_block_calls(model)  # after the comparison: a hook makes the fast paths step aside
    loss_and_grads(model, loss_fn)
    assert calls == [2] * expected_blocks  # forward, then the recomputation in backward


def count_block_calls(model: nn.Module) -> list[int]:
    """Per block, a live count of its forward's runs: a hook on its first child fires in the
    forward and again in each recomputation (a hook on the block would not: the recomputation
    calls its forward, not the module). The hooked modules run the reference code (fast paths
    step aside for hooks)."""
    counts: list[int] = []
    for _, stack in layer_stacks(model):
        for block in stack:
            i = len(counts)
            counts.append(0)
            first = next(block.children())

            def hook(*_, i=i):
                counts[i] += 1
            first.register_forward_hook(hook)
    return counts


# --- the same numbers ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"dropout": 0.1}, {"block": "post_norm", "dropout": 0.2},
                                {"moe": {"n_experts": 4, "top_k": 2}, "d_ff": 32},
                                {"mod": {"capacity": 0.5, "every": 2}}],
                         ids=["plain", "dropout", "post-norm-dropout", "moe", "mixture-of-depths"])
def test_decoder_loss_and_every_gradient_equal_with_and_without_checkpointing(kw):
    batch = tokens()
    assert_same_training_step(tiny_decoder(**kw), lambda m: lm_loss(m, batch), CFG["n_layers"])


def test_encoder_with_padding_and_dropout_gives_equal_loss_and_gradients():
    from llmkit.models.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=48, context_length=16, n_layers=2, d_model=32, n_heads=4, d_ff=48,
                                  head="masked-lm", dropout=0.1)).train()
    ids = torch.randint(2, 48, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    assert_same_training_step(model, lambda m: F.cross_entropy(m(ids, mask).flatten(0, 1), ids.flatten()), 2)


def test_encoder_decoder_checkpoints_both_stacks_with_equal_gradients():
    from llmkit.models.encoder_decoder import T5Config, T5Model

    torch.manual_seed(0)
    model = T5Model(T5Config(vocab_size=48, context_length=16, n_layers=2, n_decoder_layers=3, d_model=32,
                             n_heads=4, head_dim=8, d_ff=48, dropout=0.1)).train()
    src, tgt = tokens(2, seed=3)[:, :10], tokens(2, seed=4)[:, :8]

    def loss(m):
        return F.cross_entropy(m(src, labels=tgt).flatten(0, 1), tgt.flatten())
    assert_same_training_step(model, loss, 5)


def test_vit_and_clip_towers_give_equal_gradients():
    from llmkit.models.clip import CLIPConfig, CLIPModel
    from llmkit.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    vit = ViT(ViTConfig(n_layers=2, d_model=32, n_heads=4, d_ff=48, image_size=16, patch_size=8, num_labels=3,
                        dropout=0.1)).train()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert_same_training_step(vit, lambda m: F.cross_entropy(m(pixels), torch.tensor([0, 2])), 2)

    torch.manual_seed(0)
    tower = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48)
    clip = CLIPModel(CLIPConfig(text={**tower, "vocab_size": 48, "context_length": 8, "eos_token_id": 47},
                                vision={**tower, "image_size": 16, "patch_size": 8}, projection_dim=16)).train()
    ids = torch.randint(0, 47, (2, 8), generator=torch.Generator().manual_seed(6))
    ids[:, -1] = 47

    def contrastive(m):
        per_image, per_text = m(ids, pixels)
        labels = torch.arange(2)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    assert_same_training_step(clip, contrastive, 4)


def test_lora_wrapped_decoder_gives_equal_adapter_gradients():
    from llmkit.peft import get_method

    model = get_method("lora")({"rank": 4, "target_modules": "q,k,v,proj,up,down", "adapter_dropout": 0.1}).apply(
        tiny_decoder(dropout=0.1))
    with torch.no_grad():  # B is zero at init: noise makes the adapters' path matter
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    batch = tokens()
    assert_same_training_step(model, lambda m: lm_loss(m, batch), CFG["n_layers"])
    _, grads = loss_and_grads(model, lambda m: lm_loss(m, batch))
    assert grads and all("lora_" in name for name in grads)  # the base stays frozen


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuned_wrappers_are_checkpointed_with_equal_gradients(method):
    from llmkit.peft import get_method

    model = get_method(method)({"virtual_tokens": 3}).apply(tiny_decoder(dropout=0.1))
    batch = tokens()[:, :12]
    # prefix tuning passes its PrefixCache (which stores nothing) to every block: still recomputed
    assert_same_training_step(model, lambda m: lm_loss(m, batch), CFG["n_layers"])


# --- what stays the same -------------------------------------------------------------------------

def test_state_dict_keys_and_module_names_are_unchanged_and_load_both_ways():
    plain, model = tiny_decoder(), tiny_decoder()
    names = list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    apply_activation_checkpointing(model)
    assert list(model.state_dict()) == names and [n for n, _ in model.named_modules()] == modules
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


def test_eval_and_generation_outputs_are_unchanged():
    plain, model = tiny_decoder(dropout=0.1).eval(), tiny_decoder(dropout=0.1).eval()
    apply_activation_checkpointing(model)
    idx = tokens()[:, :8]
    torch.testing.assert_close(model(idx), plain(idx), atol=0, rtol=0)  # eval, grad on
    plain_cache, cache = plain.make_cache(1, 16), model.make_cache(1, 16)
    with torch.no_grad():  # generation: prefill, then one token at a time through the KV cache
        torch.testing.assert_close(model(idx[:1], cache), plain(idx[:1], plain_cache), atol=0, rtol=0)
        for t in range(3):
            step = idx[:1, t:t + 1]
            # the native one-token step steps aside for a block with its own forward: reference code, same numbers
            torch.testing.assert_close(model(step, cache), plain(step, plain_cache), atol=1e-6, rtol=1e-5)
    assert cache.pos == plain_cache.pos == 11


def test_eval_no_grad_and_kv_cache_forwards_are_not_recomputed(monkeypatch):
    from llmkit.training import activation_checkpointing as ac

    checkpointed = []
    def counting(*args, **kwargs):
        checkpointed.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)
    monkeypatch.setattr(ac, "checkpoint", counting)
    model = tiny_decoder(dropout=0.1)
    apply_activation_checkpointing(model)
    calls = count_block_calls(model)
    idx = tokens()[:, :8]
    model.train()(idx).sum().backward()
    assert calls == [2] * 3  # the training step: forward, then recomputed in backward
    model.eval()(idx).sum().backward()  # eval with grad on (saliency maps): stored, not recomputed
    assert calls == [3] * 3
    with torch.no_grad():
        model.train()(idx)
    assert calls == [4] * 3
    assert len(checkpointed) == 3  # the training step's three blocks only
    cache = model.make_cache(4, 16)  # grad on, training, a cache that stores keys: a recomputation would write twice
    model(idx, cache)
    assert len(checkpointed) == 3 and calls == [5] * 3 and cache.pos == 8


def test_applying_twice_deepcopy_and_remove():
    model = tiny_decoder()
    assert apply_activation_checkpointing(model) == 3
    assert apply_activation_checkpointing(model) == 3  # idempotent: no nested recomputation
    twin = copy.deepcopy(model)
    assert all(is_checkpointed(b) for b in twin.blocks)
    assert all(b.forward.__self__ is b for b in twin.blocks)  # bound to the copy, not the original
    assert remove_activation_checkpointing(model) == 3
    assert not any(is_checkpointed(b) for b in model.blocks) and "forward" not in vars(model.blocks[0])


def test_a_model_without_layer_stacks_is_a_user_error():
    with pytest.raises(UserError, match="no layer stack"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(4, 4)))


# --- memory --------------------------------------------------------------------------------------

def peak_tensor_bytes(model: nn.Module, batch: torch.Tensor) -> dict[str, int]:
    """Peak live tensor bytes over one forward and backward, by torch's MemTracker (a
    TorchDispatchMode that sees every storage an op allocates): the total and the activations."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        lm_loss(model, batch).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_kind = {getattr(kind, "value", kind): n for kind, n in peak.items()}  # "Total", "Activation", ...
    return {"total": by_kind["Total"], "activations": by_kind["Activation"]}


def test_peak_tensor_memory_is_measured_lower_with_checkpointing():
    cfg = dict(n_layers=4, d_model=64, context_length=128, dropout=0.0)
    batch = torch.randint(0, CFG["vocab_size"], (4, 129), generator=torch.Generator().manual_seed(0))
    without = peak_tensor_bytes(tiny_decoder(**cfg), batch)
    model = tiny_decoder(**cfg)
    apply_activation_checkpointing(model)
    with_ac = peak_tensor_bytes(model, batch)
    # measured 12.8 MB -> 2.6 MB of activations, 14.3 -> 5.5 MB in all: only the 4 blocks' inputs stay,
    # plus one block's activations while it is differentiated
    assert with_ac["activations"] < 0.35 * without["activations"]
    assert with_ac["total"] < 0.5 * without["total"]
    block_input = 4 * 128 * 64 * 4  # [B, T, d] float32
    assert with_ac["activations"] > 4 * block_input  # the kept inputs are counted: the tracker sees them


# --- FSDP2 and DDP over checkpointed blocks ----------------------------------------------------------

def _parallel_worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_decoder(tie_embeddings=False)
    names = list(model.state_dict())
    n = apply_activation_checkpointing(model)  # first checkpointing, then sharding, as the loop does
    calls = count_block_calls(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    rows = tokens(4).chunk(world)[rank]
    loss = lm_loss(model, rows)
    loss.backward()
    grads = {name: p.grad.full_tensor().tolist() for name, p in model.named_parameters()}
    total = loss.detach().clone()
    dist.all_reduce(total)
    result = {"loss": total.item() / world, "grads": grads, "blocks": n, "calls": calls,
              "names_unchanged": list(model.state_dict()) == names,
              "checkpointed": all(is_checkpointed(b) for b in model.blocks)}
    # DDP over checkpointed blocks: its gradient hooks fire during the recomputing backward
    plain = tiny_decoder(tie_embeddings=False)
    apply_activation_checkpointing(plain)
    ddp = nn.parallel.DistributedDataParallel(plain)
    loss = F.cross_entropy(ddp(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    result["ddp_grads"] = {name: p.grad.tolist() for name, p in ddp.module.named_parameters()}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps({str(r): g for r, g in enumerate(gathered)}))
    dist.destroy_process_group()


def _torchrun(out: Path, port: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, "parallel", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # two processes: about 25 s on a loaded 2-core machine
def test_fsdp2_and_ddp_over_checkpointed_blocks_equal_the_single_process_step(tmp_path):
    got = _torchrun(tmp_path / "parallel.json", 29650)
    model = tiny_decoder(tie_embeddings=False)
    loss = lm_loss(model, tokens(4))  # the two ranks' halves together: FSDP and DDP average their gradients
    loss.backward()
    for rank in ("0", "1"):
        r = got[rank]
        assert r["blocks"] == 3 and r["checkpointed"] and r["names_unchanged"]
        assert r["calls"] == [2] * 3  # recomputed in backward under FSDP2 too
        assert r["loss"] == pytest.approx(loss.item(), abs=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.tensor(r["grads"][name]), p.grad, atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(torch.tensor(r["ddp_grads"][name]), p.grad, atol=1e-6, rtol=1e-5,
                                       msg=f"ddp {name}")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "parallel":
    _parallel_worker(sys.argv[2])
