"""UL2's mixture of denoisers: each row's input starts with its denoiser's mode token and is that
denoiser's corruption; the denoisers' shares follow the weights; bad weights are one-line errors;
per-denoiser metrics add up to the loss; the task trains a T5 preset through `llmkit train
--objective ul2` below a stated loss."""
from __future__ import annotations

import math

import pytest
import torch
from objective_helpers import prepared_task, train_on_shakespeare, write_small_corpus

from llmkit.errors import UserError
from llmkit.objectives.span_corruption import IGNORE, span_counts
from llmkit.objectives.ul2 import DENOISERS, choose_denoiser, parse_mixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("ul2"))


def _task(corpus, tmp_path, mixture="r=0.4,x=0.4,s=0.2"):
    return prepared_task(corpus, tmp_path, objective="ul2", preset="t5-tiny", context_length=64, ul2_mixture=mixture)


def test_each_denoisers_inputs_carry_its_mode_token(corpus, tmp_path):
    task = _task(corpus, tmp_path)
    sentinels = set(task.sentinel_ids)
    batch = task.train_batch(0, 0, 48, 0, 1, 1)
    assert set(batch["denoiser"].tolist()) == {0, 1, 2}
    used = set()
    for ids, mask, labels, k in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["denoiser"]):
        name = task.names[int(k)]
        ids, target = ids[mask.bool()], labels[labels != IGNORE]
        assert ids[0] == task.special[DENOISERS[name].mode_token]
        assert len(ids) <= 64 and len(target) <= 64
        n_sentinels = sum(int(t) in sentinels for t in ids)
        if name == "s":  # a prefix in, its continuation out: no sentinels
            assert n_sentinels == 0 and len(ids) - 2 + len(target) - 1 == task.length
        else:  # span corruption: one sentinel per span, the target's share of the window ~ a density
            assert n_sentinels >= 1
            noise = len(target) - 1 - n_sentinels
            setting = [(m, d) for m, d in DENOISERS[name].spans if span_counts(task.length, d, m) == (noise, n_sentinels)]
            assert setting, (name, noise, n_sentinels)  # the counts of one of the denoiser's settings
            used.add((name, *setting[0]))
    assert used == {("r", 3.0, 0.15), ("x", 32.0, 0.15), ("x", 3.0, 0.5)}  # X draws both of its settings


def test_mixture_shares_follow_the_weights():
    weights = torch.tensor([0.5, 0.2, 0.3])
    draws = torch.tensor([choose_denoiser(torch.Generator().manual_seed(i), weights) for i in range(6000)])
    shares = torch.bincount(draws, minlength=3).float() / len(draws)
    assert (shares - weights).abs().max() < 0.02, shares


def test_a_denoiser_of_weight_zero_is_never_drawn_and_metrics_add_up(corpus, tmp_path):
    task = _task(corpus, tmp_path, mixture="r=1,s=3")
    batch = task.train_batch(1, 0, 40, 0, 1, 1)
    counts = torch.bincount(batch["denoiser"], minlength=3)
    assert counts[task.names.index("x")] == 0 and counts[task.names.index("s")] > counts[task.names.index("r")]
    model = task.build_model(torch.device("cpu")).eval()
    with torch.no_grad():
        loss, metrics = task.loss(model, batch)
    assert sum(metrics[f"loss_from_{n}"] for n in task.names).item() == pytest.approx(loss.item(), rel=1e-5)
    assert sum(metrics[f"share_{n}"] for n in task.names).item() == pytest.approx(1.0)


@pytest.mark.parametrize("text, words", [("r=1,q=2", "'q=2' is not NAME=WEIGHT"), ("r=-1", "finite number >= 0"),
                                         ("r=0,x=0", "every weight is 0"), ("r=nan", "finite number")])
def test_bad_mixtures_are_one_line_errors(text, words):
    with pytest.raises(UserError, match=words):
        parse_mixture(text)


def test_ul2_trains_t5_tiny_on_tinyshakespeare(shakespeare, tmp_path):
    start, final = train_on_shakespeare("ul2", "t5-tiny", shakespeare, tmp_path / "run")
    initial = math.log(start["vocab_size"])  # 65 characters + 105 reserved ids: ln 170 = 5.14
    assert final["val_loss"] < 4.0 < initial - 1.0, final
    assert {"val_loss_from_r", "val_loss_from_x", "val_loss_from_s", "val_share_s"} <= set(final)


def test_the_train_options_default_mixture_is_the_modules():
    from llmkit.objectives.ul2 import DEFAULT_MIXTURE
    from llmkit.training.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["ul2_mixture"].default == DEFAULT_MIXTURE
