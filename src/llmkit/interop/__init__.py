"""Checkpoint interop: Hugging Face directories (the families in `families.FAMILIES`: GPT-2, Llama,
Qwen2/3, Mistral, Gemma 2, GPT-NeoX, Phi-3, Bloom, Mixtral, Qwen2/3-MoE) in and out, and
llama2.c `.bin` checkpoints in. Conversion is data: see `families.py`."""
from llmkit.interop.families import FAMILIES
from llmkit.interop.hf import config_from_hf, export_hf, from_transformers, is_hf_dir, load_hf

__all__ = ["FAMILIES", "config_from_hf", "export_hf", "from_transformers", "is_hf_dir", "load_hf"]
