"""Chat templates render exactly as transformers' apply_chat_template; assistant spans cover
exactly the assistant contents."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from llmkit.errors import UserError
from llmkit.tokenizers import DEFAULT_CHAT_TEMPLATE, HFTokenizer, render_chat, render_chat_with_spans

# Real templates as their model folders ship them (tokenizer_config.json "chat_template").
CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# Uses namespace, tojson, loop controls and a generation block, as newer templates do.
TOOLS_STYLE = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ '[SYS]' + message.content | tojson + '\n' }}{%- continue -%}{%- endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "{%- if message.role == 'assistant' -%}{{ 'A' ~ ns.n ~ ': ' }}{% generation %}{{ message.content }}{% endgeneration %}{{ eos_token + '\n' }}"
    "{%- else -%}{{ 'U' ~ ns.n ~ ': ' + message.content + '\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}"
)
TEMPLATES = {"chatml": CHATML_QWEN2, "llama2": LLAMA2, "zephyr": ZEPHYR, "tools": TOOLS_STYLE,
             "default": DEFAULT_CHAT_TEMPLATE}

CONVERSATIONS = {
    "with_system": [
        {"role": "system", "content": "You are terse. Ünïcode ok — 你好."},
        {"role": "user", "content": "What is 2+2?\n\nThink  carefully."},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And \"quoted\" <b>html</b>?"},
        {"role": "assistant", "content": "  padded answer with\ttab\n"},
    ],
    "no_system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "Bye"},
    ],
}

BOS, EOS = "<s>", "</s>"


@pytest.fixture(scope="module")
def reference():
    """A transformers fast tokenizer over a tiny tokenizer of our own (no hub access)."""
    transformers = pytest.importorskip("transformers")
    backend = BackendTokenizer(models.WordLevel({"<unk>": 0, BOS: 1, EOS: 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token="<unk>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_render_equals_transformers_apply_chat_template(reference, name, conv, gen):
    messages = CONVERSATIONS[conv]
    if name == "llama2" and gen:
        messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    expected = reference.apply_chat_template(messages, chat_template=TEMPLATES[name], add_generation_prompt=gen,
                                             tokenize=False)
    got = render_chat(messages, TEMPLATES[name], add_generation_prompt=gen, bos_token=BOS, eos_token=EOS,
                      unk_token="<unk>")
    assert got == expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_spans_cover_exactly_the_assistant_contents(name, conv):
    messages = CONVERSATIONS[conv]
    text, spans = render_chat_with_spans(messages, TEMPLATES[name], bos_token=BOS, eos_token=EOS)
    assert text == render_chat(messages, TEMPLATES[name], bos_token=BOS, eos_token=EOS)
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(contents)
    for (start, end), content in zip(spans, contents):
        # Templates that strip contents (Llama 2) render the stripped text; others render it whole.
        assert text[start:end] in (content, content.strip())
    assert spans == sorted(spans)


def test_spans_ignore_assistant_text_repeated_in_user_turns():
    messages = [{"role": "user", "content": "say 4"}, {"role": "assistant", "content": "4"}]
    text, spans = render_chat_with_spans(messages, None)
    assert len(spans) == 1 and text[spans[0][0]:spans[0][1]] == "4"
    assert spans[0][0] > text.index("say 4") + len("say")


def test_template_raise_exception_is_user_error():
    with pytest.raises(UserError, match="alternate"):
        render_chat([{"role": "assistant", "content": "x"}], LLAMA2, bos_token=BOS, eos_token=EOS)


def test_template_syntax_error_is_user_error():
    with pytest.raises(UserError, match="syntax error"):
        render_chat([{"role": "user", "content": "x"}], "{% for m in messages %}")


def test_sandbox_blocks_attribute_escape():
    evil = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception):
        render_chat([{"role": "user", "content": "x"}], evil)


def test_tokenizer_without_template_uses_chatml_default():
    backend = BackendTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok = HFTokenizer(backend)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_trained_tokenizer_chat_markers_are_single_ids(shakespeare_slice):
    from llmkit.tokenizers import train_tokenizer

    tok = train_tokenizer("bpe", texts=[shakespeare_slice], vocab_size=400)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    assert ids[0] == tok.token_to_id("<|user|>") and tok.token_to_id("<|end|>") in ids
    assert ids[-2:] == [tok.token_to_id("<|assistant|>"), tok.encode("\n")[0]]
    text, spans = tok.apply_chat_template_with_spans(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    assert [text[s:e] for s, e in spans] == ["hello there"]


SFT_CHAT = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello, friend 😀!"},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "Sure: ещё."},
]


def test_encode_chat_masks_exactly_assistant_tokens_with_offsets(gpt2_dir):
    from llmkit.tokenizers import load_tokenizer

    tok = load_tokenizer(gpt2_dir)
    ids, mask = tok.encode_chat(SFT_CHAT)
    assert ids == tok.encode(tok.apply_chat_template(SFT_CHAT))  # whole-text ids, unchanged by masking
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    # Whole-text BPE may merge across a span edge (".<" of "<|im_end|>"): such tokens count as targets.
    assert masked.startswith("Hello, friend 😀!") and "Sure: ещё." in masked and len(masked) <= 29


def test_encode_chat_sentencepiece_path_masks_assistant_tokens(llama_model):
    from llmkit.tokenizers import load_tokenizer

    tok = load_tokenizer(llama_model)
    ids, mask = tok.encode_chat(SFT_CHAT)
    assert len(ids) == len(mask)
    assert ids == tok.encode(tok.apply_chat_template(SFT_CHAT))
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked.startswith("Hello, friend 😀!") and "Sure: ещё." in masked and len(masked) <= 30


def test_encode_with_spans_generic_path_splits_at_span_edges():
    from llmkit.tokenizers import CharTokenizer

    tok = CharTokenizer("abcd")
    ids, mask = tok.encode_with_spans("abcdab", [(1, 3), (4, 5)])
    assert ids == tok.encode("abcdab") and mask == [0, 1, 1, 0, 1, 0]
