"""A connect() client across restarts of its cache: it moves to the new segment, never reads
from or writes into a dead one, and says clearly when there is none or it was closed."""

import http.server
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import shmcache
from shmcache.arena import retire
from shmcache.store import Store

from conftest import REPO, Supervised

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]
DEADLINE = 60.0          # seconds: generous, for a loaded 2-core machine


def wait_until(condition, what, timeout=DEADLINE):
    """Poll ``condition()`` until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def raises(call, error):
    """True if ``call()`` raises ``error`` (the condition for wait_until)."""
    try:
        call()
    except error:
        return True
    return False


def read_or_none(cache, group, key):
    try:
        return cache.get(group, key)
    except (shmcache.SegmentNotFound, shmcache.PeerUnavailable):
        return None


class GroupSupervised(Supervised):
    """A supervisor in a process group of its own, so that ``kill_group`` is ``kill -9 -PGID``:
    the supervisor and every worker die at the same instant, as under an OOM kill or a
    container stop, and no worker gets to clean up."""

    def start(self, wait=True, timeout=60):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "shmcache.supervisor", *self.args],
                                     env=self.env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     process_group=0)
        if wait:
            self.wait_ready(timeout)
        return self

    def kill_group(self):
        workers = self.worker_pids()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        wait_until(lambda: not any(_alive(pid) for pid in workers), "the workers are gone")


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def group_supervised(tmp_path):
    made = []

    def start(first=None, same_port=True):
        """A new supervisor, or (``first`` given) one on the same segment name, and on the
        same port unless ``same_port`` is false."""
        same = {"name": first.name} if first is not None else {}
        if first is not None and same_port:
            same["port"] = first.port
        instance = GroupSupervised(tmp_path, APP, **same)
        made.append(instance)
        return instance.start()

    yield start
    for instance in made:
        instance.cleanup()


def test_client_follows_a_supervisor_killed_and_restarted(group_supervised):
    first = group_supervised()
    cache = shmcache.connect(name=first.name)
    try:
        assert cache.get("test", "k") == b"value-of-k"
        cache.set("test", "old", b"written before the crash")

        plain = Store.attach(first.name)            # no watcher: the write path's own check
        plain.verify_identity = True
        first.kill_group()
        # The segment is still there, but its owner is dead: nothing is served from it and
        # no write into it is reported as done.
        wait_until(lambda: raises(lambda: cache.peek("test", "k"), shmcache.SegmentNotFound),
                   "reads notice that the supervisor died")
        with pytest.raises(shmcache.SegmentNotFound):
            cache.get("test", "k")                 # and the front is gone too
        with pytest.raises(shmcache.SegmentNotFound):
            cache.set("test", "during", b"written while the cache was down")
        with pytest.raises(shmcache.SegmentNotFound):
            cache.delete("test", "old")

        second = group_supervised(first)           # same port, same segment name
        # The new supervisor retired the crashed segment before replacing it.
        with pytest.raises(shmcache.SegmentNotFound, match="removed or replaced"):
            plain.set("test", "into-the-dead-one", b"refused")
        plain.close()
        status, _body, _headers = second.request("PUT", "/cache/test/k", body=b"new value")
        assert status == 200
        wait_until(lambda: read_or_none(cache, "test", "k") == b"new value",
                   "the old client reads the value PUT to the new supervisor")
        assert cache.peek("test", "k") == b"new value"      # from the new segment itself

        cache.set("test", "from-client", b"set by the old client")
        assert second.get("test", "from-client")[:2] == (200, b"set by the old client")
        assert second.get("test", "during")[:2] == (200, b"value-of-during")   # never stored
        assert cache.get("test", "old") == b"value-of-old"  # the crashed segment's data is gone
    finally:
        cache.close()


def test_removed_segment_without_replacement_raises_segment_not_found(segment_name):
    owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    owner.define_group("g", 1 << 20)
    owner.set("g", "a", b"first")
    cache = shmcache.connect(name=segment_name)
    kept_peek = cache.peek                          # a reference an app may keep around
    try:
        assert cache.peek("g", "a") == b"first"
        owner.close()
        owner.unlink()
        wait_until(lambda: raises(lambda: cache.peek("g", "a"), shmcache.SegmentNotFound),
                   "reads notice the removal")
        for call in (lambda: cache.get("g", "a"), lambda: kept_peek("g", "a"),
                     lambda: cache.set("g", "b", b"lost?"), lambda: cache.delete("g", "a"),
                     lambda: cache.clear("g"), lambda: cache.define_group("h", 1 << 20),
                     cache.stats):
            with pytest.raises(shmcache.SegmentNotFound, match="removed or replaced"):
                call()

        owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
        owner.define_group("g", 1 << 20)
        owner.set("g", "a", b"second")
        assert cache.peek("g", "a") == b"second"    # a call finds the new segment at once
        assert kept_peek("g", "a") == b"second"     # the kept reference follows the client
        cache.set("g", "b", b"from the client")
        assert owner.peek("g", "b") == b"from the client"
    finally:
        cache.close()
        owner.close()
        owner.unlink()


def test_a_write_into_a_replaced_segment_is_undone_and_refused(segment_name):
    """The store-level check, with no watcher involved: a write that finds its segment
    replaced (or removed) under the write lock is undone and raises."""
    old_owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    old_owner.define_group("g", 1 << 20)
    old_owner.set("g", "kept", b"old")
    store = Store.attach(segment_name)
    store.verify_identity = True
    new_owner = None
    try:
        store.set("g", "before", b"accepted")
        old_owner.unlink()
        with pytest.raises(shmcache.SegmentNotFound, match="removed or replaced"):
            store.set("g", "after-removal", b"refused")
        new_owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
        new_owner.define_group("g", 1 << 20)
        with pytest.raises(shmcache.SegmentNotFound, match="removed or replaced"):
            store.set("g", "after-replacement", b"refused")
        with pytest.raises(shmcache.SegmentNotFound):
            store.delete("g", "kept")
        # Undone, not merely reported: the old segment (still mapped here) holds none of
        # the refused writes, and still holds what the delete would have removed.
        assert store.get("g", "before") == b"accepted"
        assert store.get("g", "after-removal") is None
        assert store.get("g", "after-replacement") is None
        assert store.get("g", "kept") == b"old"
        assert new_owner.peek("g", "after-replacement") is None
    finally:
        store.close()
        old_owner.close()
        if new_owner is not None:
            new_owner.close()
            new_owner.unlink()


def test_no_write_that_starts_after_retire_returns_is_reported_done(segment_name):
    """arena.retire against a writer hammering the segment: writes reported done are in it,
    the first write begun after retire() returned is refused and undone."""
    owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    owner.define_group("g", "8MiB")
    store = Store.attach(segment_name)
    store.verify_identity = True
    done, refused, late = [], [], []
    retired = threading.Event()

    def writer():
        for i in range(1_000_000):
            began_after = retired.is_set()
            try:
                store.set("g", f"k{i}", b"v")
            except shmcache.SegmentNotFound:
                refused.append(i)
                return
            done.append(i)
            if began_after:
                late.append(i)

    thread = threading.Thread(target=writer)
    try:
        thread.start()
        wait_until(lambda: len(done) >= 200, "the writer is under way")
        assert retire(f"/proc/self/fd/{store.arena.fd}") is True    # got the write lock
        retired.set()
        thread.join(timeout=DEADLINE)
        assert not thread.is_alive()
        assert late == [] and len(refused) == 1
        assert store.get("g", f"k{refused[0]}") is None            # undone, not only refused
        assert all(store.get("g", f"k{i}") == b"v" for i in done)  # 8 MiB holds them all
        with pytest.raises(shmcache.SegmentNotFound, match="removed or replaced"):
            store.delete("g", "k0")
        assert store.get("g", "k0") == b"v"
    finally:
        retired.set()
        thread.join(timeout=DEADLINE)
        store.close()
        owner.close()
        owner.unlink()


def test_a_write_racing_a_replacement_lands_in_the_new_segment(segment_name):
    """Whichever notices first (the watcher or the write's own check), a write that returns
    is in the live segment."""
    owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    owner.define_group("g", 1 << 20)
    cache = shmcache.connect(name=segment_name)
    try:
        for round_ in range(20):
            old = Store.attach(segment_name)        # a plain handle: it follows no name
            owner.close()
            owner.unlink()
            owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
            owner.define_group("g", 1 << 20)
            try:
                cache.set("g", f"key-{round_}", b"v")        # right after the replacement
                assert owner.peek("g", f"key-{round_}") == b"v"
                assert old.get("g", f"key-{round_}") is None
            finally:
                old.close()
    finally:
        cache.close()
        owner.close()
        owner.unlink()


class Front(http.server.BaseHTTPRequestHandler):
    """A stand-in for a supervisor's HTTP front: answers every key with its own name."""

    def do_GET(self):
        body = f"{self.server.label}:{self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_front(label):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
    server.label = label
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_warm_restart_keeps_the_data_and_moves_the_front(segment_name):
    """Same file, new epoch (what a supervisor does when it adopts a segment kept by a clean
    stop): the client stays on it, keeps its data, and sends misses to the new front."""
    fronts = [start_front("first"), start_front("second")]
    owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    cache = None
    try:
        owner.define_group("g", 1 << 20)
        owner.set("g", "kept", b"kept value")
        arena = owner._store.arena
        arena.set_front("127.0.0.1", fronts[0].server_address[1])
        cache = shmcache.connect(name=segment_name)
        assert cache.get("g", "miss-1") == b"first:/cache/g/miss-1"

        arena.new_epoch()
        arena.set_front("127.0.0.1", fronts[1].server_address[1])
        fronts[0].shutdown()
        fronts[0].server_close()
        wait_until(lambda: read_or_none(cache, "g", "miss-2") == b"second:/cache/g/miss-2",
                   "misses go to the new front")
        assert cache.peek("g", "kept") == b"kept value"
        cache.set("g", "after", b"written after the warm restart")
        assert owner.peek("g", "after") == b"written after the warm restart"
    finally:
        if cache is not None:
            cache.close()
        owner.close()
        owner.unlink()
        fronts[1].shutdown()
        fronts[1].server_close()


def _forked_child(cache, ready, report):
    """Runs in a child forked after ``cache`` was made, once the parent replaced the segment."""
    try:
        ready.recv()
        wait_until(lambda: cache.peek("g", "a") == b"new", "the child reads the new segment")
        cache.set("g", "from-child", b"child")
        report.send("ok")
    except BaseException as exc:
        report.send(f"{type(exc).__name__}: {exc}")


def test_a_client_made_before_fork_follows_the_new_segment_in_the_child(segment_name):
    owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    owner.define_group("g", 1 << 20)
    owner.set("g", "a", b"old")
    cache = shmcache.connect(name=segment_name)
    assert cache.peek("g", "a") == b"old"           # the parent's watcher runs
    context = multiprocessing.get_context("fork")
    ready_read, ready_write = context.Pipe(duplex=False)
    report_read, report_write = context.Pipe(duplex=False)
    child = context.Process(target=_forked_child, args=(cache, ready_read, report_write))
    child.start()
    try:
        owner.close()
        owner.unlink()
        owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
        owner.define_group("g", 1 << 20)
        owner.set("g", "a", b"new")
        ready_write.send("replaced")
        assert report_read.poll(DEADLINE * 2), "the child did not answer"
        assert report_read.recv() == "ok"
        child.join(timeout=DEADLINE)
        assert child.exitcode == 0
        assert owner.peek("g", "from-child") == b"child"
        wait_until(lambda: cache.peek("g", "a") == b"new", "the parent reads the new segment")
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        cache.close()
        owner.close()
        owner.unlink()


def test_calls_after_close_raise_client_closed(segment_name):
    owner = shmcache.create(segment_name, "16MiB", max_item_size="64KiB")
    owner.define_group("g", 1 << 20)
    owner.set("g", "a", b"1")
    cache = shmcache.connect(name=segment_name)
    kept_peek = cache.peek
    cache.close()
    cache.close()                                   # idempotent
    try:
        for call in (lambda: cache.get("g", "a"), lambda: cache.peek("g", "a"),
                     lambda: kept_peek("g", "a"), lambda: cache.set("g", "a", b"2"),
                     lambda: cache.delete("g", "a"), lambda: cache.clear(),
                     lambda: cache.define_group("h", 1 << 20), cache.stats):
            with pytest.raises(shmcache.ClientClosed, match="closed"):
                call()
        assert issubclass(shmcache.ClientClosed, shmcache.ShmcacheError)
        assert owner.peek("g", "a") == b"1"          # the segment itself is untouched
    finally:
        owner.close()
        owner.unlink()
