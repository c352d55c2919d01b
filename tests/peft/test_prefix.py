"""Prefix tuning (llmkit.peft.prefix): the table's layout is peft's, adapters move both ways
between llmkit and peft with equal logits (GQA Llama, with padding, with the reparameterisation MLP
folded away), the wrapper decodes through its cache as a full forward does and greedy decoding
equals peft's forward, and a tiny training loop learns with the base frozen."""
from __future__ import annotations

import json

import pytest
import torch

from peft_helpers import max_diff
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.prefix import PrefixTuned, split_prefix

peft = pytest.importorskip("peft")

TOL = 1e-5
N = 5  # virtual tokens
pytestmark = pytest.mark.usefixtures("one_thread")


def prefix(**opts):
    return get_method("prefix")({"virtual_tokens": N, **opts})


def logits(model, ids, **kw):
    with torch.no_grad():
        out = model(input_ids=ids, **kw) if hasattr(model, "peft_config") else model(ids, **kw)
    return getattr(out, "logits", out)


def randomize(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_prefix(hf, seed=0):
    model = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    randomize(model, seed)
    return model.eval()


def test_split_prefix_reads_layer_key_value_head_as_peft_lays_them_out():
    layers, heads, hd = 3, 2, 4
    table = torch.arange(N * layers * 2 * heads * hd, dtype=torch.float32).view(N, -1)
    keys, values = split_prefix(table, layers, heads, hd)
    assert keys.shape == values.shape == (layers, heads, N, hd)
    for l, h, i in [(0, 0, 0), (2, 1, 4), (1, 0, 3)]:
        k0 = ((2 * l) * heads + h) * hd  # peft: view [n, layers * 2, heads, hd], keys of layer l at 2l
        assert torch.equal(keys[l, h, i], table[i, k0:k0 + hd])
        assert torch.equal(values[l, h, i], table[i, k0 + heads * hd:k0 + heads * hd + hd])


def test_peft_prefix_adapter_loads_with_equal_logits(llama_pair, ids, tmp_path):
    reference = peft_prefix(llama_pair.hf)
    reference.save_pretrained(tmp_path)
    model, method = files.load_adapter(llama_pair.ours, tmp_path)
    assert isinstance(model, PrefixTuned) and method.name == "prefix" and method.opts["virtual_tokens"] == N
    assert max_diff(logits(model, ids), logits(reference, ids)) < TOL
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding: the real positions agree
    ours, theirs = logits(model, ids, attention_mask=mask), logits(reference, ids, attention_mask=mask)
    assert max_diff(ours[0], theirs[0]) < TOL and max_diff(ours[1, :-4], theirs[1, :-4]) < TOL


def test_gpt2_learned_positions_and_fused_qkv_agree_with_peft(gpt2_pair, ids, tmp_path):
    reference = peft_prefix(gpt2_pair.hf, seed=1)
    reference.save_pretrained(tmp_path)
    model, _ = files.load_adapter(gpt2_pair.ours, tmp_path)
    assert max_diff(logits(model, ids), logits(reference, ids)) < TOL
    # the virtual tokens take the first positions: the real tokens have n fewer (a learned table ends)
    assert model.cfg.context_length == gpt2_pair.ours.cfg.context_length - N


@pytest.mark.parametrize("projection", [0, 16])
def test_llmkit_prefix_adapter_loads_in_peft_with_equal_logits(llama_pair, ids, tmp_path, projection):
    method = prefix(prefix_projection=projection)
    model = method.apply(llama_pair.ours)
    randomize(model, seed=3, std=0.3)
    want = logits(model, ids)
    files.save_adapter(model, method, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["token_dim"] == 2 * 16  # 2 KV heads x head_dim 16
    assert config["prefix_projection"] is bool(projection)
    reference = peft.PeftModel.from_pretrained(llama_pair.hf, tmp_path).eval()
    assert max_diff(logits(reference, ids), want) < TOL


def test_projection_counts_and_folds_to_the_same_table(llama_pair, ids):
    hidden, kv, width = 16, 32, 2 * 2 * 32
    method = prefix(prefix_projection=hidden)
    model = method.apply(llama_pair.ours)
    assert count_parameters(model)[0] == N * kv + kv * hidden + hidden + hidden * width + width
    randomize(model, seed=1, std=0.3)
    want, table = logits(model, ids), method.adapter_tensors(model)["prompt_embeddings"]
    assert table.shape == (N, width)
    model.fold_projection()
    assert count_parameters(model)[0] == N * width
    assert max_diff(logits(model, ids), want) < TOL
    assert torch.equal(model.prefix.embedding.weight, table)


def test_plain_table_count_and_base_frozen(llama_pair):
    total = count_parameters(llama_pair.ours)[1]
    model = prefix().apply(llama_pair.ours)
    assert count_parameters(model) == (N * 2 * 2 * 32, total + N * 2 * 2 * 32)


def test_cached_decoding_equals_the_full_forward(llama_pair, ids):
    model = prefix().apply(llama_pair.ours)
    randomize(model, std=0.3)
    full = logits(model, ids)
    cache = model.make_cache(2, 16)
    assert cache.pos == 0 and cache.max_len == 16
    with torch.no_grad():
        steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(7, 12)]
    assert cache.pos == 12 and cache.inner.pos == 12 + N
    assert max_diff(torch.cat(steps, 1), full) < TOL


def greedy_with_peft_forward(reference, prompt, n):
    """peft's own generate does not inject the prefix on transformers 5 (it sets past_key_values,
    which the model now takes as `cache`): decode greedily with full forwards instead."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, reference(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()


def test_greedy_generation_equals_peft(llama_pair, ids, tmp_path):
    reference = peft_prefix(llama_pair.hf, seed=4)
    reference.save_pretrained(tmp_path)
    model, _ = files.load_adapter(llama_pair.ours, tmp_path)
    prompt = ids[0].tolist()
    ours = list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=8, temperature=0.0)))
    assert ours == greedy_with_peft_forward(reference, prompt, 8)


def test_speculative_decoding_with_itself_as_draft_equals_greedy(llama_pair, ids):
    """Speculative decoding rolls the cache back (crop) past rejected drafts: the prefix must stay."""
    model = prefix().apply(llama_pair.ours)
    randomize(model, seed=6, std=0.5)
    cfg = GenerationConfig(max_new_tokens=7, temperature=0.0)
    greedy = list(generate_tokens(model, ids[0].tolist(), cfg))
    assert list(generate_tokens(model, ids[0].tolist(), cfg, draft=model)) == greedy


def test_batched_generation_rows_equal_single_ones(llama_pair, ids):
    model = prefix().apply(llama_pair.ours)
    randomize(model, seed=5, std=0.5)
    prompts = [ids[0, :9].tolist(), ids[1, :5].tolist()]  # left padding on the second row
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    batch = generate_batch(model, prompts, cfg)
    assert batch == [list(generate_tokens(model, p, cfg)) for p in prompts]


def test_bad_inputs_are_refused(llama_pair, ids):
    with pytest.raises(UserError, match="virtual_tokens"):
        get_method("prefix")({"virtual_tokens": 0})
    with pytest.raises(UserError, match="prefix_projection"):
        prefix(prefix_projection=-1)
    model = prefix().apply(llama_pair.ours)
    with pytest.raises(UserError, match="packing"):
        model(ids, segment_ids=torch.zeros_like(ids))
    with pytest.raises(UserError, match="make_cache"):
        model(ids, cache=llama_pair.ours.make_cache(2, 32))
    with pytest.raises(UserError, match="already has virtual tokens"):
        prefix().apply(model)


@pytest.mark.parametrize("projection", [0, 32])
def test_a_tiny_training_loop_steers_the_output_with_the_base_frozen(llama_pair, projection):
    torch.manual_seed(0)
    model = get_method("prefix")({"virtual_tokens": 8, "prefix_projection": projection}).apply(llama_pair.ours)
    model.train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    target = torch.full_like(ids[:, 1:], 7)  # steer: whatever the text, say token 7 next
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lr = 3e-2 if projection else 1e-1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.5 and losses[-1] < 0.5, (losses[0], losses[-1])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

