"""Data: text sources -> token ids cached on disk -> random windows for causal-LM training."""
