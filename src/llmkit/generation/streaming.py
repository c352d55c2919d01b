"""Incremental detokenisation. Decoding token by token breaks multi-byte characters (byte-level
BPE emits half a UTF-8 sequence) and would print the start of a stop string before we know it is
one; so we decode the recent tokens behind an anchor of earlier ones and emit only the part that is
final. Text that can no longer change is committed once, so each token costs a decode of a short
window, not of the whole continuation."""
from __future__ import annotations

from typing import Sequence


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still become a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


class TextStreamer:
    """Turns a token stream into text pieces that are final: complete characters, no stop-string prefix."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), context: Sequence[int] = ()):
        """`context`: the prompt's last few ids. SentencePiece drops the leading space of a text's
        first word, so decoding the continuation alone would turn "Once" + " upon" into "Onceupon";
        decoding it behind its context and cutting the context's text off keeps the space."""
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.context = list(context)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.commit = 0  # ids[:commit] are decoded once into committed_text
        self.committed_text = ""

    def put(self, token: int) -> str:
        """Add a token; return the newly final text (possibly empty)."""
        self.ids.append(token)
        text = self._text()
        for s in self.stops:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.stopped = True
                piece, self.emitted = text[self.emitted:at], at
                return piece
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        end = max(self.emitted, end - _held_back(text[:end], self.stops))
        piece, self.emitted = text[self.emitted:end], end
        return piece

    ANCHOR, WINDOW = 4, 16  # ids decoded before the window (for their spacing); uncommitted ids kept

    def _decode_after(self, anchor: list[int], ids: list[int]) -> str:
        """The text `ids` add after `anchor` (SentencePiece drops a text's leading space otherwise)."""
        if anchor:
            full, head = self.tokenizer.decode(anchor + ids), self.tokenizer.decode(anchor)
            if full.startswith(head):
                return full[len(head):]
        return self.tokenizer.decode(ids)

    def _anchor(self) -> list[int]:
        before = self.context + self.ids[:self.commit]
        return before[-self.ANCHOR:] if self.commit else self.context

    def _text(self) -> str:
        """The whole continuation's text: the committed part, then the window decoded behind its anchor."""
        tail = self._decode_after(self._anchor(), self.ids[self.commit:])
        text = self.committed_text + tail
        if len(self.ids) - self.commit > 2 * self.WINDOW:  # commit all but the last WINDOW ids
            cut = len(self.ids) - self.WINDOW
            head = self._decode_after(self._anchor(), self.ids[self.commit:cut])
            if head and not head.endswith("\ufffd") and tail.startswith(head):
                self.committed_text += head
                self.commit = cut
        return text

    def finish(self) -> str:
        """Flush what was held back (the stream ended without completing a stop string)."""
        if self.stopped:
            return ""
        text = self._text()
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (the whole text if none occurs)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return text[:min(ends)] if ends else text
