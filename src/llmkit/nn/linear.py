"""The linear layer every llmkit model uses: `nn.Linear` itself (same parameters, state dict, init
and isinstance checks). Its own class, so that fast paths (llmkit.accel) can recognise exactly it:
an adapter or a quantized layer that replaces or subclasses it runs as what it is."""
from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    """y = x W^T + b."""
