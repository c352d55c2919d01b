"""Dtype names users type (fp32, bf16, fp16) and a check that the machine can compute in one."""
from __future__ import annotations

import functools

import torch

from llmkit.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# safetensors' dtype tags of the floating types a model's weights may use
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as "bf16" (None stays None: keep the checkpoint's dtype)."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in SHORT_NAMES:
            raise UserError(f"dtype {value} is not a weight dtype llmkit runs: use fp32, bf16 or fp16")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"unknown dtype {value!r}: use one of fp32, bf16, fp16")
    return DTYPES[key]


@functools.lru_cache(maxsize=None)
def _can_run(dtype: torch.dtype, device: str) -> bool:
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.linear(a, a).sum().item()
        torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
    except Exception:  # no kernel for this dtype, or no such device at all
        return False
    return True


def check_runnable(dtype: torch.dtype, device: str | torch.device) -> None:
    """Fail early, in one line, when this device has no kernels for `dtype` (say fp16 matmul on
    an old CPU build) instead of deep inside the first forward pass."""
    if not _can_run(dtype, str(torch.device(device))):
        raise UserError(f"this machine cannot compute in {SHORT_NAMES.get(dtype, dtype)} on {device}: "
                        "load with dtype fp32 (or bf16) instead")
