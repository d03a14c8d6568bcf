"""Triton kernels for the two vocabulary passes of the chunked replay KL (see docs/design.md).

A chunk of ``c`` rows of raw student logits ``x`` [c, V] is visited twice, with scaled logits
``z = x * inv_temp``:

* :func:`masked_lse` gathers the scaled logits on each row's teacher slots, overwrites those positions
  of ``x`` with -inf, and returns the log-sum-exp of ``z`` over the remaining vocabulary as two numbers,
  its maximum and the log of the sum relative to it (one fp32 number would round the log-sum away
  when z is ~1e8, at a small temperature);
* :func:`softmax_grad` (after per-row scalars are computed in Python) writes the dense gradient
  ``sign * exp((z - origin) + log_coef)`` and then the sparse gradient on the teacher slots.

Both kernels run one program per row and stream the vocabulary in tiles of ``BLOCK_V`` columns.
:func:`topk_row_terms` is mode "topk"'s only launch here: its loss and slot gradients from the k slot
logits (no vocabulary pass).
:func:`scale_` multiplies a 16-bit gradient by backward's fp32 ``grad_output`` in place, the product
formed in fp32 (one launch, 4 bytes per element; torch's ``mul_`` would round the scale to 16 bits).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from . import rounding
from .row_terms import _row_terms_kernel, _topk_row_terms_kernel

# Elements per program of the scale kernel on a GPU (16 per thread) and under the interpreter.
SCALE_BLOCK = 2048
SCALE_BLOCK_INTERPRETER = 1 << 16
# Widest vocabulary tile and warps per program on a GPU (8 fp32 columns per thread and tile).
MAX_BLOCK_V = 1024
NUM_WARPS = 4
# Under the CPU interpreter each tile costs a fixed number of interpreted numpy operations, so wider
# tiles are faster there.
MAX_BLOCK_V_INTERPRETER = 4096
# Widest tile of teacher slots held in registers at once; more slots (k up to V) loop over tiles.
MAX_BLOCK_K = 1024
# Vocabulary splits per row (programs per row of the partials pass; their combine is a loop of
# MAX_BLOCK_S at a time in the row-terms kernel).
MAX_SPLITS = 16
MAX_BLOCK_S = 64
# Programs per row of softmax_grad. Its 16-bit output overwrites the fp32 logits it reads: a program may
# only write bytes of its own columns, which a contiguous [c, V] gradient row allows for two programs per
# row, never more (docs/design.md, section 3).
GRAD_SPLITS = 2
# The row-terms kernel holds about eight [BLOCK_K] vectors at once: 1024 slots spill a few registers
# on sm_90 and 256 spill 8 bytes on sm_80 under triton 3.6 (tests/test_kernel_compile.py); 128, one
# element per thread of its 4 warps, spill on neither. It runs once per row over k slots, so the
# narrower tile costs nothing measurable beside the vocabulary passes.
MAX_BLOCK_K_ROW_TERMS = 128
_MIN_BLOCK_V = 16

_LOGITS_DTYPES = (torch.float32, torch.float64)
_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _lse_partials_kernel(
    logits_ptr,  # [c, V] raw logits x, last dim contiguous; on exit x[n, ids[n, i]] = -inf on used slots
    logits_row_stride,
    ids_ptr,  # [c, K] teacher ids (int32/int64), -1 = unused slot
    ids_row_stride,
    ids_col_stride,
    z_teacher_ptr,  # out [c, K] (row stride K): x[n, ids[n, i]] * inv_temp on used slots, -inf on unused
    part_max_ptr,  # out [c, S]: max_s = max of z = x * inv_temp over split s's complement columns
    part_sum_ptr,  # out [c, S]: sum of exp(z - max_s) over the same columns (0 when they are all -inf)
    part_row_stride,
    inv_temp: tl.float64,  # 1 / T, rounded once to the logits' dtype
    V,
    K,
    split_width,  # columns per split (a multiple of BLOCK_V); split s holds [s w, (s + 1) w)
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n, s): row n's vocabulary split s. NaN and +inf are reported in max_s (NaN wins), as
    torch.logsumexp propagates them; the running pairs stay finite (tl.maximum may drop a NaN)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * split_width
    hi = tl.minimum(lo + split_width, V)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    neg_inf = float("-inf")
    pos_inf = float("inf")
    compute_dtype = logits_ptr.dtype.element_ty  # fp32 or fp64
    scale = tl.full([], inv_temp, compute_dtype)

    # The teacher slots whose ids fall in this split: gather their scaled logits, then mask them out of
    # the row. Only this program reads those columns, so no other program can race with the -inf
    # stores; split 0 also writes -inf for the unused slots.
    for slot_start in range(0, K, BLOCK_K):
        slot = slot_start + tl.arange(0, BLOCK_K)
        slot_in_range = slot < K
        ids = tl.load(ids_ptr + row * ids_row_stride + slot * ids_col_stride, mask=slot_in_range, other=-1)
        used = slot_in_range & (ids >= 0)
        mine = used & (ids >= lo) & (ids < hi)
        x_teacher = tl.load(row_logits_ptr + ids, mask=mine, other=neg_inf)
        z_teacher = tl.where(mine, x_teacher * scale, neg_inf)
        tl.store(z_teacher_ptr + row * K + slot, z_teacher, mask=mine | (slot_in_range & ~used & (split == 0)))
        tl.store(row_logits_ptr + ids, tl.full([BLOCK_K], neg_inf, compute_dtype), mask=mine)
    # The -inf stores must be visible to every thread of the program before the split is read.
    tl.debug_barrier()

    # Online log-sum-exp, one running (max, sum) pair per lane and one exponential per logit: with
    # e = exp(-|z - max|), a new maximum rescales the sum (sum e + 1), any other z adds e.
    col = tl.arange(0, BLOCK_V)
    lane_max = tl.full([BLOCK_V], neg_inf, compute_dtype)
    lane_sum = tl.zeros([BLOCK_V], compute_dtype)
    lane_nan = tl.zeros([BLOCK_V], tl.int32)
    lane_posinf = tl.zeros([BLOCK_V], tl.int32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + col
        z = tl.load(row_logits_ptr + cols, mask=cols < hi, other=neg_inf) * scale
        lane_nan = tl.maximum(lane_nan, (z != z).to(tl.int32))
        lane_posinf = tl.maximum(lane_posinf, (z == pos_inf).to(tl.int32))
        z = tl.where((z != z) | (z == pos_inf), neg_inf, z)  # recorded above; keeps the pair finite
        # (A first finite z of a lane has e = 0 and a sum of 0 * 0 + 1; a -inf z adds e = 0.)
        e = tl.exp(tl.where(z == neg_inf, neg_inf, -tl.abs(z - lane_max)))
        grows = z > lane_max
        lane_sum = tl.where(grows, lane_sum * e + 1.0, lane_sum + e)
        lane_max = tl.where(grows, z, lane_max)

    split_max = tl.max(lane_max, axis=0)
    safe_split_max = tl.where(split_max == neg_inf, 0.0, split_max)
    split_sum = tl.sum(tl.where(lane_max == neg_inf, 0.0, lane_sum * tl.exp(lane_max - safe_split_max)), axis=0)
    split_max = tl.where(tl.max(lane_posinf, axis=0) > 0, pos_inf, split_max)
    split_max = tl.where(tl.max(lane_nan, axis=0) > 0, float("nan"), split_max)
    tl.store(part_max_ptr + row * part_row_stride + split, split_max)
    tl.store(part_sum_ptr + row * part_row_stride + split, split_sum)


@triton.jit
def _softmax_grad_kernel(
    logits_ptr,
    logits_row_stride,
    ids_ptr,
    ids_row_stride,
    ids_col_stride,
    grad_teacher_ptr,
    grad_teacher_row_stride,
    grad_teacher_col_stride,
    sign_ptr,
    sign_stride,
    origin_ptr,
    origin_stride,
    log_coef_ptr,
    log_coef_stride,
    out_ptr,
    out_row_stride,
    inv_temp: tl.float64,
    V,
    K,
    split_width,  # columns per program (a multiple of BLOCK_V); program (n, s) holds [s w, (s + 1) w)
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_IS_16BIT: tl.constexpr,
    NARROW_IN_PLACE: tl.constexpr,
    FIRST_SPLIT_BACKWARDS: tl.constexpr,  # split 0 visits its tiles last to first (narrow, two splits)
):
    """Program (n, s): row n's columns [s w, (s + 1) w), at most GRAD_SPLITS programs per row.

    Parameters:
    logits_ptr: raw student logits x [c, V] as left by _masked_lse_kernel (-inf on used slots).
    ids_ptr: teacher token ids [c, K]; -1 marks an unused slot.
    grad_teacher_ptr: [c, K] gradient w.r.t. z on the slots (0 on unused slots).
    sign_ptr, origin_ptr, log_coef_ptr: [c] per-row scalars of the dense gradient (sign in {-1, 0, 1}).
    out_ptr: output [c, V]: the logits themselves (same strides), a narrower dtype in their storage
        (NARROW_IN_PLACE), or a separate buffer:
        out[n, v] = sign[n] * exp((z[n, v] - origin[n]) + log_coef[n]),  z = x * inv_temp,
        then out[n, ids[n, i]] = grad_teacher[n, i] for every used slot i.
    inv_temp: 1 / temperature, passed in double precision and rounded once to the logits' dtype.
    V: vocabulary size. K: teacher slots per row.
    BLOCK_V: vocabulary tile width (power of 2). BLOCK_K: slot tile width (power of 2, <= MAX_BLOCK_K).
    OUT_IS_16BIT: out is bf16/fp16; values are rounded through fp32 (the interpreter cannot cast fp64
        to bf16 directly).
    NARROW_IN_PLACE: out is narrower than the logits (r = their element-size ratio) and in their
        storage at the row offset narrow_grad_view gives (docs/design.md, section 3). Each program
        writes only bytes of the logits columns it reads, and only after reading them: one split
        (offset 0) writes tile t over logits columns [t B / r, (t + 1) B / r), read by tile t or
        earlier; with two, split 0's output fills the top of its own columns (offset (r - 1) w) and
        its tile t lands in columns [((r - 1) w + t B) / r, ...) within [t B, w), which it has read
        when it goes last to first, and split 1's lands at the start of its own columns as with one.
        A barrier after each tile's load (every lane has read it) orders the lanes.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * split_width
    hi = tl.minimum(lo + split_width, V)
    num_tiles = (hi - lo + BLOCK_V - 1) // BLOCK_V
    row_logits_ptr = logits_ptr + row * logits_row_stride
    row_out_ptr = out_ptr + row * out_row_stride
    out_dtype = out_ptr.dtype.element_ty
    neg_inf = float("-inf")

    sign = tl.load(sign_ptr + row * sign_stride)
    origin = tl.load(origin_ptr + row * origin_stride)
    log_coef = tl.load(log_coef_ptr + row * log_coef_stride)
    # Per-row guards, so the dense pass is NaN-free on valid rows: a zero sign turns the exponential
    # off (log_coef = -inf: exp(z - origin - inf) = 0, never 0 * inf), and a -inf origin (only when every z of the row
    # is -inf) becomes 0 so that exp(-inf - origin) = 0.
    log_coef = tl.where(sign == 0, neg_inf, log_coef)
    origin = tl.where(origin == neg_inf, 0.0, origin)
    scale = tl.full([], inv_temp, sign.dtype)  # compute dtype = logits' dtype (fp32 or fp64)

    # Dense pass. When out aliases the logits, each element is read and then written by the same lane
    # in the same iteration, so the in-place update is race-free.
    col = tl.arange(0, BLOCK_V)
    for i in range(0, num_tiles):
        tile = i
        if FIRST_SPLIT_BACKWARDS:
            tile = tl.where(split == 0, num_tiles - 1 - i, i)
        cols = lo + tile * BLOCK_V + col
        in_row = cols < hi
        z = tl.load(row_logits_ptr + cols, mask=in_row, other=neg_inf) * scale
        if NARROW_IN_PLACE:
            tl.debug_barrier()
        # (z - origin) first: both are ~1/T in size and nearly cancel; log_coef is O(log 1/T).
        grad = sign * tl.exp((z - origin) + log_coef)
        grad = tl.where(sign == 0, 0.0, grad)  # exact 0 for a row that does not count, even where z is inf/NaN
        if OUT_IS_16BIT:
            grad = grad.to(tl.float32)
        tl.store(row_out_ptr + cols, grad.to(out_dtype), mask=in_row)
    # The dense stores at the slot positions must land before the sparse stores below overwrite them.
    tl.debug_barrier()

    # Sparse pass: the gradient on the teacher slots in this program's columns, BLOCK_K at a time.
    for slot_start in range(0, K, BLOCK_K):
        slot = slot_start + tl.arange(0, BLOCK_K)
        slot_in_range = slot < K
        ids = tl.load(ids_ptr + row * ids_row_stride + slot * ids_col_stride, mask=slot_in_range, other=-1)
        used = slot_in_range & (ids >= lo) & (ids < hi)
        grad_teacher_offsets = row * grad_teacher_row_stride + slot * grad_teacher_col_stride
        grad_teacher = tl.load(grad_teacher_ptr + grad_teacher_offsets, mask=used, other=0.0)
        if OUT_IS_16BIT:
            grad_teacher = grad_teacher.to(tl.float32)
        tl.store(row_out_ptr + ids, grad_teacher.to(out_dtype), mask=used)


@triton.jit
def _scale_kernel(values_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """values[i] = round(values[i] * scale) for i < numel, with values 16-bit [numel] contiguous and
    scale an fp32 scalar in device memory (no host sync): the product is formed in fp32, rounded once."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    scale = tl.load(scale_ptr)
    values = tl.load(values_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    product = values * scale
    if values_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand, as a GPU's conversion does (the interpreter would truncate).
        product = rounding.round_bf16_by_hand(product)
    rounded = product.to(values_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(values_ptr + offsets, rounded, mask=in_range)


# --------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------


def _block_v(V: int, device: torch.device, block_v: Optional[int]) -> int:
    if block_v is None:
        cap = MAX_BLOCK_V_INTERPRETER if device.type == "cpu" else MAX_BLOCK_V
        return max(_MIN_BLOCK_V, min(cap, triton.next_power_of_2(max(V, 1))))
    if not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of 2, got {block_v!r}")
    return block_v


def _block_k(K: int, block_k: Optional[int] = None) -> int:
    if block_k is None:
        return min(MAX_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    if not isinstance(block_k, int) or block_k < 1 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a positive power of 2, got {block_k!r}")
    return block_k


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_inv_temp(inv_temp) -> float:
    if isinstance(inv_temp, bool) or not isinstance(inv_temp, numbers.Real):
        raise ValueError(f"inv_temp must be a Python float, got {type(inv_temp).__name__}")
    inv_temp = float(inv_temp)
    if not (inv_temp > 0 and math.isfinite(inv_temp)):
        raise ValueError(f"inv_temp must be positive and finite, got {inv_temp}")
    return inv_temp


def _check_logits(logits) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [c, V], got {_describe(logits)}")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"logits must be float32 or float64, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have a contiguous last dim, got strides {tuple(logits.stride())}")
    return logits.shape[0], logits.shape[1]


def _check_ids(ids, c: int, device: torch.device) -> int:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != c:
        raise ValueError(f"ids must be a 2-D tensor [c={c}, k], got {_describe(ids)}")
    if ids.dtype not in _ID_DTYPES:
        raise ValueError(f"ids must be int64 or int32, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"ids is on {ids.device} but logits is on {device}")
    return ids.shape[1]


def _check_like(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {_describe(t)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have the logits' dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits is on {device}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {list(t.shape)}"
    return type(t).__name__


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty tensors may share memory: the same storage and intersecting byte spans
    (from strides and storage offsets, so meta tensors, whose data pointers are all 0, work too)."""
    if a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False

    def span(t):
        start = t.storage_offset() * t.element_size()
        last = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) * t.element_size()
        return start, last + t.element_size()

    a0, a1 = span(a)
    b0, b1 = span(b)
    return a0 < b1 and b0 < a1


def _split_width(V: int, block_v: int, split_v: Optional[int]) -> int:
    """Columns per vocabulary split: a multiple of the tile, at most MAX_SPLITS splits per row."""
    if split_v is None:
        tiles = triton.cdiv(max(V, 1), block_v)
        return block_v * triton.cdiv(tiles, MAX_SPLITS)
    if not isinstance(split_v, int) or split_v < block_v or split_v % block_v:
        raise ValueError(f"split_v must be a positive multiple of the vocabulary tile {block_v}, got {split_v!r}")
    return split_v


def _split_plan(V: int, device: torch.device, block_v: Optional[int], split_v: Optional[int]):
    """(vocabulary tile, columns per split, splits S) of the partials pass over V columns."""
    tile = _block_v(V, device, block_v)
    width = _split_width(V, tile, split_v)
    return tile, width, max(1, triton.cdiv(V, width))


def vocab_splits(V: int, device_type: str = "cuda") -> int:
    """S, the programs per row of the partials pass and the width of its two [c, S] outputs (by default;
    selfreplay_fast/planner.py counts those buffers with it)."""
    return _split_plan(V, torch.device(device_type), None, None)[2]


def _lse_partials(logits, ids, inv_temp, block_v, block_k, split_v, splits_for=()):
    """Validates, launches _lse_partials_kernel on a (c, S) grid: (z_teacher, partials [2, c, S]), the
    split maxima and sum-exps. ``splits_for``: other vocabulary sizes whose split counts S must also fit
    (vocab-parallel ranks size their partials for the largest shard, so they gather evenly); the splits
    past this V's own are empty (max -inf, sum 0)."""
    c, V = _check_logits(logits)
    k = _check_ids(ids, c, logits.device)
    inv_temp = _check_inv_temp(inv_temp)
    tile, width, splits = _split_plan(V, logits.device, block_v, split_v)
    splits = max([splits] + [_split_plan(size, logits.device, block_v, split_v)[2] for size in splits_for])
    dev, dtype = logits.device, logits.dtype
    z_teacher = torch.empty((c, k), dtype=dtype, device=dev)
    partials = torch.empty((2, c, splits), dtype=dtype, device=dev)
    part_max, part_sum = partials.unbind(0)
    if c > 0:
        with _on_device(dev):
            _lse_partials_kernel[(c, splits)](
                logits, logits.stride(0), ids, ids.stride(0), ids.stride(1), z_teacher, part_max, part_sum,
                part_max.stride(0), inv_temp, V, k, width, BLOCK_V=tile, BLOCK_K=_block_k(k, block_k), num_warps=NUM_WARPS,
            )
    return z_teacher, partials


def _launch_row_terms(z_teacher, ids, part_max, part_sum, max_c, logsum_c, block_k, row_terms=None):
    """_row_terms_kernel, one program per row. ``row_terms``: None (combine only) or a dict of the
    loss-mode arguments and outputs (see lse_and_row_terms)."""
    c, k = z_teacher.shape
    if c == 0:
        return
    rt = row_terms or {}
    lp = rt.get("teacher_logprobs", z_teacher)
    tail = rt.get("teacher_tail_logprob")
    scale = rt.get("row_scale")
    grad = rt.get("grad_teacher", z_teacher)
    with _on_device(z_teacher.device):
        _row_terms_kernel[(c,)](
            part_max, part_sum, part_max.stride(0), part_max.shape[1],
            z_teacher, ids, ids.stride(0), ids.stride(1), lp, lp.stride(0), lp.stride(1),
            tail if tail is not None else max_c, scale if scale is not None else max_c,
            rt.get("vocab_size", 0), max_c, logsum_c,
            rt.get("loss", max_c), rt.get("sign", max_c), rt.get("log_coef", max_c), grad, k,
            BLOCK_S=min(MAX_BLOCK_S, triton.next_power_of_2(part_max.shape[1])),
            BLOCK_K=min(MAX_BLOCK_K_ROW_TERMS, _block_k(k, block_k)),
            ROW_TERMS=row_terms is not None, TAIL=rt.get("mode") == "tail", HAS_TAIL_LOGPROB=tail is not None,
            WITH_GRAD=scale is not None, num_warps=NUM_WARPS,
        )


def masked_lse(
    logits: torch.Tensor, ids: torch.Tensor, inv_temp: float, *, block_v: Optional[int] = None,
    block_k: Optional[int] = None, split_v: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [c, V] float32/float64, last dim contiguous (row stride may be > V).
    ids: [c, k] int64 (or int32), -1 = unused slot; used ids of a row are unique and in [0, V).
    Returns (z_teacher [c, k], max_complement [c], logsum_complement [c]) in logits.dtype:
      z_teacher[n, i] = logits[n, ids[n, i]] * inv_temp on used slots, -inf on unused slots;
      with z = logits * inv_temp over the v not in the row's used ids (the complement),
      max_complement[n] = max z (NaN if a z is NaN, else +inf if one is +inf) and
      logsum_complement[n] = log(sum exp(z - max_complement[n])): their sum is the complement's
      log-sum-exp. Both -inf when every v is a used id.
    Side effect: logits[n, ids[n, i]] is overwritten with -inf for every used slot.
    Two launches: the split partials and their combine (the row-terms kernel without row terms).
    block_v, block_k: vocabulary / slot tile width overrides (powers of 2); split_v: columns per
    vocabulary split (a multiple of the tile); for tests and tuning.
    """
    z_teacher, (part_max, part_sum) = _lse_partials(logits, ids, inv_temp, block_v, block_k, split_v)
    max_c = torch.empty((z_teacher.shape[0],), dtype=logits.dtype, device=logits.device)
    logsum_c = torch.empty_like(max_c)
    _launch_row_terms(z_teacher, ids, part_max, part_sum, max_c, logsum_c, block_k)
    return z_teacher, max_c, logsum_c


def lse_and_row_terms(
    logits, ids, inv_temp, teacher_logprobs, teacher_tail_logprob, mode, vocab_size, row_scale, loss_out,
    *, combine=None, block_v=None, block_k=None, split_v=None,
):
    """masked_lse and the per-row scalars of ``mode`` ("tail" or "sampled") in two launches.

    teacher_logprobs: [c, k] (0 on unused slots); teacher_tail_logprob: [c] or None; vocab_size: the
    whole vocabulary's; row_scale: [c] row weight / T, or None for the loss alone; loss_out: [c],
    written with each row's KL. Returns (sign, origin, log_coef, grad_teacher) of row_scale * dL/dz in
    logits.dtype (selfreplay_fast._row_terms: RowTerms.scaled), or None without row_scale. The logits
    are left as masked_lse leaves them, for softmax_grad.

    combine: None, or a vocab-parallel rank's hook between the two launches (``logits`` and ``ids`` then
    this rank's vocabulary shard, -1 on slots held elsewhere): ``sizes``, every rank's vocabulary rows;
    ``valid_ids`` [c, k], the global ids (which slots are used); ``combine_partials(z_teacher, partials)``,
    the collectives, returning the slots' logits of every rank and all ranks' partials [2, c, R S]. Every
    rank then computes the same scalars, its own origin included (the whole vocabulary's).
    """
    if mode not in ("tail", "sampled"):
        raise ValueError(f"mode must be 'tail' or 'sampled' (topk makes no vocabulary pass), got {mode!r}")
    splits_for = combine.sizes if combine is not None else ()
    z_teacher, partials = _lse_partials(logits, ids, inv_temp, block_v, block_k, split_v, splits_for)
    c, k = z_teacher.shape
    dev, dtype = logits.device, logits.dtype
    _check_like_shape("teacher_logprobs", teacher_logprobs, (c, k), dev)
    _check_like_shape("loss_out", loss_out, (c,), dev)
    if teacher_tail_logprob is not None:
        _check_like_shape("teacher_tail_logprob", teacher_tail_logprob, (c,), dev)
    slot_ids = ids
    if combine is not None:
        if _check_ids(combine.valid_ids, c, dev) != k:
            raise ValueError(f"combine.valid_ids must have k={k} columns, got {list(combine.valid_ids.shape)}")
        z_teacher, partials = combine.combine_partials(z_teacher, partials)
        slot_ids = combine.valid_ids
    part_max, part_sum = partials.unbind(0)
    origin = torch.empty((c,), dtype=dtype, device=dev)
    logsum_c = torch.empty_like(origin)
    args = dict(teacher_logprobs=teacher_logprobs, teacher_tail_logprob=teacher_tail_logprob, mode=mode,
                vocab_size=vocab_size, loss=loss_out)
    if row_scale is not None:
        _check_like_shape("row_scale", row_scale, (c,), dev)
        args.update(row_scale=row_scale, sign=torch.empty_like(origin), log_coef=torch.empty_like(origin),
                    grad_teacher=torch.empty((c, k), dtype=dtype, device=dev))
    _launch_row_terms(z_teacher, slot_ids, part_max, part_sum, origin, logsum_c, block_k, args)
    if row_scale is None:
        return None
    return args["sign"], origin, args["log_coef"], args["grad_teacher"]


def topk_row_terms(z_teacher, ids, teacher_logprobs, row_scale, loss_out, *, block_k=None):
    """Mode "topk"'s per-row scalars in one launch (it makes no vocabulary pass and has no dense gradient).

    z_teacher: [c, k] float32/float64 scaled logits on the slots, -inf on unused slots (vocab-parallel:
    already combined across ranks); ids: [c, k] the global teacher ids, -1 = unused slot;
    teacher_logprobs: [c, k] (0 on unused slots); row_scale: [c] row weight / T, or None for the loss
    alone; loss_out: [c], written with each row's KL. Returns grad_teacher [c, k] in z_teacher's dtype,
    row_scale * dL/dz on used slots and 0 on unused ones (selfreplay_fast._row_terms, mode "topk"), or None
    without row_scale."""
    if not isinstance(z_teacher, torch.Tensor) or z_teacher.dim() != 2 or z_teacher.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"z_teacher must be a float32/float64 tensor [c, k], got {_describe(z_teacher)}")
    c, k = z_teacher.shape
    dev = z_teacher.device
    if _check_ids(ids, c, dev) != k:
        raise ValueError(f"ids must have k={k} columns, got {list(ids.shape)}")
    _check_like_shape("teacher_logprobs", teacher_logprobs, (c, k), dev)
    _check_like_shape("loss_out", loss_out, (c,), dev)
    z_teacher = z_teacher.contiguous()  # the kernel's row stride is k (a no-op for the dispatcher's)
    grad = None
    if row_scale is not None:
        _check_like_shape("row_scale", row_scale, (c,), dev)
        grad = torch.empty((c, k), dtype=z_teacher.dtype, device=dev)
    if c > 0:
        with _on_device(dev):
            _topk_row_terms_kernel[(c,)](
                z_teacher, ids, ids.stride(0), ids.stride(1), teacher_logprobs, teacher_logprobs.stride(0),
                teacher_logprobs.stride(1), row_scale if row_scale is not None else loss_out, loss_out,
                grad if grad is not None else z_teacher, k,
                BLOCK_K=min(MAX_BLOCK_K_ROW_TERMS, _block_k(k, block_k)), WITH_GRAD=grad is not None,
                num_warps=NUM_WARPS,
            )
    return grad


def _check_like_shape(name: str, t, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of shape {list(shape)}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits is on {device}")
    if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())}")


def softmax_grad(
    logits: torch.Tensor,
    ids: torch.Tensor,
    grad_teacher: torch.Tensor,
    sign: torch.Tensor,
    origin: torch.Tensor,
    log_coef: torch.Tensor,
    inv_temp: float,
    out: torch.Tensor,
    *,
    block_v: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """logits: [c, V] as left by masked_lse (used-slot positions hold -inf).
    ids: [c, k] int64/int32, -1 = unused. grad_teacher: [c, k] (logits.dtype), 0 on unused slots.
    sign, origin, log_coef: [c] (logits.dtype), sign in {-1, 0, 1}; origin is max_complement (-inf allowed).
    out: [c, V] float32/float64/bfloat16/float16, last dim contiguous; may be the same tensor as logits,
        or a narrower dtype in the logits' storage with each row at the start of the logits' row (the
        offset narrow_grad_view gives), and must not overlap it otherwise.
    Writes, with z = logits * inv_temp computed in logits.dtype:
      out[n, v] = sign[n] * exp((z[n, v] - origin[n]) + log_coef[n]) for every v (the subtraction first),
      then out[n, ids[n, i]] = grad_teacher[n, i] for every used slot.
    A zero sign gives an exact 0. Returns out.
    block_v, block_k: vocabulary / slot tile width overrides (powers of 2), for tests and tuning.
    """
    c, V = _check_logits(logits)
    k = _check_ids(ids, c, logits.device)
    inv_temp = _check_inv_temp(inv_temp)
    dtype, device = logits.dtype, logits.device
    _check_like("grad_teacher", grad_teacher, (c, k), dtype, device)
    for name, t in (("sign", sign), ("origin", origin), ("log_coef", log_coef)):
        _check_like(name, t, (c,), dtype, device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (c, V):
        raise ValueError(f"out must be a tensor of shape [{c}, {V}], got {_describe(out)}")
    if out.dtype not in _OUT_DTYPES:
        raise ValueError(f"out must be float32, float64, bfloat16 or float16, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but logits is on {device}")
    if V > 1 and out.stride(1) != 1:
        raise ValueError(f"out must have a contiguous last dim, got strides {tuple(out.stride())}")
    if c == 0 or V == 0:
        return out
    same_tensor = (
        _overlaps(out, logits) and out.storage_offset() == logits.storage_offset()
        and out.dtype == logits.dtype and out.stride() == logits.stride()
    )
    # Where out's row n starts in logits' row n, in out's elements (the same row stride in bytes).
    offset_bytes = out.storage_offset() * out.element_size() - logits.storage_offset() * logits.element_size()
    offset = offset_bytes // out.element_size()
    narrow_in_place = (
        _overlaps(out, logits) and out.element_size() < logits.element_size()
        and 0 <= offset_bytes < logits.element_size() * V and offset_bytes % out.element_size() == 0
        and (c == 1 or out.stride(0) * out.element_size() == logits.stride(0) * logits.element_size())
    )
    if not (same_tensor or narrow_in_place) and _overlaps(out, logits):
        raise ValueError(
            "out must be the logits tensor itself, vocab_pass.narrow_grad_view(logits, dtype) (a narrower "
            "dtype in the logits' storage, the same row stride in bytes), or not overlap it"
        )
    tile, width, splits = _grad_split_plan(V, device, block_v)
    if narrow_in_place and offset != _narrow_offset(logits, out.dtype, width, splits):
        raise ValueError(
            f"out in the logits' storage must be vocab_pass.narrow_grad_view(logits, {out.dtype}) (each row "
            f"at element {_narrow_offset(logits, out.dtype, width, splits)} of the logits' row viewed as "
            f"{out.dtype}), got it at element {offset}"
        )
    with _on_device(logits.device):
        _softmax_grad_kernel[(c, splits)](
            logits,
            logits.stride(0),
            ids,
            ids.stride(0),
            ids.stride(1),
            grad_teacher,
            grad_teacher.stride(0),
            grad_teacher.stride(1),
            sign,
            sign.stride(0),
            origin,
            origin.stride(0),
            log_coef,
            log_coef.stride(0),
            out,
            out.stride(0),
            inv_temp,
            V,
            k,
            width,
            BLOCK_V=tile,
            BLOCK_K=_block_k(k, block_k),
            OUT_IS_16BIT=out.dtype in (torch.bfloat16, torch.float16),
            NARROW_IN_PLACE=narrow_in_place,
            FIRST_SPLIT_BACKWARDS=narrow_in_place and splits > 1,
            num_warps=NUM_WARPS,
        )
    return out


def _grad_split_plan(V: int, device: torch.device, block_v: Optional[int]):
    """(vocabulary tile, columns per program, programs per row) of softmax_grad."""
    tile = _block_v(V, device, block_v)
    width = tile * triton.cdiv(triton.cdiv(max(V, 1), tile), GRAD_SPLITS)
    return tile, width, max(1, triton.cdiv(V, width))


def _narrow_offset(logits: torch.Tensor, dtype: torch.dtype, width: int, splits: int) -> int:
    ratio = logits.element_size() // torch.empty((), dtype=dtype).element_size()
    return (ratio - 1) * width if splits > 1 else 0


def narrow_grad_view(logits: torch.Tensor, dtype: torch.dtype, *, block_v: Optional[int] = None) -> torch.Tensor:
    """The [c, V] tensor of a narrower ``dtype`` in ``logits``' own storage that softmax_grad writes the
    gradient into without a race (row stride unchanged in bytes; each row at the offset its programs
    own: the kernel's docstring). ``block_v`` as given to softmax_grad."""
    c, V = logits.shape
    _, width, splits = _grad_split_plan(V, logits.device, block_v)
    offset = _narrow_offset(logits, dtype, width, splits)
    return logits.view(dtype)[:, offset : offset + V]


def scale_(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values *= scale in place, the product in fp32 and rounded once to values' dtype.
    values: contiguous bfloat16/float16 tensor. scale: a one-element float32 tensor on values' device.
    Returns values."""
    if not isinstance(values, torch.Tensor) or values.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"values must be a bfloat16/float16 tensor, got {getattr(values, 'dtype', type(values).__name__)}")
    if not values.is_contiguous():
        raise ValueError(f"values must be contiguous, got strides {tuple(values.stride())}")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a one-element float32 tensor, got {_describe(scale)}"
                         + (f" of {scale.dtype}" if isinstance(scale, torch.Tensor) else ""))
    if scale.device != values.device:
        raise ValueError(f"scale is on {scale.device} but values is on {values.device}")
    numel = values.numel()
    if numel == 0:
        return values
    block = SCALE_BLOCK_INTERPRETER if values.device.type == "cpu" else SCALE_BLOCK
    with _on_device(values.device):
        _scale_kernel[(triton.cdiv(numel, block),)](values, scale.reshape(()), numel, BLOCK=block,
                                                    num_warps=NUM_WARPS)
    return values
