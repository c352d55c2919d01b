"""Tokenizers: one interface (`Tokenizer`) over character, `tokenizers`-library (BPE, WordPiece,
Unigram, GPT-2 files, HF tokenizer.json) and SentencePiece kinds; training; chat templates.

Importing this package registers every kind with `load_tokenizer`.
"""
from llmkit.tokenizers.base import TOKENIZERS, SPECIAL_ROLES, Tokenizer, load_tokenizer, register
from llmkit.tokenizers.char import CharTokenizer
from llmkit.tokenizers.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ROLE_MARKER_CHAT_TEMPLATE,
    render_chat,
    render_chat_with_spans,
)
from llmkit.tokenizers.hf import HFTokenizer
from llmkit.tokenizers.clip import CLIPTokenizer
from llmkit.tokenizers.spm import SentencePieceTokenizer
from llmkit.tokenizers.train import BUILDERS, DEFAULT_SPECIAL_TOKENS, read_text_file, train_tokenizer

__all__ = [
    "BUILDERS",
    "CLIPTokenizer",
    "CharTokenizer",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "HFTokenizer",
    "ROLE_MARKER_CHAT_TEMPLATE",
    "SPECIAL_ROLES",
    "SentencePieceTokenizer",
    "TOKENIZERS",
    "Tokenizer",
    "load_tokenizer",
    "read_text_file",
    "register",
    "render_chat",
    "render_chat_with_spans",
    "train_tokenizer",
]
