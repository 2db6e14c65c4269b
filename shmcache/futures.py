"""Answers that come later: ``Promise`` (a light Future) and small combinators of futures.

A ``concurrent.futures.Future`` builds a Condition (and its RLock) when made and takes it at
every step: about 2 us a life, paid two or three times by each get that goes to the owner.
The Get path's own answers (peer_fetch.py, node.py, the combinators here) are Promises
instead: one plain lock, no Condition unless a thread really waits, under 1 us a life. Pool
work (``ThreadPoolExecutor.submit``) still answers with Futures; every consumer here takes
either (``FUTURES``), using only what both have: done, result, exception,
add_done_callback, set_result, set_exception.
"""

import logging
import threading
from concurrent.futures import Future, InvalidStateError

log = logging.getLogger("shmcache")


class Promise:
    """A result or an exception, set once, from any thread; callbacks run once it is set, in
    the thread that sets it (or at once, in the adder's thread, if it already is).

    The check-then-act pairs are under ``_lock``: ``add_done_callback`` appends only while
    not done, and setting swaps the callback list out in the same critical section, so a
    callback added while another thread sets the result is either in the swapped-out list
    (run by the setter) or sees done (run by the adder): never lost, never run twice. A
    thread that waits in ``result`` makes an Event under the lock; the setter takes it in
    the same critical section, so it is set after, or it sees done and does not wait."""

    __slots__ = ("_lock", "_done", "_value", "_error", "_callbacks", "_waiter")

    def __init__(self):
        self._lock = threading.Lock()
        self._done = False
        self._value = self._error = self._waiter = None
        self._callbacks = []

    def done(self):
        return self._done

    def set_result(self, value):
        with self._lock:
            if self._done:
                raise InvalidStateError(f"{self!r} is already done")
            self._value, self._done = value, True
            callbacks, self._callbacks = self._callbacks, None
            waiter = self._waiter
        self._finish(callbacks, waiter)

    def set_exception(self, error):
        with self._lock:
            if self._done:
                raise InvalidStateError(f"{self!r} is already done")
            self._error, self._done = error, True
            callbacks, self._callbacks = self._callbacks, None
            waiter = self._waiter
        self._finish(callbacks, waiter)

    def _finish(self, callbacks, waiter):
        if waiter is not None:
            waiter.set()
        for callback in callbacks:
            try:
                callback(self)
            except Exception:              # as concurrent.futures does: log, carry on
                log.exception("a Promise's callback %r failed", callback)

    def add_done_callback(self, callback):
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        self._finish((callback,), None)

    def _wait(self, timeout):
        with self._lock:
            if self._done:
                return
            if self._waiter is None:
                self._waiter = threading.Event()
            waiter = self._waiter
        if not waiter.wait(timeout):
            raise TimeoutError(f"{self!r} not done within {timeout} s")

    def result(self, timeout=None):
        """The value; raises the exception it was set with. TimeoutError if not done within
        ``timeout`` seconds (None: wait as long as it takes)."""
        if not self._done:
            self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout=None):
        if not self._done:
            self._wait(timeout)
        return self._error

    def __repr__(self):
        state = "pending" if not self._done else "failed" if self._error is not None else "done"
        return f"<Promise {state}>"


FUTURES = (Future, Promise)


def then(future, transform):
    """A Future of ``transform(future)``, called when ``future`` is done. ``transform`` may
    return a Future itself: its outcome is passed on."""
    result = Promise()

    def finish(done):
        try:
            value = transform(done)
        except BaseException as exc:          # transform bugs surface as a 500 upstream
            result.set_exception(exc)
            return
        if isinstance(value, FUTURES):
            value.add_done_callback(lambda inner: settle(result, inner))
        else:
            result.set_result(value)
    future.add_done_callback(finish)
    return result


def settle(result, done):
    """Pass the outcome of the Future ``done`` on to the Future ``result``."""
    exc = done.exception()
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(done.result())


def all_done(futures):
    """A Future of ``futures`` (a list), done when every one of them is."""
    result = Promise()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_done):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            result.set_result(futures)
    if not futures:
        result.set_result(futures)
    for future in futures:
        future.add_done_callback(one_done)
    return result
