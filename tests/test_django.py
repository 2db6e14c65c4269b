"""shmcache.django.ShmCache: Django's own backend test-suite, gunicorn-style worker processes
sharing an embedded segment, and host mode against a real supervisor."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import django
import pytest
from django.core.cache import CacheKeyWarning
from django.core.exceptions import ImproperlyConfigured

import shmcache
from shmcache.arena import shm_dir
from shmcache.django import MAX_KEY_BYTES, ShmCache, close_connections

from conftest import SEGMENT_PREFIX, free_port

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent
SUITE = TESTS / "django_suite"
WORKER = TESTS / "django_worker.py"
sys.path.insert(0, str(SUITE))
from skips import SKIPPED  # noqa: E402


@pytest.fixture(autouse=True)
def detach_backends():
    yield
    close_connections()


def embedded(name, **options):
    return ShmCache(name, {"OPTIONS": {"memory": "16MiB", "max_item_size": "64KiB", **options}})


# -- Django's own test-suite ----------------------------------------------------------------

def django_cache_tests():
    """A directory holding Django's ``tests/cache`` package, for the installed Django, taken
    from its source distribution on PyPI once and kept under ~/.cache (or $XDG_CACHE_HOME)."""
    version = django.__version__
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = base / "shmcache" / f"django-{version}-tests"
    if (root / "cache" / "tests.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"django=={version}", "-d", tmp],
            capture_output=True, text=True, timeout=900)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if fetched.returncode != 0 or len(archives) != 1:
            pytest.fail(f"could not download Django {version}'s source distribution, which "
                        f"holds the backend test-suite this test runs (pip download exited "
                        f"{fetched.returncode}):\n{fetched.stdout[-3000:]}{fetched.stderr[-3000:]}")
        tree = Path(tmp) / "tree"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and parts[1:3] == ("tests", "cache"):
                    target = tree.joinpath(*parts[2:])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
        if not (tree / "cache" / "tests.py").is_file():
            pytest.fail(f"Django {version}'s source distribution has no tests/cache/tests.py")
        try:
            tree.rename(root)
        except OSError:                   # another run put it there meanwhile
            if not (root / "cache" / "tests.py").is_file():
                raise
    return root


@pytest.mark.timeout(900)
def test_djangos_own_cache_backend_suite_passes():
    """Django's BaseCacheTests, run by Django's test runner as it runs them for its own
    backends; every test passes but those in django_suite/skips.py, skipped for a reason."""
    tests_root = django_cache_tests()
    location = f"{SEGMENT_PREFIX}django-suite-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SHMCACHE_DJANGO_SUITE_LOCATION": location,
           "PYTHONPATH": os.pathsep.join([str(tests_root), str(SUITE), str(TESTS.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "django", "test", "shmcache_backend_tests",
             "--settings=shmcache_django_settings", "--noinput", "-v", "2"],
            cwd=tests_root, env=env, capture_output=True, text=True, timeout=800)
    finally:
        try:
            os.unlink(os.path.join(shm_dir(), location))
        except FileNotFoundError:
            pass
    output = run.stdout + run.stderr
    ran = re.search(r"^Ran (\d+) tests? in ", output, re.M)
    status = re.search(r"^(OK|FAILED)(?: \((.*)\))?$", output, re.M)
    assert ran and status, f"no test summary from Django's runner:\n{output[-5000:]}"
    assert run.returncode == 0 and status.group(1) == "OK", output[-20000:]
    counts = dict(re.findall(r"(\w+)=(\d+)", status.group(2) or ""))
    assert int(ran.group(1)) > 40, output[-5000:]
    assert int(counts.get("skipped", 0)) == len(SKIPPED), output[-5000:]
    for name in SKIPPED:
        assert re.search(rf"^{name} .*\.\.\. skipped", output, re.M), name


# -- one process ----------------------------------------------------------------------------

def test_django_timeouts_keys_and_large_values(segment_name):
    cache = embedded(segment_name)
    cache.set("forever", "v", timeout=None)
    assert cache._run(lambda c: c._live_store().get_with_expiry(
        "django", cache._key("forever", None))[1]) is None
    cache.set("at-once", "v", timeout=0)
    assert cache.get("at-once") is None
    cache.set("k", "old")
    cache.set("k", "new", timeout=-5)                       # negative: expire at once
    assert cache.get("k", "gone") == "gone"
    assert cache.add("zero", 1, timeout=0) is True and not cache.has_key("zero")
    cache.set("t", 1)
    assert cache.touch("t", timeout=0) is True and cache.get("t") is None

    long_key = "é" * 300
    with pytest.warns(CacheKeyWarning):                     # as Django's backends warn
        cache.set(long_key, "long", timeout=None)           # hashed, never refused
        assert cache.get(long_key) == "long" and cache.get("é" * 299 + "e") is None
        assert len(cache._key(long_key, None)) <= MAX_KEY_BYTES

    cache.set("big", "small")
    cache.set("big", b"x" * (65 << 10))                     # too large: not stored, old one gone
    assert cache.get("big") is None
    assert cache.add("big", b"x" * (65 << 10)) is False
    assert cache.set_many({"a": 1, "big": b"x" * (65 << 10)}) == ["big"]
    assert cache.get_or_set("big", lambda: b"y" * (65 << 10)) == b"y" * (65 << 10)

    cache.set("n", 5)
    assert cache._run(lambda c: c.peek("django", cache._key("n", None))) == b"5"
    cache.set("b", True)
    assert cache.get("b") is True
    with pytest.raises(TypeError):
        cache.incr("b")                                      # a bool is pickled, not counted
    cache.close()                                            # Django calls it per request
    assert cache.get("n") == 5


def test_django_async_methods_call_the_sync_ones(segment_name):
    import asyncio
    cache = embedded(segment_name)

    async def use():
        await cache.aset("a", 1)
        assert await cache.aincr("a", 2) == 3
        assert await cache.aadd("a", 0) is False
        assert await cache.aget_many(["a", "b"]) == {"a": 3}
        assert await cache.aget_or_set("b", list) == []
        assert await cache.ahas_key("b") is True
        assert await cache.adelete("b") is True
        await cache.aclear()
        assert await cache.aget("a", "none") == "none"
        await cache.aclose()
    asyncio.run(use())


def test_django_configuration_errors(segment_name, make_cache):
    with pytest.raises(ImproperlyConfigured, match="unknown OPTIONS"):
        ShmCache(segment_name, {"OPTIONS": {"memroy": "1MiB"}})
    with pytest.raises(ImproperlyConfigured, match="LOCATION"):
        ShmCache("", {})
    with pytest.raises(ImproperlyConfigured, match="bad segment name"):
        ShmCache("no/slashes", {})
    make_cache()._live_store().arena.set_u32(shmcache.arena._OFFSET_OWNER_PID, os.getpid())
    with pytest.raises(ImproperlyConfigured, match="segment:"):
        embedded(segment_name).get("x")                     # a supervisor's: use host mode


def test_a_backend_used_before_fork_works_in_the_child(segment_name):
    cache = embedded(segment_name)
    cache.set("parent", 1)                                  # opened in the parent
    pid = os.fork()
    if pid == 0:                                            # gunicorn's worker, after fork
        ok = False
        try:
            ok = cache.get("parent") == 1 and cache.incr("parent") == 2
            cache.set("child", os.getpid())
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert cache.get("child") == pid and cache.get("parent") == 2


# -- gunicorn-style workers -----------------------------------------------------------------

class Worker:
    """A process of its own configured with the embedded backend (django_worker.py)."""

    def __init__(self, processes, location):
        self.proc = processes.add(subprocess.Popen(
            [sys.executable, str(WORKER), location], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=TESTS))
        assert self.read() == "ready"

    def send(self, *command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def read(self):
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.wait()}"
        return json.loads(line)

    def __call__(self, *command):
        self.send(*command)
        return self.read()


def all_at_once(workers, *command):
    """Send ``command`` to every worker before reading any answer."""
    for worker in workers:
        worker.send(*command)
    return [worker.read() for worker in workers]


def test_a_value_set_in_one_worker_is_read_by_another_at_once(segment_name, processes):
    one, two = Worker(processes, segment_name), Worker(processes, segment_name)
    assert one("set", "greeting", "hello") is None
    assert two("get", "greeting") == "hello"
    assert two("set", "greeting", {"from": "two"}) is None
    assert one("get", "greeting") == {"from": "two"}
    assert one("segment") == two("segment")


def test_incr_from_many_workers_at_once_loses_no_count(segment_name, processes):
    workers = [Worker(processes, segment_name) for _ in range(4)]
    assert workers[0]("set", "hits", 0) is None
    assert all_at_once(workers, "incr", "hits", 300) == [300] * 4
    assert workers[1]("get", "hits") == 4 * 300


def test_add_from_many_workers_at_once_has_one_winner(segment_name, processes):
    workers = [Worker(processes, segment_name) for _ in range(6)]
    all_at_once(workers, "segment")                       # opened, so the adds race each other
    for round_ in range(5):
        for index, worker in enumerate(workers):
            worker.send("add", f"lock-{round_}", index)
        results = [worker.read() for worker in workers]
        assert results.count(True) == 1 and results.count(False) == 5, results
        assert workers[round_]("get", f"lock-{round_}") == results.index(True)


def test_workers_creating_the_segment_at_once_share_one(segment_name, processes):
    workers = [Worker(processes, segment_name) for _ in range(8)]
    assert not os.path.exists(os.path.join(shm_dir(), segment_name))
    identities = all_at_once(workers, "segment")
    assert all(isinstance(identity, list) for identity in identities), identities
    assert len({tuple(identity) for identity in identities}) == 1
    st = os.stat(os.path.join(shm_dir(), segment_name))
    assert identities[0] == [st.st_dev, st.st_ino]


def test_a_segment_left_by_a_sigkilled_worker_is_reused_and_repaired(segment_name, processes):
    first = Worker(processes, segment_name)
    assert first("set", "count", 41) is None
    identity = first("segment")
    first.send("freeze_in_incr", "count", 2)                 # inside the incr's write step
    assert first.read() == "paused"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = Worker(processes, segment_name)
    assert second("segment") == identity                    # reused, not made anew
    assert second("get", "count") == 41                     # the half-made incr was undone
    assert second("incr", "count", 1) == 1 and second("get", "count") == 42
    assert second("repairs") >= 1


def test_an_incompatible_segment_is_rebuilt_once_for_all_workers(segment_name, processes):
    old = shmcache.create(segment_name, "16MiB")
    old._live_store().arena.set_u32(8, 99)                  # another layout version
    old_identity = list(old._live_store().arena.identity)
    old.close()
    workers = [Worker(processes, segment_name) for _ in range(4)]
    identities = all_at_once(workers, "segment")
    assert len({tuple(identity) for identity in identities if isinstance(identity, list)}) == 1
    assert identities[0] != old_identity, identities
    assert workers[0]("set", "k", "v") is None and workers[3]("get", "k") == "v"


# -- host mode ------------------------------------------------------------------------------

def test_host_mode_against_a_running_supervisor(supervised):
    port = free_port()
    server = supervised(port=port, name=f"kcache-{port}")   # the demo group "scores"
    cache = ShmCache(f"segment:{server.name}", {"OPTIONS": {"group": "scores"}})
    assert cache.get("Tom") is None                         # a miss is a miss: nothing loads
    cache.set("Tom", {"score": 700})
    assert cache.get("Tom") == {"score": 700}
    assert cache.add("Tom", 1) is False
    cache.set("count", 41)
    assert cache.incr("count") == 42 and cache.decr("count", 2) == 40
    assert server.get("scores", ":1:count")[:2] == (200, b"40")   # plain digits, for anyone
    assert cache.delete("Tom") is True and cache.get("Tom") is None
    assert cache.get_many(["count", "Tom"]) == {"count": 40}
    assert cache.touch("count", 60) is True

    loading = ShmCache(f"port:{port}", {
        "OPTIONS": {"group": "scores", "load": True},
        "KEY_FUNCTION": lambda key, prefix, version: key})
    assert loading.get("Sam") == 567                        # loaded by the host's getter
    assert loading.get("Nobody", "default") == "default"    # the getter's KeyError: a miss


def test_host_mode_on_a_host_with_peers(cluster):
    """With peers, set and delete go cluster-wide; add, incr and touch have no atomic
    cluster-wide form and are done as Django's base class does them, a get then a set. A get
    asks the key's owner, where the set went."""
    one, two = cluster(2)
    cache = ShmCache(f"segment:{one.name}", {"OPTIONS": {"group": "scores"}})
    other = ShmCache(f"segment:{two.name}", {"OPTIONS": {"group": "scores"}})
    assert cache._run(lambda client: client.clustered)
    for key in ("a", "b", "c", "d"):
        cache.set(key, 41)
        assert cache.incr(key) == 42
        assert other.get(key) == 42                         # from the key's owner, either host
    assert cache.add("a", 1) is False and cache.add("new", 1) is True
    assert cache.touch("a", 60) is True and cache.touch("missing", 60) is False
    assert cache.delete("new") is True and cache.get("new") is None
