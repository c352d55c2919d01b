"""Move a model's CPU weights into memory backed by 2 MiB pages (Linux transparent huge pages).

Batch-1 decoding streams every weight once per token, so its speed is the read bandwidth the
matrix-vector kernel reaches. With 4 KiB pages that read misses the TLB every 4 KiB and the hardware
prefetchers stop at each page boundary; on the 2-core EPYC we measure on, a two-thread read reaches
~28 GB/s from 4 KiB pages and ~33 GB/s from 2 MiB pages (benchmarks/decode_speed.py prints both).
The allocator PyTorch uses does not ask for huge pages, so the weights are copied once into an
anonymous mapping advised with MADV_HUGEPAGE (which is what THP's default "madvise" mode honours).

Values, shapes, Parameter objects, state dicts and saving are unchanged: only where the bytes live.
Every parameter gets its own storage over its slice of the mapping (safetensors refuses tensors that
share a storage), and the mapping lives as long as any of them does.
"""
from __future__ import annotations

import mmap
import os
import sys

import torch
from torch import nn

PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
MIN_BYTES = 8 << 20  # below this the weights sit in the caches anyway


def supported() -> bool:
    """Linux with MADV_HUGEPAGE, and not switched off with LLMKIT_HUGEPAGES=0 (the copy leaves the
    weights in anonymous memory, which a memory-mapped checkpoint's pages were not)."""
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
            and os.environ.get("LLMKIT_HUGEPAGES", "1") != "0")


def _movable(p: torch.Tensor) -> bool:
    return p.device.type == "cpu" and p.dtype.is_floating_point and p.is_contiguous() and p.numel() > 0


def _mapping(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """An anonymous private mapping advised for huge pages with room for nbytes from a 2 MiB
    boundary, and that boundary's offset; None where the kernel refuses the advice."""
    mapping = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # kernel without THP
        mapping.close()
        return None
    base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    return mapping, (-base) % PAGE


def empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """An uninitialised 1-D tensor in huge pages (benchmarks measure the bandwidth they give)."""
    if not supported():
        return None
    got = _mapping(numel * dtype.itemsize)
    return None if got is None else torch.frombuffer(got[0], dtype=dtype, count=numel, offset=got[1])


def place_in_huge_pages(model: nn.Module) -> int:
    """Copy the model's contiguous floating-point CPU parameters into one huge-page mapping;
    returns the bytes moved (0 where not supported, or for models under MIN_BYTES)."""
    params = [p for p in {id(p): p for p in model.parameters()}.values() if _movable(p)]  # tied once
    sizes = [(p.numel() * p.element_size() + ALIGN - 1) // ALIGN * ALIGN for p in params]
    total = sum(sizes)
    if not supported() or total < MIN_BYTES:
        return 0
    got = _mapping(total)
    if got is None:
        return 0
    mapping, offset = got
    with torch.no_grad():
        for p, size in zip(params, sizes):
            view = torch.frombuffer(mapping, dtype=p.dtype, count=p.numel(), offset=offset).view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += size
    return total
