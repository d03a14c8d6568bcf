"""``ReplayStream``: the endless replay batches of a training loop, resumable and split over ranks.

A loop that zips its task batches with one pass of ``buffer.batches(...)`` silently ends when the pass ends.
``buffer.stream(batch_size)`` never runs dry: pass p over the buffer is shuffled with ``seed + p``, and the
passes follow one another. Under data parallelism rank r of N takes the batches r, r + N, r + 2N, ... of
that one stream, so the ranks together replay exactly what one process would. ``state_dict()`` /
``load_state_dict()`` (the convention of torchdata's ``StatefulDataLoader``) resume it exactly: save the
state with the model's checkpoint, load it into a fresh stream, and the next batch is the one that would
have come next.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional

import torch

STATE_FORMAT = 1


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class ReplayStream:
    """An endless iterator of a buffer's training batches (see :meth:`ReplayBuffer.stream`).

    ``position`` counts the batches of the single-process stream that all ranks have taken together (every
    rank takes one per ``next``); ``passes`` the completed passes over the buffer.
    """

    def __init__(self, buffer, batch_size: int, *, seed: int = 0, device=None, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, trim: bool = True, teacher_dtype: Optional[torch.dtype] = None,
                 position: int = 0):
        self.buffer = buffer
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {self.world_size}), got {rank}")
        self.per_pass = buffer.num_batches(self.batch_size, drop_last=drop_last)
        if self.per_pass == 0:
            raise ValueError(f"the buffer holds {len(buffer)} sequences: no batch of {self.batch_size} "
                             f"{'(drop_last=True)' if drop_last else ''}".rstrip())
        self.device = device
        self._batch_kwargs = dict(drop_last=drop_last, trim=trim, teacher_dtype=teacher_dtype)
        self._restart(_check_int("position", position, 0))

    def _restart(self, position: int) -> None:
        # A multiple of the ranks, so that every rank resumes in step (exact when the world size is unchanged).
        self._start = position - position % self.world_size
        self._taken = 0
        self._iter = None

    @property
    def position(self) -> int:
        return self._start + self._taken * self.world_size

    @property
    def passes(self) -> int:
        return self.position // self.per_pass

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._batches()
        batch = next(self._iter)
        self._taken += 1
        return batch

    def _batches(self):
        index = self._start + self.rank  # this rank's next batch in the single-process stream
        while True:
            replay_pass, first = divmod(index, self.per_pass)
            for batch in self.buffer.batches(self.batch_size, shuffle=True, seed=self.seed + replay_pass,
                                             device=self.device, start=first, stride=self.world_size,
                                             **self._batch_kwargs):
                yield batch
                index += self.world_size
            # index is now this rank's first batch of the next pass (or further, when N > batches per pass)

    # -- checkpointing ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_sequences": len(self.buffer), "drop_last": self._batch_kwargs["drop_last"]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of ``state_dict()``, also from another world size: the position is then
        rounded down to a multiple of this one's ranks). A state of another stream is refused, naming what
        differs."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state must be a ReplayStream.state_dict() (format {STATE_FORMAT}), got {state!r}")
        ours = self.state_dict()
        differing = [f"{key}: {state.get(key)!r} there, {ours[key]!r} here"
                     for key in ("seed", "batch_size", "num_sequences", "drop_last") if state.get(key) != ours[key]]
        if differing:
            raise ValueError(f"state belongs to another replay stream ({'; '.join(differing)})")
        self._restart(_check_int("state['position']", state.get("position"), 0))
