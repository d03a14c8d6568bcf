"""The replay cache: self-generated sequences plus the model's own top-k teacher at every position.

Layout (S sequences, padded to length L, k teacher slots):

* ``input_ids`` [S, L] int64: prompt + generated tokens, padded with ``pad_token_id`` after ``lengths``.
* ``lengths`` [S] int64: number of real tokens of each sequence.
* ``teacher_ids`` [S, L, k] int32: row ``j`` holds the teacher for *predicting token j + 1*, i.e. it is
  aligned with the hidden state at position ``j``. ``-1`` marks an unused slot; a row without any
  prediction (prompt tokens that were not sampled, the last token, padding) is all ``-1``.
* ``teacher_logprobs`` [S, L, k] float32 (or float16): log-probabilities normalized over the full
  vocabulary (mode ``"tail"``), or log sample frequencies (mode ``"sampled"``); 0 on unused slots.
* ``teacher_tail_logprob`` [S, L] (dtype of ``teacher_logprobs``): log of the teacher mass outside the
  recorded slots (``-inf`` where there is none, or no prediction).
* ``sampled_logprobs`` [S, L] float32, or None when not recorded: at row ``j`` the log-prob of token
  ``j + 1`` under the teacher's distribution (the one the teacher rows describe), 0 on rows without a
  teacher. For sampled text (``metadata["sampled_from_teacher"]``) it is what the sequence-level estimate
  of KL(original || model) needs (forgetting.py).

On disk a buffer is a directory of safetensors shards plus ``metadata.json`` (format version, model
name and config hash, vocabulary size, k, temperature, seed, provenance, counts and one sha256 per shard);
the format, its checks and its atomic writes are in ``buffer_files.py``, the shards' ragged tensors
(format v2; v1, padded, still loads) in ``buffer_layout.py``. Writers (:class:`ShardedBufferWriter`,
:meth:`ReplayBuffer.save`) hold the directory's writer lock (``dir_lock.py``) while they write. The lazy
reader is in ``sharded_buffer.py``, the training batches of both in ``buffer_batches.py``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Dict, List, Optional, Sequence

import torch

from .buffer_batches import ROW_TENSORS, TrainingBatches
from .buffer_files import (  # noqa: F401  (re-exported: the public names of the buffer format live here)
    FORMAT_NAME,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    MASS_TOLERANCE,
    READABLE_VERSIONS,
    SAMPLED_FIELD,
    METADATA_FILE,
    MODES,
    TENSOR_NAMES,
    ReplayBufferError,
    atomic_write_bytes,
    fsync_dir,
    open_buffer_metadata,
    parse_shard_file_name,
    read_metadata,
    read_shard,
    remove_stale_temporaries,
    sha256_bytes,
    shard_file_name,
    shard_generation,
    shard_header,
    write_metadata,
    write_shard,
)
from .buffer_layout import bytes_per_token
from .dir_lock import DirectoryLock, DirectoryLockedError  # noqa: F401  (re-exported)


def check_same_run(out_dir: str, existing: Optional[dict], settings_key: str, settings: dict, producer: str,
                   num_shards: int) -> None:
    """Refuse to write into ``out_dir`` unless it is empty (``existing`` None: no metadata; hidden files
    aside) or holds a buffer of the same producer with the same ``settings`` and at most ``num_shards``
    shards: the check every resuming writer makes before building on what is there."""
    if existing is None:
        leftovers = [name for name in os.listdir(out_dir) if not name.startswith(".")]
        if leftovers:
            raise ValueError(
                f"out_dir {out_dir} is not empty and holds no replay buffer ({leftovers[:3]}...); use an empty directory"
            )
        return
    previous = existing.get(settings_key)
    if not isinstance(previous, dict):
        raise ValueError(
            f"out_dir {out_dir} holds a replay buffer made by another run (not by {producer}: its "
            f"metadata.json has no {settings_key!r} settings); use a fresh directory"
        )
    differing = sorted(key for key in set(settings) | set(previous) if settings.get(key) != previous.get(key))
    if differing:
        detail = ", ".join(f"{key}: {previous.get(key)!r} there, {settings.get(key)!r} now" for key in differing[:6])
        raise ValueError(
            f"out_dir {out_dir} holds a replay buffer made with other settings by another run of {producer} "
            f"({detail}); use a fresh directory, or rerun with the original settings to resume"
        )
    if len(existing["shards"]) > num_shards:
        raise ReplayBufferError(
            f"{out_dir}/{METADATA_FILE} lists {len(existing['shards'])} shards, but these settings make "
            f"{num_shards}: it was changed; use a fresh directory")


class ShardedBufferWriter:
    """The resumable, shard-by-shard writing of a buffer directory (``generate_replay`` and
    ``build_teacher_cache`` both write through it).

    On construction it creates ``out_dir`` if needed, takes the directory's writer lock (a second writer
    fails at once with a :class:`DirectoryLockedError` naming the holder), removes the temporaries a
    crashed writer left, and reads the buffer already there: a directory holding something else is
    refused, and so is a buffer whose ``metadata[settings_key]`` differs from ``settings`` (another
    producer, or the same one with other settings). The shards it lists are verified against their
    sha256 (a resumed run builds on them) and, with ``keep_done``, their tensors are kept in
    ``done_tensors``. :meth:`write_shard` then writes the next shard and, after it, the progress
    ``metadata.json`` (``metadata`` plus the shard list and counts; ``complete`` once ``num_shards``
    shards are written), so the metadata only ever lists whole shards.

    The lock is held until :meth:`close` (or the end of a ``with`` block). ``producer`` names the caller
    in error messages.
    """

    def __init__(
        self,
        out_dir,
        settings_key: str,
        settings: dict,
        metadata: dict,
        shard_size: int,
        num_shards: int,
        *,
        producer: str,
        keep_done: bool = False,
    ):
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.settings_key = settings_key
        self.metadata = dict(metadata)
        self.shard_size = shard_size
        self.num_shards = num_shards
        self.entries: List[dict] = []
        self.done_tensors: List[Dict[str, torch.Tensor]] = []
        self._generation = 0
        self._lock = DirectoryLock(out_dir, purpose=producer).acquire()
        try:
            self._resume(settings, producer, keep_done)
        except BaseException:
            self.close()
            raise

    def _resume(self, settings: dict, producer: str, keep_done: bool) -> None:
        out_dir, settings_key = self.out_dir, self.settings_key
        try:
            existing = read_metadata(out_dir)
        except ReplayBufferError as exc:
            raise ReplayBufferError(f"out_dir {out_dir} holds something that is not a replay buffer, or a damaged "
                                    f"one: {exc}") from exc
        remove_stale_temporaries(out_dir)  # under the lock: no write is in progress
        check_same_run(out_dir, existing, settings_key, settings, producer, self.num_shards)
        if existing is None:
            return
        self._generation = shard_generation(existing) or 0
        if existing["format_version"] != self.metadata.get("format_version", FORMAT_VERSION):
            # A run begun by an older selfreplay-fast finishes in its format: shards of one buffer share a layout.
            self.metadata.update(format_version=existing["format_version"],
                                 **{SAMPLED_FIELD: bool(existing.get(SAMPLED_FIELD, False))})
        for entry in existing["shards"]:  # a resumed run builds on these: verify them now
            tensors = read_shard(out_dir, entry, existing, verify=True)
            if keep_done:
                self.done_tensors.append(tensors)
            self.entries.append(entry)

    def close(self) -> None:
        """Release the directory's writer lock (idempotent)."""
        self._lock.release()

    def __enter__(self) -> "ShardedBufferWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._lock.held:
            raise RuntimeError(f"the writer of {self.out_dir} is closed")

    @property
    def num_done_shards(self) -> int:
        return len(self.entries)

    @property
    def num_done_sequences(self) -> int:
        return sum(e["num_sequences"] for e in self.entries)

    @property
    def complete(self) -> bool:
        return len(self.entries) >= self.num_shards

    @property
    def todo_shards(self) -> List[int]:
        """The shards still to write, in the order :meth:`write_shard` writes them."""
        return list(range(len(self.entries), self.num_shards))

    def claim(self, index: int) -> bool:
        """Whether this writer writes shard ``index`` now: always, for the next one (a single writer owns
        every shard; the data-parallel writer, generation/parallel_writer.py, may answer no)."""
        if index != len(self.entries):
            raise ValueError(f"shard {index} is not the next shard of {self.out_dir} ({len(self.entries)} is)")
        return True

    def write_progress(self, *, extra_metadata: Optional[dict] = None) -> None:
        """Write ``metadata.json`` for the shards written so far (atomically)."""
        self._check_open()
        meta = dict(self.metadata)
        meta.update(
            shards=self.entries,
            shard_size=self.shard_size,
            num_sequences=self.num_done_sequences,
            num_tokens=sum(e["num_tokens"] for e in self.entries),
            complete=self.complete,
        )
        if extra_metadata:
            meta.update(extra_metadata)
        write_metadata(self.out_dir, meta)

    def write_shard(
        self,
        tensors: Dict[str, torch.Tensor],
        *,
        entry_extra: Optional[dict] = None,
        extra_metadata: Optional[dict] = None,
    ) -> dict:
        """Write the next shard, then the progress metadata listing it; returns its metadata entry."""
        self._check_open()
        if self.complete:
            raise ValueError(f"all {self.num_shards} shards of {self.out_dir} are written already")
        entry = write_shard(self.out_dir, len(self.entries), tensors, generation=self._generation,
                            metadata=self.metadata)
        if entry_extra:
            entry.update(entry_extra)
        self.entries.append(entry)
        self.write_progress(extra_metadata=extra_metadata)  # metadata last: it only lists whole shards
        return entry


# --------------------------------------------------------------------------------------------------
# The buffer
# --------------------------------------------------------------------------------------------------


class ReplayBuffer(TrainingBatches):
    """Self-generated replay sequences with their cached top-k teacher; see the module docstring.

    ``metadata`` carries provenance (model name, config hash, temperature, seed, ...) and is saved
    with the buffer. ``vocab_size`` is required: it is what ``load`` checks a consumer against.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        teacher_tail_logprob: torch.Tensor,
        *,
        vocab_size: int,
        mode: str = "tail",
        pad_token_id: int = 0,
        metadata: Optional[dict] = None,
        sampled_logprobs: Optional[torch.Tensor] = None,
    ):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, t, dtypes in (
            ("input_ids", input_ids, (torch.int64, torch.int32)),
            ("lengths", lengths, (torch.int64, torch.int32)),
            ("teacher_ids", teacher_ids, (torch.int32, torch.int64)),
            ("teacher_logprobs", teacher_logprobs, (torch.float32, torch.float16)),
            ("teacher_tail_logprob", teacher_tail_logprob, (torch.float32, torch.float16)),
        ):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in dtypes:
                raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [S, L], got {tuple(input_ids.shape)}")
        num_seq, seq_len = input_ids.shape
        if tuple(lengths.shape) != (num_seq,):
            raise ValueError(f"lengths must have shape [S] = [{num_seq}], got {tuple(lengths.shape)}")
        if teacher_ids.dim() != 3 or tuple(teacher_ids.shape[:2]) != (num_seq, seq_len) or teacher_ids.shape[2] < 1:
            raise ValueError(f"teacher_ids must have shape [S, L, k] = [{num_seq}, {seq_len}, k>=1], got {tuple(teacher_ids.shape)}")
        if teacher_logprobs.shape != teacher_ids.shape:
            raise ValueError(f"teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, got {tuple(teacher_logprobs.shape)}")
        if tuple(teacher_tail_logprob.shape) != (num_seq, seq_len):
            raise ValueError(f"teacher_tail_logprob must have shape [S, L] = [{num_seq}, {seq_len}], got {tuple(teacher_tail_logprob.shape)}")
        if teacher_tail_logprob.dtype != teacher_logprobs.dtype:
            raise TypeError(f"teacher_tail_logprob must have the dtype of teacher_logprobs ({teacher_logprobs.dtype}), got {teacher_tail_logprob.dtype}")
        if num_seq and (int(lengths.min()) < 1 or int(lengths.max()) > seq_len):
            raise ValueError(f"lengths must lie in [1, L] = [1, {seq_len}]")
        if sampled_logprobs is not None:
            if not isinstance(sampled_logprobs, torch.Tensor) or not sampled_logprobs.is_floating_point():
                raise TypeError(f"sampled_logprobs must be a floating torch.Tensor or None, got "
                                f"{getattr(sampled_logprobs, 'dtype', type(sampled_logprobs).__name__)}")
            if tuple(sampled_logprobs.shape) != (num_seq, seq_len):
                raise ValueError(f"sampled_logprobs must have shape [S, L] = [{num_seq}, {seq_len}], got "
                                 f"{tuple(sampled_logprobs.shape)}")
            sampled_logprobs = sampled_logprobs.to(torch.float32).cpu()
        self.sampled_logprobs = sampled_logprobs
        self.input_ids = input_ids.to(torch.int64).cpu()
        self.lengths = lengths.to(torch.int64).cpu()
        self.teacher_ids = teacher_ids.to(torch.int32).cpu()
        self.teacher_logprobs = teacher_logprobs.cpu()
        self.teacher_tail_logprob = teacher_tail_logprob.cpu()
        self.vocab_size = vocab_size
        self.mode = mode
        self.pad_token_id = int(pad_token_id)
        self.metadata = dict(metadata or {})
        # Counters of the generate_replay call that produced this buffer (None when loaded or built by hand).
        self.generation_stats = None

    # -- basic properties -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def k(self) -> int:
        return self.teacher_ids.shape[2]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_teacher_rows(self) -> int:
        """Positions that carry a teacher (= tokens that were sampled from the model)."""
        return int((self.teacher_ids[:, :, 0] >= 0).sum())

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(sequences={len(self)}, seq_len={self.seq_len}, k={self.k}, vocab_size={self.vocab_size}, "
            f"mode={self.mode!r}, tokens={self.num_tokens}, logprob_dtype={self.teacher_logprobs.dtype})"
        )

    def select(self, index) -> "ReplayBuffer":
        """A buffer holding the sequences ``index`` (slice, indices, or a boolean mask over the
        sequences), trimmed to their length."""
        if isinstance(index, slice):
            idx = torch.arange(len(self))[index]
        else:
            idx = torch.as_tensor(index)
            if idx.dtype == torch.bool:  # converted as is, a mask would read as the indices 0 and 1
                if idx.shape != (len(self),):
                    raise ValueError(f"index: a boolean mask must have shape [{len(self)}], got {tuple(idx.shape)}")
                idx = idx.nonzero()[:, 0]
            idx = idx.to(torch.int64).reshape(-1)
        lengths = self.lengths[idx]
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        sampled = self.sampled_logprobs[idx, :width] if self.sampled_logprobs is not None else None
        return ReplayBuffer(
            self.input_ids[idx, :width], lengths, self.teacher_ids[idx, :width], self.teacher_logprobs[idx, :width],
            self.teacher_tail_logprob[idx, :width], vocab_size=self.vocab_size, mode=self.mode,
            pad_token_id=self.pad_token_id, metadata=self.metadata, sampled_logprobs=sampled,
        )

    def filter(self, predicate) -> "ReplayBuffer":
        """A buffer of the sequences for which ``predicate(token_ids)`` is true, in order: ``token_ids`` is
        the sequence's list of token ids, without padding (e.g. drop what must not be preserved:
        ``buffer.filter(lambda ids: banned not in ids)``). Raises TypeError if ``predicate`` is not callable
        or returns something other than a bool."""
        if not callable(predicate):
            raise TypeError(f"predicate must be callable (token-id list -> bool), got {type(predicate).__name__}")
        keep = []
        for i, ids in enumerate(self.sequences()):
            verdict = predicate(ids)
            if not isinstance(verdict, (bool, torch.Tensor)) or (isinstance(verdict, torch.Tensor) and verdict.numel() != 1):
                raise TypeError(f"predicate must return a bool, got {type(verdict).__name__} for sequence {i}")
            keep.append(bool(verdict))
        return self.select(torch.tensor(keep, dtype=torch.bool))

    def split(self, holdout, *, seed: int = 0) -> "tuple[ReplayBuffer, ReplayBuffer]":
        """(train, held_out): a reproducible random split of the sequences, ``holdout`` of them held out (an
        int count, or a fraction in (0, 1) rounded to the nearest count, at least 1). The same ``seed`` and
        buffer always give the same split; each part keeps the buffer's order."""
        n = len(self)
        if n < 2:
            raise ValueError(f"holdout: a buffer of {n} sequence(s) cannot be split")
        if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real):
            raise TypeError(f"holdout must be an int count or a float fraction, got {type(holdout).__name__}")
        if isinstance(holdout, numbers.Integral):
            count = int(holdout)
            if not 0 < count < n:
                raise ValueError(f"holdout must be a count in [1, {n - 1}] (the buffer holds {n} sequences), got {count}")
        else:
            if not 0 < holdout < 1:
                raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
            count = min(max(1, round(holdout * n)), n - 1)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        held = torch.zeros(n, dtype=torch.bool)
        held[torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:count]] = True
        return self.select(~held), self.select(held)

    def sequences(self) -> List[List[int]]:
        """The token ids of every sequence, without padding."""
        return [row[:n].tolist() for row, n in zip(self.input_ids, self.lengths.tolist())]

    # -- concatenation ----------------------------------------------------------------------------

    @classmethod
    def concat(cls, buffers: Sequence["ReplayBuffer"], *, metadata: Optional[dict] = None) -> "ReplayBuffer":
        """Concatenate buffers (e.g. shards) along the sequence axis, padding to the longest."""
        buffers = list(buffers)
        if not buffers:
            raise ValueError("buffers must hold at least one ReplayBuffer")
        for i, b in enumerate(buffers):
            if not isinstance(b, ReplayBuffer):
                raise TypeError(f"buffers[{i}] must be a ReplayBuffer, got {type(b).__name__}")
        first = buffers[0]
        for i, b in enumerate(buffers[1:], 1):
            for attr in ("vocab_size", "k", "mode"):
                if getattr(b, attr) != getattr(first, attr):
                    raise ValueError(f"buffers[{i}] has {attr}={getattr(b, attr)!r} but buffers[0] has {getattr(first, attr)!r}")
            if b.teacher_logprobs.dtype != first.teacher_logprobs.dtype:
                raise ValueError(f"buffers[{i}] stores log-probs as {b.teacher_logprobs.dtype}, buffers[0] as {first.teacher_logprobs.dtype}")
        width = max(b.seq_len for b in buffers)

        def pad(t, value):
            if t.shape[1] == width:
                return t
            shape = list(t.shape)
            shape[1] = width - t.shape[1]
            return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=1)

        # The sampled log-probs survive only if every part has them: a partial field would read as zeros.
        sampled = None
        if all(b.sampled_logprobs is not None for b in buffers):
            sampled = torch.cat([pad(b.sampled_logprobs, 0.0) for b in buffers])
        return cls(
            torch.cat([pad(b.input_ids, first.pad_token_id) for b in buffers]),
            torch.cat([b.lengths for b in buffers]),
            torch.cat([pad(b.teacher_ids, -1) for b in buffers]),
            torch.cat([pad(b.teacher_logprobs, 0.0) for b in buffers]),
            torch.cat([pad(b.teacher_tail_logprob, float("-inf")) for b in buffers]),
            vocab_size=first.vocab_size, mode=first.mode, pad_token_id=first.pad_token_id,
            metadata=metadata if metadata is not None else first.metadata, sampled_logprobs=sampled,
        )

    # -- validation -------------------------------------------------------------------------------

    def validate(self, *, chunk_sequences: int = 1024) -> "ReplayBuffer":
        """Check the teacher values once, so training can skip per-batch checks. Raises ValueError.

        Checks: ids in [-1, V); no duplicate id within a row; finite log-probs on used slots; in mode
        "tail", the slots plus the tail of every row with a teacher hold mass 1 within ``MASS_TOLERANCE``
        (1e-3) both ways; in mode "sampled", the slots' frequencies at most 1 + 1e-3; tail never NaN or
        positive beyond the tolerance; tokens in [0, V); rows past a sequence's end carry no teacher.
        """
        vocab = self.vocab_size
        limit, floor = math.log1p(MASS_TOLERANCE), math.log1p(-MASS_TOLERANCE)
        for start in range(0, len(self), chunk_sequences):
            sl = slice(start, start + chunk_sequences)
            ids = self.teacher_ids[sl].long()
            lp = self.teacher_logprobs[sl].float()
            tail = self.teacher_tail_logprob[sl].float()
            lengths = self.lengths[sl]
            tokens = self.input_ids[sl]
            inside = torch.arange(self.seq_len)[None, :] < lengths[:, None]
            where = f"(sequences {start}..{start + ids.shape[0] - 1})"
            if ((tokens < 0) | (tokens >= vocab)).logical_and(inside).any():
                raise ValueError(f"input_ids: expected token ids in [0, {vocab}) {where}")
            if ((ids < -1) | (ids >= vocab)).any():
                raise ValueError(f"teacher_ids: expected ids in [-1, {vocab}) {where}")
            used = ids >= 0
            if (used.any(dim=-1) & ~inside).any():
                raise ValueError(f"teacher_ids: a row past the end of its sequence carries a teacher {where}")
            sorted_ids = torch.where(used, ids, -1).sort(dim=-1).values
            if ((sorted_ids[..., 1:] == sorted_ids[..., :-1]) & (sorted_ids[..., 1:] >= 0)).any():
                raise ValueError(f"teacher_ids: expected no duplicate token id within a row {where}")
            if (~torch.isfinite(lp) & used).any():
                raise ValueError(f"teacher_logprobs: expected finite log-probabilities on every used slot {where}")
            mass = torch.where(used, lp, float("-inf")).logsumexp(dim=-1)
            if self.mode == "tail":
                # Slots + tail is the teacher's whole distribution: short of 1, the KL would come out negative.
                mass = torch.logaddexp(mass, tail)
                names = "teacher_logprobs and teacher_tail_logprob"
                if ((mass < floor) & used.any(dim=-1)).any():
                    raise ValueError(f"{names}: expected the slots plus the tail of a row to hold mass 1 (at least "
                                     f"1 - {MASS_TOLERANCE}) {where}")
            else:
                names = "teacher_logprobs"
            if (mass > limit).any():
                raise ValueError(f"{names}: expected the mass of a row to be at most 1 + {MASS_TOLERANCE} {where}")
            if (torch.isnan(tail) | (tail > limit)).any():
                raise ValueError(f"teacher_tail_logprob: expected a log-probability <= 0 (or -inf), never NaN {where}")
            if self.sampled_logprobs is not None:
                sampled = self.sampled_logprobs[sl]
                has_row = used.any(dim=-1)
                if (has_row & ~(torch.isfinite(sampled) & (sampled <= limit))).any() or (~has_row & (sampled != 0)).any():
                    raise ValueError(f"sampled_logprobs: expected a finite log-probability <= 0 on every row with a "
                                     f"teacher and 0 elsewhere {where}")
        return self

    def _rows(self, idx, width):
        rows = {name: getattr(self, name)[idx, :width] for name in ROW_TENSORS}
        if self.sampled_logprobs is not None:
            rows[SAMPLED_FIELD] = self.sampled_logprobs[idx, :width]
        return rows

    # -- persistence ------------------------------------------------------------------------------

    def _tensors(self, sl=slice(None)) -> Dict[str, torch.Tensor]:
        lengths = self.lengths[sl]
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        tensors = {
            "input_ids": self.input_ids[sl, :width],
            "lengths": lengths,
            "teacher_ids": self.teacher_ids[sl, :width],
            "teacher_logprobs": self.teacher_logprobs[sl, :width],
            "teacher_tail_logprob": self.teacher_tail_logprob[sl, :width],
        }
        if self.sampled_logprobs is not None:
            tensors[SAMPLED_FIELD] = self.sampled_logprobs[sl, :width]
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], *, vocab_size: int, mode: str, pad_token_id: int,
                     metadata: Optional[dict] = None) -> "ReplayBuffer":
        """A buffer of padded tensors by name (what ``read_shard`` returns; ``sampled_logprobs`` optional)."""
        return cls(tensors["input_ids"], tensors["lengths"], tensors["teacher_ids"], tensors["teacher_logprobs"],
                   tensors["teacher_tail_logprob"], vocab_size=vocab_size, mode=mode, pad_token_id=pad_token_id,
                   metadata=metadata, sampled_logprobs=tensors.get(SAMPLED_FIELD))

    def describe(self, *, format_version: int = FORMAT_VERSION) -> dict:
        """The metadata fields that describe this buffer's content (merged over ``self.metadata``), as
        saved in ``format_version``: with ``bytes_per_token``, the shard bytes of tensor data per token
        (format v2; v1 pads every sequence to its shard's longest, so it has no fixed figure)."""
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT_NAME,
            format_version=format_version,
            vocab_size=self.vocab_size,
            k=self.k,
            mode=self.mode,
            pad_token_id=self.pad_token_id,
            logprob_dtype=str(self.teacher_logprobs.dtype).replace("torch.", ""),
        )
        meta[SAMPLED_FIELD] = self.sampled_logprobs is not None and format_version >= 2
        meta.pop("bytes_per_token", None)
        if format_version >= 2:
            meta["bytes_per_token"] = bytes_per_token(self.vocab_size, self.k, self.teacher_logprobs.dtype,
                                                      sampled_logprobs=meta[SAMPLED_FIELD])
        return meta

    def save(self, directory: str, *, shard_size: int = 4096, overwrite: bool = False,
             format_version: int = FORMAT_VERSION) -> None:
        """Write the buffer to ``directory`` as safetensors shards of ``shard_size`` sequences.

        ``format_version`` 2 (default) stores the sequences ragged with narrow ids (``buffer_layout.py``); 1
        writes the older padded layout, which any selfreplay-fast reads (without ``sampled_logprobs``).

        Shards are written first (atomically), ``metadata.json`` last, so an interrupted save never
        looks like a complete buffer. Refuses a directory that already holds a buffer unless ``overwrite``.
        Holds the directory's writer lock while it writes.

        ``overwrite=True`` is atomic at the buffer level: the new shards are written under names of a new
        generation (``shard-NNNNN-g1.safetensors`` beside ``shard-NNNNN.safetensors``, and back) beside the old ones, then ``metadata.json`` is replaced
        in one rename, and only then are the old shards deleted. Killed at any point, the directory loads
        as the old buffer or as the new one. Only files of the writer's own name patterns are ever
        removed: the shards the old metadata lists (once they are no longer needed), and shards and
        temporaries that an interrupted save left unlisted.
        """
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        directory = os.fspath(directory)
        if isinstance(format_version, bool) or format_version not in READABLE_VERSIONS:
            raise ValueError(f"format_version must be one of {READABLE_VERSIONS}, got {format_version!r}")
        os.makedirs(directory, exist_ok=True)
        with DirectoryLock(directory, purpose="ReplayBuffer.save"):
            old = read_metadata(directory)
            if old is not None and not overwrite:
                raise FileExistsError(f"{directory} already holds a replay buffer; pass overwrite=True to replace it")
            remove_stale_temporaries(directory)
            generation = 0
            if old is not None:
                # The new shards must not overwrite the old ones, which stay the buffer until the metadata switch.
                generation = 1 if shard_generation(old) == 0 else 0
                _remove_unlisted_shards(directory, old)
            meta = self.describe(format_version=format_version)
            shards = [
                write_shard(directory, index, self._tensors(slice(start, start + shard_size)), generation=generation,
                            metadata=meta)
                for index, start in enumerate(range(0, len(self), shard_size))
            ]
            meta.update(
                shards=shards,
                shard_size=shard_size,
                num_sequences=len(self),
                num_tokens=self.num_tokens,
                num_teacher_rows=self.num_teacher_rows,
                complete=True,
            )
            write_metadata(directory, meta)  # the switch: the old buffer until here, the new one after
            if old is not None:
                _remove_unlisted_shards(directory, meta)

    @classmethod
    def load(
        cls,
        directory: str,
        *,
        expected_vocab_size: Optional[int] = None,
        verify_checksums: bool = True,
        validate: bool = True,
        allow_incomplete: bool = False,
    ) -> "ReplayBuffer":
        """Load a buffer saved by :meth:`save` or written by ``generate_replay(out_dir=...)``.

        Verifies every shard's sha256, refuses a buffer whose vocabulary size differs from
        ``expected_vocab_size`` (pass your model's ``lm_head`` rows), and runs :meth:`validate` once.
        A generation that was interrupted is refused unless ``allow_incomplete`` (rerun it to finish).
        """
        directory, meta = open_buffer_metadata(directory, expected_vocab_size, allow_incomplete)
        vocab, mode, pad_token_id = meta["vocab_size"], meta["mode"], meta["pad_token_id"]
        parts = []
        for entry in meta["shards"]:
            t = read_shard(directory, entry, meta, verify=verify_checksums)
            parts.append(cls.from_tensors(t, vocab_size=vocab, mode=mode, pad_token_id=pad_token_id))
        meta_only = {key: value for key, value in meta.items() if key != "shards"}
        if parts:
            buffer = cls.concat(parts, metadata=meta_only)
        else:
            k, dtype = meta["k"], LOGPROB_DTYPES[meta["logprob_dtype"]]
            buffer = cls(torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                         torch.zeros(0, 1, k, dtype=torch.int32), torch.zeros(0, 1, k, dtype=dtype),
                         torch.zeros(0, 1, dtype=dtype), vocab_size=vocab, mode=mode, pad_token_id=pad_token_id,
                         metadata=meta_only,
                         sampled_logprobs=torch.zeros(0, 1) if meta.get(SAMPLED_FIELD) else None)
        if validate:
            buffer.validate()
        return buffer

    def to_dataset(self):
        """This buffer as a Hugging Face ``datasets.Dataset``: one row per sequence, unpadded, its metadata
        (with a digest of the content) in ``dataset.info.description`` (see ``buffer_dataset.py``; needs the
        ``datasets`` extra). ``ReplayBuffer.from_dataset`` turns it back into this buffer exactly."""
        from .buffer_dataset import to_dataset

        return to_dataset(self)

    @classmethod
    def from_dataset(cls, dataset, *, metadata: Optional[dict] = None, expected_vocab_size: Optional[int] = None,
                     verify_checksum: bool = True, validate: bool = True) -> "ReplayBuffer":
        """The buffer a ``datasets.Dataset`` of :meth:`to_dataset` holds, with the checks of :meth:`open`: its
        metadata (from ``dataset.info.description``, or ``metadata=``), the vocabulary, completeness, the
        content digest (``verify_checksum``), every column's type and shape, and :meth:`validate`."""
        from .buffer_dataset import from_dataset

        return from_dataset(cls, dataset, metadata=metadata, expected_vocab_size=expected_vocab_size,
                            verify_checksum=verify_checksum, validate=validate)

    @classmethod
    def open(
        cls,
        directory,
        *,
        expected_vocab_size: Optional[int] = None,
        verify_checksums: bool = True,
        validate: bool = True,
        allow_incomplete: bool = False,
    ) -> "ShardedReplayBuffer":
        """Open a buffer directory lazily, for buffers larger than RAM: a :class:`ShardedReplayBuffer`.

        The same checks as :meth:`load` (vocabulary, completeness, every shard's sha256, :meth:`validate`),
        done shard by shard with one shard in memory at a time; afterwards only the sequence lengths are
        held. Its ``batches`` yields exactly what ``load(directory).batches`` would, reading each batch's
        rows from the shard files.
        """
        return ShardedReplayBuffer.open(directory, expected_vocab_size=expected_vocab_size,
                                        verify_checksums=verify_checksums, validate=validate,
                                        allow_incomplete=allow_incomplete)


def _remove_unlisted_shards(directory: str, metadata: dict) -> None:
    """Delete the shard files (names of the writer's own pattern only) that ``metadata`` does not list:
    the replaced shards after an overwrite, or what an interrupted save left. Call it holding the lock."""
    listed = {entry["file"] for entry in metadata["shards"]}
    removed = False
    for name in os.listdir(directory):
        if name not in listed and parse_shard_file_name(name) is not None:
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            removed = True
    if removed:
        fsync_dir(directory)


from .sharded_buffer import ShardedReplayBuffer  # noqa: E402  (it builds on ReplayBuffer, defined above)
