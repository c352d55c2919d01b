"""The Python entry point: `llmkit.load(path)` gives a model with its tokenizer, ready to generate.

The model's class comes from its directory (an llmkit config.json names the architecture, see
`llmkit.models.kinds`; a Hugging Face directory is a decoder). The tokenizer is optional: a
directory of weights alone loads, runs on token ids, and says what is missing only when text is asked
for.

Loading checks, cheaply, what would otherwise fail late or silently: every id the tokenizer can
produce must exist in the model's embedding (a larger model vocabulary, padded for speed, is fine),
and every weight must be a finite number (a NaN or inf weight makes sampling crash and greedy decoding
print garbage). The finite check is one min/max reduction per tensor, no copies (`isfinite().all()`
is 5-10x slower): 25-45 ms for a 124M fp32 model on 2 CPU cores, 2.5% of a cold load (1.7 s); after a
warm memory-mapped load (60 ms) it mostly pays the page faults the first forward pass would pay.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from llmkit.errors import UserError
from llmkit.generation.generate import GenerationConfig, generate, generate_tokens, stream
from llmkit.model_io import check_finite, check_vocab, max_token_id, non_finite  # noqa: F401  (re-exported)
from llmkit.models.kinds import ModelKind, kind_of_model, require_text_generation
from llmkit.tokenizers.base import TOKENIZERS, Tokenizer, load_tokenizer


@dataclass
class LanguageModel:
    """A loaded model, its tokenizer (None when the directory has none) and where it came from."""

    model: torch.nn.Module
    tokenizer: Tokenizer | None
    path: Path

    @property
    def kind(self) -> ModelKind | None:
        return kind_of_model(self.model)

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a UserError saying which directory lacks one and how to give one."""
        if self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer, which text in or out needs: pass tokenizer=PATH to "
                            "llmkit.load (--tokenizer PATH on the command line) or copy the tokenizer files "
                            f"(tokenizer.json, tokenizer.model, or vocab.json + merges.txt) into {self.path}; "
                            "token ids need none (generate_ids)")
        return self.tokenizer

    def _text_ready(self) -> Tokenizer:
        require_text_generation(self.model)
        return self.require_tokenizer()

    def generate(self, prompt: str, **settings) -> str:
        """Generated continuation of `prompt`; settings are GenerationConfig fields."""
        return generate(self.model, self._text_ready(), prompt, GenerationConfig(**settings))

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        """The continuation as text pieces, as they are produced."""
        return stream(self.model, self._text_ready(), prompt, GenerationConfig(**settings))

    def generate_ids(self, prompt_ids: Sequence[int], **settings) -> list[int]:
        """New token ids after `prompt_ids` (no tokenizer needed; a stop token ends the list, included).
        Stop ids are `stop_token_ids` plus the tokenizer's EOS when there is a tokenizer."""
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        return list(generate_tokens(self.model, list(prompt_ids), GenerationConfig(**settings), eos_id=eos))


def load_model_any(path: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None, check: bool = True,
                   allow_pickle: bool = False) -> torch.nn.Module:
    """The model of an llmkit run/model directory (of any registered kind) or of a Hugging Face
    directory (told apart by config.json's model_type). A llama2.c .bin must be converted first: it
    has no tokenizer. `check`: refuse weights that are not finite numbers (`check_finite`).
    `allow_pickle`: an llmkit directory's pickled weights (model.pt, pytorch_model.bin) load, through
    torch.load(weights_only=True); without it they are refused."""
    from llmkit.interop.convert import detect_format
    from llmkit.interop.dtypes import parse_dtype
    from llmkit.interop.hf import load_hf
    from llmkit.model_io import load_model

    path = Path(path)
    fmt = detect_format(path)
    if fmt == "llama2c":
        raise UserError(f"{path} is a llama2.c checkpoint: convert it first with "
                        f"`llmkit convert {path} --tokenizer TOKENIZER.model --out DIR`, then load DIR")
    if fmt == "hf":
        model = load_hf(path, device=device, dtype=dtype)
    else:
        model = load_model(path, device=device, dtype=parse_dtype(dtype), allow_pickle=allow_pickle)
    if check:
        check_finite(model, path)
    return model


def problems(lm: LanguageModel) -> list[str]:
    """What the load checks find wrong with a model loaded with check=False, one line each."""
    found = []
    for check in (lambda: check_vocab(lm.model, lm.tokenizer, lm.path), lambda: check_finite(lm.model, lm.path)):
        try:
            check()
        except UserError as e:
            found.append(str(e))
    return found


def find_tokenizer(path: str | Path, tokenizer: str | Path | Tokenizer | None = None) -> Tokenizer | None:
    """`tokenizer` (an object, a file or a folder) if given, else the one in `path`, else None.
    Files that are there but unreadable still raise: only an absent tokenizer is None."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    path = Path(path)
    if path.is_dir() and any(kind.can_load(path) for kind in TOKENIZERS.values()):
        return load_tokenizer(path)
    return None


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         tokenizer: str | Path | Tokenizer | None = None, check: bool = True,
         allow_pickle: bool = False, adapter: str | Path | None = None, merge: bool = True) -> LanguageModel:
    """Load an llmkit run directory or a Hugging Face model directory with its tokenizer.
    `dtype` (torch dtype or "fp32"/"bf16"/"fp16") casts; None keeps the stored dtype. `tokenizer`
    (a Tokenizer, file or folder) replaces the directory's own; a directory without one still
    loads, and text generation then raises a UserError saying so. `check` (the default) refuses, in
    one line, a tokenizer whose ids the model lacks and weights that are not finite numbers;
    `problems(lm)` lists the same for a model loaded with check=False. `allow_pickle` lets pickled
    weights of a directory you trust load (see `load_model_any`).

    `adapter`: a peft-format adapter folder (trained here or by `peft`) applied to the model; `path`
    may also be such a folder itself (an adapter fine-tuning run), whose base model is then the one
    its adapter_config.json names. With `merge` (the default) an adapter whose math allows it
    (LoRA, DoRA, IA3, VeRA) is folded into the weights: the same outputs, and decoding runs the
    plain model's fast paths."""
    path = Path(path)
    if adapter is None and is_adapter_dir(path):
        adapter, path = path, adapter_base(path)
    elif adapter is not None:
        warn_if_other_base(adapter, path)
    if path.is_file() and path.suffix == ".bin":  # a llama2.c checkpoint with its tokenizer .model beside it
        from llmkit.interop.dtypes import parse_dtype
        from llmkit.model_io import load_pretrained, pretrained_tokenizer

        model = load_pretrained(path, device=device, dtype=parse_dtype(dtype)).eval()
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else (load_tokenizer(tokenizer) if tokenizer is not None
                                                                  else pretrained_tokenizer(path))
    else:
        model = load_model_any(path, device=device, dtype=dtype, check=check, allow_pickle=allow_pickle)
        tok = find_tokenizer(path, tokenizer)
    if adapter is not None:
        if tokenizer is None and find_tokenizer(adapter) is not None:
            tok = find_tokenizer(adapter)  # a fine-tuning run keeps the tokenizer (and chat template) it used
        model = apply_adapter(model, adapter, merge=merge)
    if check:
        check_vocab(model, tok, path)
    return LanguageModel(model, tok, Path(adapter) if adapter is not None else path)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a peft adapter folder (adapter_config.json, no model config.json)."""
    from llmkit.peft.files import ADAPTER_CONFIG

    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(adapter: str | Path) -> Path:
    """The base model an adapter folder's config names (`base_model_name_or_path`), which must be here."""
    from llmkit.peft.files import read_adapter

    config, _ = read_adapter(adapter)
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise UserError(f"adapter {adapter} names base model {base!r}, which is not on this machine: pass the base "
                        f"model and the adapter, e.g. `llmkit generate BASE --adapter {adapter}`")
    return Path(base)


def warn_if_other_base(adapter: str | Path, base: Path) -> None:
    """One warning line (stderr) when the adapter's config names another base model that is on this
    machine: an adapter of the same shapes loads onto any base, and the outputs are then not the
    trained ones (a merged copy of its own base would apply it twice)."""
    import sys

    from llmkit.peft.files import read_adapter

    config, _ = read_adapter(adapter)
    named = config.get("base_model_name_or_path")
    if named and Path(named).exists() and Path(named).resolve() != base.resolve():
        print(f"warning: adapter {adapter} was trained on {named}, not {base}: its outputs here are not the trained "
              "ones unless the two models are the same", file=sys.stderr)


def apply_adapter(model: torch.nn.Module, adapter: str | Path, merge: bool = True) -> torch.nn.Module:
    """`model` with the adapter of folder `adapter` applied (merged where exact and `merge`)."""
    from llmkit.peft.files import load_adapter

    dtype = next(model.parameters()).dtype
    adapted, method = load_adapter(model.float(), adapter)
    if merge and method.mergeable:
        adapted = method.merge(adapted)
    return adapted.to(dtype).eval()


def merge_adapter(model: str | Path, adapter: str | Path, out: str | Path, force: bool = False,
                  dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` with `adapter` folded into its weights to `out`: a Hugging Face directory when
    the base is one, else an llmkit model directory (with the tokenizer). Methods whose adapter is
    not a weight change (prefix, prompt, bottleneck adapters) are refused."""
    from llmkit.interop.convert import _check_apart, _prepare_out, write_folder
    from llmkit.interop.hf import export_hf, is_hf_dir
    from llmkit.model_io import save_model
    from llmkit.peft.files import load_adapter

    model, out = Path(model), Path(out)
    for src in (model, Path(adapter)):
        _check_apart(src, out)
    _prepare_out(out, force)
    warn_if_other_base(adapter, model)
    lm = load(model, dtype=dtype, tokenizer=None, merge=False)
    stored = next(lm.model.parameters()).dtype
    adapted, method = load_adapter(lm.model.float(), adapter)
    merged = method.merge(adapted).to(stored)  # refuses methods that cannot merge
    tok = find_tokenizer(adapter) or lm.tokenizer
    if model.is_dir() and is_hf_dir(model):
        write_folder(out, lambda tmp: export_hf(merged, tok, tmp))
    else:
        write_folder(out, lambda tmp: save_model(merged, tmp, tok))
    return out


# --- sentence embeddings -------------------------------------------------------------------------

def _special_suffix(tok: Tokenizer) -> list[int]:
    """The ids the tokenizer's template appends to a single text ([SEP] for BERT, </s> for RoBERTa)."""
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[start + len(plain):]
    return []


def _truncate(rows: list[list[int]], limit: int, suffix: list[int]) -> list[list[int]]:
    """Rows cut to `limit` ids keeping the template's closing ids, as transformers' truncation does
    (the text's tokens are cut, the special tokens stay)."""
    keep = limit - len(suffix)
    return [r if len(r) <= limit else r[:keep] + suffix for r in rows]


def encoder_of(lm: LanguageModel, what: str = "embeddings") -> torch.nn.Module:
    """The model of `lm` if it is an encoder (llmkit.models.encoder), else a UserError naming its kind."""
    kind = lm.kind
    if kind is None or kind.name != "encoder":
        name = kind.name if kind is not None else type(lm.model).__name__
        raise UserError(f"{lm.path} holds a {name!r} model: {what} need an encoder (BERT, RoBERTa, DistilBERT or a "
                        "sentence-transformers model such as all-MiniLM-L6-v2)")
    return lm.model


def embed(model: str | Path | LanguageModel, sentences: str | Sequence[str], batch_size: int = 32,
          normalize: bool | None = None) -> torch.Tensor:
    """Sentence embeddings [N, d] of `sentences` with an encoder (a directory or a loaded
    `LanguageModel`): each text tokenized with its special tokens, cut to the model's
    `max_seq_length` as sentence-transformers cuts it, pooled as the model's config says (mean over
    real tokens for all-MiniLM-L6-v2) and made unit length where it says so (`normalize` overrides).
    Texts are batched by length, longest first (little padding), and returned in the given order."""
    from llmkit.models.encoder import pool

    lm = model if isinstance(model, LanguageModel) else load(model)
    encoder = encoder_of(lm)
    tok = lm.require_tokenizer()
    if isinstance(sentences, str):
        sentences = [sentences]
    if not all(isinstance(s, str) for s in sentences):
        raise UserError("sentences must be strings: pass a list of str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    cfg = encoder.cfg
    normalize = cfg.normalize if normalize is None else bool(normalize)
    param = next(encoder.parameters())
    if not sentences:
        return torch.empty(0, cfg.d_model, dtype=param.dtype, device=param.device)
    rows = tok.encode_many(list(sentences), add_special_tokens=True)
    empty = next((i for i, row in enumerate(rows) if not row), None)
    if empty is not None:  # nothing to pool: refuse rather than return a made-up vector
        raise UserError(f"sentence {empty} ({sentences[empty]!r}) has no tokens to embed: drop empty texts")
    rows = _truncate(rows, cfg.max_seq_length or cfg.max_positions, _special_suffix(tok))
    pad = tok.pad_id if tok.pad_id is not None else cfg.pad_token_id
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = torch.empty(len(rows), cfg.d_model, dtype=param.dtype, device=param.device)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = len(rows[chunk[0]])  # the longest of the chunk: right padding to it
                ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in chunk], device=param.device)
                lengths = torch.tensor([len(rows[i]) for i in chunk], device=param.device)
                mask = (torch.arange(width, device=param.device) < lengths[:, None]).long()
                hidden = encoder.encode(ids, mask, packed=True)  # padding is never computed
                out[torch.tensor(chunk, device=param.device)] = pool(hidden, mask, cfg.pooling, normalize)
    finally:
        encoder.train(was_training)
    return out
