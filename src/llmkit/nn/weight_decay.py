"""Which parameters AdamW's decoupled weight decay applies to (Loshchilov & Hutter 2019): the
matrices that multiply. Norms, biases (1-d) and embeddings (token tables, learned positions, a
head tied to them) are not decayed: decaying them only hurts. One rule for the optimizer's
default groups (`llmkit.training.optim.param_groups`) and for a fine-tuning method's own groups
(layer-wise learning rates, `llmkit.peft.partial`), wherever the body sits under a wrapper."""
from __future__ import annotations

from torch import nn


def no_decay(model: nn.Module) -> set[int]:
    """ids of the matrices that are not weight-decayed: every embedding table in `model` (a head
    tied to the embedding is the same parameter) and the learned position table of the model, or of
    the body a wrapper holds as `base_model` (a decoder classifier's, an adapter wrapper's). Position
    tables nested elsewhere (CLIP's towers) are decayed, as they always were here."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    body, seen = model, set()
    while isinstance(body, nn.Module) and id(body) not in seen:
        seen.add(id(body))
        pos = getattr(body, "pos", None)
        if isinstance(pos, nn.Module) and isinstance(getattr(pos, "weight", None), nn.Parameter):
            ids.add(id(pos.weight))
        body = getattr(body, "base_model", None)
    return ids


def decays(p: nn.Parameter, skip: set[int]) -> bool:
    """Whether weight decay applies to `p`: a matrix (2+ dims) not in `skip` (`no_decay`'s ids)."""
    return p.dim() >= 2 and id(p) not in skip
