"""The sft task: the loss mask is exactly the assistant replies and their end-of-turn marker (by
hand and against transformers' `return_assistant_tokens_mask`), packing changes neither the loss nor
any other sample's logits, batches are a pure function of (seed, step, micro, rank), and a short
fine-tune of stories260K on the shared instruction data lowers its assistant-token loss."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.errors import UserError
from llmkit.objectives.sft import (IGNORE, SFT_CHAT_TEMPLATE, collate_packed, collate_padded, encode_conversation,
                                   pack, read_conversations, row_messages, turn_end)

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
INSTRUCTIONS = DATA / "instructions"

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me about a cat."},
    {"role": "assistant", "content": "The cat sat on the mat."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "The dog ran to the park!"},
]
ROWS = [  # Alpaca rows of both spellings and a chat row, short enough for tiny tests
    {"instruction": "Say hi.", "input": "", "output": "Hi! I am happy."},
    {"instruction": "Name a colour.", "input": "Not red.", "response": "Blue is a nice colour."},
    {"messages": [{"role": "user", "content": "Who is Lily?"},
                  {"role": "assistant", "content": "Lily is a little girl who likes to play."}]},
    {"instruction": "Count to three.", "output": "One, two, three."},
    {"instruction": "What is the sun?", "input": "", "output": "The sun is big and hot and bright."},
    {"instruction": "Tell a story.", "input": "About a frog.", "output": "Once upon a time a frog jumped."},
]


def stories() -> Path:
    if not STORIES.is_file():
        pytest.skip(f"shared model missing: {STORIES}")
    return STORIES


def stories_tokenizer():
    from llmkit.model_io import pretrained_tokenizer

    tok = pretrained_tokenizer(stories())
    tok.chat_template = SFT_CHAT_TEMPLATE
    return tok


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) index runs where `mask` is set."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def sft_task(tmp_path: Path, data: Path, **options):
    """The sft task on `data`, prepared and set up in tmp_path/run as rank 0 of a run has it."""
    from llmkit.objectives import get_task
    from llmkit.training.config import TrainConfig

    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    cfg = TrainConfig(task="sft", init_from=str(stories()), data=str(data), out=str(out), **options)
    task = get_task("sft")(cfg)
    task.prepare(out)
    task.setup(out)
    return task


# --- the loss mask ------------------------------------------------------------------------------------

def test_mask_is_exactly_each_reply_and_its_end_of_turn_marker():
    tok = stories_tokenizer()
    ids, mask = encode_conversation(tok, CONVERSATION)
    assert tok.decode(ids.tolist()) == (
        "<s><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me about a cat.<|im_end|>\n"
        "<|im_start|>assistant\nThe cat sat on the mat.<|im_end|>\n<|im_start|>user\nAnd a dog?<|im_end|>\n"
        "<|im_start|>assistant\nThe dog ran to the park!<|im_end|>\n")
    found = runs(mask)
    assert [tok.decode(ids[a:b].tolist()) for a, b in found] == [
        "The cat sat on the mat.<|im_end|>", "The dog ran to the park!<|im_end|>"]
    for a, b in found:  # the markup around a reply is not learned: the prompt before, the newline after
        assert tok.decode(ids[:a].tolist()).endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[b:b + 1].tolist()) == "\n"
    # the ids are the whole text's, as `llmkit chat` encodes its prompt
    assert ids.tolist() == tok.encode(tok.apply_chat_template(CONVERSATION))


def test_mask_equals_transformers_assistant_tokens_mask():
    """SFT_CHAT_TEMPLATE's {% generation %} blocks tell transformers what is learned: its
    assistant_masks over the same ids must equal ours."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from llmkit.tokenizers.hf import HFTokenizer

    words = sorted({w for m in CONVERSATION for w in m["content"].replace(".", " . ").replace("?", " ? ")
                    .replace("!", " ! ").split()} | {"system", "user", "assistant"})
    backend = Backend(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    expected = ref.apply_chat_template(CONVERSATION, chat_template=SFT_CHAT_TEMPLATE, tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True)
    ours = HFTokenizer(Backend.from_str(backend.to_str()), chat_template=SFT_CHAT_TEMPLATE)
    ids, mask = encode_conversation(ours, CONVERSATION)
    assert ids.tolist() == list(expected["input_ids"])
    assert mask.astype(int).tolist() == list(expected["assistant_masks"])
    assert mask.sum() == len("The cat sat on the mat .".split()) + len("The dog ran to the park !".split()) + 2


@pytest.mark.parametrize("text, reply, want", [
    ("Q [/INST] answer </s><s>[INST]", "answer", "answer </s>"),     # Llama 2: ' ' + eos after the reply
    ("<|user|>\nhi</s>\n<|assistant|>\nyo</s>\n", "yo", "yo</s>"),   # Zephyr: eos right after
    ("User: hi\nAssistant: yo\nUser: bye\n", "yo", "yo\n"),          # plain lines: the newline ends it
    ("A: yo", "yo", "yo"),                                           # nothing after: the content alone
])
def test_turn_end_takes_the_marker_or_newline_after_the_reply(text, reply, want):
    start = text.index(reply)
    assert text[start:turn_end(text, start + len(reply), ["<|im_end|>", "</s>"])] == want


# --- reading the data ------------------------------------------------------------------------------------

def test_alpaca_rows_of_either_spelling_and_chat_rows_become_conversations(tmp_path):
    conversations = read_conversations(write_rows(tmp_path / "d.jsonl", ROWS[:3]))
    assert conversations[0] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi! I am happy."}]
    assert conversations[1][0]["content"] == "Name a colour.\n\nNot red."
    assert conversations[1][1]["content"] == "Blue is a nice colour."
    assert conversations[2] == ROWS[2]["messages"]
    (tmp_path / "d.json").write_text(json.dumps(ROWS[:3]))  # a JSON array reads the same
    assert read_conversations(tmp_path / "d.json") == conversations


@pytest.mark.parametrize("bad", [{"text": "no instruction here"}, {"instruction": "x"}, ["a", "list"],
                                 {"messages": [{"role": "user", "content": "no reply"}]}, {"messages": "hi"}])
def test_row_of_neither_shape_is_a_user_error_naming_the_row(tmp_path, bad):
    path = write_rows(tmp_path / "d.jsonl", [ROWS[0], bad])
    with pytest.raises(UserError, match="d.jsonl row 2"):
        read_conversations(path)


def test_sft_needs_a_model_to_start_from(tmp_path):
    from llmkit.objectives import get_task
    from llmkit.training.config import TrainConfig

    cfg = TrainConfig(task="sft", data=str(write_rows(tmp_path / "d.jsonl", ROWS)), out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="--init-from"):
        get_task("sft")(cfg)


# --- set-up, truncation, the saved template -------------------------------------------------------------

def test_run_dir_carries_the_template_and_chat_prompts_match_training(tmp_path):
    from llmkit.tokenizers.base import load_tokenizer

    task = sft_task(tmp_path, write_rows(tmp_path / "d.jsonl", ROWS), val_fraction=0.0)
    saved = load_tokenizer(tmp_path / "run")
    assert saved.chat_template == SFT_CHAT_TEMPLATE and task.summary()["chat_template"] == "default ChatML"
    # what `llmkit chat` feeds the tuned model is exactly the training sample up to the first learned token
    messages = row_messages(ROWS[0], "row 1")
    ids, mask = encode_conversation(saved, messages)
    prompt = saved.encode(saved.apply_chat_template(messages[:1], add_generation_prompt=True))
    assert ids[:int(np.argmax(mask))].tolist() == prompt


def test_long_samples_are_cut_and_those_left_without_reply_skipped(tmp_path):
    rows = ROWS[:4] + [{"instruction": "word " * 200, "output": "A reply cut off entirely."},
                       {"instruction": "Short.", "output": "story " * 100}]
    task = sft_task(tmp_path, write_rows(tmp_path / "d.jsonl", rows), val_fraction=0.0, context_length=64)
    # rendered lengths 61, 81, 73, 68, 666 (reply from token 641), 354 tokens: all but the first are
    # cut to 64 inputs, and the long prompt's reply is cut entirely
    s = task.summary()
    assert s["skipped_no_assistant_tokens"] == 1 and s["truncated_to_context"] == 5 and s["train_samples"] == 5
    assert sorted(len(ids) for ids, _ in task.train_samples) == [61, 65, 65, 65, 65]
    assert all(mask[1:].any() for _, mask in task.train_samples)


# --- packing ---------------------------------------------------------------------------------------------

def _samples():
    tok = stories_tokenizer()
    return [encode_conversation(tok, row_messages(r, f"row {i}")) for i, r in enumerate(ROWS)]


def _stories_model():
    from llmkit.model_io import load_pretrained

    return load_pretrained(stories(), dtype=torch.float32).eval()


def test_pack_fills_rows_in_order_within_capacity():
    assert pack([5, 3, 4, 1, 6, 6], 8) == [[0, 1], [2, 3], [4], [5]]


def test_packed_loss_equals_padded_loss():
    from llmkit.objectives.sft import assistant_cross_entropy

    samples, model = _samples(), _stories_model()
    padded = collate_padded(samples, pad_id=0)
    packed = collate_packed([samples[:2], samples[2:5], samples[5:]], pad_id=0)
    assert packed["input_ids"].shape[0] == 3 and (packed["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()
    with torch.no_grad():
        a, _ = assistant_cross_entropy(model(padded["input_ids"], attention_mask=padded["attention_mask"]), padded["labels"])
        b, _ = assistant_cross_entropy(model(packed["input_ids"], segment_ids=packed["segment_ids"],
                                             position_ids=packed["position_ids"]), packed["labels"])
    assert abs(a.item() - b.item()) < 1e-5 and 1.0 < a.item() < 20.0


def test_changing_one_packed_sample_changes_no_other_samples_logits():
    samples, model = _samples(), _stories_model()
    batch = collate_packed([samples[:4]], pad_id=0)
    seg = batch["segment_ids"][0]
    changed = batch["input_ids"].clone()
    changed[0, seg == 2] = torch.randint(3, 500, ((seg == 2).sum().item(),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
        after = model(changed, segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
    other = seg != 2
    torch.testing.assert_close(after[0, other], before[0, other], atol=1e-6, rtol=0)
    assert (after[0, seg == 2] - before[0, seg == 2]).abs().max() > 1e-2  # the changed one does change
    # and each packed sample's logits are those of the sample alone (positions restart at 0)
    alone = collate_padded(samples[2:3], pad_id=0)
    with torch.no_grad():
        single = model(alone["input_ids"])
    torch.testing.assert_close(before[0, seg == 3], single[0], atol=1e-5, rtol=1e-5)


# --- batches ---------------------------------------------------------------------------------------------

def rows_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """Each batch row's (input ids, labels) without its padding."""
    real = batch["attention_mask"] if "attention_mask" in batch else batch["segment_ids"] > 0
    return [(x[m.bool()].tolist(), y[m.bool()].tolist()) for x, y, m in zip(batch["input_ids"], batch["labels"], real)]


@pytest.mark.parametrize("packed", [False, True])
def test_batches_do_not_depend_on_how_the_global_batch_is_split(tmp_path, packed):
    task = sft_task(tmp_path, write_rows(tmp_path / "d.jsonl", ROWS * 3), val_fraction=0.2, pack=packed,
                    context_length=64, token_dropout=0.3)
    whole = rows_of(task.train_batch(5, 0, 4, 0, 1, 1))
    ranks = [row for r in (0, 1) for row in rows_of(task.train_batch(5, 0, 2, r, 2, 1))]
    micros = [row for m in (0, 1) for row in rows_of(task.train_batch(5, m, 2, 0, 1, 2))]
    assert ranks == whole and micros == whole
    assert rows_of(task.train_batch(5, 0, 4, 0, 1, 1)) == whole  # a pure function of its arguments
    assert rows_of(task.train_batch(6, 0, 4, 0, 1, 1)) != whole
    assert task.has_validation and rows_of(task.eval_batch(0, 3, 0, 1)) == rows_of(task.eval_batch(0, 3, 0, 1))


def test_token_dropout_replaces_only_prompt_tokens_and_only_in_training(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", ROWS * 4)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = sft_task(tmp_path / "a", data, val_fraction=0.2)
    dropped = sft_task(tmp_path / "b", data, val_fraction=0.2, token_dropout=0.5)
    a, b = plain.train_batch(3, 0, 8, 0, 1, 1), dropped.train_batch(3, 0, 8, 0, 1, 1)
    assert torch.equal(a["labels"], b["labels"])
    changed = a["input_ids"] != b["input_ids"]
    assert changed.any() and not (changed & ~a["droppable"]).any()
    assert (b["input_ids"][changed] == dropped.tokenizer.unk_id).all()
    share = changed.sum().item() / a["droppable"].sum().item()
    assert 0.35 < share < 0.65
    assert torch.equal(plain.eval_batch(0, 4, 0, 1)["input_ids"], dropped.eval_batch(0, 4, 0, 1)["input_ids"])


# --- end to end ------------------------------------------------------------------------------------------

@pytest.mark.slow  # ~15 s of steps alone, ~30 s on a busy 2-core machine
def test_short_finetune_of_stories260k_lowers_the_assistant_token_loss(tmp_path):
    """25 steps of 4 packed rows on 200 short Code Alpaca rows through `train`: the held-out
    assistant-token loss falls from ~8.8 nats (the story model has never seen ChatML or code) to
    ~3.3 (measured); asserted below 4.5 and at least 3 nats under the start."""
    from llmkit.tokenizers.base import load_tokenizer
    from llmkit.training.config import TrainConfig
    from llmkit.training.loop import train

    source = INSTRUCTIONS / "code_alpaca_2k.json"
    if not source.is_file():
        pytest.skip(f"shared data missing: {source}")
    rows = [r for r in json.loads(source.read_text()) if len(r["instruction"] + r["input"] + r["output"]) < 200][:200]
    data = write_rows(tmp_path / "d.jsonl", rows)
    options = dict(pack=True, context_length=192, batch_size=4, max_steps=25, lr=5e-3, min_lr=5e-4, warmup_steps=5,
                   eval_every=0, eval_batches=4, val_fraction=0.1, device="cpu", progress=False, seed=1)
    (tmp_path / "pre").mkdir()
    task = sft_task(tmp_path / "pre", data, **options)  # the same held-out rows, before any step
    model = task.pretrained().eval()
    with torch.no_grad():
        before = sum(task.loss(model, task.eval_batch(i, 4, 0, 1))[0].item() for i in range(4)) / 4
    result = train(TrainConfig(task="sft", init_from=str(stories()), data=str(data), out=str(tmp_path / "run"),
                               **options))
    assert result.steps == 25 and before > 7.0
    assert result.val_loss < 4.5 and result.val_loss < before - 3.0, (before, result.val_loss)
    assert load_tokenizer(tmp_path / "run").chat_template == SFT_CHAT_TEMPLATE  # `llmkit chat` renders as trained
