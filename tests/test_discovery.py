"""Peers found by name (--peers-dns), peer sets that change under load, and the peek that
keeps keys warm when their owner changes."""

import json
import os
import random
import select
import signal
import socket
import threading
import time

import pytest

from conftest import Supervised, free_port
from shmcache.discovery import (PREVIOUS_WINDOW, PeerBoard, PeerView, next_view,
                                parse_dns_target, peer_url, resolve)
from shmcache.wire import decode_get_response
from shmcache.ring import Ring
from test_cluster import wait_for_workers_using, workers_using

pytestmark = pytest.mark.integration

NAME = "kcache.test"
APP = ["--app", "apps.counting:groups", "--workers", "2", "--hot-fraction", "0",
       "--log-level", "debug"]


# -- pieces ------------------------------------------------------------------------------------

def test_dns_targets_name_a_port_or_take_the_servers():
    assert parse_dns_target("kcache.default.svc", 8001) == ("kcache.default.svc", 8001)
    assert parse_dns_target("kcache:9000", 8001) == ("kcache", 9000)
    for bad in ("", ":80", "a b", "http://x", "x:70000"):
        with pytest.raises(ValueError):
            parse_dns_target(bad, 8001)


def test_a_hosts_file_stands_in_for_dns(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.3 other kcache.test  # comment\n127.0.0.2 KCACHE.test\n::1 kcache.test\n")
    monkeypatch.setenv("SHMCACHE_HOSTS_FILE", str(hosts))
    assert resolve("kcache.test") == ["127.0.0.2", "127.0.0.3", "::1"]
    with pytest.raises(OSError):
        resolve("unknown.test")
    assert peer_url("http", "::1", 80) == "http://[::1]:80"


def test_the_first_view_peeks_the_others_and_a_change_keeps_the_set_before():
    a, b, c = "http://a:1", "http://b:1", "http://c:1"
    first = next_view(None, a, (a, b), now=100.0)
    assert (first.previous, first.previous_until) == ((b,), 100.0 + PREVIOUS_WINDOW)
    assert next_view(first, a, (a, b), now=200.0) is first
    changed = next_view(first, a, (a, b, c), now=200.0)
    assert (changed.peers, changed.previous, changed.previous_until) == \
        ((a, b, c), (a, b), 200.0 + PREVIOUS_WINDOW)
    assert next_view(None, a, (a,), now=1.0).previous == ()


def test_the_board_hands_the_last_view_to_forked_workers():
    board = PeerBoard()
    try:
        assert board.read() is None
        view = PeerView("http://a:1", ("http://a:1", "http://b:1"), ("http://b:1",), 5.0)
        board.publish(PeerView("http://a:1", tuple(f"http://h{i}:1" for i in range(50))))
        board.publish(view)                       # shorter than the one before: tail ignored
        pid = os.fork()
        if pid == 0:
            os._exit(0 if board.read() == view else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        board.close()


# -- hosts found by name -----------------------------------------------------------------------

class NamedHosts:
    """Supervisors on 127.0.0.2, .3, ... and one port, finding each other through NAME in a
    hosts-style file that stands in for DNS."""

    def __init__(self, tmp_path, refresh="0.3"):
        self.dir, self.refresh = tmp_path, refresh
        self.hosts_file = tmp_path / "hosts"
        self.port = free_port()
        self.made = []

    def publish(self, addresses):
        """Make NAME resolve to ``addresses`` (replaced at once, as a DNS answer is)."""
        staged = self.dir / "hosts.new"
        staged.write_text("".join(f"{address} {NAME}\n" for address in addresses))
        os.replace(staged, self.hosts_file)

    def start(self, addresses, extra=()):
        hosts = []
        for address in addresses:
            url = f"http://{address}:{self.port}"
            host = Supervised(self.dir, [*APP, "--host", address, "--peers-dns", NAME,
                                         "--peers-refresh", self.refresh, *extra],
                              {"SHMCACHE_HOSTS_FILE": str(self.hosts_file), "KCACHE_TEST_HOST": url},
                              port=self.port, host=address)
            host.url = url
            self.made.append(host)
            hosts.append(host.start(wait=False))
        for host in hosts:
            host.wait_ready()
        return hosts

    def cleanup(self):
        for host in self.made:
            host.cleanup()


@pytest.fixture
def named(tmp_path):
    hosts = NamedHosts(tmp_path)
    yield hosts
    hosts.cleanup()


def owner(hosts, key):
    url = Ring([host.url for host in hosts]).owner_of(key)
    return next(host for host in hosts if host.url == url)


def loads(host, key):
    return [h for _p, h, k in host.calls_with_hosts() if k == key]


def warm(hosts, keys):
    for key in keys:
        assert random.choice(hosts).get("test", key)[:2] == (200, f"value-of-{key}".encode())
    assert sorted(k for _p, _h, k in hosts[0].calls_with_hosts()) == sorted(keys)


class Load:
    """A client thread getting keys from the hosts until stopped; it keeps what went wrong."""

    def __init__(self, hosts, keys):
        self.hosts, self.keys = hosts, keys
        self.errors, self.gets = [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        rng = random.Random(7)
        while not self.stop.is_set():
            host, key = rng.choice(self.hosts), rng.choice(self.keys)
            try:
                answer = host.get("test", key, timeout=30)[:2]
            except OSError as exc:
                answer = repr(exc)
            if answer != (200, f"value-of-{key}".encode()):
                self.errors.append((host.url, key, answer))
            self.gets += 1

    def finish(self):
        self.stop.set()
        self.thread.join(60)
        return self.errors


def test_hosts_found_through_a_name_take_in_a_fourth_under_load(named):
    first = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    named.publish(first)
    hosts = named.start(first)
    for host in hosts:
        assert f"this host is {host.url} among 3 peers" in host.log()
        wait_for_workers_using(host, 3, workers=2)
    keys = [f"grow-{i}" for i in range(200)]
    warm(hosts, keys)
    load = Load(list(hosts), keys)
    try:
        time.sleep(0.5)
        (fourth,) = named.start(["127.0.0.5"])       # before the name has it: it adds itself
        load.hosts.append(fourth)
        named.publish(first + ["127.0.0.5"])
        everyone = hosts + [fourth]
        for host in everyone:
            wait_for_workers_using(host, 4, workers=2, timeout=60)
        time.sleep(0.5)
    finally:
        errors = load.finish()
    assert load.gets > 50 and errors == []
    for host in hosts:                                # the change is logged once per host
        assert host.log().count("peers changed: 4 peers now (added: http://127.0.0.5") == 1
    assert fourth.log().count("peers changed") == 0   # it knew all four from its start
    ring = Ring([host.url for host in everyone])
    moved = [k for k in keys if ring.owner_of(k) == fourth.url]
    assert moved
    for key in moved:                                 # the fourth peeked them: no getter call
        assert fourth.get("test", key)[:2] == (200, f"value-of-{key}".encode())
        assert len(loads(fourth, key)) == 1, key


def test_keys_that_move_to_a_new_host_are_peeked_not_loaded(named):
    first = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    named.publish(first)
    hosts = named.start(first)
    keys = [f"move-{i}" for i in range(300)]
    warm(hosts, keys)
    named.publish(first + ["127.0.0.5"])
    (fourth,) = named.start(["127.0.0.5"])
    everyone = hosts + [fourth]
    for host in everyone:
        wait_for_workers_using(host, 4, workers=2, timeout=60)
    ring = Ring([host.url for host in everyone])
    moved = [k for k in keys if ring.owner_of(k) == fourth.url]
    assert len(moved) > 30
    for index, key in enumerate(moved):               # asked of every host, the new one too
        host = everyone[index % 4]
        assert host.get("test", key)[:2] == (200, f"value-of-{key}".encode())
    calls = hosts[0].calls_with_hosts()
    assert [k for _p, h, k in calls if h == fourth.url] == []       # the getter: 0 times
    assert sorted(k for _p, _h, k in calls) == sorted(keys)          # each key once, ever
    fresh = next(k for k in (f"new-{i}" for i in range(1000)) if ring.owner_of(k) == fourth.url)
    assert everyone[0].get("test", fresh)[0] == 200   # a key nobody had: loaded by its owner
    assert loads(fourth, fresh) == [fourth.url]


def test_a_failing_lookup_keeps_the_peers_and_is_logged_once(named):
    both = ["127.0.0.2", "127.0.0.3"]
    named.publish(both)
    a, b = named.start(both)
    for host in (a, b):
        wait_for_workers_using(host, 2, workers=2)
    named.hosts_file.write_text("127.0.0.9 some.other.name\n")    # NAME no longer resolves
    time.sleep(2.0)                                               # several refreshes
    for host in (a, b):
        assert host.log().count(f"cannot resolve {NAME}") == 1, host.log()
        assert len(workers_using(host, 2)) == 2                     # the last good set is kept
    key = next(k for k in (f"kept-{i}" for i in range(1000)) if owner([a, b], k) is b)
    assert a.get("test", key)[:2] == (200, f"value-of-{key}".encode())
    assert loads(a, key) == [b.url]
    named.publish(both)
    deadline = time.monotonic() + 30
    while not all(f"{NAME} resolves again" in host.log() for host in (a, b)) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    for host in (a, b):
        assert host.log().count(f"{NAME} resolves again: 2 addresses") == 1
        assert "peers changed" not in host.log()


def test_the_name_resolves_with_getaddrinfo_and_this_host_finds_itself(supervised):
    port = free_port()
    host = supervised(["--peers-dns", "localhost", "--workers", "1"], port=port)
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}
    assert "127.0.0.1" in addresses
    expected = {peer_url("http", address, port) for address in addresses} - {f"http://127.0.0.1:{port}"}
    stats = json.loads(host.request("GET", "/stats")[1])
    assert stats["self"] == f"http://127.0.0.1:{port}"                  # no --self needed
    assert set(stats["peers"]) == expected
    assert f"this host is http://127.0.0.1:{port} among {len(expected) + 1} peers" in host.log()
    assert "not in its peer list" not in host.log()


def test_a_peek_answers_from_memory_only(supervised):
    host = supervised(["--app", "apps.counting:groups", "--workers", "1"])
    assert host.request("GET", "/_kcache/test/peeked?peek=1")[0] == 404
    assert host.calls() == []                                           # never loaded
    assert host.get("test", "peeked")[0] == 200
    status, body, _ = host.request("GET", "/_kcache/test/peeked?peek=1")
    assert status == 200 and decode_get_response(body)[0] == b"value-of-peeked"
    assert len(host.calls()) == 1


def test_a_cold_previous_owner_stops_being_peeked(make_cache):
    """A Node whose previous ring names a real peer that holds nothing (404 to every peek):
    its first COLD_PEEKS loads peek it, the loads after that do not; every key still loads."""
    from concurrent.futures import ThreadPoolExecutor
    from shmcache import Group
    from shmcache.http_messages import error
    from shmcache.httpserver import HttpServer
    from shmcache.node import Node
    from shmcache.peers import COLD_PEEKS, Peers
    peeks = []

    def cold(request):
        peeks.append(request.target)
        return error(404, "not held here")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = HttpServer(sock, cold)
    threading.Thread(target=server.serve, kwargs={"tick_interval": 0.05}, daemon=True).start()
    me, other = "http://127.0.0.1:1", f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = make_cache()._live_store()
    peers = Peers(me, [me, other], store, previous=(other,), previous_until=time.time() + 3600)
    pool = ThreadPoolExecutor(max_workers=4)
    node = Node(store, [Group("g", 1 << 20, getter=lambda key: f"loaded:{key}".encode())],
                pool, peers=peers)
    try:
        mine = [k for k in (f"cold-{i}" for i in range(1000)) if peers.owner_url(k) == me]
        assert len(mine) > COLD_PEEKS + 50
        for key in mine:
            answer = node.get("g", key)
            value = answer.result(timeout=60)[0] if hasattr(answer, "result") else answer[0]
            assert value == f"loaded:{key}".encode()
        assert len(peeks) == COLD_PEEKS
        assert all(target.endswith("?peek=1") for target in peeks)
    finally:
        node.close()
        peers.close()
        server.stop()


# -- a lookup that hangs ------------------------------------------------------------------------

def hang_lookups(named):
    """Make NAME's lookups hang: the hosts file becomes a FIFO nobody writes to (opening it
    to read blocks), as a resolver that does not answer would. Returns the FIFO's path."""
    fifo = named.dir / "hosts.fifo"
    os.mkfifo(fifo)
    os.replace(fifo, named.hosts_file)
    return named.hosts_file


def release_lookups(path):
    """Let every lookup blocked on the FIFO ``path`` go on (it reads an empty file)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:                       # ENXIO: no reader is waiting any more
            return
        os.close(fd)


def test_a_hung_lookup_does_not_hold_the_supervisor_up(named):
    """While the lookup of --peers-dns hangs (in its own child process), the supervisor still
    replaces a killed worker and still stops at once on SIGTERM."""
    import psutil
    from shmcache.discovery import LOOKUP_PROCESS_NAME
    both = ["127.0.0.2", "127.0.0.3"]
    named.publish(both)
    a, _b = named.start(both)
    workers = a.wait_for_workers(2)
    fifo = hang_lookups(named)
    try:
        deadline = time.monotonic() + 30            # a refresh starts a lookup, which hangs
        while not any(child.name() == LOOKUP_PROCESS_NAME.decode()
                      for child in psutil.Process(a.proc.pid).children()):
            assert time.monotonic() < deadline, "no lookup started"
            time.sleep(0.05)
        os.kill(workers[0], signal.SIGKILL)
        replaced = a.wait_for_workers(2, exclude=workers[:1], timeout=30)
        assert workers[0] not in replaced
        assert a.get("test", "still-served")[:2] == (200, b"value-of-still-served")
        assert a.stop(signal.SIGTERM, timeout=30) == 0
        assert "cannot resolve" not in a.log()      # still waiting: nothing to say yet
    finally:
        release_lookups(fifo)


def test_a_lookup_past_its_time_is_killed_and_counts_as_failed(tmp_path, monkeypatch):
    from shmcache import discovery
    from shmcache.config import parse_args
    fifo = tmp_path / "hosts"
    os.mkfifo(fifo)
    monkeypatch.setenv("SHMCACHE_HOSTS_FILE", str(fifo))
    source = discovery.PeerSource(parse_args(["--peers-dns", f"{NAME}:8001", "--port", "8001"]))
    source._resolved_once = True                    # as after boot: lookups run in children
    source.refresh()
    lookup = source.lookup
    assert lookup is not None and select.select([lookup.fd], [], [], 0.3)[0] == []
    lookup.started -= discovery.LOOKUP_TIMEOUT + 1  # its time is up (the clock, not a wait)
    assert lookup.overdue()
    source.lookup_done()
    assert source.lookup is None and source.answer_ready
    assert os.waitpid(lookup.pid, 0)[0] == lookup.pid            # killed: it exits at once
    source.refresh(lookup=False)                                 # the failure is taken
    assert not source.answer_ready


def test_a_lookup_child_answers_over_its_pipe(tmp_path, monkeypatch):
    from shmcache.discovery import DnsLookup
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.7 {NAME}\n127.0.0.8 {NAME}\n")
    monkeypatch.setenv("SHMCACHE_HOSTS_FILE", str(hosts))
    found = DnsLookup(NAME)
    assert found.collect() == ["127.0.0.7", "127.0.0.8"]
    os.waitpid(found.pid, 0)
    missing = DnsLookup("not-listed.test")
    with pytest.raises(OSError, match="not-listed.test is not in"):
        missing.collect()
    os.waitpid(missing.pid, 0)
