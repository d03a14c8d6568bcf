"""Argument checking and normalization shared by every replay-KL implementation.

Every public entry point (``fused_replay_kl``, ``reference_replay_kl``) goes through
:func:`prepare_replay_kl_inputs`, so bad input is rejected the same way whatever ``impl`` is chosen,
with an error that names the argument and what was expected.

Shape and dtype checks cost nothing. The checks on teacher *values* (ids in range, no duplicate ids
in a row, finite log-probs, mass <= 1, slots + tail = 1) read device data, so they are batched into one small tensor and
cost exactly one host sync per call; :func:`skip_value_checks` turns them off for a hot loop whose
cache was validated once (``ReplayBuffer.load`` does that).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Optional

import torch

MODES = ("tail", "sampled", "topk")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How far a teacher's mass may be from 1 (rounding of cached log-probs) before it is an error: one
# constant for fused_replay_kl and ReplayBuffer.validate.
from .replay_buffer import MASS_TOLERANCE  # noqa: E402  (replay_buffer imports nothing of this package)

_state = threading.local()


@contextlib.contextmanager
def skip_value_checks():
    """Skip the data-dependent teacher checks (and their one host sync) inside this block.

    Shape, dtype and device checks still run. Use it only for teacher tensors validated before, e.g.
    batches of a loaded ``ReplayBuffer``.
    """
    previous = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = previous


def value_checks_enabled() -> bool:
    return not getattr(_state, "skip", False)


@dataclass
class ReplayKLInputs:
    """Flattened, checked inputs. N = number of positions, k = teacher slots, V = vocabulary."""

    hidden: torch.Tensor  # [N, D], original dtype (autograd leaf or not)
    weight: torch.Tensor  # [V, D]
    bias: Optional[torch.Tensor]  # [V] or None
    teacher_ids: torch.Tensor  # [N, k] int64, -1 = unused slot (masked positions: all -1)
    teacher_logprobs: torch.Tensor  # [N, k] float32 (float64 if hidden is float64), 0 on unused slots
    teacher_tail_logprob: Optional[torch.Tensor]  # [N] same float dtype, -inf at masked positions
    mask: Optional[torch.Tensor]  # [N] bool or None (= all positions count)
    lead_shape: torch.Size
    mode: str
    temperature: float
    reduction: str

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def row_dtype(self) -> torch.dtype:
        """dtype of the per-row arithmetic: float64 when the caller works in float64, else float32."""
        return self.teacher_logprobs.dtype


def _require_tensor(name, value, *, dtypes=None, what="a floating tensor"):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got dtype {value.dtype}")


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def prepare_replay_kl_inputs(
    hidden,
    weight,
    teacher_ids,
    teacher_logprobs,
    *,
    bias=None,
    mask=None,
    teacher_tail_logprob=None,
    mode="tail",
    temperature=1.0,
    reduction="mean",
    vocab_size=None,
) -> ReplayKLInputs:
    """Checks and flattens the arguments. ``vocab_size``: the size of the vocabulary the teacher ids
    index, when ``weight`` holds only a shard of it (vocab-parallel; see
    :func:`prepare_sharded_inputs`); default ``weight.shape[0]``."""
    _check_choice("mode", mode, MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    temperature = check_temperature(temperature)

    _require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, what="a float16/bfloat16/float32/float64 tensor [..., D]")
    _require_tensor("weight", weight, dtypes=FLOAT_DTYPES, what="a floating tensor [V, D] (the lm_head weight)")
    _require_tensor("teacher_ids", teacher_ids, dtypes=(torch.int32, torch.int64), what="an int32/int64 tensor [..., k]")
    _require_tensor("teacher_logprobs", teacher_logprobs, dtypes=FLOAT_DTYPES, what="a floating tensor [..., k]")
    if bias is not None:
        _require_tensor("bias", bias, dtypes=FLOAT_DTYPES, what="a floating tensor [V]")
    if mask is not None:
        _require_tensor("mask", mask, dtypes=(torch.bool,), what="a bool tensor [...] (True = the position counts)")
    if teacher_tail_logprob is not None:
        _require_tensor("teacher_tail_logprob", teacher_tail_logprob, dtypes=FLOAT_DTYPES, what="a floating tensor [...]")
        if mode != "tail":
            raise ValueError(f"teacher_tail_logprob is only used by mode='tail', got mode={mode!r}")

    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    vocab = weight.shape[0]
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {dim}, got {tuple(weight.shape)}"
        )
    if vocab < 1 or dim < 1:
        raise ValueError(f"weight must have V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape [V] = [{vocab}] (weight.shape[0]), got {tuple(bias.shape)}")
    if teacher_ids.dim() < 1 or teacher_ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids must have shape [..., k] with leading shape {tuple(lead)} (that of hidden), "
            f"got {tuple(teacher_ids.shape)}"
        )
    k = teacher_ids.shape[-1]
    if k == 0:
        raise ValueError("teacher_ids must have k >= 1 slots in its last dimension, got k = 0")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
            f"got {tuple(teacher_logprobs.shape)}"
        )
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask must have shape {tuple(lead)} (hidden's leading shape), got {tuple(mask.shape)}")
    if teacher_tail_logprob is not None and teacher_tail_logprob.shape != lead:
        raise ValueError(
            f"teacher_tail_logprob must have shape {tuple(lead)} (hidden's leading shape), "
            f"got {tuple(teacher_tail_logprob.shape)}"
        )

    device = hidden.device
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("teacher_ids", teacher_ids),
        ("teacher_logprobs", teacher_logprobs),
        ("mask", mask),
        ("teacher_tail_logprob", teacher_tail_logprob),
    ):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}: all tensors must share one device")

    row_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = math.prod(lead)
    hidden2 = hidden.reshape(n, dim)
    ids = teacher_ids.reshape(n, k).long()
    logprobs = teacher_logprobs.reshape(n, k).detach().to(row_dtype)
    mask2 = mask.reshape(n) if mask is not None else None
    tail = teacher_tail_logprob.reshape(n).detach().to(row_dtype) if teacher_tail_logprob is not None else None

    if value_checks_enabled():
        _check_teacher_values(ids, logprobs, tail, mask2, vocab if vocab_size is None else vocab_size, mode)

    # Positions that do not count are neutralized (no valid slot, no tail), so whatever the cache holds
    # there (padding, NaN) can never reach the loss or the gradients.
    valid = ids >= 0
    if mask2 is not None:
        valid = valid & mask2[:, None]
        ids = torch.where(valid, ids, -1)
        if tail is not None:
            tail = torch.where(mask2, tail, float("-inf"))
    logprobs = torch.where(valid, logprobs, 0.0)
    return ReplayKLInputs(
        hidden=hidden2,
        weight=weight,
        bias=bias,
        teacher_ids=ids,
        teacher_logprobs=logprobs,
        teacher_tail_logprob=tail,
        mask=mask2,
        lead_shape=lead,
        mode=mode,
        temperature=temperature,
        reduction=reduction,
    )


def _check_teacher_values(ids, logprobs, tail, mask, vocab, mode):
    """All data-dependent checks, evaluated on device and read back with a single sync."""
    counted = mask if mask is not None else torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    valid = (ids >= 0) & counted[:, None]
    flags = [
        ("teacher_ids", f"token ids in [0, V) = [0, {vocab}) or -1 for an unused slot", ((ids < -1) | (ids >= vocab)).any()),
    ]
    sorted_ids = torch.where(valid, ids, -1).sort(dim=-1).values
    dup = ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any()
    flags.append(("teacher_ids", "no duplicate token id within a position's slots", dup))
    flags.append(
        ("teacher_logprobs", "finite log-probabilities on every used slot", (~torch.isfinite(logprobs) & valid).any())
    )
    if mode in ("tail", "sampled"):
        mass = torch.where(valid, logprobs, float("-inf")).logsumexp(dim=-1)
        what = "the teacher probabilities of a position to sum to at most 1 (+%g)" % MASS_TOLERANCE
        if mode == "sampled":
            what = "the sample frequencies of a position to sum to at most 1 (+%g)" % MASS_TOLERANCE
        flags.append(("teacher_logprobs", what, (mass > math.log1p(MASS_TOLERANCE)).any()))
    if tail is not None:
        bad_tail = (torch.isnan(tail) | (tail > math.log1p(MASS_TOLERANCE))) & counted
        flags.append(("teacher_tail_logprob", "a log-probability <= 0 (or -inf), never NaN", bad_tail.any()))
        # The tail is the teacher's exact mass outside its slots: together they are the whole
        # distribution. A short total (0.5 + 0.1) would make the KL negative, a long one overcount.
        total = torch.logaddexp(mass, tail)
        off = (total < math.log1p(-MASS_TOLERANCE)) | (total > math.log1p(MASS_TOLERANCE))
        flags.append((
            "teacher_logprobs and teacher_tail_logprob",
            "the slots' probabilities plus exp(teacher_tail_logprob) of a position to sum to 1 (+-%g)" % MASS_TOLERANCE,
            (off & counted).any(),
        ))
    failed = torch.stack([f[2] for f in flags]).tolist()  # the one host sync
    for (name, expected, _), bad in zip(flags, failed):
        if bad:
            raise ValueError(f"{name}: expected {expected}")


# --- vocab-parallel (docs/design.md, section 6) ------------------------------------------------------


@dataclass(frozen=True)
class VocabShardLayout:
    """Where this rank's rows of the lm_head sit in the global vocabulary (Megatron convention:
    contiguous shards in rank order, possibly uneven)."""

    group: object  # the torch.distributed process group
    rank: int
    sizes: tuple  # V_r of every rank, in rank order

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def vocab_size(self) -> int:
        return sum(self.sizes)


def check_process_group(process_group):
    """(rank, world size) of ``process_group``; TypeError for anything that is not a process group."""
    rank, size = getattr(process_group, "rank", None), getattr(process_group, "size", None)
    if not (callable(rank) and callable(size)):
        raise TypeError(
            "process_group must be None or a torch.distributed process group (e.g. torch.distributed.new_group()) "
            f"whose ranks each hold a vocabulary shard of weight; got {type(process_group).__name__}"
        )
    return int(rank()), int(size())


def prepare_sharded_inputs(process_group, hidden, weight, teacher_ids, teacher_logprobs, **kwargs):
    """:func:`prepare_replay_kl_inputs` for a ``weight`` (and ``bias``) that is this rank's vocabulary
    shard. Returns (inputs, layout).

    Costs one all_gather of one int64 per rank (the shard sizes, which also carry a "this rank's
    arguments were rejected" flag) and the usual single host sync of the value checks. The order
    keeps every rank in step whatever fails: the shape checks run first (the shard arguments differ
    by rank, so they may fail on one rank only: the others then raise too, naming it); the teacher
    value checks run after the gather, against the global vocabulary size, on replicated inputs, so
    they fail on every rank alike.
    """
    import torch.distributed as dist

    rank, world = check_process_group(process_group)
    error = None
    try:
        with skip_value_checks():  # shapes, dtypes, devices: no data read, no sync
            prepare_replay_kl_inputs(hidden, weight, teacher_ids, teacher_logprobs, **kwargs)
    except (TypeError, ValueError) as exc:
        error = exc
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    local = torch.tensor([-1 if error is not None else weight.shape[0]], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=process_group)
    sizes = tuple(torch.cat(gathered).tolist())
    if error is not None:
        raise error
    bad = [r for r, v in enumerate(sizes) if v < 0]
    if bad:
        raise ValueError(
            f"process_group: the weight/bias shard arguments of rank(s) {bad} were rejected (see the error "
            "raised on those ranks)"
        )
    inp = prepare_replay_kl_inputs(
        hidden, weight, teacher_ids, teacher_logprobs, vocab_size=sum(sizes), **kwargs
    )
    return inp, VocabShardLayout(process_group, rank, sizes)
