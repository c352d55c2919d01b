"""A model directory: `config.json` + `model.safetensors` + the tokenizer's files.

The model class comes from config.json's `architecture` through `llmkit.models.kinds`, so every
registered kind saves and loads here. Only safe formats load by default (safetensors); pickled
`.bin`/`.pt` weights need an explicit opt-in and then go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.errors import UserError
from llmkit.outputs import as_os_error, temp_path
from llmkit.models.kinds import (finish_loading, kind_of_config, load_config, save_config, tie_weights,
                                 tied_parameters)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

if TYPE_CHECKING:
    from llmkit.tokenizers.base import Tokenizer


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each shared storage once (a tied parameter, such as a decoder's tied LM
    head, is dropped; it is re-tied on load)."""
    tied = tied_parameters(model)
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and name in tied:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    return out


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Atomic safetensors write (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors come as text: give the OSError they are
            raise as_os_error(e, tmp) from None
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _RecordingWriter:
    """A file for torch.save that keeps the OSError its writes met: torch reports it as a bare
    RuntimeError ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str | Path) -> None:
    """torch.save to `path` (a temp location: callers rename it into place), with the disk's
    errors raised as the OSError they are."""
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read weights {path}: {e}; the file is truncated or corrupt, restore it or re-save") from None


def save_model(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write weights, config.json (naming the model's architecture) and the tokenizer, if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(state_dict_for_saving(model), directory / WEIGHTS)
    save_config(model.cfg, directory / CONFIG)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               allow_pickle: bool = False) -> torch.nn.Module:
    """Build the model config.json's architecture names and load its weights; strict about
    missing/extra tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"model directory not found: {directory}: pass a run or model directory")
    if not (directory / CONFIG).is_file():
        raise UserError(f"{directory} holds no model (no {CONFIG}): pass a run directory written by `llmkit train`")
    cfg = load_config(directory / CONFIG)
    kind = kind_of_config(cfg)
    state = _read_state(directory, allow_pickle)
    with torch.device("meta"):
        model = kind.model_class(cfg)
    assign_weights(model, state, directory, assign=True)
    finish_loading(model)
    model = model.to(device=device)
    if dtype is None:  # the stored dtype, for the buffers built at init too (RoPE tables), as --dtype does
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def fp32_state_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the tensors a module keeps in fp32 whatever the model's dtype (its class's
    `keep_fp32`, e.g. MoE's selection bias): loaders read these in fp32 instead of casting them."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in getattr(module, "keep_fp32", ())}


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                   assign: bool = False) -> None:
    """Load `state` into `model`, refusing missing, extra or mis-shaped tensors with a clear error."""
    tied = tied_parameters(model)
    state = {k: v for k, v in state.items() if k not in tied}
    missing, unexpected = _diff_keys(model, state, tied)
    if missing or unexpected:
        raise UserError(f"weights in {source} do not match the model config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}; the files come from different models")
    expected = model.state_dict()
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise UserError(f"tensor {name} in {source} has shape {tuple(t.shape)} but the config implies "
                            f"{tuple(expected[name].shape)}: the weights and config come from different models")
    state = _one_float_dtype(state, expected, source, fp32_state_names(model))
    model.load_state_dict(state, strict=False, assign=assign)
    tie_weights(model)


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what llmkit computes in


def _one_float_dtype(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     source: str | Path, keep_fp32: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Refuse a floating tensor stored as an integer, bool, F64 or F8; a file with one tensor in
    another precision (an edited file) is computed in the dtype most of its values have, except the
    `keep_fp32` tensors, which load in fp32."""
    state = {n: t.float() if n in keep_fp32 and t.is_floating_point() else t for n, t in state.items()}
    floats = {n: t for n, t in state.items() if expected[n].is_floating_point() and n not in keep_fp32}
    odd = sorted(n for n, t in floats.items() if t.dtype not in WEIGHT_DTYPES)
    if odd:
        raise UserError(f"tensor {odd[0]} in {source} is stored as {str(floats[odd[0]].dtype).removeprefix('torch.')}: "
                        "llmkit loads float32, bfloat16 and float16 weights; the file is damaged or was written by "
                        "another tool: convert it or re-save it")
    sizes: dict[torch.dtype, int] = {}
    for t in floats.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    if len(sizes) > 1:
        common = max(sizes, key=sizes.get)
        state = {n: t.to(common) if n in floats else t for n, t in state.items()}
    return state


def _read_state(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS).is_file():
        return load_weights(directory / WEIGHTS)
    if (directory / SHARDED).is_dir():
        return read_sharded(directory / SHARDED)
    pickled = [p for p in ("pytorch_model.bin", "model.pt") if (directory / p).is_file()]
    if pickled and not allow_pickle:
        raise UserError(f"{directory / pickled[0]} is a pickled checkpoint, which can run code when loaded: "
                        "convert it to safetensors, or pass allow_pickle=True to llmkit.load if you trust it")
    if pickled:
        try:
            return torch.load(directory / pickled[0], map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{directory / pickled[0]} holds objects other than tensors, which llmkit will not "
                            "unpickle: convert it to safetensors with the library that wrote it") from None
    raise UserError(f"{directory} has {CONFIG} but no {WEIGHTS}: the save was interrupted; restore the weights file")


SHARDED = "dcp"  # a sharded training checkpoint's folder (torch.distributed.checkpoint; training/sharded_checkpoint.py)


def read_sharded(directory: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a sharded (DCP) checkpoint, whole, in one process: shapes and dtypes
    from its metadata, every rank's pieces read into place by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(directory))
        meta = reader.read_metadata()
        state = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                 for key, m in meta.state_dict_metadata.items()
                 if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "no process group: loading in one process" is what we want
            warnings.simplefilter("ignore")
            dcp.load({"model": state}, storage_reader=reader)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read the sharded checkpoint {directory}: {str(e).splitlines()[0][:200]}; it is "
                        "incomplete or corrupt: use the checkpoint before it") from None
    return state


def _diff_keys(model: torch.nn.Module, state: dict, tied: dict[str, str]) -> tuple[list[str], list[str]]:
    expected = {k for k in model.state_dict() if k not in tied}
    return sorted(expected - set(state)), sorted(set(state) - expected)


def max_token_id(tokenizer: Tokenizer) -> tuple[int, str]:
    """The largest id `tokenizer` can produce and what it is ("the last of its vocabulary of N" or
    the special token role)."""
    top, what = tokenizer.vocab_size - 1, f"the last of its vocabulary of {tokenizer.vocab_size}"
    for role, idx in sorted(tokenizer.special_tokens.items()):
        if idx > top:
            top, what = idx, f"its {role} token"
    return top, what


def check_vocab(model: torch.nn.Module, tokenizer: Tokenizer | None, source: str | Path) -> None:
    """UserError unless every id the tokenizer can produce has a row in the model's embedding
    (`cfg.vocab_size`). A model vocabulary larger than the tokenizer's is normal (padded embeddings,
    as GPT-2's 50257 -> 50304) and passes; models without a vocabulary are not checked."""
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if tokenizer is None or not isinstance(vocab, int):
        return
    top, what = max_token_id(tokenizer)
    if top >= vocab:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) produces token ids up to {top} ({what}) but the "
                        f"model in {source} has vocab_size {vocab} (ids 0-{vocab - 1}): they come from different runs; "
                        "pass the tokenizer the model was trained with (tokenizer=PATH, --tokenizer PATH)")


# --- finite weights ------------------------------------------------------------------------

_MINMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what aminmax reduces
_CHUNK = 1 << 24  # elements per float32 copy of a tensor of another float type (64 MB)


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every value of `t` is finite. One min/max pass (NaN propagates through both,
    an infinity shows as one of them); types aminmax lacks (float8) are widened a chunk at a time."""
    if t.dtype in _MINMAX_DTYPES:
        return torch.isfinite(torch.stack(torch.aminmax(t))).all()
    return torch.stack([torch.isfinite(torch.stack(torch.aminmax(c.float()))).all()
                        for c in t.reshape(-1).split(_CHUNK)]).all()


def non_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that hold a NaN or an infinity, in model order (read back in one sync)."""
    named = [(n, p) for n, p in model.named_parameters()
             if p.is_floating_point() and p.numel() and not p.is_meta]
    if not named:
        return []
    with torch.no_grad():
        ok = torch.stack([_all_finite(p.detach()) for _, p in named])
    return [named[i][0] for i in torch.nonzero(~ok.cpu()).flatten().tolist()]


def check_finite(model: torch.nn.Module, source: str | Path) -> None:
    """UserError naming the first tensor whose values are not all finite numbers."""
    bad = non_finite(model)
    if not bad:
        return
    p = model.get_parameter(bad[0]).detach()
    p = p if p.dtype in _MINMAX_DTYPES else p.float()  # float8 has no isinf
    nan, inf = int(p.isnan().sum()), int(p.isinf().sum())
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    raise UserError(f"weights in {source} are not all finite numbers: tensor {bad[0]} holds {nan:,} NaN and "
                    f"{inf:,} inf of {p.numel():,} values{more}: training diverged before they were saved or the "
                    "file is damaged; load an earlier checkpoint or restore the file")


# --- a pretrained starting point of any format -------------------------------------------------

# (path, device, dtype) -> the model, or None where the path is not of the reader's format; filled
# by llmkit.interop when llmkit loads (Hugging Face directories, llama2.c .bin files)
PRETRAINED_READERS: list = []


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model at `path`, in any format llmkit reads: an llmkit run/model directory, or one a
    registered reader knows (a Hugging Face directory, a llama2.c .bin). Weights that are not
    finite numbers are refused. Fine-tuning and continued pre-training start from it (`init_from`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}: pass a model directory (llmkit or Hugging Face) or a llama2.c .bin")
    for read in PRETRAINED_READERS:
        model = read(path, device, dtype)
        if model is not None:
            break
    else:
        model = load_model(path, device=device, dtype=dtype)
    check_finite(model, path)
    return model


def pretrained_tokenizer(path: str | Path) -> "Tokenizer":
    """The tokenizer of the model at `path`: the directory's own, or for a llama2.c .bin the one
    SentencePiece .model beside it (`tok512.model` by stories260K)."""
    from llmkit.tokenizers.base import load_tokenizer

    path = Path(path)
    if path.is_file():
        models = sorted(path.parent.glob("*.model"))
        if len(models) != 1:
            found = ", ".join(m.name for m in models) or "none"
            raise UserError(f"{path} is a llama2.c checkpoint without one tokenizer .model beside it (found {found}): "
                            f"convert it first with `llmkit convert {path} --tokenizer TOK.model --out DIR`")
        return load_tokenizer(models[0])
    return load_tokenizer(path)
