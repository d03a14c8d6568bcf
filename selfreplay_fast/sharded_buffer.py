"""Lazy, memory-bounded reading of a buffer directory: :class:`ShardedReplayBuffer`, what
``ReplayBuffer.open`` returns."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional

import torch
from safetensors import safe_open

from .buffer_batches import TrainingBatches
from .buffer_files import (
    LOGPROB_DTYPES,
    SAMPLED_FIELD,
    ReplayBufferError,
    check_ragged_lengths,
    check_shard_digest,
    check_shard_header,
    check_shard_shapes,
    open_buffer_metadata,
    sha256_shard,
    shard_path,
    shard_stat,
    shard_tensor_names,
)
from .buffer_layout import scatter_ragged, unpack_ids, unpack_v2

if TYPE_CHECKING:
    from .replay_buffer import ReplayBuffer


class ShardedReplayBuffer(TrainingBatches):
    """A replay buffer read from its directory lazily: what :meth:`ReplayBuffer.open` returns.

    Opening streams over the shards once, one shard in memory at a time: it verifies each shard's
    sha256, checks its tensors and (with ``validate``) runs :meth:`ReplayBuffer.validate` on it. After
    that only the sequence lengths (8 bytes per sequence) stay in memory. :meth:`batches` yields exactly
    the batches ``ReplayBuffer.load(directory).batches(...)`` would, for the same arguments and seed
    (same order, same padding and dtypes), reading just the rows of each batch from the shard files
    (``safetensors.safe_open`` slices; no shard is ever loaded whole).

    A shard file that changes after opening is refused when a batch reads from it. What is compared, at
    every read, is the file's identity as ``os.lstat`` gives it: device, inode, size, mtime and ctime. A
    replaced file has another inode; a file rewritten in place has a new ctime, which (unlike the mtime)
    no user can set back, so restoring the mtime does not hide a rewrite. The one gap is a rewrite within
    the same tick of the file system's clock (a few ms) as the opening.
    """

    def __init__(self, directory: str, metadata: dict, entries: List[dict], shard_lengths: List[torch.Tensor],
                 shard_widths: List[int], shard_stats: List[tuple], *, k: int, logprob_dtype: torch.dtype,
                 validated: bool):
        self.directory = directory
        self._metadata_with_shards = metadata
        self.metadata = {key: value for key, value in metadata.items() if key != "shards"}
        self.vocab_size = metadata["vocab_size"]
        self.mode = metadata["mode"]
        self.pad_token_id = int(metadata["pad_token_id"])
        self._entries = entries
        self._widths = shard_widths
        self._stats = shard_stats
        self._k = k
        self.logprob_dtype = logprob_dtype
        self.format_version = metadata["format_version"]
        self.has_sampled_logprobs = bool(metadata.get(SAMPLED_FIELD, False))
        # Where each sequence starts in its shard's flat (format v2) tensors.
        self._offsets = [torch.cumsum(t.to(torch.int64), 0) - t.to(torch.int64) for t in shard_lengths]
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
        from .replay_buffer import ReplayBuffer  # replay_buffer imports this module

        directory, meta = open_buffer_metadata(directory, expected_vocab_size, allow_incomplete)
        vocab, mode, pad = meta["vocab_size"], meta["mode"], meta["pad_token_id"]
        entries = list(meta["shards"])
        k, dtype = meta["k"], LOGPROB_DTYPES[meta["logprob_dtype"]]
        lengths, widths, stats = [], [], []
        for entry in entries:
            path = shard_path(directory, entry)
            # Taken before the checksum is computed, so that a change while verifying is seen later.
            stat = shard_stat(directory, entry)
            if verify_checksums:
                check_shard_digest(directory, entry, sha256_shard(directory, entry))
            shard = cls._load_shard(directory, entry, meta, whole=validate)
            if validate:
                try:
                    ReplayBuffer.from_tensors(shard, vocab_size=vocab, mode=mode, pad_token_id=pad).validate()
                except (TypeError, ValueError) as exc:
                    raise ReplayBufferError(f"shard {path}: {exc}") from exc
            lengths.append(shard["lengths"].to(torch.int64).clone())
            widths.append(entry["seq_len"])
            stats.append(stat)
            del shard  # one shard in memory at a time
        return cls(directory, meta, entries, lengths, widths, stats, k=k, logprob_dtype=dtype, validated=validate)

    @staticmethod
    def _load_shard(directory: str, entry: dict, metadata: dict, whole: bool = True) -> Dict[str, torch.Tensor]:
        """One shard's padded tensors (``whole``) or only its ``lengths``, its header, shapes, k and dtypes
        checked against ``metadata``."""
        path = shard_path(directory, entry)
        names = shard_tensor_names(metadata)
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                check_shard_header(path, handle.metadata(), metadata)  # first: a header names another format
                missing = [name for name in names if name not in present]
                if missing:
                    raise ReplayBufferError(f"shard {path} lacks tensors {missing}")
                slices = {name: handle.get_slice(name) for name in present}
                shapes = {name: list(sl.get_shape()) for name, sl in slices.items()}
                dtypes = {name: _DTYPES.get(sl.get_dtype()) for name, sl in slices.items()}
                check_shard_shapes(path, shapes, entry, metadata, dtypes=dtypes)
                out = {name: handle.get_tensor(name) for name in (names if whole else ("lengths",))}
        except ReplayBufferError:
            raise
        except OSError as exc:
            raise ReplayBufferError(f"cannot read shard {path}: {exc.strerror or exc}") from exc
        except Exception as exc:  # safetensors raises its own error types
            raise ReplayBufferError(f"shard {path} is not a valid safetensors file: {exc}") from exc
        if metadata["format_version"] >= 2:
            check_ragged_lengths(path, out["lengths"], entry)
            if whole:
                out = unpack_v2(out, metadata["vocab_size"], metadata["k"], metadata["pad_token_id"])
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
        from .replay_buffer import ReplayBuffer  # replay_buffer imports this module

        self._check_unchanged(index)
        t = self._load_shard(self.directory, self._entries[index], self._metadata_with_shards)
        return ReplayBuffer.from_tensors(t, vocab_size=self.vocab_size, mode=self.mode,
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
        if self._stats[index] != shard_stat(self.directory, self._entries[index]):
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
        if self.has_sampled_logprobs:
            out[SAMPLED_FIELD] = torch.zeros((num, width), dtype=torch.float32)
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
                    if self.format_version >= 2:
                        self._read_ragged(handle, shard, rows, positions, bounds, out)
                        continue
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

    def _read_ragged(self, handle, shard: int, rows, positions, bounds, out) -> None:
        """Format v2: each run of consecutive rows is one slice of the shard's flat tensors."""
        offsets, lengths = self._offsets[shard], self.lengths[self._shard_of == shard]
        for a, b in zip(bounds[:-1], bounds[1:]):
            first, last = int(rows[a]), int(rows[b - 1])
            start, stop = int(offsets[first]), int(offsets[last] + lengths[last])
            run_lengths = lengths[first : last + 1]
            flat = {name: handle.get_slice(name)[start:stop] for name in handle.keys() if name != "lengths"}
            flat["teacher_ids"] = unpack_ids(flat["teacher_ids"], flat.get("teacher_ids_high"), self.vocab_size, self.k)
            flat["input_ids"] = flat.pop("tokens").to(torch.int64)
            width = out["input_ids"].shape[1]
            for name, target in out.items():
                fill = self.pad_token_id if name == "input_ids" else _FILL[name]
                target[positions[a:b]] = scatter_ragged(flat[name].to(target.dtype), run_lengths, width, fill)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "U16": torch.uint16, "U8": torch.uint8}
_FILL = {"teacher_ids": -1, "teacher_logprobs": 0.0, "teacher_tail_logprob": float("-inf"),
         SAMPLED_FIELD: 0.0}
