"""Keeping a client on the live segment of its name.

A segment is *live* while its name points to its file and, if it records an owner (a
supervisor), that owner still holds OWNER_LOCK_BYTE; one made by ``create()``, or kept by a
clean stop for a warm restart, has no owner. It is *dead* once its name is removed, or points
to a new file (a supervisor that started clean), or its owner died (no one will serve or
repair it again, and the next supervisor discards it). A warm restart keeps the file and
renews the epoch: the data stays valid, only the front may have moved.

What an attached client does about it:

    reads    A watcher thread per process checks every client each CHECK_INTERVAL (a stat
             and a lock query, a few microseconds) and moves it to the new segment, or to
             "no segment" (peek raises SegmentNotFound; get asks the last known front
             first). The readers of the segment it left are diverted (Store.divert) to the
             client's current ones, so even a reference kept to the old ``peek`` reads the
             new segment. A hit pays nothing for any of this (reader.py); the price is that
             a read may come from a segment that died up to about one interval earlier,
             that is a value the cache held at that moment.
    writes   whoever removes or replaces a segment marks it retired under the write lock
             first (arena.retire); a write finding the mark before it commits is undone
             (Store.locked), then retried once on the live one or refused. A name removed
             by hand, or a segment whose owner died, is not marked: writes go on landing
             in it until the watcher's next check, like writes made just before the event.
    no seg.  every call probes for a new segment first, so one that appears is used at once.
    fork     the watcher does not survive a fork: in the child, the first read through a
             client made before the fork checks its segment and starts the child's watcher.

A segment left behind stays mapped for RETIRE_GRACE (a read already past its group lookup
may still be copying from it), then is closed, which also gives a removed segment's memory
back to the system once every process has let go of it.
"""

import logging
import os
import threading
import time
import weakref

from .arena import probe
from .errors import SegmentIncompatible, SegmentNotFound
from .store import Store

log = logging.getLogger("shmcache")

CHECK_INTERVAL = 0.1      # seconds between two checks of a client's segment
RETIRE_GRACE = 2.0        # seconds a segment stays mapped after its client moved on


class Attachment:
    """The segment one client uses, kept the live one of its name. Thread-safe.

    ``on_change(store or None)`` runs, under the lock, whenever ``current`` changes or the
    segment's epoch or front does. ``detour(group, key)`` is where the readers of a segment
    this attachment left go instead (the client's current readers)."""
    current = None            # the live Store, or None while the name has no live segment
    closed = False

    def __init__(self, store, on_change, detour):
        self.name = store.arena.name
        self.front = None               # (host, port) last read from a live segment
        self.epoch = None
        self.problem = None             # why current is None: an exception to raise again
        self._on_change = on_change
        self._detour = detour
        self._lock = threading.Lock()   # guards every attribute above and _retired
        self._retired = []              # [(monotonic time to close it at, Store)]
        with self._lock:
            self._adopt(store)
        _register(self)

    def unavailable(self):
        """A fresh exception saying why there is no segment to use."""
        problem = self.problem or SegmentNotFound(f"no live segment {self.name!r}")
        return type(problem)(str(problem))

    # -- checking -----------------------------------------------------------------------------

    def refresh(self):
        """Check the segment now and move to the live one of the name. True if there is one."""
        ensure_watcher()                    # a forked child's first check starts its watcher
        with self._lock:
            if self.closed:
                return False
            store = self.current
            if store is None:
                return self._find_live()
            try:
                store.check_current()
            except OSError as exc:          # SegmentNotFound, or the check itself failed
                self._leave(store, exc)
                return self._find_live()
            store.undivert()                # diverted by a fork (see _after_fork_in_child)
            front = store.arena.front()
            if store.arena.epoch != self.epoch or (front is not None and front != self.front):
                # A warm restart (new epoch, same file), or the owner recorded its front
                # since: the data stands, connections to the front must be made again.
                self._note(store)
                self._on_change(store)
            return True

    def _find_live(self):
        state = probe(self.name)
        if state is None or not state.usable:
            return False                    # the problem recorded on leaving still holds
        try:
            store = Store.attach(self.name)
        except (SegmentNotFound, SegmentIncompatible) as exc:
            self.problem = exc
            return False
        try:
            store.verify_identity = True
            store.check_current()           # the probe and the attach may have seen two files
            store.start_counting()
        except OSError as exc:
            store.close(keep_counts=False)
            self.problem = exc if isinstance(exc, SegmentNotFound) else SegmentNotFound(
                f"segment {self.name!r} cannot be used: {exc}")
            return False
        self._adopt(store)
        log.info("segment %s: attached to the new segment", self.name)
        return True

    def _adopt(self, store):
        store.verify_identity = True
        store.undivert()
        self.current, self.problem = store, None
        self._note(store)
        self._on_change(store)

    def _note(self, store):
        self.epoch = store.arena.epoch
        self.front = store.arena.front() or self.front

    def _leave(self, store, reason):
        # The client's readers first, then the divert: a reader that picked up the old
        # ones before the switch reads old memory (still mapped), one that picked them up
        # after the divert goes to the new ones; none can bounce between the two.
        self.current = None
        self.problem = reason if isinstance(reason, SegmentNotFound) else SegmentNotFound(
            f"segment {self.name!r} cannot be checked: {reason}")
        self._on_change(None)
        store.divert(self._detour)
        self._retired.append((time.monotonic() + RETIRE_GRACE, store))
        log.info("segment %s: %s", self.name, self.problem)

    def close_retired(self, now):
        """Close the segments left more than RETIRE_GRACE ago."""
        with self._lock:
            due = [store for when, store in self._retired if when <= now]
            self._retired = [(when, store) for when, store in self._retired if when > now]
        for store in due:
            store.close(keep_counts=False)

    def close(self, detour):
        """Divert every reader to ``detour``, unmap everything. Idempotent."""
        with self._lock:
            self.closed = True
            stores = [store for _when, store in self._retired]
            current, self.current, self._retired = self.current, None, []
        _unregister(self)
        if current is not None:
            current.divert(detour)
            current.close()
        for store in stores:
            store.divert(detour)
            store.close(keep_counts=False)

    # -- fork ---------------------------------------------------------------------------------

    def _after_fork_in_child(self):
        self._lock = threading.Lock()       # a thread of the parent may have held it
        if self.current is not None and not self.closed:
            self.current.divert(self._check_then_read)

    def _check_then_read(self, group, key):
        """The first read in a forked child: check now (which starts this process's watcher)."""
        self.refresh()                      # undiverts the segment if it is still live
        return self._detour(group, key)


# -- the watcher: one daemon thread per process, for every attachment ------------------------

_attachments = weakref.WeakSet()    # open attachments of this process; guarded by _watch_lock
_watch_lock = threading.Lock()      # replaced in a forked child
_watcher_pid = 0                    # the process whose watcher thread runs; 0 = none


def _register(attachment):
    with _watch_lock:
        _attachments.add(attachment)
    ensure_watcher()


def _unregister(attachment):
    with _watch_lock:
        _attachments.discard(attachment)


def ensure_watcher():
    """Start this process's watcher thread unless it runs (cheap when it does)."""
    global _watcher_pid
    pid = os.getpid()
    if _watcher_pid == pid:
        return
    with _watch_lock:
        if _watcher_pid != pid:
            _watcher_pid = pid
            threading.Thread(target=_watch, name="shmcache-segment-watch", daemon=True).start()


def _watch():
    global _watcher_pid
    while True:
        time.sleep(CHECK_INTERVAL)
        with _watch_lock:
            attachments = list(_attachments)
            if not attachments:             # under the lock: _register cannot slip in between
                _watcher_pid = 0
                return
        now = time.monotonic()
        for attachment in attachments:
            try:
                attachment.refresh()
                attachment.close_retired(now)
            except Exception:               # keep watching the others; say what went wrong
                log.exception("segment %s: checking it failed", attachment.name)


def _after_fork_in_child():
    global _watch_lock, _watcher_pid
    _watch_lock = threading.Lock()
    _watcher_pid = 0
    for attachment in list(_attachments):
        attachment._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
