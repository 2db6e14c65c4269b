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
TIERS = ("unit", "integration", "chaos")      # pyproject.toml registers them


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test is in exactly one tier (a module's ``pytestmark``): collection fails,
    naming them, for tests in none or in several, before ``-m`` deselects anything."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(f"every test needs exactly one of the markers {', '.join(TIERS)} "
                                f"(pytestmark = pytest.mark.unit, ...):\n  " + "\n  ".join(wrong))


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


@pytest.fixture(params=["native", "python"])
def both_readers(request, monkeypatch):
    """Run a test once with each lock-free reader (reader.py): the C one, then the pure
    Python one. Processes the test starts inherit the choice (SHMCACHE_PURE_PYTHON)."""
    from shmcache import reader
    if request.param == "native":
        if reader._native is None:
            pytest.skip("the C reader is not built (tests/test_native.py says so)")
        if os.environ.get("SHMCACHE_PURE_PYTHON", "") not in ("", "0"):
            pytest.skip("SHMCACHE_PURE_PYTHON is set for the whole run")
        monkeypatch.delenv("SHMCACHE_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setenv("SHMCACHE_PURE_PYTHON", "1")
    return request.param


def reader_kind(store):
    """Which lock-free reader a store reads with: "native" or "python"."""
    return "native" if type(store.get).__name__ == "Reader" else "python"


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

    def release_together(self, children, ready=b"ready", go=b"go\n"):
        """Wait until every child printed ``ready``, then write ``go`` to each: they start
        their next step together."""
        for child in children:
            assert child.stdout.readline().strip() == ready
        for child in children:
            child.stdin.write(go)
            child.stdin.flush()

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


def wait_gone(pids, timeout=30):
    """Until none of ``pids`` runs (gone, or a zombie nobody reaped); AssertionError after
    ``timeout`` seconds."""
    import psutil

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if running(pid)]
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes still alive: {alive}"
        time.sleep(0.02)


def _alive(proc):
    if hasattr(proc, "poll"):
        return proc.poll() is None
    return proc.is_alive()


@pytest.fixture
def processes():
    procs = Processes()
    yield procs
    procs.stop_all()


# -- supervisors ---------------------------------------------------------------------------

import http.client  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(port, method, path, body=None, headers=None, timeout=30, host="127.0.0.1",
                 tls=None):
    """(status, body bytes, headers dict) of one request on a fresh connection; over HTTPS
    with ``tls`` = (SSLContext, name to verify the certificate for)."""
    if tls is None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        from shmcache.tls import NamedHTTPSConnection
        connection = NamedHTTPSConnection(host, port, server_name=tls[1], context=tls[0],
                                          timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


class Supervised:
    """A real supervisor subprocess (``python -m shmcache.supervisor``) on a free port."""

    def __init__(self, tmp_path, args=(), env=None, port=None, name=None, host="127.0.0.1",
                 tls=None):
        self.port = port or free_port()
        self.host = host                     # the address requests go to (its --host)
        self.tls = tls              # (SSLContext, server name): its front speaks HTTPS
        self.name = name or f"{SEGMENT_PREFIX}{uuid.uuid4().hex[:8]}"
        self.dir = tmp_path
        self.extra_args, self.extra_env = list(args), env
        self.args = ["--port", str(self.port), "--name", self.name, "--memory", "32MiB",
                     "--max-item-size", "256KiB", *map(str, args)]
        self.env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.path.join(REPO, "tests"),
                    "KCACHE_TEST_DIR": str(tmp_path), **(env or {})}
        self.proc = None
        self.log_path = tmp_path / (f"supervisor-{self.port}.log" if host == "127.0.0.1"
                                    else f"supervisor-{host}-{self.port}.log")

    def clone(self):
        """A new, unstarted supervisor with the same options, port and segment name."""
        twin = Supervised(self.dir, self.extra_args, self.extra_env, port=self.port, name=self.name,
                          host=self.host, tls=self.tls)
        twin.url = getattr(self, "url", None)
        return twin

    def start(self, wait=True, timeout=60):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "shmcache.supervisor", *self.args],
                                     env=self.env, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if http_request(self.port, "GET", "/healthz", timeout=5, host=self.host,
                                tls=self.tls)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"supervisor not ready after {timeout}s:\n{self.log()}")

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(self, method, path, body=None, headers=None, timeout=30):
        return http_request(self.port, method, path, body, headers, timeout, self.host,
                            tls=self.tls)

    def get(self, group, key, timeout=30):
        from urllib.parse import quote
        return self.request("GET", f"/cache/{quote(group, safe='')}/{quote(key, safe='')}",
                            timeout=timeout)

    def worker_pids(self):
        """The supervisor's children but a --peers-dns lookup under way (discovery.py)."""
        import psutil
        from shmcache.discovery import LOOKUP_PROCESS_NAME
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        workers = []
        for child in children:
            try:
                if child.name() != LOOKUP_PROCESS_NAME.decode():
                    workers.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return sorted(workers)

    def kill(self, timeout=60):
        """SIGKILL the supervisor, then wait until its workers have noticed and exited (they
        stop on their own within a tick). Not ``worker_pids()``: a killed supervisor has no
        children at once, while its workers still serve a moment longer."""
        workers = self.worker_pids()
        self.stop(signal.SIGKILL)
        wait_gone(workers, timeout)

    def wait_for_workers(self, count, exclude=(), timeout=30):
        """Wait until ``count`` workers run, none of them in ``exclude``; return their pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) == count and not set(pids) & set(exclude):
                return pids
            time.sleep(0.05)
        raise AssertionError(f"expected {count} workers, have {self.worker_pids()}")

    def stop(self, signum=signal.SIGTERM, timeout=60):
        """Signal the supervisor and wait; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def calls(self):
        """Getter calls the counting app recorded (by any host sharing the directory):
        list of (pid, key)."""
        return [(pid, key) for pid, _host, key in self.calls_with_hosts()]

    def calls_with_hosts(self):
        """list of (pid, host, key); host is the KCACHE_TEST_HOST of the recording host."""
        try:
            lines = (self.dir / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [tuple(line.split("\t", 2)) for line in lines]

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            workers = self.worker_pids()
            self.proc.kill()
            self.proc.wait(timeout=30)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "_log", None):
            self._log.close()
        try:
            os.unlink(os.path.join(shm_dir(), self.name))
        except FileNotFoundError:
            pass


@pytest.fixture
def supervised(tmp_path):
    """supervised(args=[...], env={...}) -> a started Supervised; all are cleaned up."""
    made = []

    def start(args=(), env=None, wait=True, **kwargs):
        instance = Supervised(tmp_path, args, env, **kwargs)
        made.append(instance)
        return instance.start(wait=wait)

    yield start
    for instance in made:
        instance.cleanup()


@pytest.fixture
def cluster(tmp_path):
    """cluster(count, args, env) -> [Supervised, ...], each listing all as --peers (or what
    ``peer_lists(urls)`` gives each); they share tmp_path, so the counting app's calls.log
    covers the whole cluster (host = its URL). With ``tls`` (as Supervised's), the URLs are
    https:// and ``args`` should carry the TLS options."""
    made = []

    def start(count=3, args=(), env=None, peer_lists=None, tls=None):
        ports = [free_port() for _ in range(count)]
        urls = [f"{'https' if tls else 'http'}://127.0.0.1:{port}" for port in ports]
        hosts = []
        lists = peer_lists(urls) if peer_lists else [urls] * count
        for index, port in enumerate(ports):
            peer_urls = lists[index]
            instance = Supervised(tmp_path, [*args, "--peers", ",".join(peer_urls)],
                                  {**(env or {}), "KCACHE_TEST_HOST": urls[index]}, port=port,
                                  tls=tls)
            instance.url = urls[index]
            made.append(instance)
            hosts.append(instance.start(wait=False))
        for instance in hosts:
            instance.wait_ready()
        return hosts

    yield start
    for instance in made:
        instance.cleanup()


def wait_for_waiters(store, group, key, count, timeout=60):
    """Wait until ``count`` processes wait for the load of ``key`` in flight on the host
    (HostFlights.waiting): every other process has met the loading one."""
    from shmcache.lru_index import encode_key
    from shmcache.singleflight import HostFlights
    flights, gid, data = HostFlights(store), store.group_id(group), encode_key(key)
    deadline = time.monotonic() + timeout
    while flights.waiting(gid, data) != count:
        assert time.monotonic() < deadline, "the processes never met in one load"
        time.sleep(0.01)
