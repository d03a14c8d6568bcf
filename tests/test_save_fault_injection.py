"""Fault injection into ReplayBuffer.save(overwrite=True) (issue #10, item 3): a child process SIGKILLs
itself at its n-th file-system call (open, write, fsync, rename, unlink, close), for every n from the
first call to past the last, so every phase of the save is hit. After each kill the directory must load
as either the old or the new complete buffer, tensor for tensor; the next save must clean up after it."""

import multiprocessing
import os
import signal

import pytest

from selfreplay_fast import dir_lock
from selfreplay_fast.replay_buffer import ReplayBuffer, parse_shard_file_name
from test_replay_buffer import make_buffer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or dir_lock.fcntl is None, reason="POSIX fork and kill")
FORK = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
# Every os-level call save() makes that changes or syncs the file system; the kill comes just before the n-th.
FAULT_POINTS = ("open", "pwrite", "ftruncate", "fsync", "replace", "rename", "unlink", "close")
OLD = (make_buffer(num_seq=7, seed=1), 3)  # (buffer, shard_size): 3 shards
NEW = (make_buffer(num_seq=10, seed=2), 4)  # 3 shards of other sizes and content


def save_and_die_at(path, buffer, shard_size, n):
    calls = [0]

    def dying(function):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return call

    for name in FAULT_POINTS:
        setattr(os, name, dying(getattr(os, name)))
    buffer.save(path, shard_size=shard_size, overwrite=True)
    os._exit(0)


def same(a, b):
    return len(a) == len(b) and a.sequences() == b.sequences() and all(
        (getattr(a, name)[:, : b.seq_len] == getattr(b, name)[:, : a.seq_len]).all()
        for name in ("teacher_ids", "teacher_logprobs", "teacher_tail_logprob"))


def killed_save(path, target, n):
    child = FORK.Process(target=save_and_die_at, args=(path, *target, n))
    child.start()
    child.join(60)
    assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
    return child.exitcode == 0


def which_buffer(path, old, new):
    """'old' or 'new': the directory must load (and open) as one of the two complete buffers."""
    loaded = ReplayBuffer.load(path)
    assert len(ReplayBuffer.open(path)) == len(loaded)
    if same(loaded, new[0]):
        return "new"
    assert same(loaded, old[0]), "the directory loads as neither the old nor the new buffer"
    return "old"


@pytest.mark.parametrize("old_format", [2, 1], ids=["v2-over-v2", "v2-over-v1"])
def test_save_overwrite_killed_at_every_point_leaves_the_old_or_the_new_buffer(tmp_path, old_format):
    # v2-over-v1: upgrading a format-v1 buffer in place is as safe as any overwrite.
    seen = []
    for n in range(1, 200):
        path = str(tmp_path / f"kill-{n}")
        OLD[0].save(path, shard_size=OLD[1], format_version=old_format)
        finished = killed_save(path, NEW, n)
        seen.append(which_buffer(path, OLD, NEW))
        if finished:
            break
    assert finished, "the save never ran to its end"
    # every phase was hit: killed before the metadata switch (old buffer) and after it (new buffer)
    assert seen[0] == "old" and seen[-1] == "new" and "old" in seen[:-1] and "new" in seen[:-1]
    assert seen == sorted(seen, key=["old", "new"].index)  # once switched, never back
    assert len(seen) > 20


def test_repeated_killed_overwrites_of_one_directory_never_lose_a_buffer_and_leave_no_debris(tmp_path):
    path = str(tmp_path / "buf")
    OLD[0].save(path, shard_size=OLD[1])
    current, target, n, finished = OLD, NEW, 1, False
    while not finished:
        assert n < 400
        finished = killed_save(path, target, n)
        if which_buffer(path, current, target) == "new":
            current, target = target, current  # the next overwrite goes back, over this one's debris
        n += 1
    assert same(ReplayBuffer.load(path), current[0])
    current[0].save(path, shard_size=current[1], overwrite=True)  # a clean run removes what kills left
    listed = {entry["file"] for entry in ReplayBuffer.open(path)._entries}
    assert set(os.listdir(path)) == {"metadata.json"} | listed
    assert all(parse_shard_file_name(name) for name in listed)
