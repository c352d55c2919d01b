"""`llmkit.load` and `llmkit info` check that the model and tokenizer agree and that the weights are
finite numbers, and say what is wrong in one line (info: after what it could print, exit 2)."""
from __future__ import annotations

import string
import time

import pytest
import torch

import llmkit
from llmkit.api import check_finite, non_finite, problems
from llmkit.cli.main import main
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.model_io import save_model
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers import CharTokenizer

CHARS = CharTokenizer.train(string.ascii_letters + " \n.,;:!?'-&$3")  # 65 characters, as shakespeare_char


def saved(tmp_path, name: str, vocab: int, tokenizer=CHARS, poison=None):
    """A tiny decoder of `vocab` ids saved with `tokenizer`; `poison(model)` edits it first."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_preset("tiny", vocab_size=vocab, init_std=0.3))
    if poison is not None:
        with torch.no_grad():
            poison(model)
    return save_model(model, tmp_path / name, tokenizer=tokenizer)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenizer_with_more_ids_than_the_model_is_refused_at_load(tmp_path):
    d = saved(tmp_path, "small", 40)
    with pytest.raises(UserError, match=r"ids up to 64 \(the last of its vocabulary of 65\).*vocab_size 40") as e:
        llmkit.load(d)
    assert "\n" not in str(e.value) and "--tokenizer" in str(e.value)


def test_a_special_id_beyond_the_model_is_refused(tmp_path):
    class WithEos(CharTokenizer):
        @property
        def special_tokens(self):
            return {"eos": 70}

    d = saved(tmp_path, "eos", 65)
    with pytest.raises(UserError, match=r"ids up to 70 \(its eos token\)"):
        llmkit.load(d, tokenizer=WithEos(CHARS.chars))


def test_a_model_vocabulary_larger_than_the_tokenizer_is_normal(tmp_path):
    d = saved(tmp_path, "padded", 100)  # padded embeddings, as GPT-2's 50257 -> 50304
    lm = llmkit.load(d)
    assert lm.model.cfg.vocab_size == 100 and lm.tokenizer.vocab_size == 65 and problems(lm) == []


def test_a_padding_id_has_no_character_and_says_so_instead_of_indexerror():
    with pytest.raises(UserError, match=r"token id 70 has no character.*ids 0-64"):
        CHARS.decode([1, 70])
    with pytest.raises(UserError, match="token id -1 has no character"):
        CHARS.decode([-1])  # would silently be the last character


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    def poison(model):
        model.blocks[1].attn.qkv.weight[3, 4] = bad
        model.norm.weight[0] = bad

    d = saved(tmp_path, "bad", 65, poison=poison)
    with pytest.raises(UserError, match=r"tensor blocks\.1\.attn\.qkv\.weight holds .* of 8,192 values "
                                        r"\(and 1 more tensor\(s\)\).*earlier checkpoint") as e:
        llmkit.load(d)
    assert "\n" not in str(e.value)
    assert llmkit.load(d, check=False).model is not None  # the opt-out loads it as it is


def test_non_finite_finds_every_bad_tensor_in_model_order():
    model = DecoderLM(ModelConfig.from_preset("tiny", vocab_size=65))
    assert non_finite(model) == []
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
        model.tok_emb.weight[0, 0] = float("inf")
    assert non_finite(model) == ["tok_emb.weight", "norm.weight"]
    bf16 = model.to(torch.bfloat16)
    assert non_finite(bf16) == ["tok_emb.weight", "norm.weight"]


def test_the_finite_check_costs_about_one_read_of_the_weights():
    """The check is one reduction per tensor: about the cost of summing every weight once (the
    load-time numbers are in llmkit.api's docstring). `isfinite().all()` costs 5-10x a sum; the
    two are timed in turns, best of several, so a busy machine slows both alike."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=8192, context_length=256, n_layers=8, d_model=512, n_heads=8))
    params = list(model.parameters())

    def read_once():
        for p in params:
            p.detach().sum()

    sums, checks = [], []
    for _ in range(5):
        sums.append(_timed(read_once))
        checks.append(_timed(lambda: check_finite(model, "m")))
    assert min(checks) < 3 * min(sums) + 0.005, (min(checks), min(sums))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_generate_cli_refuses_a_mismatched_tokenizer_before_printing(tmp_path, capsys):
    d = saved(tmp_path, "small", 40)
    code, out, err = cli(capsys, "generate", d, "--prompt", "Hello", "--max-new-tokens", "5")
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and "vocab_size 40" in err


def test_generate_cli_refuses_nan_weights_instead_of_a_sampling_crash(tmp_path, capsys):
    d = saved(tmp_path, "nan", 65, poison=lambda m: m.blocks[0].mlp.up.weight.fill_(float("nan")))
    for extra in ([], ["--greedy"]):  # sampling crashed; greedy printed garbage
        code, out, err = cli(capsys, "generate", d, "--prompt", "Hello", "--max-new-tokens", "5", *extra)
        assert code == 2 and out == "" and err.count("\n") == 1 and "blocks.0.mlp.up.weight" in err


def test_info_prints_the_model_then_the_problem(tmp_path, capsys):
    d = saved(tmp_path, "small", 40)
    code, out, err = cli(capsys, "info", d)
    assert code == 2 and "parameters:" in out and "tokenizer: CharTokenizer, vocabulary 65" in out
    assert err.startswith("error: ") and err.count("\n") == 1 and "vocab_size 40" in err
    d = saved(tmp_path, "nan", 65, poison=lambda m: m.norm.weight.fill_(float("inf")))
    code, out, err = cli(capsys, "info", d)
    assert code == 2 and "total" in out and err.count("\n") == 1 and "tensor norm.weight holds 0 NaN and 64 inf" in err


def test_info_notes_padding_ids_and_exits_0_when_all_is_well(tmp_path, capsys):
    code, out, err = cli(capsys, "info", saved(tmp_path, "padded", 100))
    assert code == 0 and err == "" and "vocabulary 65 (the model has 100 ids: 35 padding ids" in out


def test_info_describes_the_model_when_the_tokenizer_file_is_damaged(tmp_path, capsys):
    d = saved(tmp_path, "ok", 65)
    (d / "char_tokenizer.json").write_text("{ not json")
    code, out, err = cli(capsys, "info", d)
    assert code == 2 and "parameters:" in out and err.count("\n") == 1 and "corrupt character tokenizer" in err
