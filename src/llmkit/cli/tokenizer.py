"""`llmkit tokenizer train|encode|decode|stats`: thin verbs over `llmkit.tokenizers`."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Callable

from llmkit import outputs
from llmkit.cli.args import stdin_text
from llmkit.errors import UserError
from llmkit.options import VOCAB_SIZE, integer
from llmkit.tokenizers import BUILDERS, Tokenizer, load_tokenizer, read_text_file, train_tokenizer
from llmkit.tokenizers.train import DEFAULT_SPECIAL_TOKENS, NORMALIZERS

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def cmd_train(args: argparse.Namespace) -> int:
    specials = _special_tokens(args.special_tokens)
    out = Path(args.out)
    replacing = outputs.claim(out, force=args.force)  # before the (long) training: nothing is lost
    inside = [f for f in args.files if replacing and Path(f).resolve().is_relative_to(out.resolve())]
    if inside:
        raise UserError(f"--out {out} holds the input {inside[0]}, which --force would delete: choose another --out")
    outputs.check_writable(out.parent if out.parent != Path("") else Path("."))
    tok = train_tokenizer(
        args.kind, args.files, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        special_tokens=specials, lowercase=args.lowercase, normalization=args.normalization,
    )
    if replacing:  # --force: the folder's old contents go, so no stale model or vocabulary stays beside it
        outputs.remove_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"trained {args.kind} tokenizer: vocab {tok.vocab_size}, special {tok.special_tokens} -> {out}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus yields only {tok.vocab_size} of the {args.vocab_size} entries asked for "
              "(every merge or piece it supports is in)")
    return 0


def _special_tokens(text: str | None) -> list[str] | None:
    """--special-tokens a,b,c as a list; empty or repeated names are a mistake, not a choice."""
    if text is None:
        return None
    if not text.strip():
        return []  # --special-tokens "": none
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise UserError(f"--special-tokens {text!r} has an empty name: give comma-separated tokens like <s>,</s>,<pad>")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise UserError(f"--special-tokens lists {repeated[0]!r} twice: give each special token once")
    return names


def _input_text(args: argparse.Namespace) -> str:
    return args.text if args.text is not None else stdin_text()


def cmd_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(_input_text(args), add_special_tokens=args.add_special_tokens)
    if args.tokens:
        print(" ".join(repr(tok.id_to_token(i)) for i in ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _parse_ids(words: list[str], vocab_size: int) -> list[int]:
    try:
        ids = [int(w) for w in words]
    except ValueError as e:
        raise UserError(f"token ids must be integers: {e}; pass ids like 15496 995") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1}): check the tokenizer")
    return ids


def cmd_decode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    words = args.ids if args.ids else stdin_text().replace(",", " ").split()
    print(tok.decode(_parse_ids(words, tok.vocab_size), skip_special_tokens=args.skip_special_tokens))
    return 0


def corpus_stats(tok: Tokenizer, texts: list[str], top: int = 20) -> dict:
    """Tokens per word, bytes per token, unknown-token rate and the most frequent tokens."""
    counts: Counter[int] = Counter()
    words = n_bytes = 0
    for text in texts:
        lines = text.splitlines(keepends=True)
        for ids in tok.encode_many(lines):
            counts.update(ids)
        words += len(text.split())
        n_bytes += len(text.encode("utf-8"))
    n_tokens = sum(counts.values())
    if n_tokens == 0:
        raise UserError("the corpus is empty: pass files with text in them")
    unk = tok.unk_id
    return {
        "tokens": n_tokens, "words": words, "bytes": n_bytes,
        "tokens_per_word": n_tokens / max(words, 1),
        "bytes_per_token": n_bytes / n_tokens,
        "unk_rate": (counts[unk] / n_tokens) if unk is not None else 0.0,
        "top": counts.most_common(top),
    }


def cmd_stats(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    stats = corpus_stats(tok, [read_text_file(f) for f in args.files], top=args.top)
    rows = [("tokens", f"{stats['tokens']:,}"), ("words", f"{stats['words']:,}"), ("bytes", f"{stats['bytes']:,}"),
            ("tokens per word", f"{stats['tokens_per_word']:.3f}"), ("bytes per token", f"{stats['bytes_per_token']:.3f}"),
            ("unknown-token rate", f"{stats['unk_rate']:.4%}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>14}")
    print(f"\n{'rank':>4}  {'id':>7}  {'count':>10}  {'share':>7}  token")
    for rank, (idx, count) in enumerate(stats["top"], 1):
        print(f"{rank:>4}  {idx:>7}  {count:>10,}  {count / stats['tokens']:>7.2%}  {tok.id_to_token(idx)!r}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a tokenizer on text files", formatter_class=FORMATTER)
    p.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files")
    p.add_argument("--kind", choices=sorted(BUILDERS), default="bpe", help="tokenizer algorithm")
    p.add_argument("--vocab-size", type=VOCAB_SIZE.parse, required=True,
                   help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="directory to save the tokenizer into (new or empty; see --force)")
    p.add_argument("--force", action="store_true", help="replace what --out holds (a tokenizer, model or run)")
    p.add_argument("--min-frequency", type=integer(0, 2**31 - 1).parse, default=2,
                   help="least count for a merge (bpe, wordpiece)")
    p.add_argument("--special-tokens", default=None,
                   help=f"comma-separated special tokens (default: {','.join(DEFAULT_SPECIAL_TOKENS)})")
    p.add_argument("--lowercase", action="store_true", help="lowercase text before tokenizing")
    p.add_argument("--normalization", choices=sorted(NORMALIZERS), default=None, help="unicode normal form")
    p.set_defaults(func=cmd_train)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="print the token ids of a text", formatter_class=FORMATTER)
    p.add_argument("tokenizer", metavar="DIR_OR_FILE", help="tokenizer directory or file")
    p.add_argument("--text", default=None, help="text to encode (default: read stdin)")
    p.add_argument("--add-special-tokens", action="store_true", help="add bos/eos as the tokenizer does")
    p.add_argument("--tokens", action="store_true", help="print token strings instead of ids")
    p.set_defaults(func=cmd_encode)


def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="print the text of token ids", formatter_class=FORMATTER)
    p.add_argument("tokenizer", metavar="DIR_OR_FILE", help="tokenizer directory or file")
    p.add_argument("ids", nargs="*", help="token ids (default: read stdin)")
    p.add_argument("--skip-special-tokens", action="store_true", help="leave special tokens out")
    p.set_defaults(func=cmd_decode)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="tokens per word, bytes per token, unknown rate, top tokens",
                       formatter_class=FORMATTER)
    p.add_argument("tokenizer", metavar="DIR_OR_FILE", help="tokenizer directory or file")
    p.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files")
    p.add_argument("--top", type=integer(0, 1 << 20).parse, default=20, help="how many of the most frequent tokens to list")
    p.set_defaults(func=cmd_stats)


VERBS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_train, _add_encode, _add_decode, _add_stats)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tokenizer` and its sub-verbs to the top-level `llmkit` parser."""
    parser = subparsers.add_parser("tokenizer", help="train, inspect and apply tokenizers", formatter_class=FORMATTER)
    sub = parser.add_subparsers(dest="tokenizer_verb", metavar="VERB", required=True)
    for add in VERBS:
        add(sub)
