"""Small combinators of concurrent.futures Futures, for answers that come later."""

import threading
from concurrent.futures import Future


def then(future, transform):
    """A Future of ``transform(future)``, called when ``future`` is done. ``transform`` may
    return a Future itself: its outcome is passed on."""
    result = Future()

    def finish(done):
        try:
            value = transform(done)
        except BaseException as exc:          # transform bugs surface as a 500 upstream
            result.set_exception(exc)
            return
        if isinstance(value, Future):
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
    result = Future()
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
