"""Fast paths, and only fast paths: each stands in for reference code at one seam, gives the same
numbers (float rounding apart), and steps aside for anything it was not written for.

Importing this package (llmkit's __init__ does) fills the seams that nn/, models/ and training/
define, each keyed by exact class:

| seam                                     | fast path                                          |
|------------------------------------------|----------------------------------------------------|
| nn.seams.SUBLAYERS[Attention]            | fused_attention.residual (training), decode.attention_residual |
| nn.seams.SUBLAYERS[GeluMLP, ...]         | fused_mlp.residual (training), decode.mlp_residual |
| nn.seams.HEADS[Linear]                   | fused.normed_linear (training), decode.head        |
| nn.seams.ATTENTION_CORES                 | fused_attention.core (training), decode.core       |
| models.decoder.DECODE_STEPS[DecoderLM]   | decode_step.run (the whole model in one C call)    |
| models.decoder.DECODE_LAYOUTS[DecoderLM] | decode_step.layout (huge pages)                    |
| training.optim.STEP_PATHS[AdamW]         | optim.adamw_step                                   |
| training.optim.CLIP_PATHS                | optim.clip_grad_norm                               |

Set LLMKIT_NATIVE=0 to build no kernels: then every path declines where it needs one.
"""
from __future__ import annotations

from typing import Any, Callable

from llmkit import kernels
from llmkit.accel import decode, decode_step, declared, fused, fused_attention, fused_mlp, optim
from llmkit.kernels import threads  # noqa: F401  (re-exported: generation runs kernels on every core)
from llmkit.models import decoder
from llmkit.nn import seams
from llmkit.nn.attention import Attention
from llmkit.nn.linear import Linear
from llmkit.training import optim as training_optim


def first_of(*runs: Callable[..., Any]) -> Callable[..., Any]:
    """One run trying each of `runs` in turn: the first result that is not None."""
    def run(*args: Any, **kwargs: Any) -> Any:
        for r in runs:
            y = r(*args, **kwargs)
            if y is not None:
                return y
        return None
    return run


def register() -> None:
    """Fill the seams (idempotent)."""
    seams.SUBLAYERS[Attention] = seams.FastPath(
        "attention sublayer: folded (training) / few-row kernels (decoding)",
        first_of(fused_attention.residual, decode.attention_residual),
        {Attention: declared.attention(rope=declared.ANY, mask=declared.ANY, cache=declared.ANY, bias=declared.is_none)})
    for cls, decl in declared.MLP.items():
        seams.SUBLAYERS[cls] = seams.FastPath("MLP sublayer: folded (training) / few-row kernels (decoding)",
                                              first_of(fused_mlp.residual, decode.mlp_residual), {cls: decl})
    seams.HEADS[Linear] = seams.FastPath("final norm + LM head: folded (training) / few-row kernels (decoding)",
                                         first_of(fused.normed_linear, decode.head), {Linear: declared.LINEAR})
    seams.ATTENTION_CORES[:] = [seams.FastPath("native causal attention (training)", fused_attention.core, {}),
                                seams.FastPath("native one-query attention (decoding)", decode.core, {})]
    decoder.DECODE_STEPS[decoder.DecoderLM] = decode_step.DECODE_STEP
    decoder.DECODE_LAYOUTS[decoder.DecoderLM] = decode_step.layout
    training_optim.STEP_PATHS[training_optim.AdamW] = optim.adamw_step
    training_optim.CLIP_PATHS[:] = [optim.clip_grad_norm]


def unregister() -> None:
    """Empty the seams: everything runs the reference code (tests compare the two)."""
    seams.SUBLAYERS.clear()
    seams.HEADS.clear()
    seams.ATTENTION_CORES.clear()
    decoder.DECODE_STEPS.clear()
    decoder.DECODE_LAYOUTS.clear()
    training_optim.STEP_PATHS.clear()
    training_optim.CLIP_PATHS.clear()


def available() -> bool:
    """Whether the native kernels built here (without them most paths decline)."""
    return kernels.available()


def status() -> str:
    """One line for `llmkit info`: whether native kernels run here, and why not."""
    return kernels.status()


register()
