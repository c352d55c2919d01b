"""T5 span corruption: inputs and targets reassemble to the original window; over many rows the
noise share is the density and the mean span length the configured mean; lengths are those
`corrupted_lengths` predicts (so batches need no padding); the task trains a T5 preset through
`llmkit train --objective span` below a stated loss."""
from __future__ import annotations

import math

import pytest
import torch
from objective_helpers import train_on_shakespeare

from llmkit.objectives.span_corruption import (corrupted_lengths, noise_mask, random_partition, span_corrupt,
                                               window_length)

pytestmark = pytest.mark.usefixtures("one_thread")

SENTINELS = list(range(1000, 1100))  # ids no window holds
EOS = 1


def reassemble(inputs: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Replace each sentinel in the input by the span that follows it in the target (EOS dropped)."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist()[:-1]:
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs.tolist()[:-1]:
        out += spans.pop(t) if t in SENTINELS else [t]
    assert not spans  # every span was placed
    return out


def test_inputs_and_targets_reassemble_to_the_original():
    g = torch.Generator().manual_seed(0)
    for length in (2, 3, 7, 20, 64, 113, 300):
        for density, mean in ((0.15, 3.0), (0.5, 32.0), (0.5, 3.0), (0.3, 1.0)):
            ids = torch.randint(2, 900, (length,), generator=g)
            inputs, targets = span_corrupt(ids, g, density, mean, SENTINELS, EOS)
            assert reassemble(inputs, targets) == ids.tolist()
            assert (len(inputs), len(targets)) == corrupted_lengths(length, density, mean)
            assert inputs[-1] == EOS and targets[-1] == EOS and targets[0] == SENTINELS[0]
            used = [t for t in inputs.tolist() if t in SENTINELS]
            assert used == SENTINELS[: len(used)]  # sentinels in order, one per span


def test_noise_share_and_mean_span_length_over_many_rows():
    g = torch.Generator().manual_seed(1)
    noise, spans, total = 0, 0, 0
    for _ in range(500):
        mask = noise_mask(114, g, 0.15, 3.0)
        starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
        noise, spans, total = noise + int(mask.sum()), spans + int(starts.sum()), total + len(mask)
        assert not mask[0]  # T5 starts clean
    assert abs(noise / total - 0.15) < 0.005, noise / total
    assert abs(noise / spans - 3.0) < 0.2, noise / spans


def test_span_lengths_are_random_partitions():
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([random_partition(10, 3, g) for _ in range(3000)])
    assert (draws >= 1).all() and (draws.sum(1) == 10).all()
    # uniform over the 36 compositions of 10 into 3 parts: the first part is 1 with probability 8/36
    assert abs((draws[:, 0] == 1).float().mean().item() - 8 / 36) < 0.03


def test_the_window_is_the_longest_whose_corruption_fits():
    for context in (16, 32, 128, 512):
        length = window_length(context, context, 0.15, 3.0)
        assert corrupted_lengths(length, 0.15, 3.0)[0] <= context
        assert corrupted_lengths(length + 1, 0.15, 3.0)[0] > context or corrupted_lengths(length + 2, 0.15, 3.0)[0] > context
    assert window_length(512, 512, 0.15, 3.0) == 568  # T5's helper: 568 raw tokens give 512 inputs


def test_span_corruption_trains_t5_tiny_on_tinyshakespeare(shakespeare, tmp_path):
    start, final = train_on_shakespeare("span", "t5-tiny", shakespeare, tmp_path / "run")
    initial = math.log(start["vocab_size"])  # 65 characters + 102 reserved ids: ln 167 = 5.12
    assert final["val_loss"] < 3.6 < initial - 1.0, final


def test_a_long_context_gets_a_sentinel_per_span_beyond_t5s_100(tmp_path):
    from llmkit.objectives import get_task
    from llmkit.objectives.span_corruption import span_counts
    from llmkit.training.config import build_train_config

    for context, n in ((512, 100), (4096, None)):
        cfg = build_train_config(data="x", out=str(tmp_path), objective="span", preset="t5-tiny", context_length=context)
        task = get_task(cfg.task)(cfg)
        spans = span_counts(task.length, 0.15, 3.0)[1]
        assert len(task.sentinels) == (n or spans) and spans <= len(task.sentinels)
    assert spans > 100
