"""`llmkit.load` on a Hugging Face directory that holds weights but no tokenizer: the model loads
(logits equal transformers'), token ids generate, and text asks for the tokenizer in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli.main import main
from llmkit.errors import UserError
from llmkit.tokenizers import CharTokenizer

transformers = pytest.importorskip("transformers")
VOCAB = 64


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random Llama saved by transformers (config.json + model.safetensors, no tokenizer),
    weights peaked (std 0.3) so greedy decisions are not near-ties; and the reference model."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(d, safe_serialization=True)
    assert not any(d.glob("tokenizer*")) and not (d / "vocab.json").exists()
    return d, model


def test_load_without_tokenizer_gives_the_model(hf_llama):
    d, ref = hf_llama
    lm = llmkit.load(d)
    assert lm.tokenizer is None and lm.kind.name == "decoder"
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_text_generation_names_the_missing_tokenizer(hf_llama):
    d, _ = hf_llama
    lm = llmkit.load(d)
    for ask in (lambda: lm.generate("hello"), lambda: lm.stream("hello"), lm.require_tokenizer):
        with pytest.raises(UserError, match="no tokenizer") as e:
            ask()
        message = str(e.value)
        assert str(d) in message and "tokenizer=" in message and "\n" not in message


def test_token_ids_generate_without_a_tokenizer(hf_llama):
    d, ref = hf_llama
    lm = llmkit.load(d)
    prompt = [3, 14, 15, 9, 26]
    ours = lm.generate_ids(prompt, max_new_tokens=10, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist()


def test_a_tokenizer_given_to_load_enables_text(hf_llama, tmp_path):
    d, _ = hf_llama
    chars = CharTokenizer([chr(32 + i) for i in range(VOCAB)])  # one character per id of the model
    lm = llmkit.load(d, tokenizer=chars)
    text = lm.generate("HI", max_new_tokens=5, temperature=0)
    assert text == chars.decode(lm.generate_ids(chars.encode("HI"), max_new_tokens=5, temperature=0))
    chars.save(tmp_path)
    assert llmkit.load(d, tokenizer=tmp_path).generate("HI", max_new_tokens=5, temperature=0) == text


def test_a_broken_tokenizer_file_still_fails_at_load(hf_llama, tmp_path):
    d, _ = hf_llama
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in d.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UserError):
        llmkit.load(broken)


def test_cli_generate_without_tokenizer_is_one_line(hf_llama, capsys, tmp_path):
    d, _ = hf_llama
    assert main(["generate", str(d), "--prompt", "x", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err and "--tokenizer" in err
    CharTokenizer([chr(32 + i) for i in range(VOCAB)]).save(tmp_path)
    assert main(["generate", str(d), "--prompt", "HI", "--max-new-tokens", "3", "--greedy",
                 "--tokenizer", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("HI")
