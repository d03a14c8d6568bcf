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

On disk a buffer is a directory of safetensors shards plus ``metadata.json`` (format version, model
name and config hash, vocabulary size, k, temperature, seed, counts and one sha256 per shard). Every
file is written to a temporary name, fsynced and renamed into place, so a crash never leaves a
half-written shard under a real name, and ``metadata.json`` only ever lists shards that are complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT_NAME = "selfreplay-fast/replay-buffer"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MODES = ("tail", "sampled")
LOGPROB_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Teacher mass may exceed 1 by this much (rounding of cached log-probs) before validate() calls it an error;
# the same tolerance fused_replay_kl applies.
MASS_TOLERANCE = 1e-3
_TENSOR_NAMES = ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob")


class ReplayBufferError(ValueError):
    """A buffer on disk is corrupt, incomplete or incompatible with what the caller expects."""


# --------------------------------------------------------------------------------------------------
# Atomic file helpers (shared with the resumable generator in generation.py)
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    # The rename itself is only durable once the directory entry is flushed (POSIX); not possible on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old content or all of ``data``."""
    directory = os.path.dirname(os.path.abspath(path))
    # A unique hidden name in the same directory (so that the rename is atomic), created with the mode
    # open() gives, i.e. under the umask: mkstemp's 0600 would make the buffer unreadable to other users.
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    _fsync_dir(directory)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(directory: str, index: int, tensors: Dict[str, torch.Tensor]) -> dict:
    """Serialize one shard atomically; returns its metadata entry (file name, counts, sha256)."""
    data = safetensors_save({name: t.contiguous().cpu() for name, t in tensors.items()})
    name = shard_file_name(index)
    atomic_write_bytes(os.path.join(directory, name), data)
    lengths = tensors["lengths"]
    return {
        "file": name,
        "num_sequences": int(lengths.numel()),
        "num_tokens": int(lengths.sum()),
        "seq_len": int(tensors["input_ids"].shape[1]),
        "sha256": sha256_bytes(data),
    }


def write_metadata(directory: str, metadata: dict) -> None:
    atomic_write_bytes(os.path.join(directory, METADATA_FILE), (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())


def read_metadata(directory: str) -> Optional[dict]:
    """The metadata of the buffer in ``directory``, or None if there is none. Raises on a foreign file."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ReplayBufferError(f"{path} is not a readable replay-buffer metadata file: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ReplayBufferError(f"{path} is not a replay-buffer metadata file (a JSON {type(metadata).__name__})")
    if metadata.get("format") != FORMAT_NAME:
        raise ReplayBufferError(f"{path} does not describe a selfreplay-fast replay buffer (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ReplayBufferError(
            f"{path} has replay-buffer format version {version!r}; this selfreplay-fast reads version {FORMAT_VERSION}"
        )
    return metadata


def read_shard(directory: str, entry: dict, *, verify: bool = True) -> Dict[str, torch.Tensor]:
    path = os.path.join(directory, entry["file"])
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ReplayBufferError(f"cannot read shard {path}: {exc}") from exc
    if verify:
        digest = sha256_bytes(data)
        if digest != entry["sha256"]:
            raise ReplayBufferError(
                f"checksum mismatch for {path}: metadata.json records sha256 {entry['sha256']}, the file has {digest} "
                "(the shard is corrupt or was modified; regenerate it)"
            )
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ReplayBufferError(f"shard {path} is not a valid safetensors file: {exc}") from exc
    missing = [name for name in _TENSOR_NAMES if name not in tensors]
    if missing:
        raise ReplayBufferError(f"shard {path} lacks tensors {missing}")
    return tensors


class ShardedBufferWriter:
    """The resumable, shard-by-shard writing of a buffer directory (``generate_replay`` and
    ``build_teacher_cache`` both write through it).

    On construction it creates ``out_dir`` if needed and reads the buffer already there: a directory
    holding something else is refused, and so is a buffer whose ``metadata[settings_key]`` differs from
    ``settings`` (another producer, or the same one with other settings). The shards it lists are
    verified against their sha256 (a resumed run builds on them) and, with ``keep_done``, their tensors
    are kept in ``done_tensors``. :meth:`write_shard` then writes the next shard and, after it, the
    progress ``metadata.json`` (``metadata`` plus the shard list and counts; ``complete`` once
    ``num_shards`` shards are written), so the metadata only ever lists whole shards.

    ``producer`` names the caller in error messages.
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
        try:
            existing = read_metadata(out_dir)
        except ReplayBufferError as exc:
            raise ValueError(f"out_dir {out_dir} holds something that is not a replay buffer: {exc}") from exc
        self.out_dir = out_dir
        self.settings_key = settings_key
        self.metadata = dict(metadata)
        self.shard_size = shard_size
        self.num_shards = num_shards
        self.entries: List[dict] = []
        self.done_tensors: List[Dict[str, torch.Tensor]] = []
        if existing is None:
            leftovers = [name for name in os.listdir(out_dir) if not name.startswith(".")]
            if leftovers:
                raise ValueError(
                    f"out_dir {out_dir} is not empty and holds no replay buffer ({leftovers[:3]}...); use an empty directory"
                )
        else:
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
            for entry in existing.get("shards", []):  # a resumed run builds on these: verify them now
                tensors = read_shard(out_dir, entry, verify=True)
                if keep_done:
                    self.done_tensors.append(tensors)
                self.entries.append(entry)

    @property
    def num_done_shards(self) -> int:
        return len(self.entries)

    @property
    def num_done_sequences(self) -> int:
        return sum(e["num_sequences"] for e in self.entries)

    @property
    def complete(self) -> bool:
        return len(self.entries) >= self.num_shards

    def write_progress(self, *, extra_metadata: Optional[dict] = None) -> None:
        """Write ``metadata.json`` for the shards written so far (atomically)."""
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
        if self.complete:
            raise ValueError(f"all {self.num_shards} shards of {self.out_dir} are written already")
        entry = write_shard(self.out_dir, len(self.entries), tensors)
        if entry_extra:
            entry.update(entry_extra)
        self.entries.append(entry)
        self.write_progress(extra_metadata=extra_metadata)  # metadata last: it only lists whole shards
        return entry


# --------------------------------------------------------------------------------------------------
# The buffer
# --------------------------------------------------------------------------------------------------


_ROW_TENSORS = ("input_ids", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob")


def _iter_batches(rows, lengths, seq_len, batch_size, *, shuffle, seed, drop_last, device, trim, teacher_dtype,
                  start=0, stride=1):
    """The training batches of a buffer (see :meth:`ReplayBuffer.batches`), in-memory or lazy alike:
    ``rows(idx, width)`` returns the ``_ROW_TENSORS`` of the sequences ``idx``, cut to ``width``."""
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


class _TrainingBatches:
    """``batches`` and ``num_batches`` of both buffer kinds; a subclass has ``lengths``, ``seq_len``, ``__len__``
    and ``_rows(idx, width)``: the ``_ROW_TENSORS`` of the sequences ``idx``, cut to ``width``."""

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
        return _iter_batches(self._rows, self.lengths, self.seq_len, batch_size, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, device=device, trim=trim, teacher_dtype=teacher_dtype,
                             start=start, stride=stride)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


class ReplayBuffer(_TrainingBatches):
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
        return ReplayBuffer(
            self.input_ids[idx, :width], lengths, self.teacher_ids[idx, :width], self.teacher_logprobs[idx, :width],
            self.teacher_tail_logprob[idx, :width], vocab_size=self.vocab_size, mode=self.mode,
            pad_token_id=self.pad_token_id, metadata=self.metadata,
        )

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

        return cls(
            torch.cat([pad(b.input_ids, first.pad_token_id) for b in buffers]),
            torch.cat([b.lengths for b in buffers]),
            torch.cat([pad(b.teacher_ids, -1) for b in buffers]),
            torch.cat([pad(b.teacher_logprobs, 0.0) for b in buffers]),
            torch.cat([pad(b.teacher_tail_logprob, float("-inf")) for b in buffers]),
            vocab_size=first.vocab_size, mode=first.mode, pad_token_id=first.pad_token_id,
            metadata=metadata if metadata is not None else first.metadata,
        )

    # -- validation -------------------------------------------------------------------------------

    def validate(self, *, chunk_sequences: int = 1024) -> "ReplayBuffer":
        """Check the teacher values once, so training can skip per-batch checks. Raises ValueError.

        Checks: ids in [-1, V); no duplicate id within a row; finite log-probs on used slots; the
        recorded mass of a row (plus the tail mass in mode "tail") at most 1 + 1e-3; tail never NaN or
        positive beyond the tolerance; tokens in [0, V); rows past a sequence's end carry no teacher.
        """
        vocab = self.vocab_size
        limit = math.log1p(MASS_TOLERANCE)
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
                mass = torch.logaddexp(mass, tail)
            if (mass > limit).any():
                raise ValueError(f"teacher_logprobs: expected the mass of a row to be at most 1 + {MASS_TOLERANCE} {where}")
            if (torch.isnan(tail) | (tail > limit)).any():
                raise ValueError(f"teacher_tail_logprob: expected a log-probability <= 0 (or -inf), never NaN {where}")
        return self

    def _rows(self, idx, width):
        return {name: getattr(self, name)[idx, :width] for name in _ROW_TENSORS}

    # -- persistence ------------------------------------------------------------------------------

    def _tensors(self, sl=slice(None)) -> Dict[str, torch.Tensor]:
        lengths = self.lengths[sl]
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        return {
            "input_ids": self.input_ids[sl, :width],
            "lengths": lengths,
            "teacher_ids": self.teacher_ids[sl, :width],
            "teacher_logprobs": self.teacher_logprobs[sl, :width],
            "teacher_tail_logprob": self.teacher_tail_logprob[sl, :width],
        }

    def describe(self) -> dict:
        """The metadata fields that describe this buffer's content (merged over ``self.metadata``)."""
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            vocab_size=self.vocab_size,
            k=self.k,
            mode=self.mode,
            pad_token_id=self.pad_token_id,
            logprob_dtype=str(self.teacher_logprobs.dtype).replace("torch.", ""),
        )
        return meta

    def save(self, directory: str, *, shard_size: int = 4096, overwrite: bool = False) -> None:
        """Write the buffer to ``directory`` as safetensors shards of ``shard_size`` sequences.

        Shards are written first (atomically), ``metadata.json`` last, so an interrupted save never
        looks like a complete buffer. Refuses a directory that already holds a buffer unless ``overwrite``.
        """
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        old = read_metadata(directory)
        if old is not None and not overwrite:
            raise FileExistsError(f"{directory} already holds a replay buffer; pass overwrite=True to replace it")
        shards = [
            write_shard(directory, index, self._tensors(slice(start, start + shard_size)))
            for index, start in enumerate(range(0, len(self), shard_size))
        ]
        meta = self.describe()
        meta.update(
            shards=shards,
            shard_size=shard_size,
            num_sequences=len(self),
            num_tokens=self.num_tokens,
            num_teacher_rows=self.num_teacher_rows,
            complete=True,
        )
        write_metadata(directory, meta)
        if old is not None:
            keep = {s["file"] for s in shards}
            for entry in old.get("shards", []):
                if entry["file"] not in keep:
                    path = os.path.join(directory, entry["file"])
                    if os.path.exists(path):
                        os.unlink(path)

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
        directory, meta = _open_metadata(directory, expected_vocab_size, allow_incomplete)
        vocab = meta.get("vocab_size")
        mode, pad_token_id = meta.get("mode", "tail"), meta.get("pad_token_id", 0)
        parts = []
        for entry in meta.get("shards", []):
            t = read_shard(directory, entry, verify=verify_checksums)
            if t["lengths"].numel() != entry.get("num_sequences"):
                raise ReplayBufferError(
                    f"shard {entry['file']} holds {t['lengths'].numel()} sequences, metadata.json says {entry.get('num_sequences')}"
                )
            parts.append(
                cls(t["input_ids"], t["lengths"], t["teacher_ids"], t["teacher_logprobs"], t["teacher_tail_logprob"],
                    vocab_size=vocab, mode=mode, pad_token_id=pad_token_id)
            )
        listed = sum(entry.get("num_sequences", 0) for entry in meta.get("shards", []))
        if meta.get("num_sequences") != listed:
            raise ReplayBufferError(
                f"metadata.json of {directory} says {meta.get('num_sequences')} sequences but its shards hold {listed}"
            )
        meta_only = {key: value for key, value in meta.items() if key != "shards"}
        if parts:
            buffer = cls.concat(parts, metadata=meta_only)
        else:
            k = int(meta.get("k", 1))
            dtype = LOGPROB_DTYPES.get(meta.get("logprob_dtype", "float32"), torch.float32)
            buffer = cls(torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                         torch.zeros(0, 1, k, dtype=torch.int32), torch.zeros(0, 1, k, dtype=dtype),
                         torch.zeros(0, 1, dtype=dtype), vocab_size=vocab, mode=mode, pad_token_id=pad_token_id,
                         metadata=meta_only)
        if validate:
            buffer.validate()
        return buffer

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


# --------------------------------------------------------------------------------------------------
# Lazy, memory-bounded reading of a buffer on disk
# --------------------------------------------------------------------------------------------------


def _open_metadata(directory, expected_vocab_size: Optional[int], allow_incomplete: bool) -> "tuple[str, dict]":
    """The checks ``ReplayBuffer.load`` and ``ReplayBuffer.open`` share: a buffer directory with readable
    metadata, the expected vocabulary, complete unless ``allow_incomplete``."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no replay buffer at {directory}: not a directory")
    meta = read_metadata(directory)
    if meta is None:
        raise FileNotFoundError(f"no replay buffer at {directory}: {METADATA_FILE} is missing")
    vocab = meta.get("vocab_size")
    if expected_vocab_size is not None:
        if isinstance(expected_vocab_size, bool) or not isinstance(expected_vocab_size, int) or expected_vocab_size < 1:
            raise ValueError(f"expected_vocab_size must be a positive int or None, got {expected_vocab_size!r}")
        if vocab != expected_vocab_size:
            raise ReplayBufferError(
                f"the replay buffer at {directory} was made for a vocabulary of {vocab} tokens "
                f"(model {meta.get('model_name')!r}), but expected_vocab_size is {expected_vocab_size}: "
                "its teacher ids index another vocabulary; regenerate the buffer with this model"
            )
    if not meta.get("complete", False) and not allow_incomplete:
        raise ReplayBufferError(
            f"the replay buffer at {directory} is incomplete ({len(meta.get('shards', []))} shard(s) written): "
            "rerun the generation into the same directory to finish it, or pass allow_incomplete=True"
        )
    return directory, meta


def _sha256_file(path: str, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_bytes), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ReplayBufferError(f"cannot read shard {path}: {exc}") from exc
    return digest.hexdigest()


class ShardedReplayBuffer(_TrainingBatches):
    """A replay buffer read from its directory lazily: what :meth:`ReplayBuffer.open` returns.

    Opening streams over the shards once, one shard in memory at a time: it verifies each shard's
    sha256, checks its tensors and (with ``validate``) runs :meth:`ReplayBuffer.validate` on it. After
    that only the sequence lengths (8 bytes per sequence) stay in memory. :meth:`batches` yields exactly
    the batches ``ReplayBuffer.load(directory).batches(...)`` would, for the same arguments and seed
    (same order, same padding and dtypes), reading just the rows of each batch from the shard files
    (``safetensors.safe_open`` slices; no shard is ever loaded whole). A shard file that changes after
    opening (size or mtime) is refused when a batch reads from it.
    """

    def __init__(self, directory: str, metadata: dict, entries: List[dict], shard_lengths: List[torch.Tensor],
                 shard_widths: List[int], shard_stats: List[tuple], *, k: int, logprob_dtype: torch.dtype,
                 validated: bool):
        self.directory = directory
        self.metadata = {key: value for key, value in metadata.items() if key != "shards"}
        self.vocab_size = metadata.get("vocab_size")
        self.mode = metadata.get("mode", "tail")
        self.pad_token_id = int(metadata.get("pad_token_id", 0))
        self._entries = entries
        self._widths = shard_widths
        self._stats = shard_stats
        self._k = k
        self.logprob_dtype = logprob_dtype
        self.validated = validated
        self.lengths = torch.cat(shard_lengths) if shard_lengths else torch.zeros(0, dtype=torch.int64)
        counts = [t.numel() for t in shard_lengths]
        # Sequence i lives in shard _shard_of[i], at row _row_of[i].
        self._shard_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
        starts = torch.tensor([0] + counts[:-1], dtype=torch.int64).cumsum(0) if counts else torch.zeros(0, dtype=torch.int64)
        self._row_of = torch.arange(len(self.lengths)) - starts[self._shard_of] if counts else torch.zeros(0, dtype=torch.int64)
        self.generation_stats = None

    # -- opening ----------------------------------------------------------------------------------

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
        """See :meth:`ReplayBuffer.open`."""
        directory, meta = _open_metadata(directory, expected_vocab_size, allow_incomplete)
        vocab, mode, pad = meta.get("vocab_size"), meta.get("mode", "tail"), meta.get("pad_token_id", 0)
        entries = list(meta.get("shards", []))
        listed = sum(entry.get("num_sequences", 0) for entry in entries)
        if meta.get("num_sequences") != listed:
            raise ReplayBufferError(
                f"metadata.json of {directory} says {meta.get('num_sequences')} sequences but its shards hold {listed}"
            )
        k = int(meta.get("k", 1))
        dtype = LOGPROB_DTYPES.get(meta.get("logprob_dtype", "float32"), torch.float32)
        lengths, widths, stats = [], [], []
        for index, entry in enumerate(entries):
            path = os.path.join(directory, entry["file"])
            stat = os.stat(path) if os.path.exists(path) else None
            if verify_checksums:
                digest = _sha256_file(path)
                if digest != entry["sha256"]:
                    raise ReplayBufferError(
                        f"checksum mismatch for {path}: metadata.json records sha256 {entry['sha256']}, the file has "
                        f"{digest} (the shard is corrupt or was modified; regenerate it)"
                    )
            shard = cls._load_shard(directory, entry, names=_TENSOR_NAMES if validate else ("lengths",))
            if shard["lengths"].numel() != entry.get("num_sequences"):
                raise ReplayBufferError(
                    f"shard {entry['file']} holds {shard['lengths'].numel()} sequences, metadata.json says {entry.get('num_sequences')}"
                )
            shapes = shard.pop("_shapes")
            if index == 0:
                k = shapes["teacher_ids"][2] if len(shapes["teacher_ids"]) == 3 else k
                dtype = shard.pop("_logprob_dtype", dtype)
            else:
                shard.pop("_logprob_dtype", None)
            if validate:
                try:
                    part = ReplayBuffer(shard["input_ids"], shard["lengths"], shard["teacher_ids"],
                                        shard["teacher_logprobs"], shard["teacher_tail_logprob"], vocab_size=vocab,
                                        mode=mode, pad_token_id=pad)
                    if part.k != k or part.teacher_logprobs.dtype != dtype:
                        raise ValueError(f"k={part.k} and {part.teacher_logprobs.dtype} differ from the first shard's "
                                         f"k={k} and {dtype}")
                    part.validate()
                except (TypeError, ValueError) as exc:
                    raise ReplayBufferError(f"shard {path}: {exc}") from exc
                del part
            else:
                n, width = shapes["input_ids"]
                if (shapes["teacher_ids"] != [n, width, k] or shapes["teacher_logprobs"] != [n, width, k]
                        or shapes["teacher_tail_logprob"] != [n, width]):
                    raise ReplayBufferError(f"shard {path}: tensor shapes {shapes} do not fit [S, L, k={k}]")
            lengths.append(shard["lengths"].to(torch.int64).clone())
            widths.append(int(shapes["input_ids"][1]))
            stats.append((stat.st_size, stat.st_mtime_ns) if stat is not None else None)
            del shard  # one shard in memory at a time
        return cls(directory, meta, entries, lengths, widths, stats, k=k, logprob_dtype=dtype,
                   validated=validate)

    @staticmethod
    def _load_shard(directory: str, entry: dict, names=_TENSOR_NAMES) -> Dict[str, object]:
        """Read the tensors ``names`` of one shard whole (and every tensor's shape, under ``"_shapes"``)."""
        path = os.path.join(directory, entry["file"])
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                missing = [name for name in _TENSOR_NAMES if name not in present]
                if missing:
                    raise ReplayBufferError(f"shard {path} lacks tensors {missing}")
                out: Dict[str, object] = {name: handle.get_tensor(name) for name in names}
                out["_shapes"] = {name: list(handle.get_slice(name).get_shape()) for name in _TENSOR_NAMES}
                lp_dtype = handle.get_slice("teacher_logprobs").get_dtype()
        except ReplayBufferError:
            raise
        except OSError as exc:
            raise ReplayBufferError(f"cannot read shard {path}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own error types
            raise ReplayBufferError(f"shard {path} is not a valid safetensors file: {exc}") from exc
        out["_logprob_dtype"] = {"F32": torch.float32, "F16": torch.float16}.get(lp_dtype, torch.float32)
        return out

    # -- basic properties -------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def k(self) -> int:
        return self._k

    @property
    def seq_len(self) -> int:
        """The padded length ``ReplayBuffer.load`` would give: the widest shard's."""
        return max(self._widths) if self._widths else 1

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __repr__(self) -> str:
        return (
            f"ShardedReplayBuffer({self.directory!r}, sequences={len(self)}, shards={self.num_shards}, k={self.k}, "
            f"vocab_size={self.vocab_size}, mode={self.mode!r}, tokens={self.num_tokens}, logprob_dtype={self.logprob_dtype})"
        )

    # -- whole shards -----------------------------------------------------------------------------

    def shard(self, index: int) -> ReplayBuffer:
        """Shard ``index`` as an in-memory :class:`ReplayBuffer` (trimmed to the shard's own width)."""
        self._check_unchanged(index)
        t = self._load_shard(self.directory, self._entries[index])
        return ReplayBuffer(t["input_ids"], t["lengths"], t["teacher_ids"], t["teacher_logprobs"],
                            t["teacher_tail_logprob"], vocab_size=self.vocab_size, mode=self.mode,
                            pad_token_id=self.pad_token_id, metadata=self.metadata)

    def shards(self) -> Iterator[ReplayBuffer]:
        """Yield each shard as an in-memory :class:`ReplayBuffer`, one at a time (drop each before
        asking for the next to keep a single shard in memory)."""
        for index in range(self.num_shards):
            yield self.shard(index)

    def validate(self) -> "ShardedReplayBuffer":
        """Run :meth:`ReplayBuffer.validate` over every shard, one shard in memory at a time."""
        for index in range(self.num_shards):
            part = self.shard(index)
            try:
                part.validate()
            except ValueError as exc:
                raise ReplayBufferError(f"shard {self._entries[index]['file']}: {exc}") from exc
            del part
        self.validated = True
        return self

    def _check_unchanged(self, index: int) -> None:
        path = os.path.join(self.directory, self._entries[index]["file"])
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ReplayBufferError(f"cannot read shard {path}: {exc}") from exc
        if self._stats[index] != (stat.st_size, stat.st_mtime_ns):
            raise ReplayBufferError(
                f"shard {path} changed since the buffer was opened (its checksum was verified then); reopen it"
            )

    # -- training batches -------------------------------------------------------------------------

    def _rows(self, idx: torch.Tensor, width: int) -> Dict[str, torch.Tensor]:
        """Rows ``idx`` of the (virtually concatenated) buffer, cut or padded to ``width``."""
        num = idx.numel()
        out = {
            "input_ids": torch.full((num, width), self.pad_token_id, dtype=torch.int64),
            "teacher_ids": torch.full((num, width, self.k), -1, dtype=torch.int32),
            "teacher_logprobs": torch.zeros((num, width, self.k), dtype=self.logprob_dtype),
            "teacher_tail_logprob": torch.full((num, width), float("-inf"), dtype=self.logprob_dtype),
        }
        shard_of, row_of = self._shard_of[idx], self._row_of[idx]
        for shard in shard_of.unique().tolist():
            self._check_unchanged(shard)
            positions = (shard_of == shard).nonzero()[:, 0]
            rows = row_of[positions]
            rows, order = rows.sort()
            positions = positions[order]
            # Runs of consecutive rows are read with one slice each (all of them when not shuffling).
            breaks = ((rows[1:] - rows[:-1]) != 1).nonzero()[:, 0] + 1
            bounds = [0] + breaks.tolist() + [rows.numel()]
            w = min(width, self._widths[shard])
            path = os.path.join(self.directory, self._entries[shard]["file"])
            try:
                with safe_open(path, framework="pt") as handle:
                    for name, target in out.items():
                        sl = handle.get_slice(name)
                        for a, b in zip(bounds[:-1], bounds[1:]):
                            first = int(rows[a])
                            target[positions[a:b], :w] = sl[first : first + (b - a), :w].to(target.dtype)
            except ReplayBufferError:
                raise
            except Exception as exc:
                raise ReplayBufferError(f"cannot read rows of shard {path}: {exc}") from exc
        return out
