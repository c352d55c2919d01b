"""The model-kind registry: config.json names the architecture, old configs load as decoders, an
unknown one is refused naming the kinds, and a kind registered from outside travels through saving,
loading, `llmkit.load` and `llmkit info` without any verb knowing it."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import llmkit
from llmkit.cli.main import main
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.model_io import load_model, save_model
from llmkit.models import DecoderLM
from llmkit.models.kinds import (MODEL_KINDS, ModelKind, build_model, config_from_dict, config_to_dict, kind_of,
                                 kind_of_config, kind_of_model, load_config)

TINY = dict(vocab_size=64, context_length=32, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
            mlp="swiglu", norm="rmsnorm", position="rope", bias=False)


# --- a toy second kind, defined only here ----------------------------------------------------------

@dataclass
class ToyConfig:
    n_in: int = 6
    n_out: int = 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToyConfig":
        return cls(**d)


class ToyModel(nn.Module):
    """A projection with a non-persistent buffer, so loading must rebuild it through the kind's hook."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.n_in, cfg.n_out)
        self.register_buffer("scale", torch.full((cfg.n_out,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


def _rebuild_toy(model: ToyModel) -> None:
    model.scale = torch.full((model.cfg.n_out,), 2.0)


@pytest.fixture
def toy_kind(monkeypatch) -> ModelKind:
    kind = ModelKind("toy", ToyConfig, ToyModel, rebuild_buffers=_rebuild_toy,
                     info_lines=lambda m: [f"toy outputs: {m.cfg.n_out}"])
    monkeypatch.setitem(MODEL_KINDS, "toy", kind)  # removed again after the test
    return kind


@pytest.fixture
def decoder() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**TINY)).eval()


# --- the decoder kind ------------------------------------------------------------------------------

def test_config_json_names_the_architecture(decoder, tmp_path):
    save_model(decoder, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architecture"] == "decoder" and d["model_type"] == "llmkit"
    assert ModelConfig(**TINY).to_dict()["architecture"] == "decoder"
    assert kind_of(d) is MODEL_KINDS["decoder"]


def test_old_config_without_architecture_loads_as_a_decoder(decoder, tmp_path):
    save_model(decoder, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    del d["architecture"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert kind_of(d).name == "decoder"
    assert load_config(tmp_path / "config.json") == decoder.cfg
    assert ModelConfig.load(tmp_path / "config.json") == decoder.cfg
    back = load_model(tmp_path)
    ids = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(back(ids), decoder(ids), rtol=0, atol=0)


def test_unknown_architecture_names_the_valid_kinds(decoder, tmp_path):
    save_model(decoder, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "architecture": "wavenet"}))
    with pytest.raises(UserError, match=r"unknown architecture 'wavenet': valid kinds are .*decoder") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
    with pytest.raises(UserError, match="unknown architecture"):
        llmkit.load(tmp_path)


def test_decoder_config_refuses_another_architecture():
    with pytest.raises(UserError, match="'toy' is not a decoder"):
        ModelConfig.from_dict({**ModelConfig(**TINY).to_dict(), "architecture": "toy"})


def test_save_load_round_trip_through_the_registry_gives_equal_logits(decoder, tmp_path):
    save_model(decoder, tmp_path)
    back = load_model(tmp_path)
    assert type(back) is DecoderLM and kind_of_model(back).name == "decoder"
    assert back.lm_head.weight is back.tok_emb.weight  # the tie survives the registry's re-tie
    ids = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(back(ids), decoder(ids), rtol=0, atol=0)


def test_config_dict_round_trip_and_build():
    cfg = ModelConfig(**TINY)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert kind_of_config(cfg).name == "decoder"
    assert isinstance(build_model(cfg), DecoderLM)


# --- a second kind, registered from outside -------------------------------------------------------

def test_a_registered_kind_saves_and_loads_without_touching_the_verbs(toy_kind, tmp_path):
    torch.manual_seed(0)
    model = ToyModel(ToyConfig()).eval()
    save_model(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d == {"model_type": "llmkit", "architecture": "toy", "n_in": 6, "n_out": 3}
    back = load_model(tmp_path)
    assert type(back) is ToyModel and back.cfg == ToyConfig()
    x = torch.randn(4, 6)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)

    lm = llmkit.load(tmp_path)  # no tokenizer in the folder: still loads
    assert type(lm.model) is ToyModel and lm.kind is toy_kind and lm.tokenizer is None
    torch.testing.assert_close(lm.model(x), model(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="'toy' model does not generate text"):
        lm.generate("hello")
    with pytest.raises(UserError, match="does not generate text"):
        lm.generate_ids([1, 2])


def test_info_describes_a_registered_kind(toy_kind, tmp_path, capsys):
    save_model(ToyModel(ToyConfig()), tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "architecture     toy" in out and "proj" in out and "toy outputs: 3" in out
    # a kind that does not generate text is not told it lacks a tokenizer for generation
    assert "total                        21" in out and "tokenizer: none" not in out


def test_hf_export_of_another_kind_is_refused(toy_kind, tmp_path):
    from llmkit.interop.convert import convert

    save_model(ToyModel(ToyConfig()), tmp_path / "toy")
    with pytest.raises(UserError, match="decoder models only"):
        convert(tmp_path / "toy", tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()
    done = convert(tmp_path / "toy", tmp_path / "copy", to="llmkit")
    assert done.n_params == 21 and type(load_model(tmp_path / "copy")) is ToyModel


def test_a_kind_that_leaves_meta_buffers_is_reported(monkeypatch, tmp_path):
    monkeypatch.setitem(MODEL_KINDS, "toy", ModelKind("toy", ToyConfig, ToyModel))  # no rebuild hook
    save_model(ToyModel(ToyConfig()), tmp_path)
    with pytest.raises(RuntimeError, match="rebuild_buffers"):
        load_model(tmp_path)
