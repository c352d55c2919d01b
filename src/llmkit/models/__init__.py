from llmkit.models.decoder import DecoderLM

__all__ = ["DecoderLM"]
