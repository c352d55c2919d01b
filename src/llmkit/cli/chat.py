"""`llmkit chat DIR`: a multi-turn conversation in the terminal, rendered with the model's chat
template (or the default ChatML one), replies streamed. `/reset` forgets the conversation, `/exit`
(or end of input) quits."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

from llmkit.cli.generate import add_decoding_options, decoding_settings, load_draft

# Markers that end an assistant turn in common templates: generation stops at any of them.
TURN_ENDS = ("<|im_end|>", "<|end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|im_start|>", "<|user|>")

Messages = list[dict[str, Any]]


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Multi-turn chat using the model's chat template. "
                                   "Commands: /reset clears the conversation, /exit quits.")
    p.add_argument("run_dir", help="run or model directory (llmkit or Hugging Face)")
    p.add_argument("--system", default=None, help="system message (default: none)")
    add_decoding_options(p)
    p.set_defaults(func=run)


def turn_stops(tokenizer) -> tuple[list[str], list[int]]:
    """Stop strings and stop ids for the end of a turn (ids only for markers that are one token)."""
    ids = [i for i in (tokenizer.token_to_id(m) for m in TURN_ENDS) if i is not None]
    return list(TURN_ENDS), ids


def fit_prompt(tokenizer, messages: Messages, budget: int) -> tuple[list[int], Messages]:
    """Token ids of the conversation with the generation prompt, dropping the oldest turns (never
    the system message or the latest user turn) until it fits in `budget` tokens."""
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids, messages
        messages = messages[:first] + messages[first + 1:]


def chat_loop(lines: TextIO, out: TextIO, reply: Callable[[Messages], Any], system: str | None,
              interactive: bool) -> None:
    """Read user turns from `lines`, write streamed replies to `out`. `reply(messages)` yields text."""
    start: Messages = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        out.write("assistant> ")
        pieces = []
        for piece in reply(messages):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load
    from llmkit.generation.generate import stream_ids

    lm = load(args.run_dir, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    model, tok = lm.model.eval(), lm.require_tokenizer()
    cfg = decoding_settings(args)
    stops, stop_ids = turn_stops(tok)
    cfg.stop = cfg.stop + stops
    cfg.stop_token_ids = cfg.stop_token_ids + stop_ids
    draft = load_draft(args)
    budget = model.cfg.context_length - min(cfg.max_new_tokens, model.cfg.context_length // 2)

    def reply(messages: Messages):
        ids, kept = fit_prompt(tok, messages, budget)
        messages[:] = kept
        yield from stream_ids(model, tok, ids, cfg, draft)

    chat_loop(sys.stdin, sys.stdout, reply, args.system, interactive=sys.stdin.isatty())
    return 0
