"""`llmkit chat DIR`: a multi-turn conversation in the terminal, rendered with the model's chat
template (or the default ChatML one; "User: ..." lines for a character-level tokenizer), replies
streamed. `/reset` forgets the conversation, `/exit` (or end of input) quits.

What would refuse every message (a tokenizer that cannot encode its own template's text, more beams
than the vocabulary) is one error line at start; a message the tokenizer cannot encode is one error
line, and at a terminal the conversation goes on without it."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

from llmkit.cli.args import StdinLines
from llmkit.cli.generate import add_decoding_options, decoding_settings, load_draft
from llmkit.errors import UserError

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
    """Stop strings and stop ids for the end of a turn (ids only for markers that are one token),
    plus the turn starts of the tokenizer's own template (`chat_turn_ends`, e.g. "\nUser:")."""
    ids = [i for i in (tokenizer.token_to_id(m) for m in TURN_ENDS) if i is not None]
    return list(TURN_ENDS) + list(tokenizer.chat_turn_ends), ids


def check_template(tokenizer, system: str | None) -> None:
    """UserError, before the first message, when the tokenizer cannot encode the text its chat
    template adds around the messages (every message would be refused). A template that refuses this
    empty conversation is left to answer the real one."""
    probe = ([{"role": "system", "content": ""}] if system else []) + [
        {"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=True)
    except UserError:
        return
    try:
        tokenizer.encode(text)
    except UserError as e:
        missing = tokenizer.missing(text) if hasattr(tokenizer, "missing") else ""
        why = f"its vocabulary lacks {missing!r}" if missing else f"{e}"
        raise UserError(f"this model's tokenizer cannot encode its chat template ({text[:60]!r}...): {why}, so every "
                        "message would be refused; chat needs a model whose vocabulary has those characters "
                        "(use `llmkit generate` to continue plain text)") from None


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
              interactive: bool, err: TextIO | None = None) -> None:
    """Read user turns from `lines`, write streamed replies to `out`. `reply(messages)` yields text.
    A UserError while answering (a character the tokenizer lacks) ends the loop, except when
    `interactive`: then it is one line on `err` and the turn is forgotten, so the user can retype."""
    err = err or sys.stderr
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
        before = list(messages)
        messages.append({"role": "user", "content": text})
        out.write("assistant> ")
        pieces = []
        try:
            for piece in reply(messages):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except UserError as e:
            if not interactive:
                raise
            out.write("\n")
            out.flush()
            err.write(f"error: {e}\n")
            messages[:] = before
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load
    from llmkit.generation.beam import check_beams
    from llmkit.generation.generate import stream_ids

    lm = load(args.run_dir, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, adapter=args.adapter)
    model, tok = lm.model.eval(), lm.require_tokenizer()
    if getattr(model, "is_encoder_decoder", False):  # before the first prompt is printed
        raise UserError(f"{args.run_dir} is an encoder-decoder (T5) model, which maps a source to a target: "
                        "use `llmkit generate DIR --prompt SOURCE`; chat needs a decoder model")
    cfg = decoding_settings(args)
    check_template(tok, args.system)
    if cfg.num_beams > 1:
        check_beams(model, cfg.num_beams, 1, cfg.max_new_tokens)
    stops, stop_ids = turn_stops(tok)
    cfg.stop = cfg.stop + stops
    cfg.stop_token_ids = cfg.stop_token_ids + stop_ids
    draft = load_draft(args)
    budget = model.cfg.context_length - min(cfg.max_new_tokens, model.cfg.context_length // 2)

    def reply(messages: Messages):
        ids, kept = fit_prompt(tok, messages, budget)
        messages[:] = kept
        yield from stream_ids(model, tok, ids, cfg, draft)

    lines = StdinLines()
    chat_loop(lines, sys.stdout, reply, args.system, interactive=lines.isatty())
    return 0
