"""The writer lock on a buffer directory (issue #10, item 5): a second writer fails at once naming the
holder, a holder killed with SIGKILL leaves a lock the next writer takes, and every writer (generate_replay,
build_teacher_cache, ReplayBuffer.save) releases it when it returns or raises."""

import errno
import multiprocessing
import os
import signal
import socket
import time

import pytest

import selfreplay_fast as sf
from selfreplay_fast import dir_lock
from selfreplay_fast import teacher_cache as tc
from selfreplay_fast.dir_lock import DirectoryLock, DirectoryLockedError
from selfreplay_fast.replay_buffer import ReplayBufferError, ShardedBufferWriter
from test_replay_buffer import make_buffer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or dir_lock.fcntl is None, reason="POSIX fork and flock")
FORK = multiprocessing.get_context("fork") if hasattr(os, "fork") else None


def open_writer(out_dir, top_k):
    """What generate_replay does first: take the directory, claim it with progress metadata."""
    meta = {"format": sf.replay_buffer.FORMAT_NAME, "format_version": 1, "vocab_size": 37, "k": top_k,
            "mode": "tail", "pad_token_id": 0, "logprob_dtype": "float32", "generation": {"top_k": top_k}}
    writer = ShardedBufferWriter(out_dir, "generation", {"top_k": top_k}, meta, 4, 2, producer="generate_replay")
    if not writer.entries:
        writer.write_progress()
    return writer


def racer(out_dir, top_k, barrier, results, release):
    barrier.wait()
    start = time.monotonic()
    try:
        writer = open_writer(out_dir, top_k)
    except DirectoryLockedError as exc:
        results.put(("locked", os.getpid(), str(exc), time.monotonic() - start))
        return
    results.put(("holds", os.getpid(), "", time.monotonic() - start))
    release.wait(60)
    writer.close()


def test_two_writers_racing_on_one_directory_one_fails_at_once_naming_the_holder(tmp_path):
    out = str(tmp_path / "replay")
    barrier, results, release = FORK.Barrier(2), FORK.Queue(), FORK.Event()
    procs = [FORK.Process(target=racer, args=(out, top_k, barrier, results, release)) for top_k in (4, 8)]
    for p in procs:
        p.start()
    try:
        outcomes = sorted(results.get(timeout=60) for _ in procs)
    finally:
        release.set()
        for p in procs:
            p.join(60)
    (held, holder, _, _), (locked, _, message, waited) = outcomes
    assert (held, locked) == ("holds", "locked")
    assert f"pid {holder}@{socket.gethostname()}, since " in message and "generate_replay" in message
    assert waited < 5  # at once, not after waiting for the holder
    assert [p.exitcode for p in procs] == [0, 0]
    assert not os.path.exists(os.path.join(out, ".lock"))  # the holder removed it when it finished


def hold_until_killed(out_dir, ready):
    writer = open_writer(out_dir, 4)  # noqa: F841  (held: a collected writer lets go of its lock)
    ready.set()
    time.sleep(120)


def test_a_holder_killed_with_sigkill_leaves_a_lock_the_next_writer_takes(tmp_path):
    out = str(tmp_path / "replay")
    ready = FORK.Event()
    holder = FORK.Process(target=hold_until_killed, args=(out, ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(DirectoryLockedError, match=f"pid {holder.pid}@"):
            open_writer(out, 4)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    assert os.path.exists(os.path.join(out, ".lock"))  # stale: nobody removed it
    writer = open_writer(out, 4)  # the kernel dropped the dead holder's flock
    with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}@"):
        make_buffer().save(out, overwrite=True)
    writer.close()
    writer.close()  # idempotent
    assert not os.path.exists(os.path.join(out, ".lock"))
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_progress()


def test_writers_fail_at_once_on_a_held_directory_and_release_when_they_raise(tmp_path, monkeypatch):
    from test_teacher_cache import corpus, tiny_model

    model, seqs, out = tiny_model(), corpus(count=5), tmp_path / "cache"
    out.mkdir()
    with DirectoryLock(out, purpose="a test"):
        start = time.monotonic()
        with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}@.*a test"):
            sf.build_teacher_cache(model, seqs, 3, out, shard_size=2, progress=False)
        with pytest.raises(DirectoryLockedError, match="a test"):
            make_buffer().save(str(out))
        assert time.monotonic() - start < 5
    assert os.listdir(out) == []  # nothing was written

    def dying(*args):
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(tc, "_teacher_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        sf.build_teacher_cache(model, seqs, 3, out, shard_size=2, progress=False)
    DirectoryLock(out, purpose="after the interrupted writer").acquire().release()  # it let go
    monkeypatch.undo()
    sf.build_teacher_cache(model, seqs, 3, out, shard_size=2, progress=False)
    assert ".lock" not in os.listdir(out)


def test_generate_replay_releases_the_lock_when_it_returns_or_raises(tmp_path):
    from test_generation import build_model

    model, out = build_model("llama", 0), str(tmp_path / "replay")
    kwargs = dict(num_sequences=4, max_new_tokens=3, top_k=2, batch_size=2, shard_size=2, out_dir=out, progress=False)

    def stop(shard, out_dir):
        with pytest.raises(DirectoryLockedError):  # held while generating
            DirectoryLock(out_dir, purpose="a test").acquire()
        raise KeyboardInterrupt("stopped after the first shard")

    with pytest.raises(KeyboardInterrupt):
        sf.generate_replay(model, on_shard_written=stop, **kwargs)
    DirectoryLock(out, purpose="a test").acquire().release()
    assert len(sf.generate_replay(model, **kwargs)) == 4
    assert ".lock" not in os.listdir(out)


def test_a_lock_file_that_is_a_link_is_refused(tmp_path):
    out = tmp_path / "buf"
    out.mkdir()
    (tmp_path / "elsewhere").write_text("x")
    os.symlink(tmp_path / "elsewhere", out / ".lock")
    with pytest.raises(ReplayBufferError, match="symbolic link"):
        make_buffer().save(str(out))
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_a_file_system_without_locks_warns_and_writes(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(dir_lock.fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="does not support locks"):
        make_buffer().save(str(tmp_path / "buf"))
    assert len(sf.ReplayBuffer.load(str(tmp_path / "buf"))) == 7
