"""An exclusive, non-blocking writer lock on a buffer directory.

Every writer of a buffer directory (``ShardedBufferWriter``, so ``generate_replay`` and
``build_teacher_cache``; ``ReplayBuffer.save``) holds it while it writes: a second writer, in another
process or the same one, fails at once with a :class:`DirectoryLockedError` saying who holds the directory
(pid@host, since when, which command).

It is an ``flock`` on ``.lock`` inside the directory, which records the holder. The kernel drops the lock
when the holding process dies, however it dies (kill -9 included), so a crash never leaves the directory
locked: the stale ``.lock`` file stays behind and the next writer takes it over. A writer that finishes
removes the file.

Shared file systems: this is exactly as good as their locking. Linux NFS (v4, or v3 with lockd) maps
``flock`` onto NFS byte-range locks, which work across machines; some FUSE file systems and old NFS
setups without lockd do not lock across machines at all. Where ``flock`` is refused outright (ENOLCK,
ENOTSUP) the writer goes on unlocked with a warning. On Windows there is no lock.

Data-parallel generation (``generation/parallel_writer.py``) takes the same ``.lock`` *shared*
(``shared=True``): its ranks hold it together, so an exclusive writer still fails at once while any rank
runs, and a rank fails while an exclusive writer runs. A shared holder that releases removes the file
only when it is the last one (its upgrade to an exclusive lock succeeds), after ``on_last`` has run. The
ranks' own short critical sections use other lock files (``name=``), taken with ``wait=True``.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import time
import warnings

from .buffer_files import ReplayBufferError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOSYS}
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SHARED_RECORD_BYTES = 1024


class DirectoryLockedError(ReplayBufferError):
    """Another writer holds the buffer directory."""


class DirectoryLock:
    """``with DirectoryLock(directory, purpose="..."):`` holds the directory's writer lock (see the module
    docstring); ``acquire()`` / ``release()`` for a lifetime that is not one block."""

    def __init__(self, directory, *, purpose: str, name: str = LOCK_FILE, shared: bool = False):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, name)
        self.purpose = purpose
        self.shared = shared
        self._fd = None
        self._held = False  # True between acquire and release, also where no lock is possible

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self, *, wait: bool = False) -> "DirectoryLock":
        """Take the lock; a holder elsewhere makes it fail at once, or with ``wait`` it blocks until free."""
        if self._held:
            raise RuntimeError(f"the lock on {self.directory} is held already")
        if fcntl is None:
            self._held = True
            return self
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        # A releasing holder unlinks the file while it still holds it: a file opened before that unlink is
        # no longer the lock, so retry until the locked file is the one the path names.
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, mode)
            except OSError as exc:
                holder = _describe_holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else ""
                os.close(fd)
                if holder:
                    raise DirectoryLockedError(
                        f"{self.directory} is being written by another process ({holder}); this {self.purpose} "
                        "would corrupt its output: wait for it to finish, stop it, or use another directory"
                    ) from None
                if exc.errno in _UNSUPPORTED:
                    warnings.warn(
                        f"the file system of {self.directory} does not support locks ({exc.strerror}): "
                        f"{self.purpose} runs without protection against a second writer", RuntimeWarning,
                        stacklevel=3)
                    self._held = True
                    return self
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self._held = fd, True
                self._record_holder()
                return self
            os.close(fd)
        raise DirectoryLockedError(f"{self.directory}: could not take the writer lock (its lock file keeps changing)")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW | _CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ReplayBufferError(f"{self.path} is a symbolic link; a buffer's lock file must be a plain file") from None
            raise

    def _record_holder(self) -> None:
        command = " ".join(sys.argv)[:300] if sys.argv else "python"
        record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose, "command": command,
                  "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        data = (json.dumps(record) + "\n").encode()
        if self.shared:
            # Shared holders overwrite each other's record: one write of a fixed size replaces it whole
            # (a truncate plus a shorter write could interleave into something unreadable).
            record["command"] = record["command"][:120]
            data = json.dumps(record).encode()[:_SHARED_RECORD_BYTES - 1].ljust(_SHARED_RECORD_BYTES - 1) + b"\n"
            if os.fstat(self._fd).st_size > _SHARED_RECORD_BYTES:  # a longer record a killed writer left
                os.ftruncate(self._fd, _SHARED_RECORD_BYTES)
            os.pwrite(self._fd, data, 0)
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self, on_last=None) -> None:
        """Let go of the lock. A shared holder first tries to become the only holder: if it is, it calls
        ``on_last()`` (exclusively: no other holder can be between acquire and release) and removes the
        file; otherwise the file stays for the others."""
        fd, self._fd, self._held = self._fd, None, False
        if fd is None:
            return
        try:
            if self.shared:
                try:
                    # Never blocks; a failed conversion drops the shared lock, which is what release means.
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return
                if on_last is not None:
                    on_last()
            if os.path.samestat(os.fstat(fd), os.lstat(self.path)):
                os.unlink(self.path)  # while still locked: see acquire()
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        # An abandoned holder (e.g. a writer dropped with an exception) frees the directory when collected.
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _describe_holder(fd: int) -> str:
    """Who holds the lock, from what it recorded; only the recorded fields, each shortened."""
    # A holder records itself just after taking the lock: give one that is that moment a little time.
    for _ in range(50):
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            break
        time.sleep(0.01)
    else:
        return "which has not recorded itself"
    fields = {key: str(record.get(key, "?"))[:300] for key in ("pid", "host", "since", "purpose", "command")}
    return (f"pid {fields['pid']}@{fields['host']}, since {fields['since']}: {fields['purpose']}, "
            f"command {fields['command']!r}")
