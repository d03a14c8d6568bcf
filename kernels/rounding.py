"""Rounding helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def round_bf16_by_hand(x):
    """fp32 x rounded to bf16's nearest-even value, still as fp32 (16 zero low bits, which any later
    conversion keeps exactly); NaN stays NaN. For the CPU interpreter, whose own conversion of fp32 to
    bf16 truncates where a GPU's rounds to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
