"""The linear layer every llmkit model uses: `nn.Linear` (same parameters, state dict, init and
isinstance checks), with one addition: a few rows of fp32 input on CPU without autograd, which is
what each batch-1 decoding step is, go to the native matrix-vector kernel (`llmkit.kernels`)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit import kernels


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= kernels.MAX_ROWS * self.in_features:
            y = kernels.linear(x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)


def linear_into(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lead: tuple) -> torch.Tensor:
    """rows @ weight^T (+ bias) as a fresh [*lead, out] tensor, not a view: a Function's output
    that is a view of its own result cannot be edited in place afterwards (logits.div_, a hook
    steering a block's output), which the modules' outputs can."""
    out = torch.empty(*lead, weight.shape[0], dtype=rows.dtype, device=rows.device)
    flat = out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(rows, weight.t(), out=flat)
    else:
        torch.addmm(bias, rows, weight.t(), out=flat)
    return out
