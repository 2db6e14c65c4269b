"""Randomised model test: several real processes hammer overlapping keys with mixed
operations (remembered not-founds and group clears among them); every read must be a whole
value some process wrote for that key, or absent, and group budgets must hold at every
moment anyone looks."""

import multiprocessing
import random
import time

import pytest

import shmcache

from conftest import reader_kind
from valuecheck import check_value, make_value

# Each test runs with the C reader, then with the Python one.
pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("both_readers")]

PROCESSES = 4
OPS = 20_000
KEYS = 300
BUDGETS = {"small": 60_000, "large": 3_000_000}
SIZES = [0, 10, 100, 1000, 3000, 9000]


def worker(name, writer, results, kind):
    rng = random.Random(writer)
    cache = shmcache.connect(name=name)
    writes, reads, problems = set(), [], []
    if reader_kind(cache._live_store()) != kind:
        problems.append(f"reads with the {reader_kind(cache._live_store())} reader, not {kind}")
    counts = dict.fromkeys(["set", "hit", "miss", "delete", "not_found", "clear"], 0)
    try:
        for op in range(OPS):
            group = rng.choice(("small", "large"))
            key = f"key-{rng.randrange(KEYS)}"
            roll = rng.random()
            if roll < 0.40:
                value = make_value(group, key, writer, op, rng.choice(SIZES))
                ttl = rng.choice((None, None, 0.02, 5.0))
                cache.set(group, key, value, ttl=ttl)
                writes.add((group, key, writer, op))
                counts["set"] += 1
            elif roll < 0.85:
                value = cache.peek(group, key)
                if value is None:
                    counts["miss"] += 1
                else:
                    try:
                        reads.append((group, key, *check_value(group, key, value)))
                        counts["hit"] += 1
                    except ValueError as exc:
                        problems.append(str(exc))
            elif roll < 0.90:           # a remembered not-found: never read as a value
                cache._live_store().remember_not_found(group, key, rng.choice((0.02, 5.0)))
                counts["not_found"] += 1
            elif roll < 0.9995:
                cache.delete(group, key)
                counts["delete"] += 1
            else:
                cache.clear(group)
                counts["clear"] += 1
            if op % 250 == 0:
                for group_name, info in cache.stats()["groups"].items():
                    if info["bytes"] > info["cache_bytes"]:
                        problems.append(f"{group_name} over budget: {info}")
    except Exception as exc:           # report, do not hang the parent
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        cache.close()
    results.put((writer, writes, reads, problems, counts))


def test_processes_never_read_a_value_nobody_wrote(make_cache, segment_name, both_readers):
    cache = make_cache(memory="6MiB", max_item_size="16KiB", groups=BUDGETS)
    assert reader_kind(cache._store) == both_readers
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=worker, args=(segment_name, writer, results, both_readers))
             for writer in range(PROCESSES)]
    for proc in procs:
        proc.start()
    over_budget = []
    outcomes = []
    deadline = time.monotonic() + 240
    while len(outcomes) < PROCESSES and time.monotonic() < deadline:
        for group, info in cache.stats()["groups"].items():    # the parent watches too
            if info["bytes"] > info["cache_bytes"]:
                over_budget.append((group, info))
        try:
            outcomes.append(results.get(timeout=0.05))
        except Exception:
            pass
    for proc in procs:
        proc.join(timeout=30)
    assert len(outcomes) == PROCESSES, "a worker did not finish"
    assert not over_budget

    written = set()
    for _writer, writes, _reads, problems, _counts in outcomes:
        assert not problems, problems[:5]
        written |= writes
    total = dict.fromkeys(outcomes[0][4], 0)
    for _writer, _writes, reads, _problems, counts in outcomes:
        for read in reads:
            assert read in written, f"read a value nobody wrote: {read}"
        for name, count in counts.items():
            total[name] += count
    print("totals", total)
    assert total["hit"] > 5_000 and total["miss"] > 1_000, total
    stats = cache.stats()
    assert sum(info["evictions"] for info in stats["groups"].values()) > 0
    cache._store.audit()
