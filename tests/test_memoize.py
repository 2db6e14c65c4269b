"""Client.memoize: keys, serialization, exceptions, and one call per arguments for every
process of the host (threads, asyncio tasks, other processes), with and without a
supervisor."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import shmcache
from conftest import REPO, Supervised, wait_for_waiters

pytestmark = pytest.mark.integration

# A process of an app: memoizes compute(x) in group "memo", calls it `count` times at once
# (threads, or asyncio tasks cancelling `cancel` of them), and prints what each got.
# compute() records each run in the `calls` file, then waits for the `gate` file.
CHILD = r"""
import asyncio, os, sys, threading, time, shmcache
name, calls, gate, mode, count, cancel = sys.argv[1:7]
count, cancel = int(count), int(cancel)
cache = shmcache.connect(name=name, timeout=120)

def record():
    with open(calls, "a") as log:
        log.write(f"{os.getpid()}\n")

def gate_open():
    return os.path.exists(gate)

deadline = time.monotonic() + 120
if mode == "async":
    @cache.memoize("memo")
    async def compute(x):
        record()
        while not gate_open() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return {"x": x, "squared": x * x}
else:
    @cache.memoize("memo")
    def compute(x):
        record()
        while not gate_open() and time.monotonic() < deadline:
            time.sleep(0.005)
        if mode == "raise":
            raise ValueError(f"cannot compute {x}")
        return {"x": x, "squared": x * x}

print("key", compute.key(42), flush=True)
outcomes = []

def call():
    try:
        outcomes.append(repr(compute(42)))
    except Exception as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")

if mode == "async":
    async def main():
        tasks = [asyncio.ensure_future(compute(42)) for _ in range(count)]
        for _ in range(5):
            await asyncio.sleep(0)          # every task is now awaiting the one call
        for task in tasks[:cancel]:
            task.cancel()
        print("waiting", flush=True)
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            outcomes.append(type(result).__name__ if isinstance(result, BaseException)
                            else repr(result))
    asyncio.run(main())
else:
    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    print("waiting", flush=True)
    for thread in threads:
        thread.join()
for outcome in sorted(set(outcomes)):
    print("outcome", outcomes.count(outcome), outcome, flush=True)
"""


@pytest.fixture
def memo_cache(segment_name):
    with shmcache.create(segment_name, "16MiB", groups={"memo": "4MiB"}) as cache:
        yield cache


def run_children(processes, tmp_path, name, mode, count, cancel=0, children=3):
    """Start `children` app processes calling compute(42) at once; open the gate once
    every other process waits for the one running it; {outcome: count} over all, and
    the number of runs."""
    calls, gate = tmp_path / "calls", tmp_path / "gate"
    procs = [processes.python(CHILD, name, calls, gate, mode, count, cancel,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(children)]
    keys = {proc.stdout.readline().split()[1] for proc in procs}
    assert len(keys) == 1, f"processes disagree on the key: {keys}"
    for proc in procs:
        assert proc.stdout.readline().strip() == "waiting"
    with shmcache.connect(name=name) as observer:
        # all but the loading process
        wait_for_waiters(observer._live_store(), "memo", keys.pop(), children - 1)
    gate.write_text("open")
    outcomes = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        for line in out.splitlines():
            _, count_, outcome = line.split(" ", 2)
            outcomes[outcome] = outcomes.get(outcome, 0) + int(count_)
    return outcomes, calls.read_text().split()


def test_threads_of_three_processes_run_the_function_once(memo_cache, processes, tmp_path):
    outcomes, runs = run_children(processes, tmp_path, memo_cache.name, "sync", 8)
    assert outcomes == {"{'x': 42, 'squared': 1764}": 24}
    assert len(runs) == 1


def test_a_thousand_tasks_in_three_processes_run_it_once_cancelled_ones_stop_only_waiting(
        memo_cache, processes, tmp_path):
    outcomes, runs = run_children(processes, tmp_path, memo_cache.name, "async", 1000,
                                  cancel=10)
    assert outcomes == {"{'x': 42, 'squared': 1764}": 2970, "CancelledError": 30}
    assert len(runs) == 1


def test_an_exception_reaches_every_waiter_and_is_not_cached(memo_cache, processes,
                                                               tmp_path):
    outcomes, runs = run_children(processes, tmp_path, memo_cache.name, "raise", 4)
    assert len(runs) == 1
    # The process that ran it: its own exception, in each of its threads; the others: a
    # LoadError naming it.
    assert outcomes == {"ValueError: cannot compute 42": 4,
                        "LoadError: __main__.compute raised ValueError: cannot compute 42": 8}
    assert memo_cache.stats()["groups"]["memo"]["items"] == 0


def test_calls_with_the_same_arguments_share_one_result(memo_cache):
    runs = []

    @memo_cache.memoize("memo", ttl=60)
    def area(width, height=2, *rest, scale=1, **options):
        runs.append((width, height, rest, scale, options))
        return width * height * scale

    assert area(3) == 6
    assert area(width=3) == 6 and area(3, 2) == 6 and area(3, scale=1) == 6
    assert len(runs) == 1
    assert area(3, 4) == 12 and area(3.0) == 6.0 and area(3, 2, 9) == 6
    assert area(3, tag={"b": 1, "a": [1, 2]}) == area(3, tag={"a": [1, 2], "b": 1})
    assert len(runs) == 5
    assert area.__name__ == "area" and area.__wrapped__ is not area
    key = area.key(3)
    assert key.startswith("test_memoize.test_calls_with_the_same_arguments_share_one_result."
                          "<locals>.area:")
    expire = memo_cache._live_store().get_with_expiry("memo", key)[1]
    assert expire is not None and 0 < expire - time.time() <= 60
    with pytest.raises(TypeError, match="area\\(\\).*missing a required argument"):
        area()


def test_invalidate_drops_one_entry(memo_cache):
    runs = []

    @memo_cache.memoize("memo")
    def double(x):
        runs.append(x)
        return 2 * x

    assert double(1) == 2 and double(2) == 4
    assert double.invalidate(1) is True
    assert double.invalidate(1) is False
    assert double(1) == 2 and double(2) == 4
    assert runs == [1, 2, 1]


# Keys must not depend on the process (hash seeds, set order, addresses): this is the
# key of every deployment's first call, fixed here so that a change to the encoding fails.
KEY_CODE = r"""
import sys, enum, uuid, datetime, decimal, shmcache
cache = shmcache.connect(name=sys.argv[1])
class Colour(enum.Enum):
    RED = "red"
def report(user, tags, weights, when, colour, ids, amount, blob=b"\x00\xff"):
    pass
report.__module__, report.__qualname__ = "app.reports", "report"
memoized = cache.memoize("memo")(report)
print(memoized.key("ada", {"zeta", "alpha", "mu"}, {"b": 2.5, "a": (1, None, True)},
                   datetime.date(2026, 11, 29), Colour.RED,
                   frozenset({uuid.UUID(int=7), uuid.UUID(int=3)}), decimal.Decimal("1.10")))
"""
GOLDEN_KEY = "app.reports.report:"


def test_keys_are_the_same_in_every_process_and_release(memo_cache):
    keys = set()
    for seed in ("0", "1", "12345"):
        out = subprocess.run([sys.executable, "-c", KEY_CODE, memo_cache.name], cwd=REPO,
                             env={**os.environ, "PYTHONHASHSEED": seed}, text=True,
                             capture_output=True, timeout=60, check=True).stdout
        keys.add(out.strip())
    assert len(keys) == 1
    key = keys.pop()
    assert key == GOLDEN_KEY + "728fd23fec8ada96e2d597f8f4319cdc", key


def test_arguments_it_cannot_encode_need_a_key_function(memo_cache):
    class User:
        def __init__(self, uid):
            self.uid = uid

    @memo_cache.memoize("memo")
    def name(user):
        return f"user {user.uid}"

    with pytest.raises(TypeError, match="cannot build a cache key from a .*User value.*key="):
        name(User(1))
    runs = []

    @memo_cache.memoize("memo", key=lambda user: user.uid)
    def named(user):
        runs.append(user.uid)
        return f"user {user.uid}"

    assert named(User(7)) == "user 7" and named(User(7)) == "user 7"
    assert named(User(8)) == "user 8"
    assert runs == [7, 8]
    with pytest.raises(shmcache.InvalidArgument):
        memo_cache.memoize("memo", ttl=-1)
    with pytest.raises(shmcache.InvalidArgument):
        memo_cache.memoize("memo", serializer=object())
    with pytest.raises(shmcache.InvalidArgument):
        memo_cache.memoize("memo", key="uid")


def test_serializer_option_and_results_too_large_to_cache(memo_cache):
    @memo_cache.memoize("memo", serializer=json)
    def listed(n):
        return list(range(n))

    assert listed(3) == [0, 1, 2]
    assert memo_cache.peek("memo", listed.key(3)) == b"[0, 1, 2]"
    runs = []

    @memo_cache.memoize("memo")
    def big(n):
        runs.append(n)
        return b"x" * n

    assert big(5 << 20) == b"x" * (5 << 20)          # over the group's budget: not cached
    assert big(5 << 20) == b"x" * (5 << 20)
    assert runs == [5 << 20, 5 << 20]
    with pytest.raises(shmcache.UnknownGroup):
        memo_cache.memoize("no-such-group")(len)("abc")


def test_threads_of_one_process_share_the_call_and_its_exception(memo_cache):
    started, release = threading.Event(), threading.Event()
    runs = []

    @memo_cache.memoize("memo")
    def slow(x):
        runs.append(x)
        started.set()
        assert release.wait(60)
        if x < 0:
            raise ValueError("negative")
        return x

    for argument, expected in ((5, 5), (-1, ValueError)):
        started.clear()
        release.clear()
        results = []

        def call(argument=argument):
            try:
                results.append(slow(argument))
            except ValueError as exc:
                results.append(type(exc))
        first = threading.Thread(target=call)
        first.start()
        assert started.wait(60)
        others = [threading.Thread(target=call) for _ in range(7)]
        for thread in others:
            thread.start()
        deadline = time.monotonic() + 60
        while slow._in_flight[slow.key(argument)].joined < 7:
            assert time.monotonic() < deadline, "the threads never joined the call"
            time.sleep(0.001)
        release.set()
        for thread in [first, *others]:
            thread.join(60)
        assert results == [expected] * 8
    assert runs == [5, -1]
    with pytest.raises(ValueError):                   # not cached: runs again
        release.set()
        slow(-1)
    assert runs == [5, -1, -1]


def test_async_functions_in_one_process(memo_cache):
    runs = []

    @memo_cache.memoize("memo")
    async def fetch(x):
        runs.append(x)
        await asyncio.sleep(0.01)
        if x == "bad":
            raise LookupError("no such thing")
        return x.upper()

    async def main():
        results = await asyncio.gather(*[fetch("a") for _ in range(50)])
        assert results == ["A"] * 50
        errors = await asyncio.gather(*[fetch("bad") for _ in range(5)],
                                      return_exceptions=True)
        assert all(isinstance(e, LookupError) for e in errors)
        assert await fetch("a") == "A"
    asyncio.run(main())
    asyncio.run(main())                                 # a second loop: same cache
    assert runs == ["a", "bad", "bad"]
    assert fetch.invalidate("a")


def test_with_a_supervisor(tmp_path):
    supervisor = Supervised(tmp_path, ["--workers", "1"]).start()
    try:
        with shmcache.connect(name=supervisor.name) as cache:
            cache.define_group("memo", "1MiB")
            runs = []

            @cache.memoize("memo", ttl=30)
            def total(*values):
                runs.append(values)
                return sum(values)

            assert total(1, 2, 3) == 6 and total(1, 2, 3) == 6
            assert runs == [(1, 2, 3)]
            with shmcache.connect(name=supervisor.name) as other:
                assert other.peek("memo", total.key(1, 2, 3)) is not None
    finally:
        supervisor.stop()
        supervisor.cleanup()


def test_a_result_computed_across_a_clear_of_its_group_is_not_kept(memo_cache):
    runs = []

    @memo_cache.memoize("memo")
    def read_setting(name):
        runs.append(name)
        if len(runs) == 1:
            memo_cache.clear("memo")            # the group is flushed while it computes
        return f"{name} v{len(runs)}"

    assert read_setting("colour") == "colour v1"         # answered, but not kept
    assert memo_cache.peek("memo", read_setting.key("colour")) is None
    assert read_setting("colour") == "colour v2"
    assert read_setting("colour") == "colour v2"         # kept: no clear this time
    assert runs == ["colour", "colour"]
