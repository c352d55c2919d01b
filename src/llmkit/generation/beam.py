"""Beam search: keep the `num_beams` most likely partial sequences, score finished ones by
log-probability / length ** length_penalty (Wu et al., "Google's NMT system", 2016), return the best.

The bookkeeping follows transformers' beam search so that the same model gives the same output:
each step ranks 2 * num_beams candidates (so enough survive after some end), a candidate among the
top num_beams that ends (stop token, or the length limit) joins the finished pool (num_beams best
kept), the best non-ending ones continue. The search ends when the pool is full and (early_stopping)
or no running beam can still beat the worst finished one (its score / current length, the same
heuristic transformers uses), or at the length limit.

Its size is bounded before anything is allocated (`check_beams`): at most one beam per vocabulary
entry, and the beams' KV cache and logits must fit in the device's free memory; a request past either
is one line naming the numbers, not a search that runs for hours or swaps the machine to a halt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llmkit.errors import UserError
from llmkit.generation.decode_loop import cache_bytes, free_memory, model_device, prefill, step, stop_ids_of
from llmkit.generation.sampling import History, build_processors

NEG = -1.0e9  # "impossible" score, finite so that sums stay ordered


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # length-penalised log-probability


@dataclass
class BeamResult:
    tokens: list[int]  # the best hypothesis (its stop token included)
    score: float
    hypotheses: list[Hypothesis]  # all finished ones, best first


class FinishedPool:
    """The num_beams best finished hypotheses."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[Hypothesis] = []

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    def worst(self) -> float:
        return min(h.score for h in self.items)

    def add(self, hyp: Hypothesis) -> None:
        self.items.append(hyp)
        self.items.sort(key=lambda h: -h.score)
        del self.items[self.size:]


def can_still_improve(pool: FinishedPool, best_running: float, length: int, length_penalty: float) -> bool:
    """False once the pool is full and the best running beam, scored at the current length, is no
    better than the worst finished hypothesis (for length_penalty > 0 this is a heuristic)."""
    if not pool.full:
        return True
    return best_running / (length ** length_penalty) > pool.worst()


def beam_memory(model, num_beams: int, cache_len: int) -> int:
    """Bytes beam search allocates for `num_beams` beams: the KV cache of `cache_len` positions (held
    twice over while `reorder` copies it), and the per-step scores over every (beam, token) pair
    (logits, their float log-softmax, the candidate sums: about four [beams, vocab] fp32 arrays)."""
    cache = cache_bytes(model, cache_len, num_beams) or 0
    return 2 * cache + 4 * num_beams * model.cfg.vocab_size * 4


def check_beams(model, num_beams: int, prompt_len: int, max_new_tokens: int) -> None:
    """UserError when `num_beams` exceeds the vocabulary or the search would not fit in memory."""
    vocab = model.cfg.vocab_size
    if num_beams > vocab:
        raise UserError(f"num_beams {num_beams} is more than the model's vocabulary of {vocab} tokens: beam search "
                        f"keeps at most one beam per token; pass --num-beams {vocab} or fewer")
    cache_len = min(model.cfg.context_length, prompt_len + max_new_tokens)
    need = beam_memory(model, num_beams, cache_len)
    device = model_device(model)
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"num_beams {num_beams} over {cache_len} positions needs about {need / 2**30:.1f} GiB "
                        f"(KV cache and scores) but {device.type} has {free / 2**30:.1f} GiB free: "
                        "lower --num-beams or --max-new-tokens")


@torch.inference_mode()
def beam_search(model, prompt_ids: Sequence[int], cfg, eos_id: int | None = None) -> BeamResult:
    """Beam search over one prompt; `cfg` is a GenerationConfig (num_beams, length_penalty,
    early_stopping, max_new_tokens, stop_token_ids, penalties). Sampling settings are ignored."""
    nb = cfg.num_beams
    max_new = min(cfg.max_new_tokens, model.cfg.context_length - len(prompt_ids) + 1)
    check_beams(model, nb, len(prompt_ids), max_new)
    device = model_device(model)
    stop_ids = stop_ids_of(cfg, eos_id)
    keep = min(max(2, 1 + len(stop_ids)) * nb, nb * model.cfg.vocab_size)  # topk needs k <= candidates
    process = build_processors(cfg, greedy=True)  # penalties only
    prompt = torch.tensor([list(prompt_ids)] * nb, device=device)
    history = History.start(prompt, model.cfg.vocab_size) if process.needs_history else None
    cache = model.make_cache(nb, min(model.cfg.context_length, len(prompt_ids) + max_new))
    logits = prefill(model, prompt, cache)
    running = torch.full((nb,), NEG, device=device)
    running[0] = 0.0  # all beams start equal: let only the first expand on the first step
    seqs: list[list[int]] = [[] for _ in range(nb)]
    pool = FinishedPool(nb)
    improvable = True
    stop_t = torch.tensor(sorted(stop_ids) or [-1], device=device)
    for i in range(max_new):
        length = i + 1
        logp = process(logits.float().log_softmax(-1), history)
        V = logp.shape[-1]
        scores, flat = (logp + running[:, None]).view(-1).topk(keep)
        beam, token = flat // V, flat % V
        ends = torch.isin(token, stop_t) | (length == max_new)
        # finished: only candidates among the top nb can enter the pool
        if improvable and not (cfg.early_stopping and pool.full):
            for j in torch.nonzero(ends[:nb]).flatten().tolist():
                b = int(beam[j])
                pool.add(Hypothesis(seqs[b] + [int(token[j])], float(scores[j]) / length ** cfg.length_penalty))
        # running: the nb best candidates that did not end
        alive = (scores + ends.float() * NEG).topk(nb).indices
        running, src, new_tokens = (scores + ends.float() * NEG)[alive], beam[alive], token[alive]
        seqs = [seqs[b] + [t] for b, t in zip(src.tolist(), new_tokens.tolist())]
        improvable = improvable and can_still_improve(pool, float(running[0]), length, cfg.length_penalty)
        if bool(ends.all()) or not improvable or (cfg.early_stopping and pool.full) or length == max_new:
            break
        cache.reorder(src)
        if history is not None:
            history = History(history.seen[src], history.counts[src])
            history.add(new_tokens)
        logits = step(model, new_tokens[:, None], cache)
    best = pool.items[0] if pool.items else Hypothesis(seqs[0], float(running[0]))
    return BeamResult(best.tokens, best.score, pool.items)
