"""Every recipe in recipes/ is valid as shipped: its options check out and the model it describes
builds, runs a forward and backward pass, and decodes through its cache as it recomputes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from llmkit.config import ModelConfig
from llmkit.models import kinds
from llmkit.models.decoder import DecoderLM
from llmkit.objectives import get_task
from llmkit.training.config import build_train_config

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert len(RECIPES) >= 5, RECIPES


def _absent_init(recipe: Path) -> str | None:
    """The recipe's --init-from when it names ../shared/data and that is not here (the tests skip it)."""
    init = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("init_from")
    return init if init and "shared/data" in str(init) and not Path(init).exists() else None


def _kind(recipe: Path, tmp_path: Path) -> str:
    cfg = build_train_config(recipe, data=str(tmp_path / "text.txt"), out=str(tmp_path / "run"))
    return kinds.all_presets()[cfg.preset].name


ABSENT = {r: _absent_init(r) for r in RECIPES}
PRESENT = [r for r in RECIPES if not ABSENT[r]]
OTHER_RECIPES = [r for r in PRESENT if _kind(r, Path("/nonexistent")) != "decoder"]
# a recipe that starts from ../shared/data's weights is a decoder's (stories260K): skipped when absent
DECODER_RECIPES = [r for r in PRESENT if r not in OTHER_RECIPES] + [
    pytest.param(r, marks=pytest.mark.skip(reason=f"{ABSENT[r]} is not present")) for r in RECIPES if ABSENT[r]]


@pytest.mark.parametrize("recipe", OTHER_RECIPES, ids=lambda p: p.stem)
def test_each_recipe_of_another_kind_names_a_task_that_trains_its_preset(recipe, tmp_path):
    """Encoder, T5, ViT and CLIP recipes: the task exists and takes the preset's kind, and the model
    with the recipe's overrides builds (their training runs are the tasks' own tests)."""
    cfg = build_train_config(recipe, data=str(tmp_path / "data"), out=str(tmp_path / "run"))
    task = get_task(cfg.task)
    kind = kinds.all_presets()[cfg.preset]
    assert kind.name in (getattr(task, "architectures", None) or (kind.name,)), (cfg.task, kind.name)
    model = kinds.build_model(kinds.config_from_preset(cfg.preset, **cfg.model_overrides()))
    assert kinds.num_params(model) > 0


@pytest.mark.parametrize("recipe", DECODER_RECIPES, ids=lambda p: p.stem)
def test_each_recipe_builds_a_model_that_trains_and_decodes(recipe, tmp_path):
    cfg = build_train_config(recipe, data=str(tmp_path / "text.txt"), out=str(tmp_path / "run"))
    model_cfg = ModelConfig.from_preset(cfg.preset, **{"vocab_size": 67, **cfg.model_overrides(),
                                                       "context_length": 24})
    torch.manual_seed(0)
    model = DecoderLM(model_cfg)
    x = torch.randint(0, 67, (2, 24))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2)
        steps = [model(x[:, :10], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
