"""The writer of one rank of a data-parallel generation (``shard_schedule.py`` says who writes what).

Several processes write one buffer directory at once, so what the single writer
(``ShardedBufferWriter``) does alone is shared out:

* **The writer lock, shared.** Every rank holds the directory's ``.lock`` shared (``dir_lock.py``) from
  opening to closing: ranks run side by side, and an exclusive writer (a single-process
  ``generate_replay``, ``build_teacher_cache``, ``ReplayBuffer.save``) fails at once while any rank
  runs, as a rank fails while one of those runs.
* **Merged progress.** ``metadata.json`` is only ever rewritten under a second lock (``.merge.lock``,
  waited for, held for one read-modify-write): a rank reads the file, adds its new shard and writes it
  back (atomically), so no rank's progress is lost to another's. The format lists shards 0..n-1 in order
  (``buffer_files.check_metadata``), and ranks finish out of order: shards written beyond the first
  missing one are recorded under ``"out_of_order_shards"`` until the gap fills, then move into
  ``"shards"``. ``generation_stats`` is the sum of the written shards' counters.
* **Completion.** The merge that fills the last gap writes the final metadata (``complete: true``, the
  out-of-order list gone): whichever rank finishes last, with nothing to wait for. A rank whose shards
  are done returns; the buffer is complete once every rank has returned.
* **Claims.** Before generating shard ``i`` a rank takes ``.claim-<i>.lock`` (not waited for) and checks
  under the merge lock that ``i`` is not written yet: two processes never generate one shard, even when a
  rank is started twice, or a rerun with another ``world_size`` overlaps a run still going.
* **Death and resume.** A rank killed at any point (kill -9 included) loses only the shard it was
  generating: its locks go with the process, its temporaries are hidden files that the last rank to
  close (or the next exclusive writer) removes, and a rerun, with any ``world_size``, one process
  included, generates exactly the shards neither list holds. Each rank verifies the sha256 of the written
  shards of its own share when it opens (every written shard is some rank's share).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Dict, List, Optional

import torch

from ..buffer_files import (
    _SHA256, ReplayBufferError, parse_shard_file_name, read_metadata, read_shard, remove_stale_temporaries,
    shard_generation, write_metadata, write_shard,
)
from ..dir_lock import DirectoryLock, DirectoryLockedError
from ..replay_buffer import FORMAT_VERSION, SAMPLED_FIELD, check_same_run
from .decode_loop import GenerationStats
from .shard_schedule import rank_shards

OUT_OF_ORDER_FIELD = "out_of_order_shards"
MERGE_LOCK = ".merge.lock"
_CLAIM_LOCK = re.compile(r"\.claim-\d{5,}\.lock")
_SHARED_LOCK_WAIT_S = 5.0  # a rank that closes last holds .lock exclusively for a few ms


def claim_lock_name(index: int) -> str:
    return f".claim-{index:05d}.lock"


class ParallelShardWriter:
    """One rank's writer: the counterpart of ``ShardedBufferWriter`` (same constructor arguments, plus
    ``num_sequences``, ``rank`` and ``world_size``; ``todo_shards``, ``claim``, ``write_shard``, ``close``)."""

    def __init__(self, out_dir, settings_key: str, settings: dict, metadata: dict, shard_size: int, num_shards: int,
                 *, num_sequences: int, rank: int, world_size: int, producer: str):
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.metadata = dict(metadata)
        self.shard_size, self.num_shards, self.num_sequences = shard_size, num_shards, num_sequences
        self.rank, self.world_size = rank, world_size
        self.purpose = f"{producer} (data-parallel rank {rank} of {world_size})"
        self._generation = 0
        self._claim: Optional[DirectoryLock] = None
        self._claimed: Optional[int] = None
        self._lock = self._take_shared_lock()
        try:
            with self._merge_lock():
                try:
                    existing = read_metadata(out_dir)
                except ReplayBufferError as exc:
                    raise ReplayBufferError(f"out_dir {out_dir} holds something that is not a replay buffer, or a "
                                            f"damaged one: {exc}") from exc
                check_same_run(out_dir, existing, settings_key, settings, producer, num_shards)
                if existing is None:
                    self._write_metadata({})  # claim the directory before the first shard
                    written = {}
                else:
                    self._generation = shard_generation(existing) or 0
                    if existing["format_version"] != self.metadata.get("format_version", FORMAT_VERSION):
                        # As ShardedBufferWriter: a run begun by an older selfreplay-fast finishes in its format.
                        self.metadata.update(format_version=existing["format_version"],
                                             **{SAMPLED_FIELD: bool(existing.get(SAMPLED_FIELD, False))})
                    written = self._written(existing)
            mine = rank_shards(num_shards, rank, world_size)
            for index in mine:  # this rank's written shards: verified, as a single writer verifies all
                if index in written:
                    read_shard(out_dir, written[index], existing, verify=True)
            self.todo_shards: List[int] = [index for index in mine if index not in written]
        except BaseException:
            self.close()
            raise

    # -- locks ------------------------------------------------------------------------------------

    def _take_shared_lock(self) -> DirectoryLock:
        deadline = time.monotonic() + _SHARED_LOCK_WAIT_S
        while True:
            lock = DirectoryLock(self.out_dir, purpose=self.purpose, shared=True)
            try:
                return lock.acquire()
            except DirectoryLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextlib.contextmanager
    def _merge_lock(self):
        lock = DirectoryLock(self.out_dir, purpose=self.purpose, name=MERGE_LOCK).acquire(wait=True)
        try:
            yield
        finally:
            lock.release()

    def claim(self, index: int) -> bool:
        """Take shard ``index`` for this process: False when another live process is generating it or it
        is written already (skip it then)."""
        self._check_open()
        if self._claimed is not None:
            raise RuntimeError(f"shard {self._claimed} is claimed and not written yet")
        claim = DirectoryLock(self.out_dir, purpose=self.purpose, name=claim_lock_name(index))
        try:
            claim.acquire()
        except DirectoryLockedError:
            return False
        with self._merge_lock():
            written = index in self._written(read_metadata(self.out_dir))
        if written:
            claim.release()
            return False
        self._claim, self._claimed = claim, index
        return True

    # -- writing ----------------------------------------------------------------------------------

    def write_shard(self, tensors: Dict[str, torch.Tensor], *, entry_extra: Optional[dict] = None,
                    extra_metadata: Optional[dict] = None) -> dict:
        """Write the claimed shard, then merge it into ``metadata.json``; returns its metadata entry."""
        self._check_open()
        if self._claimed is None:
            raise RuntimeError("claim a shard before writing it")
        index = self._claimed
        entry = write_shard(self.out_dir, index, tensors, generation=self._generation, metadata=self.metadata)
        if entry_extra:
            entry.update(entry_extra)
        with self._merge_lock():
            written = self._written(read_metadata(self.out_dir))
            written[index] = entry
            self._write_metadata(written, extra_metadata)  # metadata last: it only lists whole shards
        self._claim.release()
        self._claim, self._claimed = None, None
        self.todo_shards = [s for s in self.todo_shards if s != index]
        return entry

    def _written(self, metadata: dict) -> Dict[int, dict]:
        """Every written shard's entry by index: those listed and those written out of order."""
        written = {index: entry for index, entry in enumerate(metadata["shards"])}
        extra = metadata.get(OUT_OF_ORDER_FIELD, [])
        if not isinstance(extra, list):
            raise ReplayBufferError(f"{self.out_dir}: field {OUT_OF_ORDER_FIELD!r} of metadata.json must be a list")
        for entry in extra:
            parsed = parse_shard_file_name(entry.get("file")) if isinstance(entry, dict) else None
            if (parsed is None or parsed[1] != self._generation or not len(written) <= parsed[0] < self.num_shards
                    or parsed[0] in written or not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]))):
                raise ReplayBufferError(f"{self.out_dir}: an entry of {OUT_OF_ORDER_FIELD!r} in metadata.json is not "
                                        "a shard of this buffer (the file was changed); use a fresh directory")
            written[parsed[0]] = entry
        return written

    def _write_metadata(self, written: Dict[int, dict], extra_metadata: Optional[dict] = None) -> None:
        listed = 0
        while listed in written:
            listed += 1
        entries = [written[index] for index in range(listed)]
        meta = dict(self.metadata)
        meta.update(extra_metadata or {})
        meta.update(
            shards=entries,
            shard_size=self.shard_size,
            num_sequences=sum(e["num_sequences"] for e in entries),
            num_tokens=sum(e["num_tokens"] for e in entries),
            complete=listed >= self.num_shards,
        )
        stats = [entry["stats"] for entry in written.values() if isinstance(entry.get("stats"), dict)]
        if stats:
            meta["generation_stats"] = _summed_stats(stats)
        ahead = [written[index] for index in sorted(written) if index > listed]
        if ahead:
            meta[OUT_OF_ORDER_FIELD] = ahead
        write_metadata(self.out_dir, meta)

    # -- closing ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._lock.held:
            raise RuntimeError(f"the writer of {self.out_dir} is closed")

    def close(self) -> None:
        """Release this rank's locks (idempotent); the last rank to close tidies the directory."""
        if self._claim is not None:
            self._claim.release()
            self._claim, self._claimed = None, None
        self._lock.release(on_last=self._tidy)

    def _tidy(self) -> None:
        # Only while this process holds .lock alone: no rank runs, so every temporary is stale and no one
        # holds a merge or claim lock (they are taken only under the shared .lock).
        remove_stale_temporaries(self.out_dir)
        for name in os.listdir(self.out_dir):
            if name == MERGE_LOCK or _CLAIM_LOCK.fullmatch(name):
                try:
                    os.unlink(os.path.join(self.out_dir, name))
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "ParallelShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summed_stats(records: List[dict]) -> dict:
    total = GenerationStats()
    names = [name for name in GenerationStats.__dataclass_fields__]
    for record in records:
        total.add(GenerationStats(**{name: record[name] for name in names if name in record}))
    return total.as_dict()
