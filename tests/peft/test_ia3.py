"""IA3 (llmkit.peft.ia3): init leaves outputs alone, merged equals unmerged (and unmerge restores),
trainable counts equal peft's, adapters move both ways between llmkit and peft's IA3 with equal
logits (keys `...ia3_l`, feedforward_modules), bad selections are refused, and a tiny training
loop learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.ia3 import IA3Linear

peft = pytest.importorskip("peft")

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared machine


def ia3(**opts):
    return get_method("ia3")(opts)


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def randomize(model, seed=0):
    """Move every IA3 vector off its init (ones), so the tests see them act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name or "out_l" in name or "in_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def test_init_leaves_outputs_unchanged_and_counts(llama_pair, ids):
    """Vectors start at one; trainable: k (2 kv heads x 16 = 32), v (32) and down's input (96) in
    each of 2 layers = 320, as peft's IA3 counts on the transformers model."""
    before = logits(llama_pair.ours, ids)
    _, total_before = count_parameters(llama_pair.ours)
    method = ia3()
    model = method.apply(llama_pair.ours)
    assert (logits(model, ids) - before).abs().max() < TOL
    trainable, total = count_parameters(model)
    assert trainable == 320 and total == total_before + 320
    assert sorted(n.rsplit(".", 1)[-1] for n in method.adapter_tensors(model)) == ["ia3_l"] * 6
    shapes = {k: tuple(v.shape) for k, v in method.adapter_tensors(model).items()}
    assert shapes["blocks.0.attn.k.ia3_l"] == (32, 1) and shapes["blocks.1.mlp.down.ia3_l"] == (1, 96)
    reference = peft.get_peft_model(llama_pair.hf, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                  feedforward_modules=["down_proj"]))
    assert reference.get_nb_trainable_parameters()[0] == trainable


def test_scaling_acts_on_the_right_rows_and_inputs():
    """Output rows of the k and v slices scale by their vectors, q's rows stay; an input-scaled
    layer scales its input's columns."""
    base = torch.nn.Linear(8, 12)
    layer = IA3Linear(base, [(4, 8), (8, 12)], scale_input=False)
    with torch.no_grad():
        layer.out_l[0].fill_(2.0)
        layer.out_l[1].fill_(3.0)
    x = torch.randn(5, 8)
    y, y0 = layer(x), base(x)
    assert torch.allclose(y[:, :4], y0[:, :4]) and torch.allclose(y[:, 4:8], 2 * y0[:, 4:8])
    assert torch.allclose(y[:, 8:], 3 * y0[:, 8:])
    down = IA3Linear(torch.nn.Linear(8, 3), [], scale_input=True)
    with torch.no_grad():
        down.in_l.copy_(torch.arange(8.0)[None])
    assert torch.allclose(down(x), down.base(x * torch.arange(8.0)))


def test_merge_equals_unmerged_and_unmerge_restores(llama_pair, ids):
    method = ia3(target_modules="q,v,proj,up,down")
    model = method.apply(llama_pair.ours)
    randomize(model)
    w0 = model.blocks[1].mlp.down.base.weight.detach().clone()
    unmerged = logits(model, ids)
    merged = method.merge(model)
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    assert (logits(merged, ids) - unmerged).abs().max() < TOL
    with pytest.raises(UserError, match="unmerge first"):
        method.adapter_tensors(merged)
    model = method.unmerge(merged)
    assert isinstance(model.blocks[1].mlp.down, IA3Linear)
    assert (model.blocks[1].mlp.down.base.weight - w0).abs().max() < 1e-6
    assert (logits(model, ids) - unmerged).abs().max() < TOL


PEFT_CONFIGS = {
    "k,v,down": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "q,o,up,gate,down": dict(target_modules=["q_proj", "o_proj", "up_proj", "gate_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
    "regex": dict(target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=r".*down_proj"),
}


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_adapter_loads_with_equal_logits(llama_pair, ids, tmp_path, name):
    reference = peft.get_peft_model(llama_pair.hf, peft.IA3Config(init_ia3_weights=False, **PEFT_CONFIGS[name]))
    reference.eval()
    reference.save_pretrained(tmp_path)
    model, method = files.load_adapter(llama_pair.ours, tmp_path)
    assert method.name == "ia3"
    assert (logits(model, ids) - logits(reference, ids)).abs().max() < TOL


def test_llmkit_adapter_loads_in_peft_with_equal_logits(llama_pair, ids, tmp_path):
    method = ia3(target_modules="k,v,up,down")
    model = method.apply(llama_pair.ours)
    randomize(model, seed=3)
    files.save_adapter(model, method, tmp_path)
    config, tensors = files.read_adapter(tmp_path)
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "up_proj", "v_proj"]
    reference = peft.PeftModel.from_pretrained(llama_pair.hf, tmp_path).eval()
    from peft.utils import get_peft_model_state_dict
    assert set(tensors) == {"base_model.model." + k.removeprefix("base_model.model.")
                            for k in get_peft_model_state_dict(reference)}
    assert "base_model.model.model.layers.1.mlp.down_proj.ia3_l" in tensors
    assert (logits(model, ids) - logits(reference, ids)).abs().max() < TOL
    # and back: the folder loads into a fresh llmkit model with the same outputs
    from peft_helpers import load_pair

    again, _ = files.load_adapter(load_pair(llama_pair.dir).ours, tmp_path)
    assert (logits(again, ids) - logits(model, ids)).abs().max() < TOL


def test_gpt2_fused_conv1d_adapter_moves_both_ways(gpt2_pair, hf_gpt2_dir, ids, tmp_path):
    """GPT-2: the whole fused c_attn scaled on its output, the MLP's c_proj on its input; saved, the
    MLP's is named `mlp.c_proj` (plain `c_proj` would make peft adapt the attention's too)."""
    from peft_helpers import load_pair

    reference = peft.get_peft_model(gpt2_pair.hf, peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                                 feedforward_modules=["mlp.c_proj"],
                                                                 init_ia3_weights=False)).eval()
    reference.save_pretrained(tmp_path / "peft")
    model, method = files.load_adapter(gpt2_pair.ours, tmp_path / "peft")
    assert sorted(t.short for t in method.targets) == ["down", "down", "qkv", "qkv"]
    assert (logits(model, ids) - logits(reference, ids)).abs().max() < TOL
    files.save_adapter(model, method, tmp_path / "ours")
    config, _ = files.read_adapter(tmp_path / "ours")
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"] and config["feedforward_modules"] == ["mlp.c_proj"]
    back = peft.PeftModel.from_pretrained(load_pair(hf_gpt2_dir).hf, tmp_path / "ours").eval()
    assert sum(p.numel() for n, p in back.named_parameters() if "ia3_l" in n) == count_parameters(model)[0]
    assert (logits(back, ids) - logits(reference, ids)).abs().max() < TOL


def test_bad_selections_are_refused(llama_pair):
    with pytest.raises(UserError, match="matches nothing"):
        ia3(target_modules="nope").apply(llama_pair.ours)
    method = get_method("ia3")(get_method("ia3").options_from_peft(
        {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["k_proj"]}))
    with pytest.raises(UserError, match="slice"):
        method.apply(llama_pair.ours)
    model = ia3().apply(llama_pair.ours)
    with pytest.raises(UserError, match="already"):
        ia3().apply(model)


def test_a_tiny_training_loop_learns_a_fixed_text(llama_pair):
    """Only the IA3 vectors train (on every linear layer: 960 entries; IA3's few parameters take a
    high learning rate); the cross-entropy on fixed text falls from 5.16 to below 3 (measured 2.58)."""
    torch.manual_seed(0)
    model = ia3(target_modules="q,k,v,proj,gate,up,down").apply(llama_pair.ours).train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    base = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 3.0, (losses[0], losses[-1])
    assert all(torch.equal(a, b) for a, b in zip(base, [p for p in model.parameters() if not p.requires_grad]))
