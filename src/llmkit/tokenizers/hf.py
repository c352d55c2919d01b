"""Tokenizers from the Hugging Face `tokenizers` library: a `tokenizer.json` (with the
`tokenizer_config.json` beside it: special tokens, chat template), or GPT-2's `vocab.json` +
`merges.txt`, turned into the same byte-level BPE GPT-2 and tiktoken's "gpt2" use.

Special tokens are added as transformers 5 adds them: by tokenizer.json's post-processor, with
tokenizer_config.json's add_bos_token / add_eos_token honoured only beside GPT-2's files.

Saved as `tokenizer.json` + `tokenizer_config.json`, which transformers' `AutoTokenizer` also reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from llmkit.errors import UserError
from llmkit.tokenizers.base import SPECIAL_ROLES, Tokenizer, guess_special_roles, register
from llmkit.utils import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template beside the config
GPT2_FILES = ("vocab.json", "merges.txt")


def _token_content(value: Any) -> str | None:
    """A special token as configs store it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}; restore the file or delete it") from None
    return data if isinstance(data, dict) else {}


def _pick_template(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is the one used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def read_hf_config(directory: Path) -> dict[str, Any]:
    """Special tokens (role -> string), chat template and add_bos/eos flags of an HF tokenizer folder."""
    config = _read_json(directory / CONFIG_FILE)
    special_map = _read_json(directory / SPECIAL_MAP_FILE)
    roles: dict[str, str] = {}
    for role in SPECIAL_ROLES:
        token = _token_content(config.get(f"{role}_token")) or _token_content(special_map.get(f"{role}_token"))
        if token is not None:
            roles[role] = token
    template = _pick_template(config.get("chat_template"))
    if (directory / TEMPLATE_FILE).is_file():
        template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    return {
        "roles": roles,
        "chat_template": template,
        "add_bos_token": config.get("add_bos_token"),
        "add_eos_token": config.get("add_eos_token"),
    }


@register
class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind the common interface (BPE, WordPiece, Unigram, ...)."""

    kind = "hf"
    priority = 10

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        roles = special_tokens if special_tokens is not None else guess_special_roles(specials)
        self._roles = {r: t for r, t in roles.items() if backend.token_to_id(t) is not None}
        self.chat_template = chat_template
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self._own_post = backend.post_processor  # what the tokenizer.json itself adds
        self._add_bos_token, self._add_eos_token = add_bos_token, add_eos_token
        self._apply_flags()

    # -- add_bos_token / add_eos_token ------------------------------------------------------------
    @property
    def add_bos_token(self) -> bool | None:
        """Whether `encode(..., add_special_tokens=True)` prepends BOS; None: as tokenizer.json says."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool | None) -> None:
        self._add_bos_token = value
        self._apply_flags()

    @property
    def add_eos_token(self) -> bool | None:
        """Whether `encode(..., add_special_tokens=True)` appends EOS; None: as tokenizer.json says."""
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool | None) -> None:
        self._add_eos_token = value
        self._apply_flags()

    def _apply_flags(self) -> None:
        """Put the flags into the backend's post-processor, as transformers' `update_post_processor`
        does: then `encode` and the saved tokenizer.json (what transformers 5 reads) add the same
        special tokens. A flag left None keeps what the tokenizer.json's post-processor does."""
        self.backend.post_processor = self._own_post
        if self._add_bos_token is None and self._add_eos_token is None:
            return
        bos, eos = self._roles.get("bos"), self._roles.get("eos")
        has_bos, has_eos = self.adds_special_tokens()
        want_bos = has_bos if self._add_bos_token is None else bool(self._add_bos_token) and bos is not None
        want_eos = has_eos if self._add_eos_token is None else bool(self._add_eos_token) and eos is not None
        if (want_bos, want_eos) == (has_bos, has_eos):
            return
        head, tail = [bos] * want_bos, [eos] * want_eos
        single = " ".join(head + ["$A"] + tail)
        pair = " ".join(head + ["$A"] + tail + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail])
        used = dict.fromkeys(head + tail)
        template = processors.TemplateProcessing(single=single, pair=pair,
                                                 special_tokens=[(t, self.backend.token_to_id(t)) for t in used])
        # GPT-2's ByteLevel post-processor only fixes offsets: keep it in front, as train.py does
        keep = isinstance(self._own_post, processors.ByteLevel)
        self.backend.post_processor = processors.Sequence([self._own_post, template]) if keep else template

    # -- the interface --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Whole-text ids; a token is a target when its characters overlap a span (from offsets)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [int(any(s < e_tok and s_tok < e for s, e in spans) if e_tok > s_tok else
                    any(s <= s_tok < e for s, e in spans)) for s_tok, e_tok in enc.offsets]
        return enc.ids, mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, so an embedding of this size covers every token."""
        return self._vocab_size

    def special_token_strings(self) -> dict[str, str]:
        return dict(self._roles)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    # -- files ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self.backend.to_str(pretty=False))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "llmkit_kind": self.kind}
        config.update({f"{role}_token": tok for role, tok in self._roles.items()})
        for flag in ("add_bos_token", "add_eos_token"):
            if getattr(self, flag) is not None:
                config[flag] = getattr(self, flag)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def can_load(cls, directory: Path) -> bool:
        return (directory / TOKENIZER_FILE).is_file() or all((directory / f).is_file() for f in GPT2_FILES)

    @classmethod
    def load(cls, directory: str | Path) -> "HFTokenizer":
        directory = Path(directory)
        if (directory / TOKENIZER_FILE).is_file():
            return cls._with_config(_backend_from_file(directory / TOKENIZER_FILE), directory, flags=False)
        return cls._with_config(gpt2_backend(directory / GPT2_FILES[0], directory / GPT2_FILES[1]), directory)

    @classmethod
    def can_load_file(cls, path: Path) -> bool:
        if path.name == GPT2_FILES[0]:
            return (path.parent / GPT2_FILES[1]).is_file()
        return path.suffix == ".json" and _looks_like_tokenizer_json(path)

    @classmethod
    def load_file(cls, path: Path) -> "HFTokenizer":
        if path.name == GPT2_FILES[0]:
            return cls._with_config(gpt2_backend(path, path.parent / GPT2_FILES[1]), path.parent)
        return cls._with_config(_backend_from_file(path), path.parent, flags=False)

    @classmethod
    def _with_config(cls, backend: BackendTokenizer, directory: Path, flags: bool = True) -> "HFTokenizer":
        """The tokenizer with tokenizer_config.json's roles and template. Its add_bos_token /
        add_eos_token count only beside vocab.json + merges.txt (`flags`): transformers 5 drops them
        when a tokenizer.json is there, whose post-processor alone decides, and so does llmkit."""
        config = read_hf_config(directory)
        return cls(
            backend,
            special_tokens=config["roles"] or None,
            chat_template=config["chat_template"],
            add_bos_token=config["add_bos_token"] if flags else None,
            add_eos_token=config["add_eos_token"] if flags else None,
        )


def _looks_like_tokenizer_json(path: Path) -> bool:
    """A tokenizer.json has a "model" object; peek at the start rather than parse megabytes."""
    if path.name == TOKENIZER_FILE:
        return True
    try:
        with path.open("r", encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return '"model"' in head or '"added_tokens"' in head


def _backend_from_file(path: Path) -> BackendTokenizer:
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for any malformed file
        raise UserError(f"cannot read tokenizer file {path}: {e}; restore the file or re-save the tokenizer") from None


def gpt2_backend(vocab: Path, merges: Path, eos_token: str = "<|endoftext|>") -> BackendTokenizer:
    """GPT-2's byte-level BPE: the same regex split, byte-to-unicode map and merges as tiktoken's gpt2."""
    for path in (vocab, merges):
        if not path.is_file():
            raise UserError(f"GPT-2 tokenizer file not found: {path}: put vocab.json and merges.txt side by side")
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise UserError(f"cannot read GPT-2 vocab/merges ({vocab}, {merges}): {e}; restore the files") from None
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if model.token_to_id(eos_token) is not None:
        backend.add_special_tokens([eos_token])
    return backend
