"""Hugging Face model directories in and out: `load_hf(dir)` builds a `DecoderLM` from
config.json + safetensors (one file or shards with an index), `export_hf(model, ...)` writes a
directory `transformers.AutoModelForCausalLM.from_pretrained` reads with the same logits.

A folder is read the way transformers 5 reads it, so both give the same logits: the same weight
files (`weight_files`: model.safetensors before an index; stray *.safetensors ignored) and the same
tie rule (a stored lm_head.weight that differs from the embedding is kept, whatever
tie_word_embeddings says).

Loading never materialises the checkpoint twice: the model is built with its random init skipped,
so its parameters are untouched (never resident) memory, and the checkpoint's tensors replace them
(`load_state_dict(assign=True)`). (Not the meta device: its first use in a process imports torch's
decompositions, ~70 MB resident, as much as a small checkpoint.) A tensor used as stored is the
memory-mapped safetensors data itself (no copy); one that must be fused (q/k/v), transposed or cast
is read with plain file reads into ordinary memory, so the mapped pages it came from never become
resident on top of the copy.
"""
from __future__ import annotations

import dataclasses
import json
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.interop.dtypes import SAFETENSORS_DTYPES, check_runnable, parse_dtype
from llmkit.interop.families import TRANSFORMS, Family, Rule, family_for_export, family_of
from llmkit.model_io import fp32_state_names, save_weights, state_dict_for_saving
from llmkit.models.decoder import DecoderLM
from llmkit.models.kinds import build_model, kind_of_model, tie_weights
from llmkit.utils import atomic_write_text, import_if_present

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
HEAD = "lm_head.weight"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)-of-(?P<total>\d+)\.safetensors$")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- reading a directory ---------------------------------------------------------------------

def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise UserError(f"{directory} has no {CONFIG}: pass a Hugging Face model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object: download it again")
    return config


def is_hf_dir(path: str | Path) -> bool:
    """A folder with a config.json that is not llmkit's own."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8")).get("model_type") != "llmkit"
    except (ValueError, AttributeError):
        return True  # let read_config report the broken file


def _shard_gaps(files: list[Path]) -> list[str]:
    """Names of `stem-0000k-of-0000n.safetensors` shards absent from a set of files."""
    groups: dict[tuple[str, str], set[int]] = {}
    widths: dict[tuple[str, str], int] = {}
    for f in files:
        m = _SHARD.match(f.name)
        if m:
            key = (m["stem"], m["total"])
            groups.setdefault(key, set()).add(int(m["n"]))
            widths[key] = len(m["n"])
    return [f"{stem}-{k:0{widths[(stem, total)]}d}-of-{total}.safetensors"
            for (stem, total), have in groups.items() for k in range(1, int(total) + 1) if k not in have]


def _index_map(directory: Path, index: str = INDEX) -> dict[str, Path]:
    path = directory / index
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid safetensors index ({e}): download it again") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}: check the file and its permissions") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(f, str) for k, f in weight_map.items()):
        raise UserError(f"{path} is not a valid safetensors index (\"weight_map\" must map tensor names to "
                        "file names): download it again")
    root = directory.resolve()
    outside = sorted({f for f in weight_map.values() if not (directory / f).resolve().is_relative_to(root)})
    if outside:
        raise UserError(f"{path} names file(s) outside {directory}: {', '.join(outside[:3])}: "
                        "an index may only name shards in its own folder; download it again")
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
        raise UserError(f"{index} in {directory} points to missing file(s) {', '.join(missing[:3])}: "
                        "download the missing shard(s) again")
    return {name: directory / f for name, f in weight_map.items()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}; the file is truncated or corrupt, download it again") from None


def _file_map(path: Path) -> dict[str, Path]:
    return {name: path for name in _open(path).keys()}


def _explicit_map(directory: Path, name: Any) -> dict[str, Path]:
    """config.json's `transformers_weights`: the one file (or index) transformers is told to read."""
    path = directory / str(name)
    if not (isinstance(name, str) and name.endswith((".safetensors", ".safetensors.index.json"))
            and path.resolve().is_relative_to(directory.resolve())):
        raise UserError(f"config.json sets transformers_weights to {name!r}: it must name a .safetensors file "
                        "or a .safetensors.index.json inside the model directory; fix or remove the key")
    if not path.is_file():
        raise UserError(f"config.json names transformers_weights {name!r}, which is not in {directory}: "
                        "download it again or remove the key")
    return _index_map(directory, name) if name.endswith(".index.json") else _file_map(path)


def weight_files(directory: Path, config: dict[str, Any]) -> dict[str, Path]:
    """Tensor name -> file, from exactly the files `transformers.AutoModelForCausalLM.from_pretrained`
    reads in a local folder (5.x `_get_resolved_checkpoint_files`): the file config.json's
    `transformers_weights` names, else model.safetensors, else the shards model.safetensors.index.json
    lists. Any other *.safetensors beside them is ignored, as transformers ignores it.

    Without either, transformers loads nothing; llmkit then reads one complete `stem-0000k-of-0000n`
    shard set that is the folder's only *.safetensors (an index lost in a copy: one reading only) and
    refuses every other mix, naming the files."""
    if config.get("transformers_weights") is not None:
        return _explicit_map(directory, config["transformers_weights"])
    if (directory / WEIGHTS).is_file():
        return _file_map(directory / WEIGHTS)
    if (directory / INDEX).is_file():
        return _index_map(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory} has {CONFIG} but no *.safetensors weights: download the safetensors "
                        "files (pickled pytorch_model.bin is not read)")
    gaps = _shard_gaps(files)
    if gaps:
        raise UserError(f"shard {', '.join(gaps[:3])} is missing from {directory}, and so is {INDEX}: "
                        "download them again")
    sets = {(m["stem"], m["total"]) for m in map(_SHARD.match, (f.name for f in files)) if m}
    if len(sets) == 1 and all(_SHARD.match(f.name) for f in files):
        out: dict[str, Path] = {}
        for f in files:
            out.update(_file_map(f))
        return out
    names = ", ".join(f.name for f in files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else "")
    raise UserError(f"{directory} has {names} but neither {WEIGHTS} nor {INDEX}, so it is unclear which "
                    f"to load (transformers loads none): rename the checkpoint file to {WEIGHTS} or download "
                    f"{INDEX}, and remove the other files")


class Checkpoint:
    """Tensors of one or many memory-mapped safetensors files, by (fixed-up) HF name, read lazily."""

    def __init__(self, where: dict[str, Path], family: Family | None = None):
        self._where: dict[str, tuple[Path, str]] = {}
        for name, path in where.items():
            fixed = name
            for pattern, repl in (family.key_fixups if family is not None else ()):
                fixed = re.sub(pattern, repl, fixed)
            self._where[fixed] = (path, name)
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> set[str]:
        return set(self._where)

    def alias(self, name: str, existing: str) -> None:
        """Make `name` read the stored tensor `existing`."""
        self._where[name] = self._where[existing]

    def same_tensor(self, a: str, b: str) -> bool:
        """Whether two names read one stored tensor (an alias)."""
        return self._where[a] == self._where[b]

    def _slice(self, name: str):
        path, original = self._where[name]
        if path not in self._handles:
            self._handles[path] = _open(path)
        try:
            return self._handles[path].get_slice(original)
        except (SafetensorError, KeyError) as e:
            raise UserError(f"{path} lacks tensor {original} ({e}): the index and the shard disagree, "
                            "download both again") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        tag = self._slice(name).get_dtype()
        if tag not in SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} is stored as {tag}: llmkit loads F32, BF16 and F16 checkpoints "
                            "(dequantize it first)")
        return SAFETENSORS_DTYPES[tag]

    def get(self, name: str, mapped: bool = True) -> torch.Tensor:
        """The tensor; `mapped`: backed by the file's memory map (zero-copy, for use as stored),
        else read into a fresh tensor (for data about to be transformed into another one)."""
        path, original = self._where[name]
        dtype = self.dtype(name)  # also opens the file and checks the tensor is there
        if not mapped:
            return self._read(path, original, dtype)
        try:
            return self._handles[path].get_tensor(original)
        except SafetensorError as e:
            raise UserError(f"cannot read tensor {original} from {path}: {e}; the file is corrupt, "
                            "download it again") from None

    def _read(self, path: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
        if path not in self._headers:  # safetensors: u64 header length, JSON header, raw data
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        start, header = self._headers[path]
        entry = header[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        with open(path, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(out.view(-1).view(torch.uint8).numpy())
        if got != end - begin:
            raise UserError(f"cannot read tensor {name} from {path}: the file is truncated, download it again")
        return out

    def close(self) -> None:
        self._handles.clear()
        self._headers.clear()


@contextmanager
def open_checkpoint(directory: Path, family: Family | None, config: dict[str, Any]) -> Iterator[Checkpoint]:
    """The checkpoint transformers would load from `directory` (see `weight_files`)."""
    ckpt = Checkpoint(weight_files(directory, config), family)
    try:
        yield ckpt
    finally:
        ckpt.close()


# --- the table, applied ----------------------------------------------------------------------

def _match(rules: tuple[Rule, ...], name: str) -> tuple[Rule, str | None]:
    for rule in rules:
        m = rule.pattern().match(name)
        if m:
            return rule, m.groupdict().get("i")
    raise RuntimeError(f"no conversion rule for llmkit tensor {name}")  # a gap in the table: our bug


def expected_hf_shapes(rule: Rule, shape: torch.Size, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes the HF tensors of `rule` must have: run the export transform on a meta tensor (a
    piece's HF tensor holds all n pieces)."""
    shapes = [tuple(t.shape) for t in TRANSFORMS[rule.transform][1](torch.empty(shape, device="meta"), cfg)]
    if rule.piece is not None:
        shapes = [(s[0] * rule.piece[1], *s[1:]) for s in shapes]
    return shapes


def _read_parts(rule: Rule, hf_names: list[str], ckpt: Checkpoint, dtype: torch.dtype) -> list[torch.Tensor]:
    """The HF tensors a rule's import transform takes (a piece rule: its block of rows, copied out)."""
    if rule.piece is not None:
        k, n = rule.piece
        return [ckpt.get(name, mapped=False).chunk(n, dim=0)[k].clone() for name in hf_names]
    as_stored = rule.transform == "copy" and ckpt.dtype(hf_names[0]) == dtype
    return [ckpt.get(name, mapped=as_stored) for name in hf_names]


def hf_to_llmkit_state(family: Family, cfg: ModelConfig, expected: dict[str, torch.Size], ckpt: Checkpoint,
                       dtype: torch.dtype, keep_fp32: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """llmkit state dict built from the checkpoint by the family's table, every shape checked
    before any data is read; strict both ways (a missing or an unused tensor is an error). The
    `keep_fp32` tensors are read in fp32 whatever `dtype` is (model_io.fp32_state_names)."""
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, shape in expected.items():
        rule, layer = _match(family.tensors, name)
        hf_names = rule.hf_names(layer, cfg)
        present = [n in ckpt for n in hf_names]
        if rule.zero_if_absent and not any(present):
            state[name] = torch.zeros(shape, dtype=dtype)
            continue
        if not all(present):
            lost = hf_names[present.index(False)]
            raise UserError(f"checkpoint lacks tensor {lost} (llmkit {name}): the weights are incomplete or "
                            f"were saved for another config.json; download them again")
        for hf_name, want in zip(hf_names, expected_hf_shapes(rule, shape, cfg)):
            got = ckpt.shape(hf_name)
            if got != want:
                raise UserError(f"tensor {hf_name} has shape {got} but config.json implies {want}: "
                                "the weights and config.json come from different models")
            ckpt.dtype(hf_name)  # rejects quantized storage
        want = torch.float32 if name in keep_fp32 else dtype
        tensor = TRANSFORMS[rule.transform][0](_read_parts(rule, hf_names, ckpt, want), cfg)
        state[name] = tensor if tensor.dtype == want else tensor.to(want)
        used.update(hf_names)
    ignore = [re.compile(p) for p in family.ignore] + ([re.compile("^" + re.escape(family.hf_head) + "$")]
                                                       if cfg.tie_embeddings else [])
    extra = sorted(n for n in ckpt.names() - used if not any(p.search(n) for p in ignore))
    if extra:
        raise UserError(f"checkpoint has tensors llmkit would not use ({', '.join(n if n.isprintable() else repr(n) for n in extra[:3])}): config.json "
                        "does not describe these weights; check it belongs to this checkpoint")
    return state


def llmkit_to_hf_state(family: Family, cfg: ModelConfig, state: dict[str, torch.Tensor],
                       dtype: torch.dtype | None = None, keep_fp32: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The same table run backwards: HF tensor name -> tensor, each its own contiguous storage, cast
    to `dtype` except the `keep_fp32` tensors (written in fp32, as transformers writes them)."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == HEAD and cfg.tie_embeddings:
            continue
        rule, layer = _match(family.tensors, name)
        parts = TRANSFORMS[rule.transform][1](tensor.detach(), cfg)
        for hf_name, part in zip(rule.hf_names(layer, cfg), parts):
            part = part if dtype is None or name in keep_fp32 else part.to(dtype)
            if rule.piece is not None:
                pieces.setdefault(hf_name, {})[rule.piece[0]] = part
            else:
                out[hf_name] = part
    for hf_name, blocks in pieces.items():  # the blocks of one fused HF tensor, in order
        out[hf_name] = torch.cat([blocks[k] for k in sorted(blocks)], dim=0)
    return out


_INIT_FUNCTIONS = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_")


@contextmanager
def _skipping_init() -> Iterator[None]:
    """Build modules without running their random init: `torch.empty` memory that nobody writes is
    never paged in, so a model about to receive a checkpoint costs no resident memory."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


# --- public API ------------------------------------------------------------------------------

def _stored_head_differs(ckpt: Checkpoint, emb: str, head: str, dtype: torch.dtype) -> bool:
    """Whether the checkpoint holds an LM head (`head`: lm_head.weight, GPT-NeoX's embed_out.weight)
    that is not the embedding. transformers 5 then keeps both untied (it compares them exactly, in
    the dtype it loads), whatever config.json says."""
    if head not in ckpt or emb not in ckpt or ckpt.same_tensor(head, emb):
        return False
    if ckpt.shape(head) != ckpt.shape(emb):
        return True
    return not torch.equal(ckpt.get(head).to(dtype), ckpt.get(emb).to(dtype))


# --- other model kinds ---------------------------------------------------------------------------
# Encoders, encoder-decoders and vision models have small tables of their own: a Hugging Face
# `model_type` -> the module that reads it, with `config_from_hf_dict(config) -> config object` and
# `load_hf_dir(directory, config, device, dtype) -> model`; an llmkit kind name -> the module that
# writes it, with `export_hf_dir(model, tokenizer, out_dir, dtype) -> Path`. Imported on first use.
HF_KIND_READERS: dict[str, str] = {
    "bert": "llmkit.interop.encoders", "roberta": "llmkit.interop.encoders",
    "distilbert": "llmkit.interop.encoders", "t5": "llmkit.interop.t5", "longt5": "llmkit.interop.t5",
    "vit": "llmkit.interop.vision", "clip": "llmkit.interop.vision",
}
HF_KIND_WRITERS: dict[str, str] = {"t5": "llmkit.interop.t5", "encoder": "llmkit.interop.encoders",
                                   "clip": "llmkit.interop.clip_tables"}


def _kind_module(table: dict[str, str], key: Any):
    """The module `table` names for `key`, or None (also when that module is not built yet)."""
    module = table.get(key) if isinstance(key, str) else None
    return None if module is None else import_if_present(module)


def read_tensors(directory: Path, config: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files transformers would read from `directory` (`weight_files`),
    by its stored name, memory-mapped; cast to `dtype` where given (F32/BF16/F16 only)."""
    with open_checkpoint(directory, None, config) as ckpt:
        out = {}
        for name in sorted(ckpt.names()):
            stored = ckpt.dtype(name)
            t = ckpt.get(name, mapped=dtype is None or stored == dtype)
            out[name] = t if dtype is None or stored == dtype else t.to(dtype)
        return out


def gather(tensors: dict[str, torch.Tensor], hf_names: list[str] | tuple[str, ...], name: str,
           source: str | Path) -> torch.Tensor:
    """llmkit tensor `name` from its HF tensors in `tensors`: the one as stored, or several joined
    along rows (a fused q/k/v); UserError naming the first one the checkpoint lacks."""
    missing = [n for n in hf_names if n not in tensors]
    if missing:
        raise UserError(f"{source} lacks tensor {missing[0]} (llmkit {name}): the weights are incomplete or "
                        "belong to another config.json; download them again")
    parts = [tensors[n] for n in hf_names]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                 optional: tuple[str, ...] = ()) -> torch.nn.Module:
    """Load `state` (llmkit names) into `model` strictly: every shape checked first (UserError naming
    the tensor, so config.json and the weights disagreeing is one line), every parameter and
    persistent buffer filled except the tied ones and `optional` (names the checkpoint may omit)."""
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise UserError(f"{source}: tensor for {name} has shape {tuple(t.shape)} but config.json says "
                            f"{tuple(expected[name].shape)}: the config and the weights do not belong together")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:  # a gap in the kind's table: our bug
        raise RuntimeError(f"conversion table produced names the model lacks: {unexpected[:5]}")
    from llmkit.models.kinds import tied_parameters

    tied = set(tied_parameters(model))
    missing = sorted(n for n in set(expected) - set(state) if n not in tied and n not in optional)
    if missing:
        raise UserError(f"{source} lacks the weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                        "the checkpoint is incomplete or of another architecture")
    model.load_state_dict(state, strict=False, assign=True)
    tie_weights(model)
    return model


def config_from_hf(directory: str | Path) -> ModelConfig:
    """The config object of an HF directory (no weights read): a `ModelConfig` for decoders, the
    kind's own config class for encoders, T5, ViT and CLIP."""
    config = read_config(Path(directory))
    reader = _kind_module(HF_KIND_READERS, config.get("model_type"))
    if reader is not None:
        return reader.config_from_hf_dict(config)
    return family_of(config).to_llmkit(config)


def load_hf(directory: str | Path, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> DecoderLM:
    """A `DecoderLM` with the weights of an HF directory, in the checkpoint's dtype unless `dtype`
    asks for another. Unsupported architectures, missing shards, shape mismatches and unreadable
    files raise UserError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"model directory not found: {directory}: pass a Hugging Face model directory")
    config = read_config(directory)
    reader = _kind_module(HF_KIND_READERS, config.get("model_type"))
    if reader is not None:
        return reader.load_hf_dir(directory, config, device=device, dtype=dtype)
    family = family_of(config)
    cfg = family.to_llmkit(config)
    wanted = parse_dtype(dtype)
    with open_checkpoint(directory, family, config) as ckpt:
        emb, head = family.tensors[0].hf[0], family.hf_head
        if cfg.tie_embeddings and emb not in ckpt and head in ckpt:
            ckpt.alias(emb, head)  # transformers ties the other way round: the stored head is the embedding too
        target = wanted or (ckpt.dtype(emb) if emb in ckpt else torch.float32)
        check_runnable(target, device)
        if cfg.tie_embeddings and _stored_head_differs(ckpt, emb, head, target):
            warnings.warn(f"{directory}: config.json ties the embeddings but the checkpoint stores a different "
                          f"{head}; using the stored head, as transformers does (set tie_word_embeddings=false "
                          "to silence this)", stacklevel=2)
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
        try:
            with _skipping_init():
                model = build_model(cfg)
        except RuntimeError as e:  # the CPU allocator's answer to a size no memory holds
            if "can't allocate memory" not in str(e):
                raise
            raise UserError(f"config.json in {directory} describes a model of {_param_count(cfg):,} parameters, "
                            "more than this machine's memory holds: check that it belongs to these weights") from None
        expected = {k: v.shape for k, v in model.state_dict().items()
                    if not (cfg.tie_embeddings and k == HEAD)}
        state = hf_to_llmkit_state(family, cfg, expected, ckpt, target, fp32_state_names(model))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {HEAD}:  # a gap in the family's table: our bug
        raise RuntimeError(f"conversion table incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tie_weights(model)
    return model.to(device=device, dtype=target).eval()


def _param_count(cfg: ModelConfig) -> int:
    """Parameters a decoder of `cfg` has, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def from_transformers(hf_model: torch.nn.Module) -> DecoderLM:
    """An llmkit copy of a live `transformers` model (same weights), through the same family table
    as loading from disk: the model is saved to a temporary directory and loaded back."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmkit-from-hf-") as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        model = load_hf(tmp)
        # the memory maps point into tmp, which is about to go: own the tensors
        for p in model.parameters():
            p.data = p.data.clone()
        return model


def check_exportable(model: torch.nn.Module) -> None:
    """UserError unless `model` is a decoder or a kind with a writer (`HF_KIND_WRITERS`)."""
    kind = kind_of_model(model)
    if kind is not None and _kind_module(HF_KIND_WRITERS, kind.name) is not None:
        return
    if kind is None or not issubclass(kind.model_class, DecoderLM):
        name = kind.name if kind is not None else type(model).__name__
        raise UserError(f"Hugging Face export covers decoder models only, not {name!r}: "
                        "save it as an llmkit directory instead (--to llmkit)")


def export_hf(model: DecoderLM, tokenizer=None, out_dir: str | Path = ".", family: str | None = None,
              dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face directory of `family` (default: the one
    whose shape fits; UserError when none does). Other kinds go to their writer (`HF_KIND_WRITERS`)."""
    check_exportable(model)
    writer = _kind_module(HF_KIND_WRITERS, kind_of_model(model).name)
    if writer is not None:
        return writer.export_hf_dir(model, tokenizer, out_dir, dtype)
    cfg = model.cfg
    fam = family_for_export(cfg, family)
    wanted = parse_dtype(dtype)
    stored = wanted or model.tok_emb.weight.dtype
    config: dict[str, Any] = {"architectures": [fam.architecture], "model_type": fam.model_type,
                              **fam.from_llmkit(cfg), "dtype": _TORCH_DTYPE_NAMES.get(stored, "float32")}
    tensors = llmkit_to_hf_state(fam, cfg, state_dict_for_saving(model), wanted, fp32_state_names(model))
    if tokenizer is not None:
        config.update({k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                                         ("pad_token_id", tokenizer.pad_id)) if v is not None})
    return write_hf_dir(out_dir, config, tensors, tokenizer)


def write_hf_dir(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer=None,
                 files: dict[str, dict[str, Any]] | None = None) -> Path:
    """A Hugging Face model folder: model.safetensors, config.json, the tokenizer's files and any
    other JSON `files` (name -> contents, e.g. preprocessor_config.json), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, out / WEIGHTS)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    for name, contents in (files or {}).items():
        atomic_write_text(out / name, json.dumps(contents, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


__all__ = ["HF_KIND_READERS", "HF_KIND_WRITERS", "assign_state", "check_exportable", "config_from_hf", "export_hf",
           "gather", "is_hf_dir", "load_hf", "read_config", "read_tensors", "write_hf_dir"]
