"""Triton matmul over fp32 master weights with 16-bit tensor-core operands (docs/design.md, section 3).

Under autocast with an fp32 lm_head, the two head matmuls that read the weight W [V, D] (the logits
x = h Wᵀ + b and the hidden gradient G W) must multiply 16-bit operands, as autocast's ``F.linear`` does:
W rounded to the autocast dtype, products accumulated in fp32. cuBLAS needs that rounded W as a
tensor, a 1.05 GB copy at an 8B head (V = 128256, D = 4096, bf16). :func:`head_matmul` never forms it:
each program loads fp32 tiles of W and rounds them to the 16-bit dtype in registers just before
``tl.dot``, which accumulates in fp32. Bitwise the same operands as the copy; only the accumulation
order differs from cuBLAS'.

The matmul is C[M, N] = A[M, K] B[K, N] (+ bias[N]), A 16-bit (the hidden chunk or G, any strides), B a
strided view of the fp32 weight (Wᵀ for the logits, W for the hidden gradient), C fp32 or 16-bit.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import rounding

# Output tile and reduction step. One configuration serves sm_80 and sm_90 (tests/test_kernel_compile.py
# compiles both, no spills; at the headline 106-116 registers and 88 KiB of shared memory on sm_90 for 4
# stages of a 128 x 32 16-bit A tile and a 32 x 128 fp32 B tile, within an A100's 163 KiB too). Six
# 128-row tiles cover a 768-row chunk.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 32
NUM_STAGES = 4
NUM_WARPS = 8
# Programs of consecutive ids walk down GROUP_M row tiles of one column of tiles, so the programs in
# flight share W's tiles in L2 and W is read from HBM about once per chunk.
GROUP_M = 8
# Under the CPU interpreter tl.dot on 16-bit operands returns wrong values and a cast of fp32 to bf16
# truncates instead of rounding to nearest even: the kernel then rounds W by hand and multiplies the
# (exactly representable) 16-bit values in fp32. tests/test_kernel_compile.py sets this False while it
# records launches, so that it compiles the variant a GPU runs.
EXACT_FP32_DOT_INTERPRETER = True

_SIXTEEN = (torch.bfloat16, torch.float16)


@triton.jit
def _head_matmul_kernel(
    a_ptr,  # A [M, K], 16-bit: the hidden chunk h [c, D] (logits) or the gradient G = dL/dx [c, V]
    a_row_stride,
    a_col_stride,
    w_ptr,  # fp32 weight; B[k, n] = w_ptr[k * w_k_stride + n * w_n_stride] (Wᵀ: strides (1, D); W: (D, 1))
    w_k_stride,
    w_n_stride,
    bias_ptr,  # [N] fp32 bias b, added in fp32 to every row (only read when HAS_BIAS)
    c_ptr,  # out C [M, N] = A round16(B) (+ b), column stride 1: fp32 logits or a 16-bit hidden gradient
    c_row_stride,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # C = A B + b (the logits' bias folded in), else C = A B
    EXACT_FP32_DOT: tl.constexpr,  # interpreter: round B by hand, dot in fp32 (see module constant)
):
    """Program p computes the C tile (pid_m, pid_n); the K loop accumulates in fp32."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    # Rows and columns past the edge are wrapped into range for the loads (their results are never
    # stored), so only the reduction's tail needs a mask; tile offsets are int32, bases int64.
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_K)
    a_rows = (pid_m * BLOCK_M + local_m) % M
    w_cols = (pid_n * BLOCK_N + local_n) % N
    a_tile = a_ptr + (a_rows.to(tl.int64)[:, None] * a_row_stride + steps[None, :] * a_col_stride)
    w_tile = w_ptr + (steps[:, None] * w_k_stride + w_cols.to(tl.int64)[None, :] * w_n_stride)
    op_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_tile, mask=steps[None, :] < k_left, other=0.0)
        w = tl.load(w_tile, mask=steps[:, None] < k_left, other=0.0)
        if EXACT_FP32_DOT:
            if op_dtype == tl.bfloat16:
                w = rounding.round_bf16_by_hand(w)
            else:
                w = w.to(op_dtype).to(tl.float32)
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(op_dtype), acc)  # a GPU converts to nearest even (Triton's default)
        a_tile += BLOCK_K * a_col_stride
        w_tile += BLOCK_K * w_k_stride
    rows = pid_m * BLOCK_M + local_m
    cols = pid_n * BLOCK_N + local_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if EXACT_FP32_DOT:
        if c_ptr.dtype.element_ty == tl.bfloat16:
            acc = rounding.round_bf16_by_hand(acc)
    out = c_ptr + (rows.to(tl.int64)[:, None] * c_row_stride + cols[None, :])
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _check(name: str, t, dims: int, dtypes) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype not in dtypes:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dims}-D tensor of {' or '.join(map(str, dtypes))}, got {got}")


def head_matmul(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bias=None) -> torch.Tensor:
    """out = a @ round(w) (+ bias), round(w) = the fp32 ``w`` rounded to ``a``'s 16-bit dtype in registers.

    a: [M, K] bfloat16/float16, any strides. w: [K, N] float32, any strides (pass ``W.T`` for the
    logits, ``W`` for the hidden gradient). out: [M, N] float32 or a's dtype, column stride 1; the
    product is accumulated in fp32 and rounded once to out's dtype. bias: optional [N] float32,
    contiguous, added in fp32. Returns out."""
    _check("a", a, 2, _SIXTEEN)
    _check("w", w, 2, (torch.float32,))
    _check("out", out, 2, (torch.float32, a.dtype))
    (m, k), n = a.shape, w.shape[1]
    if w.shape[0] != k or tuple(out.shape) != (m, n):
        raise ValueError(f"shapes do not multiply: a {tuple(a.shape)} @ w {tuple(w.shape)} -> out {tuple(out.shape)}")
    if n > 1 and out.stride(1) != 1:
        raise ValueError(f"out must have a contiguous last dim, got strides {tuple(out.stride())}")
    if bias is not None:
        _check("bias", bias, 1, (torch.float32,))
        if bias.shape[0] != n or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous [{n}] tensor, got shape {tuple(bias.shape)}")
    if len({a.device, w.device, out.device} | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("a, w, out (and bias) must be on one device")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros((), dtype=out.dtype))
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    on_cpu = a.device.type == "cpu"
    with torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext():
        _head_matmul_kernel[grid](
            a, a.stride(0), a.stride(1), w, w.stride(0), w.stride(1), bias if bias is not None else out,
            out, out.stride(0), m, n, k,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, HAS_BIAS=bias is not None,
            EXACT_FP32_DOT=on_cpu and EXACT_FP32_DOT_INTERPRETER, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return out

