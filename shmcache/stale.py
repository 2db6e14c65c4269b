"""Serving stale values while they reload: a group's ``stale=SECONDS`` window.

After an entry's ttl ends, for the group's stale window more a get answers the old value at
once (a *stale hit*) and starts a *refresh*: a reload in the background that nobody waits
for. The refresh goes where a miss's load would go (the host-wide singleflight on the owner,
the owner's peer route elsewhere), so however many processes serve the stale value, the
getter runs once per host; if a load of the key is already in flight on the host, no other
starts. A refresh that fails leaves the stale value in place, served on until the window
ends (stale-if-error), and counts in ``refresh_errors``; the getter's own failures are
logged by its group's rate-limited FailureLog. A refresh the getter answers with "no such
key" removes the stale value. Past the window the entry is gone as any expired one is.

Plain reads (``peek``, the lock-free ``Store.get``) never see stale values: they do not
start refreshes. The stale-aware read is ``Store.get_stale``, looked at only after a plain
read missed, so a fresh hit costs what it always did.

What a stale hit and a refresh count, and the refresh itself: node.py (``stale_or_miss``,
``refresh``), where the Get path is counted. Here: the window's arithmetic, the headers,
and the refreshes in flight.
"""

import math
import threading
import time


STALE_HEADER = ("X-Cache", "stale")


def is_stale(expiry, now=None):
    """True if a value with this expiry (Unix time, None = never) is past it."""
    return expiry is not None and expiry <= (time.time() if now is None else now)


def stale_headers(ttl, expiry, now=None):
    """The HTTP headers of an answer with a value of expiry ``expiry``: none for a fresh
    one; for a stale one ``X-Cache: stale`` and ``Age`` (whole seconds since it was loaded,
    taken as the group's ``ttl`` plus the time since it expired)."""
    now = time.time() if now is None else now
    if not is_stale(expiry, now):
        return ()
    return (STALE_HEADER, ("Age", str(math.floor((ttl or 0) + now - expiry))))


class Refreshes:
    """One process's refreshes in flight: at most one per key at a time. ``submit(fn)``
    runs ``fn`` in the background (a worker's pool; by default a daemon thread each)."""

    def __init__(self, submit=None):
        self._submit = submit or _thread
        self._lock = threading.Lock()           # guards _running
        self._running = set()

    def start(self, name, work):
        """Run ``work()`` in the background unless a refresh named ``name`` is running;
        True if started."""
        with self._lock:
            if name in self._running:
                return False
            self._running.add(name)

        def run():
            try:
                work()
            finally:
                with self._lock:
                    self._running.discard(name)
        try:
            self._submit(run)
        except BaseException:                   # no thread or pool to run it (exiting)
            with self._lock:
                self._running.discard(name)
            raise
        return True

    def __len__(self):
        return len(self._running)


def _thread(function):
    threading.Thread(target=function, name="shmcache-refresh", daemon=True).start()
