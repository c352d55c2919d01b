"""Chat templates: render a conversation through a Jinja template exactly as transformers'
`apply_chat_template` does, and find the character spans of the assistant turns so that
supervised fine-tuning can compute the loss on them alone.

The environment matches transformers': sandboxed, `trim_blocks` + `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` block tag, `raise_exception`, a `tojson` that does
not HTML-escape, `strftime_now`, and the special tokens passed as `bos_token`, `eos_token`, ...
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import UserError

# ChatML, as Qwen and many others use: every turn is `<|im_start|>role\ncontent<|im_end|>\n`.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For tokenizers trained here: the role markers are special tokens, so each is a single id.
ROLE_MARKER_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# For character-level tokenizers, whose vocabulary holds only the characters of their training text:
# plain "User: ...\nAssistant: ..." lines, made of letters, ':', ' ' and '\n' that any English text
# has (the markers above would need '<' and '|'). A reply ends where the next turn's label starts.
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_CHAT_TEMPLATE = (
    "{% set names = " + repr(PLAIN_ROLES) + " %}"
    "{% for message in messages %}"
    "{{ names.get(message['role'], message['role']) + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
PLAIN_TURN_ENDS = tuple(f"\n{name}:" for name in PLAIN_ROLES.values())


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping, as templates that print tool schemas expect."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template string; chat templates come from the Hub, so always sandboxed."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template has a syntax error (line {e.lineno}): {e.message}; fix the template") from None


def _plain_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh dict copies without None values (templates handle a missing key better than None)."""
    if isinstance(messages, dict) or not all(isinstance(m, dict) for m in messages):
        raise UserError("chat messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def render_chat(
    messages: Sequence[dict[str, Any]],
    template: str | None = None,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` with `template` (DEFAULT_CHAT_TEMPLATE when None)."""
    if not messages:
        raise UserError("cannot render an empty conversation: give at least one message")
    compiled = compile_template(template or DEFAULT_CHAT_TEMPLATE)
    extra.setdefault("tools", None)
    extra.setdefault("documents", None)
    try:
        return compiled.render(
            messages=_plain_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"chat template refused the conversation: {e}; fix the messages or the template") from None


# Private-use characters: never produced by a tokenizer's normal text, kept by every Jinja filter
# a template is likely to apply (trim, tojson with ensure_ascii=False, string concatenation).
_OPEN, _CLOSE = "\ue000", "\ue001"


def _wrap_whole(content: str) -> str:
    return _OPEN + content + _CLOSE


def _wrap_core(content: str) -> str:
    """Markers inside the outer whitespace, for templates that `trim` the content."""
    core = content.strip()
    if not core:
        return content
    start = content.index(core)
    return content[:start] + _OPEN + core + _CLOSE + content[start + len(core):]


_WRAPPERS: tuple[Callable[[str], str], ...] = (_wrap_whole, _wrap_core)


def _spans_from_markers(marked: str) -> tuple[str, list[tuple[int, int]]] | None:
    """Strip the markers; return the text and the spans between marker pairs (None if unbalanced)."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    start: int | None = None
    for ch in marked:
        if ch == _OPEN:
            if start is not None:
                return None
            start = pos
        elif ch == _CLOSE:
            if start is None:
                return None
            spans.append((start, pos))
            start = None
        else:
            out.append(ch)
            pos += 1
    return ("".join(out), spans) if start is None else None


def render_chat_with_spans(
    messages: Sequence[dict[str, Any]],
    template: str | None = None,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """Render like `render_chat` and return the (start, end) character spans of assistant contents.

    Each assistant content is wrapped in private-use marker characters, rendered, and the markers'
    positions become the spans once removed; the result is accepted only if it equals the plain
    rendering, so a template that rewrites contents can never yield wrong spans.
    """
    plain = render_chat(messages, template, add_generation_prompt, bos_token, eos_token, **extra)
    if any(_OPEN in str(m.get("content", "")) or _CLOSE in str(m.get("content", "")) for m in messages):
        raise UserError("message content contains private-use characters U+E000/U+E001: remove them")
    n_assistant = sum(1 for m in messages if m.get("role") == "assistant" and isinstance(m.get("content"), str))
    for wrap in _WRAPPERS:
        marked_messages = [
            {**m, "content": wrap(m["content"])} if m.get("role") == "assistant" and isinstance(m.get("content"), str) else m
            for m in messages
        ]
        marked = render_chat(marked_messages, template, add_generation_prompt, bos_token, eos_token, **extra)
        found = _spans_from_markers(marked)
        if found is not None and found[0] == plain and len(found[1]) <= n_assistant:
            return plain, [s for s in found[1] if s[1] > s[0]]
    raise UserError(
        "could not locate the assistant turns in the rendered chat (the template rewrites message contents); "
        "use a template that prints message['content'] unchanged"
    )
