"""`llmkit embed MODEL --text ... [--text ...] [--file F | --file -]`: sentence embeddings of an
encoder (llmkit, Hugging Face BERT-family or sentence-transformers directory), printed as JSON
lines or a compact table; with `--similarity` the cosine-similarity table of the texts; with
`--out FILE.npy|FILE.jsonl` written to a file (atomically; an existing file only with --force)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmkit.cli.args import stdin_text
from llmkit.cli.generate import device_option
from llmkit.errors import UserError
from llmkit.options import COUNT

OUT_SUFFIXES = (".npy", ".jsonl")


def register(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings of an encoder model",
                       description="Embed sentences with an encoder (e.g. all-MiniLM-L6-v2): one vector per text, "
                                   "printed as JSON lines, a table, or a cosine-similarity table.")
    p.add_argument("model", help="model directory (llmkit, Hugging Face BERT/RoBERTa/DistilBERT or sentence-transformers)")
    p.add_argument("--text", action="append", default=[], help="a text to embed; repeat for several")
    p.add_argument("--file", action="append", default=[],
                   help="a UTF-8 file of texts, one per line (blank lines skipped); '-' reads standard input")
    p.add_argument("--similarity", action="store_true", help="print the cosine similarity of every pair of texts "
                   "(needs 2 or more) instead of the embeddings")
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl",
                   help="how embeddings are printed: one JSON object per line, or a compact table")
    p.add_argument("--out", default=None, help="write the embeddings to this .npy or .jsonl file (see --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=COUNT.parse, default=32, help="texts per forward pass")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="unit-length embeddings (default: as the model says)")
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def gather_texts(args: argparse.Namespace) -> list[str]:
    """The --text values, then each --file's non-blank lines, in order; UserError when none."""
    from llmkit.textio import read_text

    texts = list(args.text)
    for name in args.file:
        content = stdin_text() if name == "-" else read_text(name)
        texts += [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise UserError("no text to embed: pass --text TEXT (repeatable), --file FILE (one text per line) or --file - "
                        "(standard input)")
    return texts


def check_out(path: str, force: bool) -> Path:
    """The --out file, checked before any work: a known suffix, not a folder, not an existing file
    unless --force, in a folder that can be written."""
    from llmkit import outputs

    out = Path(path)
    if out.suffix not in OUT_SUFFIXES:
        raise UserError(f"--out {out}: write a {' or '.join(OUT_SUFFIXES)} file (the suffix picks the format)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file path such as {out / 'embeddings.npy'}")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists: pass --force to replace it, or choose another --out")
    outputs.check_writable(out.parent if str(out.parent) else Path("."))
    return out


def write_out(out: Path, texts: list[str], vectors) -> None:
    import io

    import numpy as np

    from llmkit.utils import atomic_write_bytes, atomic_write_text

    if out.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, vectors.float().cpu().numpy())
        atomic_write_bytes(out, buf.getvalue())
    else:
        atomic_write_text(out, "".join(json.dumps({"text": t, "embedding": v}, ensure_ascii=False) + "\n"
                                       for t, v in zip(texts, vectors.float().cpu().tolist())))


def _label(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def similarity_table(texts: list[str], vectors) -> str:
    """Cosine similarities [N, N] as rows '#i text | s_i1 s_i2 ...'."""
    import torch.nn.functional as F

    unit = F.normalize(vectors.float(), dim=1)
    sims = (unit @ unit.T).cpu().tolist()
    labels = [f"#{i + 1} {_label(t)}" for i, t in enumerate(texts)]
    width = max(len(s) for s in labels)
    head = " " * width + " | " + " ".join(f"{f'#{j + 1}':>6}" for j in range(len(texts)))
    rows = [f"{label:<{width}} | " + " ".join(f"{s:6.3f}" for s in row) for label, row in zip(labels, sims)]
    return "\n".join([head, "-" * len(head), *rows])


def embedding_table(texts: list[str], vectors, shown: int = 6) -> str:
    """One row per text: the label, its norm and the first `shown` components."""
    labels = [_label(t) for t in texts]
    width = max(len(s) for s in labels)
    rows = []
    for label, v in zip(labels, vectors.float().cpu()):
        head = " ".join(f"{x:+.4f}" for x in v[:shown].tolist())
        rows.append(f"{label:<{width}} | norm {v.norm().item():.4f} | {head}{' ...' if v.numel() > shown else ''}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import embed, encoder_of, load

    texts = gather_texts(args)
    if args.similarity and len(texts) < 2:
        raise UserError("--similarity compares texts: pass 2 or more (--text A --text B)")
    out = check_out(args.out, args.force) if args.out else None
    lm = load(args.model, device=args.device)
    encoder_of(lm)
    lm.require_tokenizer()
    vectors = embed(lm, texts, batch_size=args.batch_size, normalize=args.normalize)
    if out is not None:
        write_out(out, texts, vectors)
        print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}", file=sys.stderr)
    if args.similarity:
        print(similarity_table(texts, vectors))
    elif out is None:
        if args.format == "table":
            print(embedding_table(texts, vectors))
        else:
            for t, v in zip(texts, vectors.float().cpu().tolist()):
                print(json.dumps({"text": t, "embedding": [round(x, 6) for x in v]}, ensure_ascii=False))
    return 0
