"""Fixtures for data-pipeline tests (defined in data_helpers)."""
from data_helpers import gpt2_dir, shakespeare, small_tok  # noqa: F401
