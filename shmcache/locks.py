"""Cross-process locks on byte ranges of the segment file (Linux open-file-description locks).

Why OFD locks (``F_OFD_SETLK[W]``):

* any process that can open the file can take them (no shared-memory futex to inherit);
* the kernel drops them when the holder's open file description goes away, so a SIGKILLed
  holder releases its locks at once;
* they belong to the open file description, not the process, so each process (and a child
  after fork) must ``os.open`` its own descriptor: an inherited descriptor shares the
  parent's description, and the two would not exclude each other. ``LockFile`` re-opens in
  the child automatically (``os.register_at_fork``).
* threads of one process share the descriptor, so they are serialised by a
  ``threading.Lock`` per lock byte first.

The byte offsets locked are lock names only; locking a byte does not touch the data there.
"""

import errno
import fcntl
import os
import struct
import threading
import weakref

_FLOCK = struct.Struct("hhqqi4x")    # struct flock on x86-64: type, whence, start, len, pid
_live_files = weakref.WeakSet()


def _flock(kind, byte):
    return _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)


class LockFile:
    """This process's descriptor on a lock file, and the byte locks taken through it."""
    fd = -1

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._thread_locks = {}          # byte -> threading.Lock; guarded by _guard
        self._guard = threading.Lock()
        _live_files.add(self)

    def _reopen_after_fork(self):
        # The inherited descriptor shares the parent's locks: drop it (closing our copy does
        # not release the parent's locks, the description lives on in the parent).
        if self.fd >= 0:
            # Through /proc: the same file even if it was renamed or unlinked meanwhile.
            inherited = self.fd
            self.fd = os.open(f"/proc/self/fd/{inherited}", os.O_RDWR | os.O_CLOEXEC)
            os.close(inherited)
        self._guard = threading.Lock()
        for lock in self._thread_locks.values():
            lock._thread_lock = threading.Lock()   # a parent thread may have held it

    def byte_lock(self, byte, spins=0):
        """The ByteLock for ``byte``; one object per byte per process. ``spins``: see
        ByteLock (the first call for a byte decides)."""
        with self._guard:
            lock = self._thread_locks.get(byte)
            if lock is None:
                lock = self._thread_locks[byte] = ByteLock(self, byte, spins)
            return lock

    def close(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)      # releases every lock this process holds through it

    def try_lock_byte(self, byte):
        """Non-blocking OFD lock of one byte, without the thread lock; True if taken."""
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, byte))
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def unlock_byte(self, byte):
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))

    def is_locked_elsewhere(self, byte):
        """True if some other open file description holds a lock on ``byte`` right now."""
        result = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
        return _FLOCK.unpack(result)[0] != fcntl.F_UNLCK


class ByteLock:
    """An exclusive lock on one byte: threads first, then processes. Not re-entrant.

    ``spins``: for a lock held a few microseconds at a time (the write lock), try that many
    times without sleeping (yielding the CPU in between) before waiting in the kernel. A
    process put to sleep by ``F_OFD_SETLKW`` is woken tens of microseconds after the lock
    is free, many times the hold; meanwhile the holder takes the lock again and again, so
    two processes setting at once did less than one alone. The kernel queue stays the
    fallback, so a holder that is slow (or preempted) costs a waiter no more than ``spins``
    failed tries."""

    def __init__(self, lock_file, byte, spins=0):
        self._file = lock_file
        self._thread_lock = threading.Lock()
        self._lock_req = _flock(fcntl.F_WRLCK, byte)
        self._unlock_req = _flock(fcntl.F_UNLCK, byte)
        self._spins = range(spins)

    def acquire(self):
        self._thread_lock.acquire()
        try:
            fd, request = self._file.fd, self._lock_req
            for _spin in self._spins:
                try:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                os.sched_yield()
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)   # retries EINTR itself
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self):
        try:
            fcntl.fcntl(self._file.fd, fcntl.F_OFD_SETLK, self._unlock_req)
        finally:
            self._thread_lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def _after_fork_in_child():
    for lock_file in list(_live_files):
        lock_file._reopen_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
