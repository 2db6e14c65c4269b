"""Shared fixtures: unique segment names, segments that are always unlinked, and a check that
no test leaves shared memory or processes behind."""

import os
import signal
import subprocess
import sys
import uuid

import pytest

import shmcache
from shmcache.arena import shm_dir

SEGMENT_PREFIX = "kcache-test-"


def _test_segments():
    try:
        return {name for name in os.listdir(shm_dir()) if name.startswith(SEGMENT_PREFIX)}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must unlink the shared memory it creates."""
    before = _test_segments()
    yield
    leaked = _test_segments() - before
    for name in leaked:
        os.unlink(os.path.join(shm_dir(), name))
    assert not leaked, f"test left shared memory behind: {sorted(leaked)}"


@pytest.fixture
def segment_name():
    """A fresh segment name; whatever the test leaves under it is removed afterwards."""
    name = f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        os.unlink(os.path.join(shm_dir(), name))
    except FileNotFoundError:
        pass


@pytest.fixture
def make_cache(segment_name):
    """make_cache(memory=..., groups={name: budget}) -> an owning Client, closed afterwards."""
    made = []

    def make(memory="16MiB", max_item_size="64KiB", groups=None, ttl=None):
        cache = shmcache.create(segment_name, memory, max_item_size=max_item_size)
        made.append(cache)
        for group, budget in (groups or {"g": 1 << 20}).items():
            cache.define_group(group, budget, ttl=ttl)
        return cache

    yield make
    for cache in made:
        cache.close()
        cache.unlink()


class Processes:
    """Child processes a test starts; all are SIGKILLed and reaped at teardown."""

    def __init__(self):
        self.procs = []

    def python(self, code, *args, **kwargs):
        """Start ``python -c code args...`` (an unrelated process, not a fork)."""
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], **kwargs)
        self.procs.append(proc)
        return proc

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for proc in self.procs:
            pid = getattr(proc, "pid", None)
            if pid and _alive(proc):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            if hasattr(proc, "wait"):
                proc.wait(timeout=30)
            elif hasattr(proc, "join"):
                proc.join(timeout=30)


def _alive(proc):
    if hasattr(proc, "poll"):
        return proc.poll() is None
    return proc.is_alive()


@pytest.fixture
def processes():
    procs = Processes()
    yield procs
    procs.stop_all()
