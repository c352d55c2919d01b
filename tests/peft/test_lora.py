"""LoRA (llmkit.peft.lora): init leaves outputs alone, merge equals unmerged, trainable counts,
adapters move both ways between llmkit and peft with equal logits (Llama q/v and all-linear, GPT-2's
fused Conv1D c_attn), a tiny training loop learns, and the fast paths step aside for the wrapper."""
from __future__ import annotations

import pytest
import torch

from peft_helpers import logits, max_diff
from llmkit.errors import UserError
from llmkit.nn.linear import Linear
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.lora import LoRALinear, block_rows, lora_scale

peft = pytest.importorskip("peft")

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared machine


def lora(**opts):
    return get_method("lora")(opts)


def randomize(model: torch.nn.Module, key: str = "lora_B", seed: int = 0, std: float = 0.5) -> None:
    """Every parameter whose name holds `key` set to seeded noise (B is zero at init: an adapter
    that does nothing would pass a parity test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_fixture_models_agree(llama_pair, gpt2_pair, ids):
    for pair in (llama_pair, gpt2_pair):
        assert max_diff(logits(pair.ours, ids), logits(pair.hf, ids)) < TOL


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_leaves_outputs_exactly_unchanged(llama_pair, ids, init):
    before = logits(llama_pair.ours, ids)
    model = lora(rank=4, lora_init=init).apply(llama_pair.ours)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert torch.equal(logits(model, ids), before)
    assert all(a.abs().sum() > 0 for a in model.blocks[0].attn.qkv.lora_A)  # A is not zero: B alone is


def test_pissa_init_keeps_outputs_and_moves_principal_part_into_the_adapter(llama_pair, ids):
    before = logits(llama_pair.ours, ids)
    w = llama_pair.ours.blocks[0].attn.qkv.weight.detach().clone()
    model = lora(rank=4, alpha=8.0, lora_init="pissa").apply(llama_pair.ours)
    layer = model.blocks[0].attn.qkv
    assert max_diff(logits(model, ids), before) < TOL
    # B A is the best rank-4 approximation of the q rows: the residual lost exactly the top 4 singular values
    sv = torch.linalg.svdvals(w[:64])
    assert torch.allclose(torch.linalg.svdvals(layer.base.weight[:64]), torch.cat([sv[4:], sv.new_zeros(4)]),
                          atol=1e-5)
    assert torch.equal(layer.base.weight[64:96], w[64:96])  # k is not adapted: untouched


def test_trainable_count_is_rank_times_in_plus_out_per_target(llama_pair):
    r = 4
    model = lora(rank=r, target_modules="q,v,down").apply(llama_pair.ours)
    d, q_rows, v_rows, ff = 64, 4 * 16, 2 * 16, 96
    per_layer = r * (d + q_rows) + r * (d + v_rows) + r * (ff + d)
    assert count_parameters(model)[0] == 2 * per_layer


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert lora_scale(16, 4) == 4.0
    assert lora_scale(16, 4, rslora=True) == 8.0


def test_block_rows_places_each_slice_in_its_rows_and_columns():
    b0, b1 = torch.ones(2, 3), 2 * torch.ones(1, 3)
    block = block_rows([b0, b1], [(0, 2), (3, 4)], 5)
    want = torch.zeros(5, 6)
    want[0:2, 0:3], want[3:4, 3:6] = 1, 2
    assert torch.equal(block, want)


def test_merge_equals_unmerged_and_unmerge_restores(llama_pair, ids):
    w0 = llama_pair.ours.blocks[1].attn.qkv.weight.detach().clone()
    torch.manual_seed(0)  # A's Kaiming init draws from the global generator
    method = lora(rank=4, target_modules="all-linear", rslora=True)
    model = method.apply(llama_pair.ours)
    randomize(model)
    unmerged = logits(model, ids)
    merged_model = method.merge(model)
    assert type(merged_model.blocks[1].attn.qkv) is Linear and type(merged_model.blocks[1].mlp.down) is Linear
    scale = max(1.0, unmerged.abs().max().item())  # fp32 rounding of W + sBA grows with the logits' size
    assert max_diff(logits(merged_model, ids), unmerged) < TOL * scale
    with pytest.raises(UserError, match="unmerge first"):
        method.adapter_tensors(merged_model)
    model = method.unmerge(merged_model)
    assert isinstance(model.blocks[1].attn.qkv, LoRALinear)
    assert max_diff(model.blocks[1].attn.qkv.base.weight, w0) < 1e-6
    assert max_diff(logits(model, ids), unmerged) < TOL * scale


def peft_lora(hf, config, seed=0):
    model = peft.get_peft_model(hf, config)
    randomize(model, seed=seed)
    return model.eval()


PEFT_CONFIGS = {
    "q,v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear-rslora": dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"], use_rslora=True),
}


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_adapter_loads_with_equal_logits(llama_pair, ids, tmp_path, name):
    reference = peft_lora(llama_pair.hf, peft.LoraConfig(**PEFT_CONFIGS[name]))
    reference.save_pretrained(tmp_path)
    model, method = files.load_adapter(llama_pair.ours, tmp_path)
    assert method.name == "lora" and method.opts["rank"] == PEFT_CONFIGS[name]["r"]
    assert max_diff(logits(model, ids), logits(reference, ids)) < TOL


@pytest.mark.parametrize("opts", [dict(rank=4, alpha=8.0),
                                  dict(rank=3, alpha=5.0, rslora=True, target_modules="k,o_proj,up")])
def test_llmkit_adapter_loads_in_peft_with_equal_logits(llama_pair, ids, tmp_path, opts):
    method = lora(**opts)
    model = method.apply(llama_pair.ours)
    randomize(model, seed=3)
    files.save_adapter(model, method, tmp_path)
    reference = peft.PeftModel.from_pretrained(llama_pair.hf, tmp_path).eval()
    assert max_diff(logits(reference, ids), logits(model, ids)) < TOL


def test_gpt2_fused_conv1d_adapter_moves_both_ways(gpt2_pair, ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    reference = peft_lora(gpt2_pair.hf, config)
    reference.save_pretrained(tmp_path / "peft")
    model, method = files.load_adapter(gpt2_pair.ours, tmp_path / "peft")
    want = logits(reference, ids)
    assert max_diff(logits(model, ids), want) < TOL
    # and back: llmkit's save of the same adapter into a fresh transformers GPT-2
    files.save_adapter(model, method, tmp_path / "ours")
    import json
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    fresh = type(gpt2_pair.hf).from_pretrained(gpt2_pair.dir, attn_implementation="eager").eval()
    back = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    assert max_diff(logits(back, ids), want) < TOL


def jiggle(model, seed=0):
    """Every trainable parameter moved a little (seeded): a trained adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_pissa_adapter_moves_both_ways_on_the_original_base(llama_pair, ids, tmp_path):
    """A PiSSA adapter file holds A and B only; loading it (here and in peft) rebuilds the residual
    W - s B0 A0 from the original weights (the SVD's top-r part is unique), so the logits agree."""
    method = lora(rank=4, lora_init="pissa")
    model = method.apply(llama_pair.ours)
    jiggle(model)
    files.save_adapter(model, method, tmp_path / "ours")
    reference = peft.PeftModel.from_pretrained(llama_pair.hf, tmp_path / "ours").eval()
    assert max_diff(logits(reference, ids), logits(model, ids)) < TOL
    # and a peft PiSSA adapter on a fresh llmkit copy of the original model
    from llmkit.interop.hf import load_hf
    reference.save_pretrained(tmp_path / "peft")
    ours, method = files.load_adapter(load_hf(llama_pair.dir), tmp_path / "peft")
    assert method.opts["lora_init"] == "pissa"
    assert max_diff(logits(ours, ids), logits(reference, ids)) < TOL


def test_adapter_of_another_rank_is_refused(llama_pair, tmp_path):
    peft_lora(llama_pair.hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    config = files.read_adapter(tmp_path)[0]
    method = lora(**{**get_method("lora").options_from_peft(config), "rank": 2})
    model = method.apply(llama_pair.ours)
    tensors = {files.from_peft_key(k, files.naming_for(model)): v for k, v in files.read_adapter(tmp_path)[1].items()}
    with pytest.raises(UserError, match="shape"):
        method.load_adapter_tensors(model, tensors, "x")


@pytest.mark.parametrize("field, value", [("rank_pattern", {"q_proj": 2}), ("layers_to_transform", [0]),
                                          ("target_modules", ".*q_proj"),
                                          ("init_lora_weights", "olora"), ("bias", "all")])
def test_peft_settings_llmkit_does_not_implement_are_refused(field, value):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
    with pytest.raises(UserError, match=field.split("_")[0]):
        get_method("lora").options_from_peft(config)


def test_bad_options_are_refused(llama_pair):
    with pytest.raises(UserError, match="lora_init"):
        lora(lora_init="svd")
    method = lora()
    method.apply(llama_pair.ours)
    with pytest.raises(UserError, match="already carries adapters"):
        lora().apply(llama_pair.ours)
    with pytest.raises(UserError, match="not merged"):
        method.unmerge(llama_pair.ours)


def test_dropout_acts_in_training_only(llama_pair, ids):
    model = lora(rank=4, adapter_dropout=0.5).apply(llama_pair.ours)
    randomize(model)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))


def test_a_tiny_training_loop_learns_a_fixed_text(llama_pair):
    """Only the adapters train; the cross-entropy on one fixed sequence falls from ~5 to below 1.5."""
    torch.manual_seed(0)
    model = lora(rank=8, alpha=16.0, target_modules="q,v,up,down").apply(llama_pair.ours).train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    base = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 1.5, (losses[0], losses[-1])
    assert all(torch.equal(a, b) for a, b in zip(base, [p for p in model.parameters() if not p.requires_grad]))


def test_fast_paths_step_aside_for_the_wrapper_and_results_match_merged(llama_pair, ids, monkeypatch):
    """With llmkit.accel registered (importing llmkit does it), the training-time fused attention
    serves the merged model's plain Linear but not the LoRA wrapper; the gradients' forward agrees."""
    from llmkit import kernels  # importing llmkit registered the fast paths
    from llmkit.accel import fused_attention

    calls: list[int] = []
    real = fused_attention._PrenormAttention.apply
    monkeypatch.setattr(fused_attention._PrenormAttention, "apply", lambda *a: calls.append(1) or real(*a))
    method = lora(rank=4)
    model = method.apply(llama_pair.ours)
    randomize(model)
    x = model.embed(ids).detach().requires_grad_(True)  # inputs needing grad: the training paths' condition
    wrapped = model(ids, inputs_embeds=x)
    assert calls == []
    merged = method.merge(model)
    plain = merged(ids, inputs_embeds=x)
    if kernels.available():
        assert calls, "the fused attention should serve the merged model (plain Linear)"
    assert max_diff(wrapped.detach(), plain.detach()) < TOL


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_a_bfloat16_model_keeps_its_dtype_and_trains_float32_adapters(llama_pair, ids, name):
    model = llama_pair.ours.to(torch.bfloat16)
    model = get_method(name)({"rank": 4}).apply(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    out = model(ids)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in trainable)
