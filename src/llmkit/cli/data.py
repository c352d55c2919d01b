"""`llmkit data prepare SOURCES... --tokenizer DIR --out DIR`: a thin verb over `llmkit.data.prepare`."""
from __future__ import annotations

import argparse
import os
import sys

from llmkit.options import integer

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def cmd_prepare(args: argparse.Namespace) -> int:
    from llmkit.data.prepare import prepare

    s = prepare(args.sources, args.tokenizer, args.out, text_field=args.text_field, workers=args.workers,
                shard_tokens=args.shard_tokens, skip_bad_records=args.skip_bad_records, force=args.force,
                progress=not args.quiet and sys.stderr.isatty())
    verb = "reused" if s.reused else "prepared"
    print(f"{verb} {s.out_dir}: {s.documents:,} documents, {s.tokens:,} tokens ({s.dtype}, vocab {s.vocab_size}) "
          f"in {s.shards} shard(s); {s.bytes / 1e6:.1f} MB in {s.seconds:.1f} s = {s.mb_per_s:.1f} MB/s [{s.engine}]")
    if s.empty_records:
        print(f"{s.empty_records:,} record(s) with empty text (nothing to train on) left out")
    if s.skipped_records:
        print(f"skipped {s.skipped_records:,} bad record(s), e.g. {'; '.join(s.skipped_examples[:3])}")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from llmkit.data.prepare import DEFAULT_SHARD_TOKENS

    p = sub.add_parser("prepare", formatter_class=FORMATTER,
                       help="tokenize text/JSONL/JSON/CSV/Parquet into sharded token files for training")
    p.add_argument("sources", nargs="+", metavar="SOURCES", help="files or folders (.txt .md .jsonl .json .csv .tsv .parquet, "
                   "optionally .gz/.bz2/.xz)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file (tokenizer.json, vocab.json, .model)")
    p.add_argument("--out", required=True, help="output directory: new, empty or earlier prepared data (replaced "
                   "atomically when done); see --force")
    p.add_argument("--force", action="store_true", help="replace an --out that holds something else (a model, "
                   "tokenizer or run)")
    p.add_argument("--text-field", default="text", help="the record field holding the text (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--workers", type=integer(1, 1024).parse, default=os.cpu_count() or 1, help="tokenizing processes")
    p.add_argument("--shard-tokens", type=integer(1, 2**40).parse, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file")
    p.add_argument("--skip-bad-records", action="store_true", help="skip (and count) records that are not JSON or lack the field")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare training data", formatter_class=FORMATTER,
                                   description="Prepare training data: tokenize once into memory-mappable shards.")
    sub = parser.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    _add_prepare(sub)


def run(args: argparse.Namespace) -> int:
    return int(args.func(args) or 0)
