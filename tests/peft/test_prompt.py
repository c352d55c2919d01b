"""Prompt tuning (llmkit.peft.prompt): adapters move both ways between llmkit and peft with equal
logits of the real tokens, the init from a text (peft's TEXT rule) or from vocabulary rows, greedy
generation equals peft's (and batched rows equal single ones), and a tiny training loop learns."""
from __future__ import annotations

import json

import pytest
import torch

from peft_helpers import max_diff
from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.prompt import PromptTuned, init_token_ids

peft = pytest.importorskip("peft")

TOL = 1e-5
N = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(**opts):
    return get_method("prompt")({"virtual_tokens": N, **opts})


def real_logits(model, ids, **kw):
    """Logits of the real tokens: peft returns the virtual positions' too, first."""
    with torch.no_grad():
        if hasattr(model, "peft_config"):
            return model(input_ids=ids, **kw).logits[:, N:]
        return model(ids, **kw)


def peft_prompt(hf, seed=0):
    model = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.prompt_encoder["default"].embedding.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return model.eval()


class WordTokenizer:
    """Enough of a tokenizer for the init text: BOS then one id per word."""

    bos_id = 1

    def encode(self, text, add_special_tokens=False):
        return ([self.bos_id] if add_special_tokens else []) + [3 + len(w) for w in text.split()]


def test_peft_prompt_adapter_loads_with_equal_logits(llama_pair, ids, tmp_path):
    reference = peft_prompt(llama_pair.hf)
    reference.save_pretrained(tmp_path)
    model, method = files.load_adapter(llama_pair.ours, tmp_path)
    assert isinstance(model, PromptTuned) and method.name == "prompt"
    assert max_diff(real_logits(model, ids), real_logits(reference, ids)) < TOL
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    ours, theirs = real_logits(model, ids, attention_mask=mask), real_logits(reference, ids, attention_mask=mask)
    assert max_diff(ours[0, :-3], theirs[0, :-3]) < TOL and max_diff(ours[1], theirs[1]) < TOL
    last = model(ids, logits_to_keep=1)
    assert max_diff(last[:, 0], real_logits(model, ids)[:, -1]) < TOL


def test_gpt2_learned_positions_agree_with_peft(gpt2_pair, ids, tmp_path):
    reference = peft_prompt(gpt2_pair.hf, seed=3)
    reference.save_pretrained(tmp_path)
    model, _ = files.load_adapter(gpt2_pair.ours, tmp_path)
    assert max_diff(real_logits(model, ids), real_logits(reference, ids)) < TOL
    assert model.cfg.context_length == gpt2_pair.ours.cfg.context_length - N


def test_llmkit_prompt_adapter_loads_in_peft_with_equal_logits(llama_pair, ids, tmp_path):
    method = prompt(prompt_init_text="a tiny prompt")
    method.tokenizer = WordTokenizer()
    model = method.apply(llama_pair.ours)
    with torch.no_grad():
        noise = torch.randn(model.prompt_embeddings.shape, generator=torch.Generator().manual_seed(1))
        model.prompt_embeddings.add_(noise)
    files.save_adapter(model, method, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N and config["token_dim"] == 64
    reference = peft.PeftModel.from_pretrained(llama_pair.hf, tmp_path).eval()
    assert max_diff(real_logits(reference, ids), real_logits(model, ids)) < TOL


def test_text_init_repeats_or_cuts_the_text_as_peft_does(llama_pair):
    assert init_token_ids([7, 8], 5) == [7, 8, 7, 8, 7]
    assert init_token_ids([1, 2, 3, 4, 5, 6], 4) == [1, 2, 3, 4]
    method = prompt(prompt_init_text="ab cde f")
    method.tokenizer = WordTokenizer()
    model = method.apply(llama_pair.ours)
    want = llama_pair.ours.tok_emb.weight[[1, 5, 6, 4, 1]]  # BOS, then 3 + word lengths, repeated to 5
    assert torch.equal(model.prompt_embeddings, want)


def test_text_init_equals_peft_text_init_with_the_same_tokenizer(llama_pair, tmp_path):
    """peft reads the tokenizer folder itself (AutoTokenizer); llmkit gets the same folder's tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    import transformers

    from llmkit.tokenizers.base import load_tokenizer

    words = "classify the sentiment of this review".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(tmp_path)
    text = "classify the sentiment"  # 4 ids with BOS, repeated to 7
    reference = peft.get_peft_model(llama_pair.hf, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path)))
    method = get_method("prompt")({"virtual_tokens": 7, "prompt_init_text": text})
    method.tokenizer = load_tokenizer(tmp_path)
    model = method.apply(llama_pair.ours)
    assert torch.equal(model.prompt_embeddings, reference.prompt_encoder["default"].embedding.weight)


def test_text_init_and_text_generation_on_stories260k():
    """The real small Llama with its SentencePiece tokenizer: the init text's ids (BOS first, as
    tokenizer(text) gives them) start the prompt, and text generation runs through the wrapper."""
    from pathlib import Path

    from llmkit.generation.generate import generate
    from llmkit.model_io import load_pretrained, pretrained_tokenizer

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"
    if not path.is_file():
        pytest.skip("stories260K is not in ../shared/data")
    base, tok = load_pretrained(path).eval(), pretrained_tokenizer(path)
    method = get_method("prompt")({"virtual_tokens": 6, "prompt_init_text": "Once upon a time"})
    method.tokenizer = tok
    model = method.apply(base)
    ids = init_token_ids(tok.encode("Once upon a time", add_special_tokens=True), 6)
    assert ids[0] == tok.bos_id
    assert torch.equal(model.prompt_embeddings, base.tok_emb.weight[ids])
    text = generate(model, tok, "Lily", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str) and text


def test_without_text_the_prompt_starts_as_vocabulary_rows(llama_pair):
    model = prompt().apply(llama_pair.ours)
    table = llama_pair.ours.tok_emb.weight
    for row in model.prompt_embeddings:
        assert (table == row).all(-1).any()
    assert count_parameters(model)[0] == N * 64


def test_greedy_generation_equals_peft(llama_pair, ids, tmp_path):
    reference = peft_prompt(llama_pair.hf, seed=2)
    reference.save_pretrained(tmp_path)
    model, _ = files.load_adapter(llama_pair.ours, tmp_path)
    p = ids[0].tolist()
    ours = list(generate_tokens(model, p, GenerationConfig(max_new_tokens=8, temperature=0.0)))
    # peft's generate re-injects the prompt correctly only without its cache on transformers 5
    with torch.no_grad():
        theirs = reference.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=8,
                                    do_sample=False, use_cache=False)
    assert ours == theirs[0, len(p):].tolist()


def test_cached_decoding_equals_the_full_forward_and_batches_match(llama_pair, ids):
    model = prompt().apply(llama_pair.ours)
    full = real_logits(model, ids)
    cache = model.make_cache(2, 16)
    with torch.no_grad():
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(6, 12)]
    assert cache.pos == 12 and cache.inner.pos == 12 + N
    assert max_diff(torch.cat(steps, 1), full) < TOL
    prompts = [ids[0, :4].tolist(), ids[1, :9].tolist()]
    cfg = GenerationConfig(max_new_tokens=5, temperature=0.0)
    assert generate_batch(model, prompts, cfg) == [list(generate_tokens(model, q, cfg)) for q in prompts]


def test_bad_inputs_are_refused(llama_pair, ids):
    with pytest.raises(UserError, match="virtual_tokens"):
        get_method("prompt")({"virtual_tokens": -2})
    with pytest.raises(UserError, match="needs the tokenizer"):
        prompt(prompt_init_text="hello").apply(llama_pair.ours)
    model = prompt().apply(llama_pair.ours)
    with pytest.raises(UserError, match="packing"):
        model(ids, segment_ids=torch.zeros_like(ids))
    with pytest.raises(UserError, match="make_cache"):
        model(ids, cache=llama_pair.ours.make_cache(2, 32))
    with pytest.raises(UserError, match="no room"):
        get_method("prompt")({"virtual_tokens": 128}).apply(llama_pair.ours)


def test_a_tiny_training_loop_steers_the_output_with_the_base_frozen(llama_pair):
    torch.manual_seed(0)
    model = get_method("prompt")({"virtual_tokens": 8}).apply(llama_pair.ours).train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    target = torch.full_like(ids[:, 1:], 7)  # steer: whatever the text, say token 7 next
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([model.prompt_embeddings], lr=1e-1, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.5 and losses[-1] < 1.2, (losses[0], losses[-1])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

