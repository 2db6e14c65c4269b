"""Embedding without a supervisor: create(groups=...), getters run by the embedding
processes once for the host, and the narrow errors of the public API."""

import os
import subprocess
import sys
import time

import pytest

import shmcache
from conftest import REPO

pytestmark = pytest.mark.integration

LOADER = r"""
import os, sys, time, shmcache
name, calls, delay, key = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
def getter(key):
    with open(calls, "a") as log:
        log.write(f"{os.getpid()} {key}\n")
    time.sleep(delay)                       # a slow database
    return f"loaded-{key}"
cache = shmcache.connect(name=name, timeout=60)
cache.define_group("users", "1MiB", getter=getter)
print("ready", flush=True)
sys.stdin.readline()                        # go
print(cache.get("users", key).decode(), flush=True)
"""


def test_create_with_groups_defines_them_before_anyone_attaches(segment_name):
    with shmcache.create(segment_name, "8MiB",
                         groups={"plain": "1MiB", "sized": 4096}) as cache:
        with shmcache.connect(name=segment_name) as other:
            groups = other.stats()["groups"]
            assert groups["plain"]["cache_bytes"] == 1 << 20
            assert groups["sized"]["cache_bytes"] == 4096
            cache.set("plain", "k", b"v")
            assert other.peek("plain", "k") == b"v"


def test_miss_without_getter_or_front_is_not_found(segment_name):
    with shmcache.create(segment_name, "8MiB", groups={"plain": "1MiB"}) as cache:
        assert cache.peek("plain", "absent") is None
        with pytest.raises(shmcache.NotFound, match="no getter for 'plain'.*no front"):
            cache.get("plain", "absent")
        with pytest.raises(shmcache.UnknownGroup):
            cache.get("nope", "absent")


def test_getter_of_an_embedded_group_loads_once_per_miss(segment_name):
    calls = []

    def getter(key):
        calls.append(key)
        if key.startswith("missing"):
            raise KeyError(key)
        return f"value-{key}"
    group = shmcache.Group("users", "1MiB", getter, ttl=60)
    with shmcache.create(segment_name, "8MiB", groups=[group]) as cache:
        assert cache.get("users", "42") == b"value-42"
        assert cache.get("users", "42") == b"value-42"
        assert cache.peek("users", "42") == b"value-42"
        with pytest.raises(shmcache.NotFound):
            cache.get("users", "missing-1")
        assert calls == ["42", "missing-1"]


def test_processes_embedding_one_segment_share_one_load(segment_name, tmp_path, processes):
    calls = tmp_path / "calls.log"
    with shmcache.create(segment_name, "8MiB", groups={"users": "1MiB"}):
        children = [processes.python(LOADER, segment_name, calls, 1.0, "shared",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": REPO})
                    for _ in range(4)]
        processes.release_together(children)
        for child in children:
            assert child.stdout.readline().strip() == b"loaded-shared"
            assert child.wait(60) == 0
        assert len(calls.read_text().splitlines()) == 1        # one load for the host


def test_a_waiter_that_runs_out_of_time_gets_load_timeout(segment_name, tmp_path, processes):
    calls = tmp_path / "calls.log"
    with shmcache.create(segment_name, "8MiB", groups={"users": "1MiB"}):
        slow = processes.python(LOADER, segment_name, calls, 30.0, "slow",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": REPO})
        assert slow.stdout.readline().strip() == b"ready"
        slow.stdin.write(b"go\n")
        slow.stdin.flush()
        deadline = time.monotonic() + 30
        while not calls.exists():                               # its load has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with shmcache.connect(name=segment_name, timeout=0.5) as waiter:
            waiter.define_group("users", "1MiB", getter=lambda key: b"never called")
            with pytest.raises(shmcache.LoadTimeout) as timed_out:
                waiter.get("users", "slow")
            assert isinstance(timed_out.value, shmcache.LoadError)
        slow.kill()


@pytest.mark.parametrize("call, message", [
    (lambda name: shmcache.create(name, "1MiB"), "too small"),
    (lambda name: shmcache.create(name, "lots"), "not a byte size"),
    (lambda name: shmcache.create(name, "8MiB", max_item_size="128MiB"), "max item size"),
    (lambda name: shmcache.create(name, "8MiB", groups=["users"]), "Group objects"),
    (lambda name: shmcache.create(name, "8MiB", groups=[shmcache.Group("a"), shmcache.Group("a")]),
     "named twice"),
    (lambda name: shmcache.create("bad name!", "8MiB"), "bad segment name"),
    (lambda name: shmcache.Group("users", ttl=-1), "ttl"),
    (lambda name: shmcache.Group("bad name", 1 << 20), "bad group name"),
    (lambda name: shmcache.connect(port=1, name="x"), "exactly one"),
])
def test_bad_arguments_raise_invalid_argument(segment_name, call, message):
    with pytest.raises(shmcache.InvalidArgument, match=message) as raised:
        call(segment_name)
    assert isinstance(raised.value, ValueError)                 # what callers caught before
    assert not os.path.exists(os.path.join(shmcache.arena.shm_dir(), segment_name))


def test_bad_ttl_on_set_is_invalid_argument(segment_name):
    with shmcache.create(segment_name, "8MiB", groups={"g": "1MiB"}) as cache:
        with pytest.raises(shmcache.InvalidArgument, match="ttl"):
            cache.set("g", "k", b"v", ttl=0)
        assert cache.peek("g", "k") is None


def test_calls_after_close_raise_client_closed(segment_name):
    cache = shmcache.create(segment_name, "8MiB", groups={"g": "1MiB"})
    cache.close()
    for call in (lambda: cache.get("g", "k"), lambda: cache.peek("g", "k"),
                 lambda: cache.set("g", "k", b"v")):
        with pytest.raises(shmcache.ClientClosed, match="closed"):
            call()
    cache.unlink()
