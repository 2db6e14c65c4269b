"""The part of a worker's epoll loop that is not HTTP: the epoll object, the eventfd
that wakes it from other threads, timers (``call_later``) and other descriptors watched
on it (``watch``), for code running on the loop's own thread (peer_fetch.py fetches from
owners so). httpserver.HttpServer is this loop serving HTTP connections; its ``serve``
runs the loop.
"""

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time

log = logging.getLogger("shmcache.http")


class Timer:
    """A ``call_later`` that has not run yet; ``cancel()`` keeps it from running."""
    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def cancel(self):
        self.function = None


class EpollLoop:
    """An epoll object, its wake eventfd, its timers and its watched descriptors."""

    def __init__(self):
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._watched = {}                   # fd -> callback(events), see ``watch``
        self._timers = []                    # heap of (when, sequence, Timer)
        self._compact_at = 4096              # heap size that makes call_later drop cancelled
        self._sequence = itertools.count()
        self._loop_thread = None             # ident of the thread running the loop
        self._soon = collections.deque()     # functions other threads left for the loop

    # -- the loop for others (its own thread only) ---------------------------------------------

    def in_loop(self):
        """True on the thread running the loop."""
        return threading.get_ident() == self._loop_thread

    def watch(self, fd, events, callback):
        """Call ``callback(events)`` on the loop when ``fd`` has any of ``events``."""
        self._watched[fd] = callback
        self._epoll.register(fd, events)

    def rewatch(self, fd, events):
        """Change the events ``fd`` is watched for."""
        self._epoll.modify(fd, events)

    def unwatch(self, fd):
        """Stop watching ``fd`` (before closing it)."""
        if self._watched.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_soon_threadsafe(self, function):
        """Run ``function()`` on the loop's thread soon; callable from any thread. (A
        deque's append and popleft are atomic: the loop takes what is there when it wakes,
        and a function appended after it looked wakes it again.)"""
        self._soon.append(function)
        self._wake()

    def _run_soon(self):
        soon = self._soon
        while soon:
            function = soon.popleft()
            try:
                function()
            except Exception:
                log.exception("a function called soon failed")

    def call_later(self, delay, function):
        """Run ``function()`` on the loop in ``delay`` seconds; a Timer to cancel it."""
        timer = Timer(function)
        timers = self._timers
        if len(timers) >= self._compact_at:     # most are cancelled deadlines: drop them
            timers[:] = [entry for entry in timers if entry[2].function is not None]
            heapq.heapify(timers)
            self._compact_at = max(4096, 2 * len(timers))
        heapq.heappush(timers, (time.monotonic() + delay, next(self._sequence), timer))
        return timer

    def _run_timers(self, now):
        timers = self._timers
        while timers and timers[0][0] <= now:
            function = heapq.heappop(timers)[2].function
            if function is not None:
                try:
                    function()
                except Exception:
                    log.exception("timer failed")

    def _wake(self):
        try:
            os.eventfd_write(self._wake_fd, 1)
        except BlockingIOError:          # counter full: the loop is awake anyway
            pass

