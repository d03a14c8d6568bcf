"""``fused_replay_kl``: KL(teacher || student) to a cached top-k teacher, straight from hidden states.

Plan (docs/design.md, section 3): tokens are processed in chunks of c rows. For each chunk the raw
logits x = h W^T + b are materialized in fp32 ([c, V], bounded by the chunk size, never [N, V]), two
vocabulary passes (Triton kernels or PyTorch) reduce them to per-row scalars and overwrite them with
dL/dx, and two more matmuls turn that into the hidden and weight gradients. The gradients are
computed during the forward (three matmuls in all, the minimum) and only scaled by the incoming
gradient in backward; ``reduction="none"`` cannot be scaled after the fact, and fp16 gradients
formed before the loss scale arrives would underflow, so those two recompute in backward instead. ``mode="topk"`` never touches the rest of the vocabulary: it gathers the k lm_head
rows of each position (an indexed dot, O(N k D)).

Vocab-parallel (``process_group``, docs/design.md, section 6): the same chunk loop runs on every rank
over its shard of the vocabulary; a ``_VocabShard`` combines the per-row scalars across ranks and sums
the hidden-gradient partials. Without a process group ``_WHOLE_VOCAB`` makes those hooks identities.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _vocab_pass_torch
from ._inputs import (
    IMPLS,
    ReplayKLInputs,
    VocabShardLayout,
    _check_choice,
    check_chunk_size,
    prepare_replay_kl_inputs,
    prepare_sharded_inputs,
)
from . import _weight_grad_share

# torch.mm(a, b, out_dtype=torch.float32) for 16-bit CUDA operands (cuBLAS accumulates and writes fp32).
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()

def _has_fp32_out_matmul(device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take 16-bit operands with out_dtype=torch.float32 on this device:
    CUDA (cuBLAS) and meta (shapes only: tests/test_kl_launch_budget.py), not the CPU."""
    return _MM_HAS_OUT_DTYPE and device.type in ("cuda", "meta")


# Vocabulary rows per 16-bit product added into an fp32 weight-gradient accumulator (16 MiB at D = 4096).
_GRAD_WEIGHT_BLOCK_ROWS = 2048

# Bytes of one fp32 [chunk, V] logits buffer when chunk_size is None. On a GPU it is the chunk's only
# [c, V] buffer (the 16-bit gradient is written into its own storage), 384 MiB: 768 rows at V = 128256.
# The CPU path's PyTorch passes add temporaries of about the same size.
_CHUNK_BYTES = {"cuda": 384 << 20, "cpu": 32 << 20}
# Chunk rows are rounded down to a multiple of the matmul tile (cuBLAS' largest M tile) when a chunk
# holds at least that many: an odd M wastes a partial tile in all three matmuls.
_CHUNK_ROW_MULTIPLE = 256


def _triton_vocab_pass():
    try:
        from .kernels import vocab_pass
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "impl='triton' needs the triton package (pip install triton); "
            f"importing selfreplay_fast.kernels.vocab_pass failed: {exc}"
        ) from exc
    return vocab_pass


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    _check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if impl == "triton" and not _triton_usable(device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors with triton installed, or CPU tensors with the environment "
            f"variable TRITON_INTERPRET=1 (the Triton interpreter); got tensors on {device}"
        )
    return impl


class _HeadMatmuls:
    """The three matmuls of a chunk, with fp32 (or fp64) logits whatever the parameter dtype.

    16-bit parameters on CUDA use tensor-core matmuls with an fp32 output for the logits, and
    16-bit operands for the two gradient matmuls (fp32 accumulation inside cuBLAS; the weight
    gradient is accumulated across chunks in the parameter dtype, as autograd would). Elsewhere
    (CPU, fp32, fp64) everything runs in the accumulation dtype.

    fp32 master weights with 16-bit matmuls (autocast) under ``triton_matmul`` (impl="triton", the CUDA
    default) never form the 16-bit copy of the weight (1.05 GB at an 8B head): the two matmuls that
    read it are ``kernels/head_matmul.py``, which rounds fp32 tiles of W to the 16-bit dtype in
    registers, the same operands as the copy (docs/design.md, section 3). impl="torch" keeps the copy.
    """

    def __init__(self, weight, bias, matmul_dtype, low_precision_matmuls: bool, triton_matmul: bool = False):
        self.acc_dtype = torch.float64 if matmul_dtype == torch.float64 else torch.float32
        self.low_precision = low_precision_matmuls and matmul_dtype in (torch.float16, torch.bfloat16)
        self.operand_dtype = matmul_dtype if self.low_precision else self.acc_dtype
        self.weight_shape = weight.shape
        self.bias = bias.detach().to(self.acc_dtype).contiguous() if bias is not None else None
        # The weight gradient accumulates across chunks in the parameter's own precision: 16-bit for a
        # 16-bit lm_head (as autograd would), fp32 for fp32 master weights under autocast.
        self.grad_weight_dtype = torch.promote_types(self.operand_dtype, weight.dtype)
        self._master = None  # the fp32 weight, rounded tile by tile inside the Triton matmul
        if triton_matmul and self.low_precision and weight.dtype == torch.float32:
            from .kernels import head_matmul

            self._master, self._head_matmul = weight.detach(), head_matmul.head_matmul
            self.weight = self._weight_for_logits = None
            return
        self.weight = weight.detach().to(self.operand_dtype)
        # Without a 16-bit x 16-bit -> fp32 matmul (CPU; torch builds before aten::mm.dtype) the
        # logits use an upcast copy of the weight, made once per call.
        self._weight_for_logits = self.weight
        if self.low_precision and not _has_fp32_out_matmul(weight.device):
            self._weight_for_logits = self.weight.to(self.acc_dtype)

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] in the operand dtype (mode="topk": only the slots' rows)."""
        if self._master is not None:
            return self._master[ids].to(self.operand_dtype)
        return self.weight[ids]

    def logits(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """x = h W^T + b in the accumulation dtype; the bias is the matmul's addend (no separate pass)."""
        h = hidden_chunk.to(self.operand_dtype)
        if self._master is not None:
            out = torch.empty(h.shape[0], self.weight_shape[0], dtype=self.acc_dtype, device=h.device)
            return self._head_matmul(h, self._master.T, out, bias=self.bias)
        if self._weight_for_logits.dtype == self.acc_dtype:
            h, fp32_out = h.to(self.acc_dtype), {}
        else:
            fp32_out = {"out_dtype": self.acc_dtype}
        if self.bias is None:
            return torch.mm(h, self._weight_for_logits.T, **fp32_out)
        return torch.addmm(self.bias, h, self._weight_for_logits.T, **fp32_out)

    def grad_hidden(self, grad_logits: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """G W in G's dtype (into ``out`` when given: rows of the hidden gradient, of G's dtype)."""
        if self._master is not None:
            if out is None:
                out = torch.empty(grad_logits.shape[0], self.weight_shape[1], dtype=grad_logits.dtype,
                                  device=grad_logits.device)
            return self._head_matmul(grad_logits, self._master, out)
        return torch.mm(grad_logits, self.weight, out=out)

    def accumulate_grad_weight(self, acc: torch.Tensor, grad_logits, hidden_chunk) -> None:
        h = hidden_chunk.to(self.operand_dtype)
        if acc.dtype == grad_logits.dtype:
            acc.addmm_(grad_logits.T, h)
            return
        if acc.dtype == torch.float32 and _has_fp32_out_matmul(acc.device):
            # fp32 master weights, 16-bit operands: one matmul accumulating into the fp32 sum (cuBLAS'
            # C = A B + C with an fp32 C), never rounded to 16 bits, no temporary.
            torch.addmm(acc, grad_logits.T, h, out_dtype=torch.float32, out=acc)
            return
        # Without such a matmul (CPU): a wider accumulator than the operands (fp32 master weights, 16-bit matmuls): add each block of
        # vocabulary rows' 16-bit product in the wide dtype, so the running sum is never rounded to
        # 16 bits; the blocks bound the temporary to _GRAD_WEIGHT_BLOCK_ROWS x D.
        for start in range(0, acc.shape[0], _GRAD_WEIGHT_BLOCK_ROWS):
            rows = slice(start, start + _GRAD_WEIGHT_BLOCK_ROWS)
            acc[rows] += torch.mm(grad_logits[:, rows].T, h)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives matmuls on this device type, or None when autocast is off (or the
    device type has none, e.g. meta tensors)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _warn_if_weight_upcast(hidden, weight, matmul_dtype) -> None:
    """The two fp32-matmul cliffs of mixed dtypes without autocast on a GPU, where torch's promotion runs
    the three head matmuls in fp32 (CUDA cores or TF32, a fraction of the 16-bit tensor-core rate):
    fp32 hidden with a 16-bit lm_head (also an fp32 copy of the weight, 2 GiB at an 8B head, per call),
    and 16-bit hidden with an fp32 lm_head (fp32 master weights used without autocast). Either is almost
    always a forgotten autocast or a final norm that upcasts, so say so (once per call site, Python's
    default)."""
    if weight.device.type != "cuda" or matmul_dtype != torch.float32:
        return
    sixteen = (torch.float16, torch.bfloat16)
    if weight.dtype in sixteen:
        warnings.warn(
            f"fused_replay_kl: hidden is {hidden.dtype} but weight is {weight.dtype}, without autocast: the head "
            f"runs in fp32 on an fp32 copy of the weight ({weight.numel() * 4 / 2**20:.0f} MiB per call). Pass "
            f"hidden in {weight.dtype} or run under torch.autocast('cuda', dtype={weight.dtype}) for 16-bit "
            "tensor-core matmuls (the logits are accumulated in fp32 either way).",
            stacklevel=4,
        )
    elif hidden.dtype in sixteen:
        warnings.warn(
            f"fused_replay_kl: hidden is {hidden.dtype} but weight is {weight.dtype}, without autocast: the head's "
            f"three matmuls run as fp32 matmuls, far below the {hidden.dtype} tensor-core rate. Run under "
            f"torch.autocast('cuda', dtype={hidden.dtype}) (the fp32 weight keeps an fp32 gradient) or keep "
            f"the lm_head in {hidden.dtype}.",
            stacklevel=4,
        )


class _WholeVocab:
    """This process holds the whole vocabulary: every hook is the identity (no work, no copies)."""

    def local_ids(self, ids):
        return ids

    def on_shard(self, values, local_ids):
        """``values`` [c, k] (already 0 on unused slots) restricted to this shard's slots."""
        return values

    def combine_teacher_logits(self, z_teacher):
        return z_teacher

    def chunk_combine(self, global_ids):
        """What the passes' ``lse_and_row_terms`` needs from the other ranks: nothing here."""
        return None

    def sum_partials(self, partial, acc_dtype):
        return partial

    def max_local_rows(self, inp):
        """Vocabulary rows of the largest logits chunk any rank materializes (sets the chunk size)."""
        return inp.vocab_size

    def vocab_size(self, inp):
        """Size of the whole vocabulary (all ranks' shards)."""
        return inp.vocab_size


_WHOLE_VOCAB = _WholeVocab()


class _VocabShard(_WholeVocab):
    """This rank holds rows [offset, offset + V_r) of the vocabulary (docs/design.md, section 6).

    Every rank calls the hooks in the same order with tensors of the same shapes: [c, k] and [c] for
    the scalars (z_teacher by MAX, each slot's logit lives on one rank and is -inf elsewhere;
    LSE_c by MAX then SUM of exp(LSE_c,r - max)), [c, D] for the hidden gradient. No host syncs.
    """

    def __init__(self, layout: VocabShardLayout):
        import torch.distributed as dist

        self._dist = dist
        self.group = layout.group
        self.offset, self.size, self.sizes = layout.offset, layout.size, layout.sizes

    def _all_reduce(self, t, op):
        self._dist.all_reduce(t, op=op, group=self.group)
        return t

    def _all_gather(self, t):
        """[R, *t.shape]: every rank's ``t`` (the same shape on every rank), in rank order."""
        out = t.new_empty((len(self.sizes), *t.shape))
        # Into views of one buffer: the list form works on every process group (a backend's own, e.g. a
        # bare ProcessGroupGloo, has no all_gather_single); the values are few (2 c S per rank).
        self._dist.all_gather(list(out.unbind(0)), t.contiguous(), group=self.group)
        return out

    def local_ids(self, ids):
        local = ids - self.offset
        return torch.where((ids >= self.offset) & (local < self.size), local, -1)

    def on_shard(self, values, local_ids):
        return torch.where(local_ids >= 0, values, 0.0)

    def combine_teacher_logits(self, z_teacher):
        return self._all_reduce(_nan_as_posinf(z_teacher).contiguous(), self._dist.ReduceOp.MAX)

    def chunk_combine(self, global_ids):
        return _ShardCombine(self, global_ids)

    def combine_partials(self, z_teacher, partials):
        """The Triton passes' combine: ``z_teacher`` [c, k] by MAX (exact: one finite value per used
        slot) and the ranks' vocabulary-split partials ``partials`` [2, c, S] (max, sum-exp; S the same
        on every rank) side by side as [2, c, R S], which the row-terms kernel combines as it does one
        rank's splits. One MAX all-reduce of [c, k], one all-gather of 2 c S values, one copy."""
        z_teacher = self._all_reduce(_nan_as_posinf(z_teacher).contiguous(), self._dist.ReduceOp.MAX)
        two, c, splits = partials.shape
        gathered = self._all_gather(partials)  # [R, 2, c, S]
        return z_teacher, gathered.permute(1, 2, 0, 3).reshape(two, c, len(self.sizes) * splits)

    def combine_lse(self, z_teacher, max_complement, logsum_complement):
        """The PyTorch passes' combine: each rank's complement log-sum-exp (as max and log-sum) into
        the whole vocabulary's."""
        k = z_teacher.shape[1]
        # One MAX over [c, k + 1]: the slots' logits (exact: one finite value per used slot) and the
        # per-row maximum of the ranks' complement maxima.
        packed = torch.cat([z_teacher, max_complement[:, None]], dim=1)
        packed = self._all_reduce(_nan_as_posinf(packed), self._dist.ReduceOp.MAX)
        top = packed[:, k]
        safe_top = torch.where(top == float("-inf"), 0.0, top)  # every rank's complement empty: sum 0, log 0 = -inf
        # Each rank's sum relative to the global maximum (each term <= V_r), then summed.
        local = ((max_complement - safe_top) + logsum_complement).exp()
        total = self._all_reduce(local, self._dist.ReduceOp.SUM)
        return packed[:, :k], top, total.log()

    def sum_partials(self, partial, acc_dtype):
        # Summed in the accumulation dtype: sharding adds no 16-bit rounding to the hidden gradient.
        return self._all_reduce(partial.to(acc_dtype).contiguous(), self._dist.ReduceOp.SUM)

    def max_local_rows(self, inp):
        return max(self.sizes)  # the same chunk size on every rank, whatever its shard

    def vocab_size(self, inp):
        return sum(self.sizes)


@dataclass
class _ShardCombine:
    """A vocab-parallel chunk's hook into the passes' ``lse_and_row_terms``: the rows' global ids (a
    slot is used whichever rank holds its id), every rank's vocabulary rows (the Triton partials are
    sized for the largest shard, so that they gather evenly), and the collectives."""

    shard: _VocabShard
    valid_ids: torch.Tensor  # [c, k] global teacher ids, -1 = unused slot

    @property
    def sizes(self):
        return self.shard.sizes

    def combine_partials(self, z_teacher, partials):
        return self.shard.combine_partials(z_teacher, partials)

    def combine_lse(self, z_teacher, max_complement, logsum_complement):
        return self.shard.combine_lse(z_teacher, max_complement, logsum_complement)


def _nan_as_posinf(t):
    """A MAX all-reduce may drop a NaN (max(x, NaN) = x in some backends); a NaN and a +inf logit
    make a row's loss NaN alike (compute_row_terms), and +inf always wins a MAX."""
    return torch.where(torch.isnan(t), float("inf"), t)


@dataclass
class _Grads:
    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _add_rows(acc: torch.Tensor, row_ids: torch.Tensor, values: torch.Tensor) -> None:
    """``acc[row_ids[i]] += values[i]`` for every i, ``values`` in the accumulation dtype.

    A 16-bit ``acc`` (the weight gradient of a 16-bit lm_head) must not take the duplicates one by one:
    CUDA's index_add_ adds them with 16-bit atomics, so a token in the top-k of thousands of rows
    would have its gradient rounded thousands of times, stalling once the running sum dwarfs each
    term. Instead the duplicates are summed first in ``values``' dtype (sort the ids, number the
    distinct ones, index_add_ into one row per distinct id: no host sync, as unique() would need),
    and each touched row of ``acc`` is then rounded once per call, as a dense chunk's matmul is.
    """
    if acc.dtype == values.dtype:
        acc.index_add_(0, row_ids, values)
        return
    sorted_ids, order = row_ids.sort()
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    distinct_of_sorted = starts.cumsum(0) - 1  # [m]: which distinct id each sorted entry holds
    distinct_of_entry = torch.empty_like(distinct_of_sorted).scatter_(0, order, distinct_of_sorted)
    sums = torch.zeros_like(values).index_add_(0, distinct_of_entry, values)  # rows past the last id stay 0
    # Row of each distinct id. Rows past the last one add an exact 0 to row j mod V: spread over the rows
    # (as 0 to one row they would all contend for that row's atomics), and 0 leaves any row as it was.
    distinct_ids = torch.arange(len(row_ids), device=row_ids.device) % acc.shape[0]
    distinct_ids.scatter_(0, distinct_of_sorted, sorted_ids)
    acc.index_add_(0, distinct_ids, sums.to(acc.dtype))


def _rows_within(budget: int, per_row: int, num_rows: int) -> int:
    rows = max(1, budget // per_row)
    if rows >= _CHUNK_ROW_MULTIPLE:
        rows -= rows % _CHUNK_ROW_MULTIPLE
    return min(num_rows, rows)


def vocab_chunk_rows(num_rows: int, vocab_rows: int, device_type: str = "cuda",
                     acc_dtype: torch.dtype = torch.float32, budget: Optional[int] = None,
                     extra_row_bytes: int = 0) -> int:
    """Rows per chunk of the vocabulary passes (modes "tail" and "sampled") without ``chunk_size``: as many
    [c, vocab_rows] logits rows in ``acc_dtype``, plus ``extra_row_bytes`` per row, as ``budget`` bytes
    hold (default: ``_CHUNK_BYTES`` of the device type). selfreplay_fast/planner.py calls it too."""
    if budget is None:
        budget = _CHUNK_BYTES["cpu" if device_type == "cpu" else "cuda"]
    return _rows_within(budget, vocab_rows * torch.finfo(acc_dtype).bits // 8 + extra_row_bytes, num_rows)


def _default_chunk_rows(inp: ReplayKLInputs, head: _HeadMatmuls, vocab: _WholeVocab) -> int:
    if inp.mode != "topk":
        # A vocab-parallel rank also holds its [c, D] partial of the hidden gradient, in the operand and
        # then the accumulation dtype for the SUM across ranks; with the whole vocabulary it goes straight
        # into the gradient.
        partial = 0 if vocab is _WHOLE_VOCAB else inp.hidden.shape[1] * (
            head.operand_dtype.itemsize + head.acc_dtype.itemsize)
        return vocab_chunk_rows(inp.num_rows, vocab.max_local_rows(inp), inp.hidden.device.type, head.acc_dtype,
                                extra_row_bytes=partial)
    # [c, k, D] alive per row: the gathered lm_head rows and, for the weight gradient, their outer
    # product with h (accumulation dtype); a narrower weight gradient adds the per-id sums and their
    # copy in its dtype (_add_rows).
    acc_bytes = torch.finfo(head.acc_dtype).bits // 8
    per_element = 2 * acc_bytes
    if head.grad_weight_dtype != head.acc_dtype:
        per_element += acc_bytes + torch.finfo(head.grad_weight_dtype).bits // 8
    per_row = inp.teacher_ids.shape[1] * inp.hidden.shape[1] * per_element
    return _rows_within(_CHUNK_BYTES["cpu" if inp.hidden.device.type == "cpu" else "cuda"], per_row, inp.num_rows)


def _store_hidden_grad(grad_hidden, rows, partial, counted) -> None:
    """A position that does not count gets an exact 0, even when a non-finite weight entry makes its
    row of G W a 0 * inf = NaN."""
    if counted is not None:
        partial = torch.where(counted, partial, 0.0)
    grad_hidden[rows] = partial.to(grad_hidden.dtype)


def _run_chunks(inp, head, passes, vocab, row_scale, chunk_rows, want_h, want_w, want_b, grad_weight=None):
    """Loss per row and, where asked, the gradients weighted by ``row_scale`` [N] (row weight / T); the
    weight gradient is added into ``grad_weight`` when given (a shared buffer: _weight_grad_share.py).

    ``passes`` is the module with ``lse_and_row_terms``, ``softmax_grad`` and ``topk_row_terms`` (Triton
    or PyTorch); ``vocab`` the vocabulary this process holds (``_WHOLE_VOCAB`` or a ``_VocabShard``,
    whose ranks must all run this loop with the same chunks and the same ``want_h``)."""
    n, dim = inp.hidden.shape
    dev = inp.hidden.device
    loss = torch.empty(n, dtype=inp.row_dtype, device=dev)
    want_any = want_h or want_w or want_b
    grads = _Grads(
        hidden=torch.empty(n, dim, dtype=inp.hidden.dtype, device=dev) if want_h else None,
        weight=(grad_weight if grad_weight is not None
                else torch.zeros(head.weight_shape, dtype=head.grad_weight_dtype, device=dev)) if want_w else None,
        bias=torch.zeros(inp.vocab_size, dtype=head.acc_dtype, device=dev) if want_b else None,
    )
    inv_temp = 1.0 / inp.temperature
    tail_all = inp.teacher_tail_logprob
    vocab_size = vocab.vocab_size(inp)
    hidden = inp.hidden.detach()
    if inp.mask is not None:
        # A position that does not count contributes exactly nothing: an inf/NaN hidden state there
        # would otherwise reach the weight gradient as inf * 0 = NaN. Once per call (N D elements, one
        # launch) rather than once per chunk.
        hidden = torch.where(inp.mask[:, None], hidden, 0.0)
    # Rows of this process's weight, -1 for slots held elsewhere: once per call ([N, k]), not per chunk.
    local_ids = vocab.local_ids(inp.teacher_ids)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        h = hidden[rows]
        counted = inp.mask[rows, None] if inp.mask is not None else None
        global_ids, lp = inp.teacher_ids[rows], inp.teacher_logprobs[rows]
        ids = local_ids[rows]
        tail = tail_all[rows] if tail_all is not None else None
        if inp.mode == "topk":
            safe_ids = ids.clamp_min(0)
            w_rows = head.weight_rows(safe_ids).to(head.acc_dtype)  # [c, k, D]: only the slots' rows
            # An unused slot reads row 0: zero it, so that a non-finite row 0 cannot reach the hidden
            # gradient of a position whose slots do not name it (0 * inf = NaN).
            w_rows.masked_fill_((ids < 0)[:, :, None], 0.0)
            z = torch.einsum("cd,ckd->ck", h.to(head.acc_dtype), w_rows)
            if head.bias is not None:
                z = z + head.bias[safe_ids]
            z = vocab.combine_teacher_logits(torch.where(ids >= 0, z * inv_temp, float("-inf")))
            # The loss and row_scale * dL/dz on the slots in one launch of the passes (Triton: one kernel).
            grad_teacher = passes.topk_row_terms(z, global_ids, lp, row_scale[rows] if want_any else None,
                                                 loss[rows])
            if want_any:
                # dL/dx on this process's slots, 0 elsewhere
                g = vocab.on_shard(grad_teacher, ids)
                if want_h:
                    partial = torch.einsum("ck,ckd->cd", g, w_rows)
                    _store_hidden_grad(grads.hidden, rows, vocab.sum_partials(partial, head.acc_dtype), counted)
                if want_w:
                    outer = (g[:, :, None] * h.to(head.acc_dtype)[:, None, :]).reshape(-1, dim)
                    _add_rows(grads.weight, safe_ids.reshape(-1), outer)
                if want_b:
                    grads.bias.index_add_(0, safe_ids.reshape(-1), g.reshape(-1))
            continue

        logits = head.logits(h)  # [c, V] raw logits, fp32/fp64
        scale_rows = row_scale[rows] if want_any else None
        # The per-row scalars in the passes' own launches (Triton: the partials pass and the row-terms
        # kernel; vocab-parallel ranks gather their partials between the two).
        scaled = passes.lse_and_row_terms(logits, ids, inv_temp, lp, tail, inp.mode, vocab_size, scale_rows,
                                          loss[rows], combine=vocab.chunk_combine(global_ids))
        if not want_any:
            continue
        # A 16-bit gradient goes into the logits' own storage (no second [c, V] buffer), where the passes say.
        out = logits if head.operand_dtype == logits.dtype else passes.narrow_grad_view(logits, head.operand_dtype)
        sign, origin, log_coef, grad_teacher = scaled
        grad_logits = passes.softmax_grad(logits, ids, grad_teacher, sign, origin, log_coef, inv_temp, out)
        del logits
        if want_h:
            if vocab is _WHOLE_VOCAB and grad_logits.dtype == grads.hidden.dtype:
                # Straight into the gradient's rows; non-counted rows are zeroed once per call below.
                head.grad_hidden(grad_logits, out=grads.hidden[rows])
            else:  # summed over the ranks in the accumulation dtype, rounded once into the gradient's rows
                grads.hidden[rows].copy_(vocab.sum_partials(head.grad_hidden(grad_logits), head.acc_dtype))
        if want_w:
            head.accumulate_grad_weight(grads.weight, grad_logits, h)
        if want_b:
            grads.bias += grad_logits.sum(dim=0, dtype=head.acc_dtype)
        del grad_logits, out  # free this chunk's buffers before the next chunk allocates its own
    if want_h and inp.mask is not None and inp.mode != "topk":
        # A position that does not count gets an exact 0, even when a non-finite weight entry makes its
        # row of G W a 0 * inf = NaN (as _store_hidden_grad does in topk mode; here once per call).
        grads.hidden.masked_fill_(~inp.mask[:, None], 0.0)
    return loss, grads


def _scale_in_place(grad: torch.Tensor, grad_output: torch.Tensor, passes) -> None:
    """grad *= grad_output, the product formed in fp32 (or wider) and rounded once to grad's dtype.

    ``grad.mul_(grad_output)`` would round grad_output to a 16-bit grad's dtype first (PyTorch's type
    promotion for a 0-dim operand): up to 0.2 % scale error for lambda or 1 / accumulation steps. A 16-bit
    gradient goes through the passes' ``scale_`` instead (one Triton launch; fp32 blocks on the CPU)."""
    if grad.element_size() >= 4:
        grad.mul_(grad_output.to(grad.dtype))
    else:
        passes.scale_(grad, grad_output.to(torch.float32))


def _weighted_sum(loss_rows, weight_rows, counted):
    """sum(loss * weight) over the counted rows: a masked row's loss (NaN from a NaN bias) times its
    weight 0 would still be NaN."""
    if counted is not None:
        loss_rows = torch.where(counted, loss_rows, 0.0)
    return (loss_rows * weight_rows).sum()


class _FusedReplayKL(torch.autograd.Function):
    """Inputs after ``vocab``: hidden [N, D], weight [V, D], bias [V] or None (for autograd only).

    Vocab-parallel: the loss is replicated and every rank's backward returns the full gradient of its
    replica of hidden (already summed over the ranks' shards) and its own shard's weight/bias
    gradient; the caller must not all-reduce the hidden gradient again."""

    @staticmethod
    def forward(ctx, inp: ReplayKLInputs, impl, chunk_size, low_precision, vocab, hidden, weight, bias):
        device_type = hidden.device.type
        # Under autocast the head matmuls run in the autocast dtype, as an nn.Linear would; everything
        # else here chooses its precision explicitly, so autocast is off inside.
        matmul_dtype = _autocast_dtype(device_type)
        if matmul_dtype is None:
            matmul_dtype = torch.promote_types(hidden.dtype, weight.dtype)
            _warn_if_weight_upcast(hidden, weight, matmul_dtype)
        with _autocast_off(device_type):
            return _FusedReplayKL._forward(
                ctx, inp, impl, chunk_size, low_precision, vocab, matmul_dtype, hidden, weight, bias
            )

    @staticmethod
    def _forward(ctx, inp, impl, chunk_size, low_precision, vocab, matmul_dtype, hidden, weight, bias):
        passes = _triton_vocab_pass() if impl == "triton" else _vocab_pass_torch
        head = _HeadMatmuls(weight, bias, matmul_dtype, low_precision, triton_matmul=impl == "triton")
        chunk_rows = chunk_size or _default_chunk_rows(inp, head, vocab)
        want_h, want_w, want_b = ctx.needs_input_grad[5:8]
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        counted = inp.mask

        ctx.grads = ctx.recompute = ctx.share = None
        ctx.rel = 1.0
        ctx.passes = passes
        if inp.reduction == "none":
            loss_rows, _ = _run_chunks(inp, head, passes, vocab, None, chunk_rows, False, False, False)
            ctx.recompute = (inp, head, passes, vocab, chunk_rows, None)
            if counted is not None:
                loss_rows = torch.where(counted, loss_rows, 0.0)
            return loss_rows.reshape(inp.lead_shape)

        # Row weights of the reduction, as tensors (no host sync): mean divides by the count.
        if counted is None:
            weight_rows = torch.ones(inp.num_rows, dtype=inp.row_dtype, device=hidden.device)
        else:
            weight_rows = counted.to(inp.row_dtype)
        if inp.reduction == "mean":
            weight_rows = weight_rows / weight_rows.sum().clamp_min(1)
        if head.operand_dtype == torch.float16 and (want_h or want_w or want_b):
            # fp16 gradients formed before the loss scale (GradScaler's grad_output) arrives would
            # underflow (mean divides by the token count): recompute them in backward, scaled first.
            loss_rows, _ = _run_chunks(inp, head, passes, vocab, None, chunk_rows, False, False, False)
            ctx.recompute = (inp, head, passes, vocab, chunk_rows, weight_rows)
            return _weighted_sum(loss_rows, weight_rows, counted)
        # Another fused loss of the same sum may hold this weight's gradient already: add into it.
        member = _weight_grad_share.join(weight, head.grad_weight_dtype) if want_w else None
        row_scale = weight_rows / inp.temperature
        if member is not None:
            row_scale, ctx.rel = row_scale * member.rel, member.rel
        loss_rows, grads = _run_chunks(inp, head, passes, vocab, row_scale, chunk_rows, want_h, want_w, want_b,
                                       grad_weight=member.grad if member is not None else None)
        if member is not None:
            grads.weight = None  # the owner returns the sum
        elif want_w:
            ctx.share = _weight_grad_share.own(weight, grads.weight)
        ctx.grads = grads
        return _weighted_sum(loss_rows, weight_rows, counted)

    @staticmethod
    def backward(ctx, grad_output):
        # The engine runs backward with autograd on exactly when create_graph=True (a gradient penalty,
        # torch.autograd.functional.hvp/hessian). The gradients below come from fused arithmetic, not
        # from differentiable operations: returned as they are, a second derivative through them would
        # be a silent 0, so refuse.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_replay_kl does not support double backward (second-order gradients: "
                "create_graph=True, gradient penalties, torch.autograd.functional.hvp/hessian); its "
                "gradients are computed by fused kernels, not by differentiable operations. Use "
                "reference_replay_kl (same arguments, plain autograd over the full [N, V] logits) for "
                "second-order gradients"
            )
        if ctx.recompute is not None:  # reduction="none" (per-row grad_output) or fp16 operands
            # Vocab-parallel: the same collectives as the forward, in the same order on every rank.
            inp, head, passes, vocab, chunk_rows, weight_rows = ctx.recompute
            want_h, want_w, want_b = ctx.needs_input_grad[5:8]
            if weight_rows is None:
                row_scale = grad_output.reshape(-1).to(inp.row_dtype) / inp.temperature
                if inp.mask is not None:
                    row_scale = torch.where(inp.mask, row_scale, 0.0)
            else:
                row_scale = grad_output.to(inp.row_dtype) * weight_rows / inp.temperature
            with _autocast_off(inp.hidden.device.type):
                _, grads = _run_chunks(inp, head, passes, vocab, row_scale, chunk_rows, want_h, want_w, want_b)
        else:
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "fused_replay_kl: backward ran twice through the same loss; its gradients are "
                    "precomputed once in forward and released after the first backward"
                )
            ctx.grads = None
            _weight_grad_share.release(ctx.share)
            # A share's member formed its gradients ctx.rel times too large (its weight term is in the owner's).
            # The quotient in fp32 or wider (a 16-bit grad_output divided as it is would round it first).
            scale = grad_output
            if not _weight_grad_share.is_unit(ctx.rel):
                wide = torch.promote_types(grad_output.dtype, torch.float32)
                if isinstance(ctx.rel, torch.Tensor):
                    wide = torch.promote_types(wide, ctx.rel.dtype)
                scale = grad_output.to(wide) / ctx.rel
            for g in (grads.hidden, grads.weight, grads.bias):
                if g is not None:
                    _scale_in_place(g, scale, ctx.passes)
        return (
            None, None, None, None, None,
            grads.hidden,
            grads.weight.to(ctx.weight_dtype) if grads.weight is not None else None,
            grads.bias.to(ctx.bias_dtype) if grads.bias is not None else None,
        )


def _refuse_dtensors(**tensors):
    """FSDP2 (``fully_shard``) swaps in the unsharded, plain parameters only inside the forward of the
    module whose group holds them; read outside it (e.g. a lm_head given its own ``fully_shard`` group,
    whose forward never runs here) the weight is still a sharded DTensor, and the matmuls would fail
    with a cryptic mixed-tensor error. Its ``to_local()`` is an FSDP shard, not a vocab shard in the
    ``process_group`` sense, so it cannot simply be used either: refuse with a pointer instead."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")  # not imported: there are no DTensors
    if dtensor_module is None:
        return
    for name, t in tensors.items():
        if isinstance(t, dtensor_module.DTensor):
            raise ValueError(
                f"fused_replay_kl: {name} is a DTensor (placements {t.placements}), e.g. an FSDP2-sharded "
                "parameter read outside its module's forward. Call fused_replay_kl inside the forward of "
                "a fully_shard module whose group holds the lm_head (there it is a plain, unsharded "
                "tensor), and give the lm_head no fully_shard group of its own; see README, "
                "'Data-parallel training (DDP, FSDP2)'"
            )


def fused_replay_kl(
    hidden,
    weight,
    teacher_ids,
    teacher_logprobs,
    *,
    bias=None,
    mask=None,
    mode="tail",
    temperature=1.0,
    reduction="mean",
    impl="auto",
    chunk_size=None,
    process_group=None,
    teacher_tail_logprob=None,
):
    """KL(teacher || student) of every position, from the student's last hidden states.

    Args:
        hidden: [..., D] float32/bfloat16/float16 (float64 works too) last hidden states.
        weight: [V, D] lm_head weight. bias: [V] optional lm_head bias.
        teacher_ids: [..., k] int32/int64 cached teacher token ids; -1 marks an unused slot.
        teacher_logprobs: [..., k] the teacher's log-probabilities, normalized over the full
            vocabulary (``mode="sampled"``: log sample frequencies).
        mask: [...] bool, True where the position counts.
        mode: "tail" (top-k plus one bucket for the rest; a lower bound on the full KL, exact when
            k = V), "sampled" (unbiased random-sampling distillation) or "topk" (both distributions
            renormalized over the teacher's slots; no pass over the vocabulary).
        temperature: the student's logits are divided by it.
        reduction: "mean" over counted positions (0 when none count), "sum", or "none" ([...],
            0 at masked positions).
        impl: "torch" (chunked PyTorch), "triton" (CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1) or "auto" (triton on CUDA, torch otherwise).
        chunk_size: positions per chunk (default: about 384 MiB of fp32 logits on CUDA, 32 MiB on CPU).
        process_group: a torch.distributed process group for a vocab-parallel lm_head (Megatron
            convention): ``weight`` [V_r, D] and ``bias`` [V_r] are this rank's contiguous shard of
            the vocabulary, shards in rank order and possibly uneven (V = sum of V_r, each V_r >= 1);
            ``hidden``, ``teacher_ids`` (global ids), ``teacher_logprobs``, ``mask`` and
            ``teacher_tail_logprob`` are the same on every rank. Every rank must make the call with
            the same arguments otherwise (mode, reduction, chunk_size, impl, temperature, which
            of hidden needs a gradient) and run its backward. Every rank returns the same global
            loss; backward gives every rank the full hidden gradient (already summed across the
            shards: do not all-reduce it again) and its own shard's weight/bias gradient. Cost per
            chunk of c positions: two all-reduces, of c (k + 1) and c elements (topk mode: one, of
            c k), and, when hidden needs a gradient, one of c D; plus one all_gather of one int per
            rank per call (docs/design.md, section 6). ``reference_replay_kl`` accepts it too.
        teacher_tail_logprob: [...] optional exact log of the teacher's mass outside its k slots
            (``mode="tail"``), used instead of log(1 - sum p).

    Returns the loss in float32 (float64 for float64 hidden). Gradients flow to hidden, weight and
    bias, never to the teacher; a weight (or bias) with ``requires_grad=False`` costs no gradient
    work. A masked position contributes exactly 0 to the loss and every gradient, whatever its hidden
    state holds; a NaN/+inf logit of a counted position gives a NaN loss, as a plain log-softmax
    would. Second-order gradients (``create_graph=True``) raise; use ``reference_replay_kl``. Math
    and numerics: docs/design.md.
    """
    chunk_size = check_chunk_size(chunk_size)
    _check_choice("impl", impl, IMPLS)
    _refuse_dtensors(hidden=hidden, weight=weight, bias=bias)
    kwargs = dict(bias=bias, mask=mask, teacher_tail_logprob=teacher_tail_logprob, mode=mode,
                  temperature=temperature, reduction=reduction)
    vocab = _WHOLE_VOCAB
    if process_group is None:
        inp = prepare_replay_kl_inputs(hidden, weight, teacher_ids, teacher_logprobs, **kwargs)
    else:
        inp, layout = prepare_sharded_inputs(process_group, hidden, weight, teacher_ids, teacher_logprobs, **kwargs)
        vocab = _VocabShard(layout)
    impl = resolve_impl(impl, inp.hidden.device)
    return _apply(inp, impl, chunk_size, low_precision=inp.hidden.is_cuda, vocab=vocab)


def _apply(inp: ReplayKLInputs, impl: str, chunk_size, low_precision: bool, vocab: _WholeVocab = _WHOLE_VOCAB):
    """Runs the autograd Function. ``low_precision`` (16-bit gradient matmuls, the CUDA default) is a
    separate switch so CPU tests can exercise that arithmetic too."""
    hidden, weight, bias = inp.hidden, inp.weight, inp.bias
    if not torch.is_grad_enabled():
        # An autograd.Function sees its inputs' requires_grad even under no_grad / inference_mode, and
        # this one computes gradients during forward: detach, so evaluation does no gradient work.
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _FusedReplayKL.apply(inp, impl, chunk_size, low_precision, vocab, hidden, weight, bias)
