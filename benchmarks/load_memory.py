"""Peak memory while loading a Hugging Face checkpoint, as a multiple of the weights' size.

Claim (issue 4): `llmkit.interop.load_hf` loads through memory-mapped safetensors, so the peak
resident set added by loading stays under 1.3x the size of the weights.

Method: save a random Llama with transformers (single file and sharded), then in a fresh
subprocess per case import everything, record the resident set, load, and read the peak resident
set (VmHWM of /proc/self/status: a fresh address space per exec, unlike `ru_maxrss`, which a
child inherits from its parent across fork + exec). ratio = (peak - resident before loading) / weights bytes. transformers'
`from_pretrained` is measured the same way for reference.

    python benchmarks/load_memory.py            # ~170 MB fp32 model
    python benchmarks/load_memory.py --layers 4 # smaller
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import psutil, torch
torch.set_num_threads(1)
import transformers
from llmkit.interop import load_hf
transformers.logging.set_verbosity_error()
case, path, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "warm"
x = torch.ones(8, 8)  # first use of the compute kernels: not part of loading
torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None]).sum()
if warm:
    # The first model built on the meta device imports torch's meta kernels and decompositions
    # (~70 MB of Python objects), once per process and whatever the checkpoint's size: pay it on a
    # tiny model first so that only memory proportional to the checkpoint is counted.
    with torch.device("meta"):
        if case == "transformers":
            transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=1, vocab_size=8))
        else:
            from llmkit.config import ModelConfig
            from llmkit.models.decoder import DecoderLM
            DecoderLM(ModelConfig.from_preset("tiny"))
before = psutil.Process().memory_info().rss
if case == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
else:
    model = load_hf(path)
n_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
# touch every weight once, as the first forward pass would (mapped pages become resident)
checksum = float(sum(p.float().sum() for p in model.parameters()))
status = open("/proc/self/status").read().split("VmHWM:")[1]
peak = int(status.split()[0]) * 1024  # kB
after = psutil.Process().memory_info().rss
print(json.dumps({"before": before, "peak": peak, "after": after, "param_bytes": n_bytes}))
"""


def save_model(root: Path, layers: int, width: int, vocab: int) -> dict[str, Path]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=width, intermediate_size=int(width * 2.75), num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                                   max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="40MB")
    return {"llmkit load_hf (1 file)": single, "llmkit load_hf (sharded)": sharded, "transformers": single}


def measure(case: str, path: Path, warm: bool) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, "transformers" if case == "transformers" else "llmkit",
                          str(path), "warm" if warm else "cold"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=16000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = save_model(Path(tmp), args.layers, args.width, args.vocab)
        weights = sum(f.stat().st_size for f in cases["llmkit load_hf (1 file)"].glob("*.safetensors"))
        print(f"random Llama, {args.layers} layers, width {args.width}, vocab {args.vocab}: "
              f"safetensors {weights / 2**20:.1f} MiB (fp32)\n")
        print("| loader | added peak RSS, cold process | ratio | added peak RSS, after warm-up (tiny model "
              "built on meta first) | ratio |")
        print("|---|---|---|---|---|")
        for case, path in cases.items():
            row = []
            for warm in (False, True):
                r = measure(case, path, warm)
                added = r["peak"] - r["before"]
                row += [f"{added / 2**20:.0f} MiB", f"{added / weights:.2f}x"]
            print(f"| {case} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
