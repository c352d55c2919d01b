"""Checkpoint interop: Hugging Face directories (the families in `families.FAMILIES`: GPT-2, Llama,
Qwen2/3, Mistral, Gemma 2, GPT-NeoX, Phi-3, Bloom, Mixtral, Qwen2/3-MoE) in and out, and
llama2.c `.bin` checkpoints in. Conversion is data: see `families.py`."""
from llmkit.interop.families import FAMILIES
from llmkit.interop.hf import config_from_hf, export_hf, from_transformers, is_hf_dir, load_hf


def _read_pretrained(path, device, dtype):
    """A Hugging Face directory or a llama2.c .bin as a model (None for other paths): the reader
    `llmkit.model_io.load_pretrained` tries before llmkit's own directories."""
    from pathlib import Path

    from llmkit.interop.llama2c import load_llama2c

    path = Path(path)
    if path.is_file() and path.suffix == ".bin":
        return load_llama2c(path, dtype=dtype).to(device)
    if path.is_dir() and is_hf_dir(path):
        return load_hf(path, device=device, dtype=dtype)
    return None


def register() -> None:
    """Fill the lower layers' seams: pretrained readers (model_io) and peft adapter naming."""
    from llmkit import model_io
    from llmkit.interop import peft_format

    if _read_pretrained not in model_io.PRETRAINED_READERS:
        model_io.PRETRAINED_READERS.append(_read_pretrained)
    peft_format.register()


register()

__all__ = ["FAMILIES", "config_from_hf", "export_hf", "from_transformers", "is_hf_dir", "load_hf"]
