"""Decoding: logits processors (pure functions in a registry), the token loop with a KV cache,
beam search, speculative decoding, left-padded batches, and streaming text that never splits a
character or leaks part of a stop string."""
from llmkit.generation.beam import BeamResult, beam_search
from llmkit.generation.generate import (GenerationConfig, generate, generate_batch, generate_many, generate_tokens,
                                        stream)
from llmkit.generation.sampling import PROCESSORS
from llmkit.generation.speculative import speculative_tokens
from llmkit.generation.streaming import TextStreamer

__all__ = ["BeamResult", "GenerationConfig", "PROCESSORS", "TextStreamer", "beam_search", "generate", "generate_batch",
           "generate_many", "generate_tokens", "speculative_tokens", "stream"]
