"""`llmkit generate DIR --prompt ...`: stream a continuation to the terminal (llmkit or Hugging Face
directory); for an encoder-decoder (T5) the prompt is the source and the generated target is
printed. Every decoding setting is a GenerationConfig field, so the options are declared once."""
from __future__ import annotations

import argparse
import sys

from llmkit.cli.args import add_dataclass_options, given
from llmkit.generation.generate import GenerationConfig
from llmkit.options import integer


def device_option(text: str) -> str:
    """argparse `type=` for --device: cpu, cuda or cuda:N, and a GPU must be there for cuda."""
    if text == "cpu":
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible (this PyTorch build or machine has "
                                             "none): use --device cpu")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} GPU(s) are visible")
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `chat`."""
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several (default: none)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=integer(0, 2**31 - 1).parse, default=[],
                   help="stop token id besides EOS; repeat for several (default: none)")
    p.add_argument("--draft", default=None, help="draft model directory: speculative decoding (default: none)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or folder (default: the one in the model directory)")
    p.add_argument("--adapter", default=None, help="peft-format adapter folder to apply (LoRA, DoRA, IA3, prompt, "
                                                   "prefix, ...; merged into the weights where exact) (default: none)")
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="cast the weights (default: as stored)")
    add_dataclass_options(p, GenerationConfig, skip=("stop", "stop_token_ids", "vocab_limit"))


def decoding_settings(args: argparse.Namespace) -> GenerationConfig:
    settings = given(args, GenerationConfig)
    if args.greedy:
        settings["temperature"] = 0.0
    settings["stop"] = list(args.stop)
    settings["stop_token_ids"] = list(args.stop_token_ids)
    cfg = GenerationConfig(**settings)
    cfg.validate()
    return cfg


def warn_if_extrapolated(model, context_length: int | None) -> None:
    """One warning line when --context-length takes a RoPE model without a context-extension
    scaling past the length it was trained on (its angles there were never seen in training)."""
    cfg = getattr(model, "cfg", None)
    if (context_length is not None and cfg is not None and context_length > cfg.context_length
            and getattr(cfg, "position", None) == "rope" and not getattr(cfg, "rope_scaling", None)):
        print(f"warning: --context-length {context_length} is past the {cfg.context_length} positions this model was "
              "trained on: RoPE without a rope_scaling extrapolates there, and quality may drop", file=sys.stderr)


def load_draft(args: argparse.Namespace):
    if not args.draft:
        return None
    from llmkit.api import load_model_any

    return load_model_any(args.draft, device=args.device, dtype=args.dtype).eval()


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained model",
                       description="Generate a continuation of a prompt, streamed as it is produced.")
    p.add_argument("run_dir", help="run or model directory (llmkit or Hugging Face)")
    p.add_argument("--prompt", default="", help="text to continue; for a T5 model the source text (default: empty = "
                   "start from BOS / newline)")
    add_decoding_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load
    from llmkit.generation.generate import stream

    lm = load(args.run_dir, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, adapter=args.adapter)
    tok = lm.require_tokenizer()
    cfg = decoding_settings(args)
    warn_if_extrapolated(lm.model, cfg.context_length)
    draft = load_draft(args)
    prompt = args.prompt
    if not prompt and tok.bos_id is None:
        prompt = "\n"
    pieces = stream(lm.model.eval(), tok, prompt, cfg, draft=draft)
    first = next(pieces, "")  # the prompt's checks (vocabulary, context, beams) run before anything is printed
    out = sys.stdout
    # a decoder continues the prompt (echoed first); an encoder-decoder (T5) prints its target only
    out.write(("" if getattr(lm.model, "is_encoder_decoder", False) else args.prompt) + first)
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0
