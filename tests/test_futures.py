"""Promise (futures.py): the light Future of the Get path, from one thread and from many."""

import threading
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

import pytest

from shmcache.futures import FUTURES, Promise, all_done, settle, then

pytestmark = pytest.mark.unit


def test_result_and_callbacks_in_order():
    promise = Promise()
    seen = []
    promise.add_done_callback(lambda done: seen.append(("first", done.result())))
    promise.add_done_callback(lambda done: seen.append(("second", done.result())))
    assert not promise.done() and seen == []
    promise.set_result(7)
    assert promise.done() and promise.result() == 7 and promise.exception() is None
    assert seen == [("first", 7), ("second", 7)]
    promise.add_done_callback(lambda done: seen.append(("late", done.result())))
    assert seen[-1] == ("late", 7)                 # added after: run at once, by the adder


def test_exception_is_raised_by_result():
    promise = Promise()
    promise.set_exception(KeyError("k"))
    assert isinstance(promise.exception(), KeyError)
    with pytest.raises(KeyError):
        promise.result()


def test_set_twice_is_refused_and_keeps_the_first():
    promise = Promise()
    promise.set_result(1)
    with pytest.raises(InvalidStateError):
        promise.set_result(2)
    with pytest.raises(InvalidStateError):
        promise.set_exception(ValueError())
    assert promise.result() == 1


def test_a_failing_callback_does_not_stop_the_others(caplog):
    promise = Promise()
    seen = []
    promise.add_done_callback(lambda done: 1 / 0)
    promise.add_done_callback(lambda done: seen.append(done.result()))
    promise.set_result("v")
    assert seen == ["v"]
    assert "callback" in caplog.text and "ZeroDivisionError" in caplog.text


def test_result_waits_for_another_thread_and_times_out():
    promise = Promise()
    with pytest.raises(TimeoutError):
        promise.result(timeout=0.05)
    started = threading.Event()

    def later():
        started.set()
        promise.set_result("there")
    waiter = ThreadPoolExecutor(1).submit(lambda: promise.result(timeout=60))
    threading.Thread(target=later).start()
    assert started.wait(60)
    assert waiter.result(timeout=60) == "there"


def test_callbacks_added_while_another_thread_sets_are_each_run_once():
    """The race the lock closes: adders on several threads against one setter. Every
    callback runs exactly once, whichever side of the set it lands on."""
    for _round in range(200):
        promise = Promise()
        counts = [0] * 40
        barrier = threading.Barrier(5)

        def add(first):
            barrier.wait()
            for index in range(first, 40, 4):
                promise.add_done_callback(
                    lambda _done, i=index: counts.__setitem__(i, counts[i] + 1))

        def setter():
            barrier.wait()
            promise.set_result(None)
        threads = [threading.Thread(target=add, args=(first,)) for first in range(4)]
        threads.append(threading.Thread(target=setter))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert counts == [1] * 40


def test_combinators_take_promises_and_pool_futures():
    with ThreadPoolExecutor(2) as pool:
        pooled = pool.submit(lambda: 20)
        assert then(pooled, lambda done: done.result() + 1).result(timeout=60) == 21
        inner = Promise()
        outer = then(Promise(), None)               # never done: nothing runs
        assert not outer.done()
        chained = then(pooled, lambda _done: inner)  # a transform that answers a promise
        assert not chained.done()
        inner.set_result("inner")
        assert chained.result(timeout=60) == "inner"
        failing = then(pooled, lambda _done: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=60)
        both = [Promise(), pool.submit(lambda: 2)]
        gathered = all_done(both)
        both[0].set_result(1)
        assert [f.result() for f in gathered.result(timeout=60)] == [1, 2]
        copy = Promise()
        source = Future()
        source.set_exception(LookupError("x"))
        settle(copy, source)
        assert isinstance(copy.exception(), LookupError)
    assert isinstance(Promise(), FUTURES) and isinstance(Future(), FUTURES)
