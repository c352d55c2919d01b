"""Speculative decoding (Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding", 2023; Chen et al., "Accelerating LLM Decoding with Speculative Sampling", 2023).

A small draft model proposes k tokens one by one; the target model scores all of them in one
forward pass. Draft token i is kept with probability min(1, p_i / q_i) (p: target, q: draft
distribution); at the first rejection a token is drawn from the residual max(0, p - q) renormalised,
and if all k are kept a bonus token is drawn from the target's next distribution. The output then
follows the target distribution exactly. Greedy decoding is the case of point-mass p and q: a draft
token survives iff it is the target's argmax, so the output equals the target's greedy output.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from llmkit.errors import UserError
from llmkit.generation.decode_loop import decode_threads, make_generator, model_device, stop_ids_of
from llmkit.generation.sampling import History, build_processors, probabilities


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept / resample rule, batched over independent trials.

    p [N, k+1, V] target distributions (the last one follows all k drafts), q [N, k, V] draft
    distributions, drafts [N, k] the draft tokens (drawn from q). Returns (n_accepted [N], next [N]):
    keep drafts[:, :n] and append `next`, drawn from the residual at n (from p[:, k] when n == k).
    """
    N, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(N, k, generator=generator, device=p.device)
    accepted = u * q_d < p_d  # u < p/q without dividing by zero
    n = accepted.long().cumprod(-1).sum(-1)
    q_pad = torch.cat([q, q.new_zeros(N, 1, p.shape[-1])], 1)  # residual after k accepts = p itself
    at = n[:, None, None].expand(N, 1, p.shape[-1])
    residual = (p.gather(1, at) - q_pad.gather(1, at))[:, 0].clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual, p.gather(1, at)[:, 0])  # p == q at n: rounding only
    nxt = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return n, nxt


def _distributions(logits: torch.Tensor, tokens: Sequence[int], history: History | None, process, greedy: bool
                   ) -> torch.Tensor:
    """Processed distributions of consecutive positions [T, V]; row i sees `tokens[:i]` added to the
    history (penalties depend on what came before)."""
    if history is None:
        return probabilities(process(logits.float(), None), greedy)
    rows, h = [], history.clone()
    for i in range(logits.shape[0]):
        rows.append(probabilities(process(logits[i:i + 1].float(), h), greedy))
        if i < len(tokens):
            h.add(torch.tensor([tokens[i]], device=logits.device))
    return torch.cat(rows)


@torch.inference_mode()
def speculative_tokens(target, draft, prompt_ids: Sequence[int], cfg, eos_id: int | None = None) -> Iterator[int]:
    """Yield the target model's tokens, produced k + 1 at a time at best. Stops at a stop token, after
    max_new_tokens, or when the target's context is full (no sliding here)."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(f"draft model vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                        f"({target.cfg.vocab_size}): use a draft trained with the same tokenizer")
    device = model_device(target)
    generator = make_generator(cfg.seed, device)
    stop_ids = stop_ids_of(cfg, eos_id)
    process = build_processors(cfg)
    ctx = min(target.cfg.context_length, draft.cfg.context_length)
    seq = list(prompt_ids)
    history = History.start(torch.tensor([seq], device=device), target.cfg.vocab_size) if process.needs_history else None
    t_cache, d_cache = target.make_cache(1, ctx), draft.make_cache(1, ctx)
    if len(seq) > 1:  # both caches hold all but the last token
        head = torch.tensor([seq[:-1]], device=device)
        target(head, cache=t_cache, logits_to_keep=1)
        draft(head, cache=d_cache, logits_to_keep=1)
    pending = [seq[-1]]  # tokens the draft cache has not seen yet
    produced = 0
    while produced < cfg.max_new_tokens and len(seq) < ctx + 1:
        k = max(0, min(cfg.num_draft_tokens, cfg.max_new_tokens - produced - 1, ctx - len(seq)))
        drafts, qs = [], []
        d_hist = history.clone() if history is not None else None
        for _ in range(k):
            with decode_threads(device):
                logits = draft(torch.tensor([pending], device=device), cache=d_cache, logits_to_keep=1)[:, -1]
            q = probabilities(process(logits.float(), d_hist), cfg.greedy)
            token = torch.multinomial(q, 1, generator=generator)[0]
            drafts.append(int(token))
            qs.append(q)
            pending = [drafts[-1]]
            if d_hist is not None:
                d_hist.add(token)
        with decode_threads(device):
            t_logits = target(torch.tensor([[seq[-1]] + drafts], device=device), cache=t_cache,
                              logits_to_keep=k + 1)[0]
        p = _distributions(t_logits, drafts, history, process, cfg.greedy)
        q = torch.cat(qs) if qs else p.new_zeros(0, p.shape[-1])
        n, nxt = accept_drafts(p[None], q[None], torch.tensor([drafts], device=device, dtype=torch.long), generator)
        n = int(n)
        new = drafts[:n] + [int(nxt)]
        # roll back what was computed for rejected drafts
        t_cache.crop(len(seq) + n)
        d_cache.crop(len(seq) + n)
        pending = (seq + new)[d_cache.pos:]  # 1 token, or 2 when every draft was kept
        for token in new:
            yield token
            produced += 1
            if token in stop_ids:
                return
            seq.append(token)
            if history is not None:
                history.add(torch.tensor([token], device=device))
