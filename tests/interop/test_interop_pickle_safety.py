"""No file a user points llmkit at can run code by being loaded.

Every torch.load in src/ (model_io._read_state: a model directory's pytorch_model.bin / model.pt
behind allow_pickle=True; training.checkpoint.load_checkpoint: a checkpoint's trainer_state.pt, read
on --resume) must stay `weights_only=True`, and the other loaders must not unpickle at all. Each
test crafts a pickle whose `__reduce__` creates a marker file when unpickled, first proves that the
payload really fires under `torch.load(weights_only=False)`, then loads it through llmkit: refused,
marker absent. Switching any of those loads to `weights_only=False` fails here.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.interop import load_hf
from llmkit.model_io import load_model, save_model
from llmkit.models import DecoderLM
from llmkit.training.checkpoint import STATE, load_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_malicious(path: Path, marker: Path, like: dict | None = None) -> None:
    """A torch.save file shaped like what the loader expects, with the payload as one value."""
    obj = dict(like or {})
    obj["payload"] = _Payload(marker)
    torch.save(obj, path)
    # the payload is live: an unsafe load would run it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.fixture
def tiny_model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig.from_preset("tiny"))


def test_malicious_trainer_state_is_refused_on_resume(tiny_model, tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", 5, tiny_model, {"step": 5, "rng": torch.get_rng_state()})
    weights, state = load_checkpoint(ckpt)  # the genuine checkpoint loads
    assert state["step"] == 5 and set(weights) >= {"tok_emb.weight"}
    marker = tmp_path / "pwned"
    _write_malicious(ckpt / STATE, marker, like={"step": 5})
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def _pickled_model_dir(model: DecoderLM, tmp_path: Path, name: str, marker: Path) -> Path:
    d = tmp_path / "model"
    save_model(model, d)
    (d / "model.safetensors").unlink()
    _write_malicious(d / name, marker, like=model.state_dict())
    return d


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin"])
def test_pickled_weights_are_refused_without_the_opt_in(tiny_model, tmp_path, name):
    marker = tmp_path / "pwned"
    d = _pickled_model_dir(tiny_model, tmp_path, name, marker)
    with pytest.raises(UserError, match="pickled checkpoint"):
        load_model(d)
    with pytest.raises(UserError, match="pickled checkpoint"):
        llmkit.load(d)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin"])
def test_opt_in_still_refuses_a_pickle_that_is_more_than_tensors(tiny_model, tmp_path, name):
    marker = tmp_path / "pwned"
    d = _pickled_model_dir(tiny_model, tmp_path, name, marker)
    with pytest.raises((UserError, pickle.UnpicklingError)):
        load_model(d, allow_pickle=True)
    assert not marker.exists()


def test_opt_in_refusal_is_a_user_error(tiny_model, tmp_path):
    d = _pickled_model_dir(tiny_model, tmp_path, "model.pt", tmp_path / "pwned")
    with pytest.raises(UserError):
        load_model(d, allow_pickle=True)


def test_opt_in_loads_a_plain_tensor_pickle(tiny_model, tmp_path):
    """The refusal above is weights_only's, not a refusal of every pickle."""
    d = tmp_path / "model"
    save_model(tiny_model, d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), d / "model.pt")
    loaded = load_model(d, allow_pickle=True)
    assert torch.equal(loaded.tok_emb.weight, tiny_model.tok_emb.weight)


def test_the_refusal_names_the_argument_llmkit_load_takes(tiny_model, tmp_path):
    import llmkit

    d = tmp_path / "model"
    save_model(tiny_model, d)
    (d / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), d / "model.pt")
    with pytest.raises(UserError, match="pass allow_pickle=True to llmkit.load"):
        llmkit.load(d)
    assert torch.equal(llmkit.load(d, allow_pickle=True).model.tok_emb.weight, tiny_model.tok_emb.weight)


def test_hf_directory_with_only_a_pickled_bin_is_refused_unread(hf_dirs, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(hf_dirs["llama"], d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    _write_malicious(d / "pytorch_model.bin", marker)
    with pytest.raises(UserError, match="pytorch_model.bin is not read"):
        load_hf(d)
    with pytest.raises(UserError):
        llmkit.load(d)
    assert not marker.exists()
