"""Training batches of a replay buffer, in memory (``ReplayBuffer``) or read lazily from its shards
(``ShardedReplayBuffer``) alike: both subclass :class:`TrainingBatches` over their own ``_rows``."""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch

ROW_TENSORS = ("input_ids", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob")


def normalized_teacher(batch, mode: str) -> None:
    """Upcast a 16-bit cache's teacher to float32, renormalized in float64 (in place on ``batch``).

    Rounding the top-k and the tail to 16 bits leaves the teacher's mass off 1 by up to ~1e-3 (k = 64), and a
    teacher that is not a distribution can give a negative KL for a student that equals it. The renormalized
    teacher is the nearest distribution (each probability scaled by the same factor): tail mode sums the slots
    and the tail, sampled mode the slots (docs/design.md, the cache section). Rows without a teacher keep
    their values."""
    lp, tail = batch["teacher_logprobs"], batch["teacher_tail_logprob"]
    if lp.dtype not in (torch.float16, torch.bfloat16):
        return
    lp64 = lp.double().masked_fill(batch["teacher_ids"] < 0, float("-inf"))
    terms = torch.cat([lp64, tail.double()[..., None]], -1) if mode == "tail" else lp64
    mass = terms.logsumexp(-1)
    mass = torch.where(torch.isfinite(mass), mass, torch.zeros_like(mass))
    batch["teacher_logprobs"] = (lp.double() - mass[..., None]).float()
    batch["teacher_tail_logprob"] = (tail.double() - mass).float()


def iter_batches(rows, lengths, seq_len, batch_size, *, shuffle, seed, drop_last, device, trim, teacher_dtype,
                 start=0, stride=1, mode="tail"):
    """The training batches of a buffer (see :meth:`ReplayBuffer.batches`), in-memory or lazy alike:
    ``rows(idx, width)`` returns the ``ROW_TENSORS`` of the sequences ``idx``, cut to ``width``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0 (a batch index), got {start!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if teacher_dtype is not None and teacher_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"teacher_dtype must be a floating torch dtype or None, got {teacher_dtype!r}")
    n = len(lengths)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    # Batch j holds order[j * batch_size : (j + 1) * batch_size] whatever is skipped: skipping reads nothing.
    for first in range(start * batch_size, stop, stride * batch_size):
        idx = order[first : first + batch_size]
        batch_lengths = lengths[idx]
        width = int(batch_lengths.max()) if trim else seq_len
        batch = rows(idx, width)
        normalized_teacher(batch, mode)
        if teacher_dtype is not None:
            for name in ("teacher_logprobs", "teacher_tail_logprob"):
                batch[name] = batch[name].to(teacher_dtype)
        batch.update(
            attention_mask=(torch.arange(width)[None, :] < batch_lengths[:, None]).long(),
            mask=batch["teacher_ids"][:, :, 0] >= 0,
            lengths=batch_lengths,
            indices=idx,
        )
        if device is not None:
            batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        yield batch


class TrainingBatches:
    """``batches`` and ``num_batches`` of both buffer kinds; a subclass has ``lengths``, ``seq_len``, ``__len__``
    and ``_rows(idx, width)``: the ``ROW_TENSORS`` of the sequences ``idx``, cut to ``width``."""

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device=None,
        trim: bool = True,
        teacher_dtype: Optional[torch.dtype] = None,
        start: int = 0,
        stride: int = 1,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Yield training batches aligned for ``fused_replay_kl``.

        Each batch is a dict with ``input_ids`` [B, Lb], ``attention_mask`` [B, Lb] (1 = real token),
        ``teacher_ids`` [B, Lb, k], ``teacher_logprobs`` [B, Lb, k], ``teacher_tail_logprob`` [B, Lb] and
        ``mask`` [B, Lb] (True where the position has a teacher). Row ``j`` is the teacher for predicting
        token ``j + 1``, so pass the student's hidden states at positions ``0..Lb-1`` unshifted::

            hidden = last_hidden_states(model, b["input_ids"], b["attention_mask"])  # [B, Lb, D]
            loss = fused_replay_kl(hidden, lm_head.weight, b["teacher_ids"], b["teacher_logprobs"],
                                   mask=b["mask"], teacher_tail_logprob=b["teacher_tail_logprob"])

        ``trim`` cuts every batch to its longest sequence; ``shuffle`` uses a permutation drawn from
        ``seed`` (pass e.g. ``seed + epoch`` for a new order each epoch). ``start`` and ``stride`` yield only
        the batches ``start, start + stride, ...`` of the pass, the same batches as without them and without
        reading the others: ``start`` resumes a pass, ``stride`` splits it over data-parallel ranks. A
        ``ShardedReplayBuffer`` yields the same batches, read lazily: one batch in memory at a time, each
        opening the shards it draws from and reading only its rows.
        """
        return iter_batches(self._rows, self.lengths, self.seq_len, batch_size, shuffle=shuffle, seed=seed,
                            drop_last=drop_last, device=device, trim=trim, teacher_dtype=teacher_dtype,
                            start=start, stride=stride, mode=self.mode)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def stream(self, batch_size: int, *, seed: int = 0, device=None, rank: int = 0, world_size: int = 1,
               drop_last: bool = False, trim: bool = True, teacher_dtype: Optional[torch.dtype] = None):
        """An endless :class:`~selfreplay_fast.replay_stream.ReplayStream` of training batches: pass p over
        the buffer is shuffled with ``seed + p``; rank ``rank`` of ``world_size`` takes every
        ``world_size``-th batch; ``state_dict()`` / ``load_state_dict()`` resume it exactly."""
        from .replay_stream import ReplayStream

        return ReplayStream(self, batch_size, seed=seed, device=device, rank=rank, world_size=world_size,
                            drop_last=drop_last, trim=trim, teacher_dtype=teacher_dtype)
