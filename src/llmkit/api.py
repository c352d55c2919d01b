"""The Python entry point: `llmkit.load(path)` gives a model with its tokenizer, ready to generate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llmkit.generation.generate import GenerationConfig, generate, stream
from llmkit.model_io import load_model
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


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LanguageModel:
    """Load a model directory (an llmkit run directory) with its tokenizer."""
    model = load_model(path, device=device, dtype=dtype)
    return LanguageModel(model, load_tokenizer(path), Path(path))
