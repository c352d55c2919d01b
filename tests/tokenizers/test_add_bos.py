"""Prompts get BOS where transformers' `tokenizer(text)` puts one (issue #12): a tokenizer.json's
post-processor (tokenizer_config.json's add_bos_token ignored beside it, as transformers 5 does),
GPT-2 files with add_bos_token, SentencePiece as llama2.c prompts; and stories260K fed those ids
follows llama2.c's reference, where without BOS it departs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmkit.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "models" / "stories260K"
TEXT = "hello world, once upon a time"
BOS, EOS = 1, 2  # "<s>", "</s>" in the small BPE below


def _bpe(post: str) -> BackendTokenizer:
    """A small byte-level BPE with <unk>, <s>, </s>; `post` picks the tokenizer.json post-processor."""
    tok = BackendTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT, "a little girl named Lily"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    templates = {"bos": "<s> $A", "boseos": "<s> $A </s>"}
    if post in templates:
        tok.post_processor = processors.TemplateProcessing(
            single=templates[post], pair=templates[post] + " $B:1", special_tokens=[("<s>", BOS), ("</s>", EOS)])
    elif post == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _folder(d: Path, post: str, config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _bpe(post).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", **config}))
    return d


def _reference(d: Path, text: str = TEXT, add_special_tokens: bool = True) -> list[int]:
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    return ref(text, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.fixture(scope="module")
def stories() -> Path:
    if not (STORIES / "tok512.model").is_file():
        pytest.skip("../shared/data/models/stories260K is not present")
    return STORIES


# --- tokenizer.json folders and GPT-2 files, against AutoTokenizer ---------------------------------

@pytest.mark.parametrize("post", ["none", "bos", "boseos", "bytelevel"])
@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False}, {"add_eos_token": True},
                                   {"add_bos_token": True, "add_eos_token": True, "tokenizer_class": "LlamaTokenizer"}])
def test_tokenizer_json_folder_adds_the_special_tokens_transformers_adds(post, flags, tmp_path):
    d = _folder(tmp_path, post, flags)
    ours = load_tokenizer(d)
    assert ours.encode(TEXT, add_special_tokens=True) == _reference(d)
    assert ours.encode(TEXT) == _reference(d, add_special_tokens=False)


def test_llama_style_tokenizer_json_prompt_starts_with_bos_like_transformers(tmp_path):
    d = _folder(tmp_path, "bos", {"add_bos_token": True, "add_eos_token": False})
    prompt = load_tokenizer(d).encode_prompt(TEXT)
    assert prompt[0] == BOS and prompt == _reference(d)


@pytest.mark.parametrize("config", [{}, {"add_bos_token": True, "bos_token": "<|endoftext|>"},
                                    {"add_bos_token": False, "bos_token": "<|endoftext|>"}])
def test_gpt2_files_honour_add_bos_token_like_transformers(config, gpt2_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", **config}))
    ours = load_tokenizer(tmp_path)
    assert ours.encode("Hello world", add_special_tokens=True) == _reference(tmp_path, "Hello world")
    assert ours.encode_prompt("Hello world") == ([50256] if config.get("add_bos_token") else []) + [15496, 995]


def test_flag_set_in_python_is_saved_where_transformers_reads_it(tmp_path):
    tok = HFTokenizer(_bpe("bytelevel"), add_bos_token=True)
    plain = tok.encode(TEXT)
    assert tok.encode(TEXT, add_special_tokens=True) == [BOS] + plain
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(TEXT, add_special_tokens=True) == [BOS] + plain
    assert _reference(tmp_path) == [BOS] + plain
    tok.add_bos_token = None  # back to what the tokenizer.json itself does
    assert tok.encode(TEXT, add_special_tokens=True) == plain


def test_encode_prompt_drops_the_eos_the_rule_appends_and_keeps_one_typed(tmp_path):
    tok = load_tokenizer(_folder(tmp_path, "boseos", {}))
    full = tok.encode(TEXT, add_special_tokens=True)
    assert full[0] == BOS and full[-1] == EOS
    assert tok.encode_prompt(TEXT) == full[:-1]
    assert tok.encode_prompt(TEXT + "</s>") == [BOS] + tok.encode(TEXT + "</s>")


def test_char_tokenizer_prompt_is_its_plain_encoding():
    tok = CharTokenizer.train("abc ")
    assert tok.encode_prompt("ab c") == tok.encode("ab c") == [1, 2, 0, 3]


# --- SentencePiece, as llama2.c prompts -----------------------------------------------------------

PROMPTS = ["Once upon a time", "Lily and Ben went to the park.", ""]


def test_sentencepiece_prompt_starts_with_bos_as_llama2c_encodes_it(stories):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(stories / "tok512.model"))
    tok = load_tokenizer(stories / "tok512.model")
    for text in PROMPTS:
        assert tok.encode_prompt(text) == sp.encode(text, add_bos=True) == [sp.bos_id()] + sp.encode(text)


@pytest.mark.parametrize("flag", [True, False])
def test_sentencepiece_folder_llmkit_saves_reads_the_same_in_transformers(flag, stories, tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers reads a SentencePiece .model through protobuf")
    tok = load_tokenizer(stories / "tok512.model")
    tok.add_bos_token = flag
    tok.save(tmp_path)
    for text in PROMPTS[:2]:
        assert load_tokenizer(tmp_path).encode_prompt(text) == _reference(tmp_path, text)


# --- generation from a prompt: stories260K ----------------------------------------------------------

def _greedy(model, ids: list[int], n: int) -> list[int]:
    from llmkit.generation.generate import GenerationConfig, generate_tokens
    return list(generate_tokens(model, ids, GenerationConfig(max_new_tokens=n, temperature=0)))


def test_stories260k_prompt_with_bos_continues_as_the_llama2c_reference(stories):
    from llmkit.interop.llama2c import load_llama2c
    model = load_llama2c(stories / "stories260K.bin")
    tok = load_tokenizer(stories / "tok512.model")
    reference = _greedy(model, [BOS], 80)  # llama2.c's own run from BOS: "Once upon a time, there was ..."
    prompt = tok.encode_prompt("Once upon a time")
    assert prompt[0] == BOS and prompt[1:] == reference[:len(prompt) - 1]
    n = 80 - (len(prompt) - 1)
    assert prompt[1:] + _greedy(model, prompt, n) == reference
    bare = tok.encode("Once upon a time")  # what issue #12 saw: no BOS, and the story departs
    assert bare + _greedy(model, bare, n) != reference


def test_generation_prompts_with_the_tokenizers_prompt_ids(stories):
    from llmkit.generation.generate import generate, prompt_ids_of
    from llmkit.interop.llama2c import load_llama2c
    tok = load_tokenizer(stories / "tok512.model")
    assert prompt_ids_of(tok, "Once upon a time") == tok.encode_prompt("Once upon a time")
    model = load_llama2c(stories / "stories260K.bin")
    text = "Once upon a time" + generate(model, tok, "Once upon a time", temperature=0, max_new_tokens=40)
    assert text == tok.decode(_greedy(model, [BOS], 44))
