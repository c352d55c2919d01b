"""Position-wise feed-forward networks: the GELU MLP (GPT-2; GELU from Hendrycks & Gimpel,
"Gaussian Error Linear Units", 2016) and SwiGLU (Shazeer, "GLU Variants Improve Transformer",
2020), as used by LLaMA, and GeGLU (the same paper's GELU-gated unit), as used by Gemma; CLIP's quick GELU."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.nn.linear import Linear


class GeluMLP(nn.Module):
    """down(GELU(up(x))), the hidden layer `d_ff` wide (4 x d_model in GPT-2)."""

    approximate = "none"

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate=self.approximate)))


class ReluMLP(GeluMLP):
    """down(relu(up(x))): the original Transformer's and T5 v1.0's feed-forward ("DenseReluDense")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.relu(self.up(x))))


class GeluTanhMLP(GeluMLP):
    """GPT-2's tanh approximation of GELU ("gelu_new" in transformers)."""

    approximate = "tanh"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's "gelu_new", Gemma's "gelu_pytorch_tanh")."""
    return F.gelu(x, approximate="tanh")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated linear unit with the SiLU (swish) gate."""

    activation = staticmethod(F.silu)

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(self.gate(x)) * self.up(x)))


class GeGLU(SwiGLU):
    """down(gelu_tanh(gate(x)) * up(x)): the gated linear unit with a (tanh-approximated) GELU gate
    (Shazeer 2020), Gemma's MLP. SwiGLU's parameters; fast paths find classes by exact type, so
    those written for SwiGLU's arithmetic never take it."""

    activation = staticmethod(gelu_tanh)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016) that CLIP uses."""
    return x * torch.sigmoid(1.702 * x)


class QuickGeluMLP(GeluMLP):
    """down(quick_gelu(up(x))): CLIP's MLP (GeluMLP's parameters; its own class, so fast paths
    written for GELU's arithmetic never take it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(quick_gelu(self.up(x))))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "gelu_tanh": GeluTanhMLP, "swiglu": SwiGLU, "geglu": GeGLU,
                                    "quick_gelu": QuickGeluMLP, "relu": ReluMLP}
