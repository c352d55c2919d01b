"""Bottleneck (Houlsby) adapters (llmkit.peft.adapter): init leaves outputs unchanged, parameter
counts, equal logits to AdapterHub's `adapters` library (a checked-in reference, made by
fixtures/make_houlsby_reference.py), the adapter folder round trip, dropout, and a tiny training
loop that learns with the base frozen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_helpers import max_diff
from llmkit.errors import UserError
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.adapter import WithAdapter, adapterhub_name

TOL = 1e-5
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "houlsby_reference"
pytestmark = pytest.mark.usefixtures("one_thread")


def adapter(**opts):
    return get_method("adapter")(opts)


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def fresh(directory):
    """A new llmkit copy of a saved HF model."""
    from llmkit.interop.hf import load_hf

    return load_hf(directory).eval()


def randomize(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_init_leaves_outputs_exactly_unchanged(llama_pair, ids):
    before = logits(llama_pair.ours, ids)
    model = adapter(adapter_size=8).apply(llama_pair.ours)
    assert isinstance(model.blocks[0].attn, WithAdapter) and isinstance(model.blocks[1].mlp, WithAdapter)
    assert torch.equal(logits(model, ids), before)
    assert model.blocks[0].attn.adapter_down.weight.abs().sum() > 0  # only the up-projection starts at zero


def test_trainable_count_is_two_bottlenecks_per_block(llama_pair):
    total_before = count_parameters(llama_pair.ours)[1]
    d, n, layers = 64, 8, 2
    model = adapter(adapter_size=n).apply(llama_pair.ours)
    per_adapter = d * n + n + n * d + d
    trainable, total = count_parameters(model)
    assert trainable == layers * 2 * per_adapter
    assert total == total_before + trainable


def test_equals_adapterhub_double_seq_bn_config():
    """The same weights in `adapters` 1.3.0 (DoubleSeqBnConfig, reduction_factor 4) gave these logits."""
    from safetensors.torch import load_file

    from llmkit.interop.hf import load_hf

    if not (REFERENCE / "io.safetensors").is_file():
        pytest.skip("no AdapterHub reference fixture")
    io, tensors = load_file(str(REFERENCE / "io.safetensors")), load_file(str(REFERENCE / "adapter.safetensors"))
    model = load_hf(REFERENCE).eval()
    method = adapter(adapter_size=32 // 4)
    model = method.apply(model)
    ours = method.adapter_tensors(model)
    assert len(ours) == len(tensors) == 16
    method.load_adapter_tensors(model, {k: tensors[adapterhub_name(k, "houlsby")] for k in ours}, "reference")
    assert max_diff(logits(model, io["ids"]), io["logits"]) < TOL


def test_adapterhub_names():
    assert (adapterhub_name("blocks.3.mlp.adapter_down.bias", "a")
            == "model.layers.3.output_adapters.adapters.a.adapter_down.0.bias")
    assert (adapterhub_name("blocks.0.attn.adapter_up.weight", "a")
            == "model.layers.0.attention_adapters.adapters.a.adapter_up.weight")
    with pytest.raises(UserError, match="not a bottleneck adapter"):
        adapterhub_name("blocks.0.attn.q.lora_A.weight", "a")


def test_adapter_tensors_round_trip_into_a_fresh_model(llama_pair, hf_llama_dir, ids):
    method = adapter(adapter_size=4)
    model = method.apply(llama_pair.ours)
    randomize(model)
    want = logits(model, ids)
    tensors = method.adapter_tensors(model)
    assert set(tensors) >= {"blocks.0.attn.adapter_down.weight", "blocks.1.mlp.adapter_up.bias"}
    other = adapter(adapter_size=4)
    new = other.apply(fresh(hf_llama_dir))
    other.load_adapter_tensors(new, tensors, "test")
    assert torch.equal(logits(new, ids), want)
    with pytest.raises(UserError, match="shape"):
        small = adapter(adapter_size=2)
        small.load_adapter_tensors(small.apply(fresh(hf_llama_dir)), tensors, "test")


def test_adapter_folder_round_trip_with_llmkit_names(llama_pair, hf_llama_dir, ids, tmp_path):
    """peft has no bottleneck adapter, so the folder keeps llmkit's names, even for a Llama."""
    method = adapter(adapter_size=4, adapter_dropout=0.1)
    model = method.apply(llama_pair.ours)
    randomize(model, seed=2)
    want = logits(model.eval(), ids)
    files.save_adapter(model, method, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["llmkit_method"] == "adapter" and config["adapter_size"] == 4 and config["peft_type"] is None
    assert config["llmkit_names"] is True
    loaded, m2 = files.load_adapter(fresh(hf_llama_dir), tmp_path)
    assert m2.name == "adapter" and m2.opts == {"adapter_size": 4, "adapter_dropout": 0.1}
    assert torch.equal(logits(loaded, ids), want)


def test_greedy_generation_equals_full_forward_greedy(llama_pair, ids):
    """The native decoding step steps aside for the wrapped sublayers; the reference decodes right."""
    from llmkit.generation.generate import GenerationConfig, generate_tokens

    model = adapter(adapter_size=8).apply(llama_pair.ours)
    randomize(model, seed=4)
    seq = ids[:1]
    for _ in range(6):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    got = list(generate_tokens(model, ids[0].tolist(), GenerationConfig(max_new_tokens=6, temperature=0.0)))
    assert got == seq[0, ids.shape[1]:].tolist()


def test_dropout_acts_in_training_only(llama_pair, ids):
    model = adapter(adapter_size=8, adapter_dropout=0.5).apply(llama_pair.ours)
    randomize(model)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))


def test_bad_options_are_refused(llama_pair):
    with pytest.raises(UserError, match="adapter_size"):
        adapter(adapter_size=0)
    with pytest.raises(UserError, match="adapter_dropout"):
        adapter(adapter_dropout=1.0)
    adapter().apply(llama_pair.ours)
    with pytest.raises(UserError, match="already carries"):
        adapter().apply(llama_pair.ours)
    with pytest.raises(UserError, match="cannot be merged"):
        adapter().merge(llama_pair.ours)


def test_a_tiny_training_loop_learns_with_the_base_frozen(llama_pair):
    torch.manual_seed(0)
    model = adapter(adapter_size=16).apply(llama_pair.ours).train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
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
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
