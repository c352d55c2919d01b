"""Decoding: sampling filters (pure functions on logits), the token loop with a KV cache, and
streaming text that never splits a character or leaks part of a stop string."""
from llmkit.generation.generate import GenerationConfig, generate, generate_tokens, stream

__all__ = ["GenerationConfig", "generate", "generate_tokens", "stream"]
