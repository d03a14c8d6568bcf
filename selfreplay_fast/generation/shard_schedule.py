"""Which process generates which shard: data-parallel generation into one ``out_dir``.

``world_size`` processes (torchrun ranks, or any launcher that gives each process its rank) fill one
buffer directory, on one node or on many over shared storage. Shard ``i`` belongs to rank
``i % world_size`` (round robin: every rank gets the same number of shards to within one, and the ranks
work through the buffer front to back together, so a partial buffer lists a long prefix). A shard's
content depends on ``(seed, i)`` alone (:func:`shards.shard_seed`), never on the rank that produced it or
on ``world_size``: a run with any number of ranks, or resumed with another number, gives the buffer a
single process gives, shard for shard and byte for byte (same software and hardware).

The rank and world size come from the ``rank=`` / ``world_size=`` arguments, else from the environment
(``RANK`` and ``WORLD_SIZE``, which torchrun sets), else 0 and 1. The environment is read only when the
call writes to an ``out_dir``: the ranks meet there, and a torchrun job that generates a buffer in memory
on each rank keeps doing so. Pass ``world_size=1`` to generate the whole buffer in one process of a
torchrun job. How the ranks share the directory (the writer lock, merged progress, who completes the
metadata) is in ``parallel_writer.py``.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from typing import List, Optional, Tuple


def _as_int(name: str, value, source: str) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an int, got {value!r} from {source}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def resolve_rank(rank: Optional[int], world_size: Optional[int], *, out_dir, environ=None) -> Tuple[int, int]:
    """``(rank, world_size)`` of this process, checked: ``world_size >= 1`` and ``0 <= rank < world_size``,
    and ``out_dir`` given whenever ``world_size > 1``. Explicit arguments win over ``RANK``/``WORLD_SIZE``."""
    environ = os.environ if environ is None else environ
    use_environment = out_dir is not None
    if world_size is None and use_environment and environ.get("WORLD_SIZE", "") != "":
        world_size = _as_int("world_size", environ["WORLD_SIZE"], "the WORLD_SIZE environment variable")
    world_size = 1 if world_size is None else _as_int("world_size", world_size, "")
    if world_size < 1:
        raise ValueError(f"world_size must be an int >= 1 (the number of processes), got {world_size}")
    if rank is None:
        if world_size == 1:
            rank = 0
        elif use_environment and environ.get("RANK", "") != "":
            rank = _as_int("rank", environ["RANK"], "the RANK environment variable")
        else:
            raise ValueError(f"rank must be given with world_size={world_size} (this process's index, 0 to "
                             f"{world_size - 1}; torchrun sets RANK)")
    rank = _as_int("rank", rank, "")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    if world_size > 1 and out_dir is None:
        raise ValueError(f"out_dir is needed for data-parallel generation (world_size={world_size}): the ranks "
                         "write their shards into one buffer directory")
    return rank, world_size


def rank_shards(num_shards: int, rank: int, world_size: int) -> List[int]:
    """The shards rank ``rank`` of ``world_size`` generates, in the order it generates them."""
    return list(range(rank, num_shards, world_size))


def shard_num_sequences(shard: int, num_sequences: int, shard_size: int) -> int:
    """How many sequences shard ``shard`` holds (the last one may be short)."""
    return min(shard_size, num_sequences - shard * shard_size)


def progress_span(todo: List[int], num_sequences: int, shard_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(done, total)`` sequences of this process's share for its progress bar, ``todo`` being the shards
    it has left (one process: the whole buffer, resumed shards counted as done)."""
    total = sum(shard_num_sequences(s, num_sequences, shard_size)
                for s in rank_shards(-(-num_sequences // shard_size), rank, world_size))
    return total - sum(shard_num_sequences(s, num_sequences, shard_size) for s in todo), total


@contextlib.contextmanager
def rank_engine_devices(world_size: int, devices_per_rank: int = 1, environ=None):
    """While a rank builds its vLLM engine: ``CUDA_VISIBLE_DEVICES`` narrowed to the GPUs of its local
    rank (``LOCAL_RANK``, set by torchrun): ``devices_per_rank`` (its tensor-parallel size) consecutive
    ones, so that eight ranks on a node of eight GPUs get one each instead of all starting on GPU 0. The
    engine's processes are started during the build and keep that view; this process's is restored
    after. Nothing changes for one process, without ``LOCAL_RANK``, or where the launcher already gave
    each process only its own GPUs."""
    environ = os.environ if environ is None else environ
    local_rank = environ.get("LOCAL_RANK", "")
    if world_size == 1 or not local_rank.strip().isdigit():
        yield
        return
    local_rank = int(local_rank)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    else:
        ids = [part for part in visible.split(",") if part.strip()]
    mine = ids[local_rank * devices_per_rank:(local_rank + 1) * devices_per_rank]
    if len(ids) <= devices_per_rank or len(mine) < devices_per_rank:
        yield
        return
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    try:
        yield
    finally:
        if visible is None:
            environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            environ["CUDA_VISIBLE_DEVICES"] = visible
