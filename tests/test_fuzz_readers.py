"""Fuzz the readers of model directories: random and mutated bytes as `model.safetensors` (header
lengths off, bad JSON, offsets out of range, wrong dtypes and shapes, tensors re-encoded in another
dtype) and random or mistyped values in `config.json` (llmkit's and Hugging Face's: wrong types per
field, huge ints, NaN), fed to `llmkit.model_io.load_model`, `llmkit.load` and
`llmkit.interop.hf.load_hf`. Each input must load (and then run: one forward pass) or raise a
one-line UserError: never another exception, never a hang.

Bounded for CI: derandomized (the same examples every run), no example database, no shrinking, a few
dozen examples per property; `LLMKIT_FUZZ_EXAMPLES=2000` explores further. Address space is capped
during each load, so a config that asks for terabytes fails at once instead of swapping the machine.

Each crash the fuzzer found (a TypeError, a hang building 2**31 layers, an allocation of terabytes,
a two-line message) is pinned at the end as the input that caused it, now refused in one line.
`KNOWN_CRASHES` lists messages a property may step around while a newly found crash is being fixed.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402

from timeouts import deadline

import llmkit  # noqa: E402
from llmkit.config import ModelConfig  # noqa: E402
from llmkit.errors import UserError  # noqa: E402
from llmkit.interop.hf import export_hf, load_hf  # noqa: E402
from llmkit.model_io import load_model, save_model  # noqa: E402
from llmkit.models.decoder import DecoderLM  # noqa: E402
from llmkit.tokenizers import CharTokenizer  # noqa: E402

EXAMPLES = int(os.environ.get("LLMKIT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
HANG_S = 10  # one load running longer than this is a hang
HEADROOM = 4 << 30  # address space one load may add

VOCAB = 32
FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what a checkpoint may hold

# Crashes found here in readers this test does not own, by the start of their message; each is
# pinned by an xfail(strict=True) test below. Remove an entry when its reader answers in a UserError.
KNOWN_CRASHES: dict[str, str] = {}


# --- the directories the fuzzer mutates -----------------------------------------------------------

def tiny(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**{**dict(vocab_size=VOCAB, context_length=16, n_layers=1, d_model=16, n_heads=2),
                                    **overrides}))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """An llmkit directory (with a char tokenizer) and Hugging Face llama and gpt2 directories."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = CharTokenizer([chr(48 + i) for i in range(VOCAB)])
    llama_like = dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, n_kv_heads=1)
    return {
        "llmkit": save_model(tiny(**llama_like), root / "llmkit", tokenizer=tok),
        "llama": export_hf(tiny(**llama_like), None, root / "llama"),
        "gpt2": export_hf(tiny(mlp="gelu_tanh"), None, root / "gpt2"),
    }


@contextmanager
def capped_address_space():
    """A soft RLIMIT_AS a few GiB above what the process uses now, for the length of one load: an
    allocation beyond it fails at once (and must be answered as a UserError) instead of swapping the
    machine. Restored before anything reports a failure."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = used + HEADROOM if hard == resource.RLIM_INFINITY else min(used + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def copy_of(directory: Path):
    with tempfile.TemporaryDirectory(prefix="llmkit-fuzz-") as tmp:
        target = Path(tmp) / directory.name
        shutil.copytree(directory, target)
        yield target


LOADERS = {"load_model": load_model, "llmkit.load": llmkit.load, "load_hf": load_hf}


def loads_or_refuses(loader: str, directory: Path, known: bool = True, hang_s: int = HANG_S) -> str:
    """'loaded' (and one forward pass ran), 'refused' (a one-line UserError) or, with `known`, 'known'
    (a crash listed in KNOWN_CRASHES); any other exception fails the property."""
    with deadline(hang_s):
        try:
            with capped_address_space():
                model = LOADERS[loader](directory)
                model = getattr(model, "model", model)  # llmkit.load gives a LanguageModel
                with torch.inference_mode():
                    logits = model(torch.tensor([[1, 2, 3]]))
        except UserError as e:
            assert "\n" not in str(e), f"a UserError of several lines: {e}"
            return "refused"
        except RuntimeError as e:
            if known and any(str(e).startswith(k) or k in str(e).split("\n")[0] for k in KNOWN_CRASHES):
                return "known"
            raise
    assert logits.shape[:2] == (1, 3) and logits.is_floating_point()
    return "loaded"


# --- strategies: weights ----------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
DTYPE_TAGS = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F4", "f32", ""])


def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: object, data: bytes, length_delta: int = 0, text: str | None = None) -> bytes:
    raw = (json.dumps(header) if text is None else text).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", max(len(raw) + length_delta, 0) % 2**64) + raw + data


BASE: dict[str, tuple[bytes, dict[str, torch.Tensor]]] = {}  # which -> the file's bytes and tensors


@st.composite
def mutated_safetensors(draw, which: str) -> bytes:
    """Bytes near the real safetensors file of BASE[which], or none at all."""
    original, state = BASE[which]
    header, data = split(original)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["random", "truncate", "flip", "length", "append", "header_text", "header_json",
                                 "entry", "offsets", "recast", "reshape", "rename"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if kind == "flip":
        blob = bytearray(original)
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, min(len(blob) - 1, 8 + len(json.dumps(header)) + 64)))] = draw(st.integers(0, 255))
        return bytes(blob)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + original[8:]
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=64))
    if kind == "header_text":
        return join(None, data, text=draw(st.text(max_size=40)))
    if kind == "header_json":
        return join(draw(JSON), data)
    name = draw(st.sampled_from(names))
    if kind == "recast":  # a well-formed file with one tensor stored in another floating type
        return safetensors_bytes({**state, name: state[name].to(draw(st.sampled_from(FLOATS)))})
    if kind == "reshape":  # a well-formed file with one tensor of another (consistent) shape
        t = state[name].reshape(-1)
        return safetensors_bytes({**state, name: t[:draw(st.integers(0, max(t.numel() - 1, 0)))]})
    if kind == "rename":  # a tensor missing, renamed or added (no control characters: a known crash, pinned)
        tensors = dict(state)
        new_name = draw(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12))
        tensors[new_name] = tensors.pop(name) if draw(st.booleans()) else tensors[name].clone()
        return safetensors_bytes(tensors)
    entry = dict(header[name])
    if kind == "entry":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop"]))
        if field == "dtype":
            entry["dtype"] = draw(DTYPE_TAGS | JSON)
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4) | JSON)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-1, 2**64), min_size=2, max_size=2) | JSON)
        elif field == "extra":
            entry[draw(st.text(max_size=6))] = draw(JSON)
        else:
            entry.pop(draw(st.sampled_from(sorted(entry))))
    else:  # offsets: shifted within or beyond the data
        begin, end = entry["data_offsets"]
        shift = draw(st.integers(-end, len(data) + 64))
        entry["data_offsets"] = [begin + shift, end + shift]
    return join({**header, name: entry}, data, length_delta=draw(st.sampled_from([0, 0, 0, -1, 1, 7])))


# --- strategies: configs ----------------------------------------------------------------------------

SIZE = st.integers(1, 64) | st.integers(-2, 2**70)  # small sizes load; huge and negative ones must be refused
POSITIVE = st.floats(1e-8, 1e4, allow_nan=False)
WORD = st.sampled_from(["gelu", "gelu_tanh", "swiglu", "layernorm", "rmsnorm", "rope", "learned", "sinusoidal",
                        "alibi", "silu", "gelu_new", "relu", "default", "linear", "llama3"]) | st.text(max_size=8)
ROPE = st.none() | st.fixed_dictionaries({"type": st.sampled_from(["linear", "llama3", "dynamic"])},
                                         optional={"factor": POSITIVE, "low_freq_factor": POSITIVE,
                                                   "high_freq_factor": POSITIVE,
                                                   "original_max_position_embeddings": SIZE})
# A value of each field's own type, in a small range: what a config.json could hold by mistake.
LLMKIT_TYPED = {
    "vocab_size": SIZE, "context_length": SIZE, "n_layers": st.integers(1, 3), "d_model": SIZE, "n_heads": SIZE,
    "n_kv_heads": st.none() | SIZE, "head_dim": st.none() | SIZE, "d_ff": st.none() | SIZE, "mlp": WORD,
    "norm": WORD, "norm_eps": POSITIVE | st.floats(-1, 0), "position": WORD, "rope_base": POSITIVE,
    "rope_scaling": ROPE, "bias": st.booleans(), "qkv_bias": st.none() | st.booleans(),
    "sliding_window": st.none() | st.integers(-2, 64), "dropout": st.floats(0, 2), "tie_embeddings": st.booleans(),
    "init_std": POSITIVE, "architecture": st.sampled_from(["decoder", "encoder", ""]),
}
HF_TYPED = {
    "vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": SIZE, "num_hidden_layers": st.integers(1, 3),
    "num_attention_heads": SIZE, "num_key_value_heads": SIZE, "head_dim": SIZE, "hidden_act": WORD,
    "max_position_embeddings": SIZE, "rms_norm_eps": POSITIVE, "tie_word_embeddings": st.booleans(),
    "rope_theta": POSITIVE, "rope_scaling": st.none() | st.fixed_dictionaries({"rope_type": WORD, "factor": POSITIVE}),
    "rope_parameters": st.fixed_dictionaries({"rope_type": st.sampled_from(["default", "linear", "llama3", "yarn"]),
                                              "rope_theta": POSITIVE}, optional={"factor": POSITIVE}),
    "attention_bias": st.booleans(), "mlp_bias": st.booleans(), "model_type": st.sampled_from(["llama", "gpt2", "qwen2",
                                                                                               "mistral", "bert"]),
    "n_positions": SIZE, "n_layer": st.integers(1, 3), "n_embd": SIZE, "n_head": SIZE, "n_inner": st.none() | SIZE,
    "activation_function": WORD, "layer_norm_epsilon": POSITIVE, "scale_attn_weights": st.booleans(),
}


def typed_config(draw, original: dict, typed: dict) -> dict:
    """`original` with one to three fields set to a value of their own type, in range."""
    config = dict(original)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(sorted(set(config) & set(typed))))
        config[field] = draw(typed[field])
    return config


def any_config(draw, original: dict) -> object:
    """Anything: a field of any JSON value (wrong types, huge ints, NaN), one dropped or added, or
    the whole file another JSON value."""
    kind = draw(st.sampled_from(["field", "field", "field", "drop", "extra", "whole"]))
    if kind == "whole":
        return draw(JSON)
    config = dict(original)
    if kind == "drop":
        config.pop(draw(st.sampled_from(sorted(config))))
    elif kind == "extra":
        config[draw(st.text(max_size=8))] = draw(JSON)
    else:
        for _ in range(draw(st.integers(1, 3))):
            config[draw(st.sampled_from(sorted(config)))] = draw(JSON)
    return config


# --- the properties ---------------------------------------------------------------------------------

LOADERS_OF = {"llmkit": ("load_model", "llmkit.load"), "llama": ("load_hf", "llmkit.load"),
              "gpt2": ("load_hf", "llmkit.load")}


def write_and_load(source: Path, name: str, content: bytes, known: bool = True) -> list[str]:
    with copy_of(source) as d:
        (d / name).write_bytes(content)
        return [loads_or_refuses(loader, d, known) for loader in LOADERS_OF[source.name]]


@pytest.mark.parametrize("which", ["llmkit", "llama", "gpt2"])
def test_mutated_weights_load_or_refuse(dirs, which):
    BASE[which] = ((dirs[which] / "model.safetensors").read_bytes(), load_file(dirs[which] / "model.safetensors"))
    seen = set()

    @FUZZ
    @given(blob=mutated_safetensors(which))
    def check(blob):
        seen.update(write_and_load(dirs[which], "model.safetensors", blob))

    check()
    assert "refused" in seen  # the mutations reach the readers


@pytest.mark.parametrize("which,typed", [("llmkit", LLMKIT_TYPED), ("llama", HF_TYPED), ("gpt2", HF_TYPED)])
def test_configs_with_wrong_values_of_the_right_type_load_or_refuse(dirs, which, typed):
    original = json.loads((dirs[which] / "config.json").read_text())
    seen = set()

    @FUZZ
    @given(data=st.data())
    def check(data):
        config = typed_config(data.draw, original, typed)
        seen.update(write_and_load(dirs[which], "config.json", json.dumps(config).encode()))

    check()
    assert {"loaded", "refused"} <= seen


@pytest.mark.parametrize("which", ["llmkit", "llama", "gpt2"])
def test_configs_with_any_json_values_load_or_refuse(dirs, which):
    original = json.loads((dirs[which] / "config.json").read_text())

    @FUZZ
    @given(data=st.data())
    def check(data):
        config = any_config(data.draw, original)
        write_and_load(dirs[which], "config.json", json.dumps(config).encode(), known=False)

    check()


def test_the_unmutated_directories_load(dirs):
    for which, loaders in LOADERS_OF.items():
        assert [loads_or_refuses(loader, dirs[which]) for loader in loaders] == ["loaded", "loaded"]


# --- crashes the fuzzer found, fixed: each stays a UserError -----------------------------------------

def _config_with(dirs, which: str, **change) -> bytes:
    return json.dumps({**json.loads((dirs[which] / "config.json").read_text()), **change}).encode()


CONFIG_CRASHES = [  # (directory, the fields changed, what used to happen)
    ("llmkit", {"mlp": []}, "TypeError unhashable type: config.py validate `in MLPS`"),
    ("llmkit", {"head_dim": "x"}, "TypeError: config.py __post_init__/validate arithmetic on a string"),
    ("llmkit", {"norm_eps": None}, "TypeError '<=' on None: config.py validate"),
    ("llmkit", {"norm_eps": math.nan}, "loads: `norm_eps <= 0` is False for NaN, and every logit is NaN"),
    ("llmkit", {"dropout": []}, "TypeError '<=' on a list: config.py validate"),
    ("llmkit", {"sliding_window": []}, "TypeError: config.py validate"),
    ("llmkit", {"rope_scaling": True}, "AttributeError 'bool' has no .get: config.py validate"),
    ("llmkit", {"rope_base": None}, "TypeError in nn/positions.py: rope_base unchecked"),
    ("llmkit", {"init_std": -1.0}, "RuntimeError normal expects std >= 0: init_std unchecked"),
    ("llmkit", {"init_std": None}, "TypeError normal_(): init_std unchecked"),
    ("llmkit", {"head_dim": -2}, "RuntimeError in torch.arange: head_dim not in the positive checks"),
    ("llmkit", {"d_ff": 2**63}, "TypeError Overflow when unpacking long long: no upper bound"),
    ("llmkit", {"head_dim": 10**30}, "OverflowError int too big to convert: no upper bound"),
    ("llmkit", {"context_length": 2**31}, "RuntimeError can't allocate memory (RoPE tables): no upper bound"),
    ("llmkit", {"n_layers": 2**31}, "a hang: building 2**31 blocks: no upper bound"),
    ("llama", {"hidden_size": "x"}, "TypeError // on str: families.py _llama_like"),
    ("llama", {"num_attention_heads": 0}, "ZeroDivisionError: families.py _llama_like divides by it"),
    ("llama", {"rope_parameters": 1}, "TypeError 'int' is not iterable: families.py rope_from_hf"),
    ("llama", {"rope_parameters": "x"}, "ValueError dictionary update sequence: families.py rope_from_hf"),
    ("llama", {"vocab_size": 2**31}, "RuntimeError can't allocate memory: no upper bound"),
    ("llama", {"max_position_embeddings": 2**63}, "RuntimeError SymInt: no upper bound"),
    ("llama", {"model_type": None, "architectures": True}, "TypeError 'bool' is not iterable: families.py family_of"),
    ("llama", {"model_type": None, "architectures": [[]]}, "TypeError in ', '.join: families.py family_of"),
    ("gpt2", {"model_type": "qwen2"}, "RuntimeError can't allocate memory: load_hf builds the 7B model of qwen2's "
                                      "defaults before it checks the checkpoint's shapes"),
    ("gpt2", {"activation_function": []}, "TypeError unhashable: families.py gpt2_to_llmkit"),
    ("gpt2", {"n_embd": {}}, "TypeError int * dict: families.py gpt2_to_llmkit"),
    ("gpt2", {"n_positions": 10**30}, "TypeError Overflow when unpacking long long: no upper bound"),
]


@pytest.mark.parametrize("which,changes,now", CONFIG_CRASHES,
                         ids=[f"{w}-{','.join(f'{k}={v!r}' for k, v in c.items())}"[:56] for w, c, _ in CONFIG_CRASHES])
def test_config_crash_found_by_the_fuzzer(dirs, which, changes, now, request):
    loader = "load_model" if which == "llmkit" else "load_hf"
    with copy_of(dirs[which]) as d:
        (d / "config.json").write_bytes(_config_with(dirs, which, **changes))
        assert loads_or_refuses(loader, d, known=False, hang_s=3) == "refused"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64,
                                   torch.float8_e4m3fn])
def test_llmkit_weights_in_an_odd_dtype_are_refused(dirs, dtype):
    state = load_file(dirs["llmkit"] / "model.safetensors")
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"].to(dtype)
    with copy_of(dirs["llmkit"]) as d:
        (d / "model.safetensors").write_bytes(safetensors_bytes(state))
        assert loads_or_refuses("load_model", d, known=False) == "refused"


def test_a_tensor_name_with_a_newline_is_still_one_line(dirs):
    state = load_file(dirs["llama"] / "model.safetensors")
    state["evil\nname"] = state["model.norm.weight"].clone()
    with copy_of(dirs["llama"]) as d:
        (d / "model.safetensors").write_bytes(safetensors_bytes(state))
        assert loads_or_refuses("load_hf", d, known=False) == "refused"


def test_nan_config_values_are_refused(dirs):
    """json.dumps writes NaN, Python's json reads it: the float fields take it to the config (norm_eps
    is pinned above)."""
    for field in ("dropout",):
        with copy_of(dirs["llmkit"]) as d:
            (d / "config.json").write_bytes(_config_with(dirs, "llmkit", **{field: math.nan}))
            assert loads_or_refuses("load_model", d, known=False) == "refused"
