"""Crash safety: writers SIGKILLed in the middle of an update, at chosen points and at random.
No reader may ever get a wrong or torn value, the others must carry on at once, and the
structures must come out whole."""

import multiprocessing
import os
import random
import select
import signal
import struct
import threading
import time
from pathlib import Path

import pytest

import shmcache
from shmcache.arena import _OFFSET_WRITER_PID

from conftest import reader_kind
from valuecheck import check_value, make_value

# Each test runs with the C reader, then with the Python one.
pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("both_readers")]

CHILD = str(Path(__file__).with_name("crash_child.py"))
OLD = make_value("g", "target", 1, 1, 100)
NEW = make_value("g", "target", 9, 2, 100)
NEW_RESIZED = make_value("g", "target", 9, 2, 3000)
NEW_LARGE = make_value("g", "target", 9, 2, 6000)

# operation -> (setup, values the target may have after the kill)
SCENARIOS = {
    "insert": ("empty", {None, NEW}),        # the first item of its class: a new page
    "insert_carve": ("neighbours", {None, NEW}),    # a chunk carved from a partial page
    "insert_free": ("holes", {None, NEW}),          # a chunk from a page's free list
    "rewrite": ("target", {OLD, NEW, None}),
    "resize": ("target", {OLD, NEW_RESIZED, None}),
    "evict": ("full group", {None, NEW}),
    "delete": ("target", {OLD, None}),
    "pressure": ("full arena", {None, NEW_LARGE}),
    "clear": ("many", {OLD, None}),
}
# Every journaled write of the short operations (they need fewer than 26), a spread of the
# long ones (a page reassignment or a clear makes thousands).
CASES = [(operation, point) for operation in ("insert", "rewrite", "resize", "evict", "delete")
         for point in range(1, 26)]
CASES += [(operation, point) for operation in ("insert_carve", "insert_free")
          for point in range(1, 9)]
# The new-key sets that the C writer makes itself (a partial page with room, no eviction):
# with the C reader and writer, every pause of theirs is in C; in C or in Python, they make
# six journal calls.
IN_C = ("insert_carve", "insert_free")
CASES += [(operation, point) for operation in ("pressure", "clear")
          for point in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233)]


def prepare(make_cache, setup):
    if setup == "full arena":
        cache = make_cache(memory="2MiB", max_item_size="16KiB",
                           groups={"g": 1 << 30, "keep": 1 << 20, "other": 1 << 30})
        i = 0
        while cache.stats()["slabs"]["free_pages"]:
            cache.set("other", f"filler-{i}", b"f" * 100)
            i += 1
        cache.set("other", "more", b"f" * 100)
    else:
        budget = 20 * (6 + len(OLD)) if setup == "full group" else 1 << 20
        cache = make_cache(memory="4MiB", max_item_size="16KiB",
                           groups={"g": budget, "keep": 1 << 20})
    if setup == "full group":
        for i in range(20):
            cache.set("g", f"fill{i:02d}", OLD[:len(OLD)])
    if setup in ("target", "many"):
        cache.set("g", "target", OLD)
    if setup in ("neighbours", "holes"):      # keys as long as "target", values as NEW
        for i in range(4):
            cache.set("g", f"near-{i}", b"n" * len(NEW))
    if setup == "holes":
        cache.delete("g", "near-1")
    if setup == "many":
        for i in range(200):
            cache.set("g", f"item-{i}", b"x" * 50)
    for i in range(BYSTANDERS):
        cache.set("keep", f"bystander-{i}", b"still here")
    return cache


BYSTANDERS = 8


def bystander_on_an_even_stripe(cache):
    """A bystander key whose seqlock stripe the frozen writer has not made odd. One that
    shares a stripe with the write in progress is read under the lock, so it waits, by
    design; the stripes of the keys depend on the segment's hash seeds."""
    index = cache._store.index
    gid = cache._store.group_id("keep")
    for i in range(BYSTANDERS):
        key = f"bystander-{i}"
        stripe = index._bucket(gid, key.encode()) % index.nstripes
        if not struct.unpack_from("I", index.buf, index.stripes_off + 4 * stripe)[0] & 1:
            return key
    raise AssertionError(f"all {BYSTANDERS} bystanders' stripes are odd")


def read_line(proc, timeout=60):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not report in time"
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("operation, pause_at", CASES)
def test_writer_killed_mid_update(make_cache, segment_name, processes, operation, pause_at,
                                  both_readers):
    setup, allowed = SCENARIOS[operation]
    cache = prepare(make_cache, setup)
    assert reader_kind(cache._store) == both_readers
    repairs_before = cache.stats()["repairs"]
    child = processes.python(open(CHILD).read(), segment_name, operation, pause_at,
                             stdout=-1, text=True, cwd=os.path.dirname(CHILD),
                             env={**os.environ, "PYTHONPATH": os.path.dirname(CHILD)})
    line = read_line(child)
    if operation in IN_C:           # the chunk, word 0, two ring links, the bucket, the counts
        assert (line != "completed") == (pause_at <= 6), line
    if line == "completed":
        child.wait(timeout=30)
        value = cache.peek("g", "target")
        assert value in allowed and (operation in ("delete", "clear") or value is not None)
        cache._store.audit()
        return
    assert line.startswith("paused"), line
    if operation in IN_C:
        assert line.endswith(" in C") == (both_readers == "native"), line

    if operation != "pressure":          # page reassignment may evict anything
        # A reader elsewhere is not held up by a writer frozen with the lock.
        result, key = [], bystander_on_an_even_stripe(cache)
        reader = threading.Thread(target=lambda: result.append(cache.peek("keep", key)))
        reader.start()
        reader.join(timeout=10)
        assert result == [b"still here"], "a lock-free read waited for the frozen writer"

    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    recovered = []

    def recover():                                     # repairs if the stripe was left odd
        recovered.append(cache.peek("g", "target"))
        cache.set("g", "after", b"works")
    survivor = threading.Thread(target=recover)
    survivor.start()
    survivor.join(timeout=30)                          # a lock left held would hang here
    assert len(recovered) == 1 and not survivor.is_alive(), "others hung after the kill"
    value = recovered[0]
    assert value in allowed, f"read {value!r:.80} after the kill"
    if value is not None:
        check_value("g", "target", value)
    assert cache.peek("g", "after") == b"works"
    assert cache.stats()["repairs"] == repairs_before + 1
    cache._store.audit()


# -- random kills during a write-heavy loop ---------------------------------------------------

WRITERS, READERS, KILLS, KEYS = 3, 2, 80, 150


def writer_loop(name, writer):
    cache = shmcache.connect(name=name)
    rng = random.Random(writer * 7919 + os.getpid())
    seq = 0
    while True:
        seq += 1
        group = rng.choice(("small", "big"))
        key = f"k{rng.randrange(KEYS)}"
        if rng.random() < 0.85:
            cache.set(group, key, make_value(group, key, writer, seq, rng.choice((20, 100, 2000, 7000))))
        else:
            cache.delete(group, key)


def reader_loop(name, stop, results):
    cache = shmcache.connect(name=name)
    rng = random.Random(os.getpid())
    reads = hits = 0
    problems = []
    while not stop.is_set():
        group = rng.choice(("small", "big"))
        key = f"k{rng.randrange(KEYS)}"
        value = cache.peek(group, key)
        reads += 1
        if value is not None:
            hits += 1
            try:
                check_value(group, key, value)
            except ValueError as exc:
                problems.append(str(exc))
    results.put((reads, hits, problems))


def test_random_sigkills_of_writers_never_expose_a_wrong_value(make_cache, segment_name, processes):
    cache = make_cache(memory="4MiB", max_item_size="16KiB",
                       groups={"small": 40_000, "big": 1 << 30})
    context = multiprocessing.get_context("fork")
    stop, results = context.Event(), context.Queue()
    readers = [processes.add(context.Process(target=reader_loop, args=(segment_name, stop, results)))
               for _ in range(READERS)]
    writers = [processes.add(context.Process(target=writer_loop, args=(segment_name, w)))
               for w in range(WRITERS)]
    for proc in readers + writers:
        proc.start()
    rng = random.Random(5)
    for kill in range(KILLS):
        time.sleep(rng.uniform(0.01, 0.05))         # let them get well into their loops
        holder = cache._store.arena.get_u32(_OFFSET_WRITER_PID)   # whoever writes right now
        pids = [writer.pid for writer in writers]
        slot = pids.index(holder) if holder in pids else rng.randrange(WRITERS)
        victim = writers[slot]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=30)
        writers[slot] = processes.add(context.Process(target=writer_loop,
                                                      args=(segment_name, WRITERS + kill)))
        writers[slot].start()
    for victim in writers:
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=30)
    stop.set()
    outcomes = [results.get(timeout=60) for _ in readers]
    for reader in readers:
        reader.join(timeout=30)
    problems = [p for _reads, _hits, found in outcomes for p in found]
    assert not problems, problems[:5]
    assert sum(hits for _reads, hits, _p in outcomes) > 1000
    stats = cache.stats()
    print(f"repairs after {KILLS + WRITERS} kills: {stats['repairs']}")
    assert stats["repairs"] >= 10          # many kills landed inside a write
    cache._store.audit()
    for group, info in stats["groups"].items():
        assert info["bytes"] <= info["cache_bytes"]
