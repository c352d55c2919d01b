"""The Python entry point: `llmkit.load(path)` gives a model with its tokenizer, ready to generate.

The model's class comes from its directory (an llmkit config.json names the architecture, see
`llmkit.models.kinds`; a Hugging Face directory is a decoder). The tokenizer is optional: a
directory of weights alone loads, runs on token ids, and says what is missing only when text is asked
for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate, generate_tokens, stream
from llmkit.models.kinds import ModelKind, kind_of_model, require_text_generation
from llmkit.tokenizers.base import TOKENIZERS, Tokenizer, load_tokenizer


@dataclass
class LanguageModel:
    """A loaded model, its tokenizer (None when the directory has none) and where it came from."""

    model: torch.nn.Module
    tokenizer: Tokenizer | None
    path: Path

    @property
    def kind(self) -> ModelKind | None:
        return kind_of_model(self.model)

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a UserError saying which directory lacks one and how to give one."""
        if self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer, which text in or out needs: pass tokenizer=PATH to "
                            "llmkit.load (--tokenizer PATH on the command line) or copy the tokenizer files "
                            f"(tokenizer.json, tokenizer.model, or vocab.json + merges.txt) into {self.path}; "
                            "token ids need none (generate_ids)")
        return self.tokenizer

    def _text_ready(self) -> Tokenizer:
        require_text_generation(self.model)
        return self.require_tokenizer()

    def generate(self, prompt: str, **settings) -> str:
        """Generated continuation of `prompt`; settings are GenerationConfig fields."""
        return generate(self.model, self._text_ready(), prompt, GenerationConfig(**settings))

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        """The continuation as text pieces, as they are produced."""
        return stream(self.model, self._text_ready(), prompt, GenerationConfig(**settings))

    def generate_ids(self, prompt_ids: Sequence[int], **settings) -> list[int]:
        """New token ids after `prompt_ids` (no tokenizer needed; a stop token ends the list, included).
        Stop ids are `stop_token_ids` plus the tokenizer's EOS when there is a tokenizer."""
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        return list(generate_tokens(self.model, list(prompt_ids), GenerationConfig(**settings), eos_id=eos))


def load_model_any(path: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """The model of an llmkit run/model directory (of any registered kind) or of a Hugging Face
    directory (told apart by config.json's model_type). A llama2.c .bin must be converted first: it
    has no tokenizer."""
    from llmkit.interop.convert import detect_format
    from llmkit.interop.dtypes import parse_dtype
    from llmkit.interop.hf import load_hf
    from llmkit.model_io import load_model

    path = Path(path)
    fmt = detect_format(path)
    if fmt == "llama2c":
        raise UserError(f"{path} is a llama2.c checkpoint: convert it first with "
                        f"`llmkit convert {path} --tokenizer TOKENIZER.model --out DIR`, then load DIR")
    if fmt == "hf":
        return load_hf(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=parse_dtype(dtype))


def find_tokenizer(path: str | Path, tokenizer: str | Path | Tokenizer | None = None) -> Tokenizer | None:
    """`tokenizer` (an object, a file or a folder) if given, else the one in `path`, else None.
    Files that are there but unreadable still raise: only an absent tokenizer is None."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    path = Path(path)
    if path.is_dir() and any(kind.can_load(path) for kind in TOKENIZERS.values()):
        return load_tokenizer(path)
    return None


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         tokenizer: str | Path | Tokenizer | None = None) -> LanguageModel:
    """Load an llmkit run directory or a Hugging Face model directory with its tokenizer.
    `dtype` (torch dtype or "fp32"/"bf16"/"fp16") casts; None keeps the stored dtype. `tokenizer`
    (a Tokenizer, file or folder) replaces the directory's own; a directory without one still
    loads, and text generation then raises a UserError saying so."""
    model = load_model_any(path, device=device, dtype=dtype)
    return LanguageModel(model, find_tokenizer(path, tokenizer), Path(path))
