"""The Python entry point: `llmkit.load(path)` gives a model with its tokenizer, ready to generate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate, stream
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers.base import Tokenizer, load_tokenizer


@dataclass
class LanguageModel:
    model: DecoderLM
    tokenizer: Tokenizer
    path: Path

    def generate(self, prompt: str, **settings) -> str:
        """Generated continuation of `prompt`; settings are GenerationConfig fields."""
        return generate(self.model, self.tokenizer, prompt, GenerationConfig(**settings))

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        """The continuation as text pieces, as they are produced."""
        return stream(self.model, self.tokenizer, prompt, GenerationConfig(**settings))


def load_model_any(path: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None) -> DecoderLM:
    """The model of an llmkit run/model directory or of a Hugging Face directory (told apart by
    config.json's model_type). A llama2.c .bin must be converted first: it has no tokenizer."""
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


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> LanguageModel:
    """Load an llmkit run directory or a Hugging Face model directory with its tokenizer.
    `dtype` (torch dtype or "fp32"/"bf16"/"fp16") casts; None keeps the stored dtype."""
    model = load_model_any(path, device=device, dtype=dtype)
    return LanguageModel(model, load_tokenizer(path), Path(path))
