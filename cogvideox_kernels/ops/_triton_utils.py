"""What every Triton kernel file here shares, written once: the store cast (with the interpreter's
bf16 rounding fixed), the TMA scratch allocator, the TMA alignment rule and interpreter detection."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpret_mode

__all__ = ["store_cast", "ensure_tma_allocator", "tma_aligned", "interpret_mode"]


@triton.jit
def store_cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``x`` -> ``DTYPE`` for a store, rounding to nearest even. The interpreter truncates
    float32 -> bf16 (the GPU rounds), which doubles the rounding error; there we round by hand so CPU
    tests see GPU numerics."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpret_mode() else "cuda")


_TMA_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator; set it once per process."""
    global _TMA_ALLOCATOR_SET
    if not _TMA_ALLOCATOR_SET:
        triton.set_allocator(_tma_scratch)
        _TMA_ALLOCATOR_SET = True


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and 16-byte multiples as strides (but the last)."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True
