"""Fetches from owners on the event loop (peer_fetch.py), against small servers in threads.

The fetching side is an HttpServer too: its handler starts a fetch on its own loop and
answers with what the fetch gave, so every fetch runs on a loop thread as in a worker.
"""

import socket
import threading
import time

import pytest

from shmcache.errors import NotFound, PeerUnavailable
from shmcache.futures import Promise, then
from shmcache.wire import PROTOBUF, encode_get_response
from shmcache.http_messages import error, render
from shmcache.httpserver import HttpServer
from shmcache import peer_fetch
from shmcache.peer_fetch import PeerFetcher
from shmcache.peers import PeerClient, PeerError

pytestmark = pytest.mark.integration


def listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, sock.getsockname()[1]


def serve(handle):
    """An HttpServer answering ``handle`` in a thread: (server, port)."""
    sock, port = listening()
    server = HttpServer(sock, handle)
    threading.Thread(target=server.serve, kwargs={"tick_interval": 0.05}, daemon=True).start()
    return server, port


class Owner:
    """A peer route answering 200 with a GetResponse, 404 for keys starting "absent", 500
    for "fail"; it remembers which client connections asked. ``close``: close each
    connection after its answer."""

    def __init__(self, close=False):
        self.close = close
        self.connections = set()
        self.server, self.port = serve(self.handle)
        self.url = f"http://127.0.0.1:{self.port}"

    def handle(self, request):
        self.connections.add(request.peer)
        key = request.path.rsplit("/", 1)[1]
        if key.startswith("absent"):
            return error(404, f"{key} not found")
        if key.startswith("fail"):
            return error(500, "the getter failed")
        return render(200, encode_get_response(b"value-of-" + key.encode(), 1e9),
                      content_type=PROTOBUF, close=self.close)


class Asker:
    """The fetching side: GET /<key> fetches ``key`` from ``client`` on the loop and answers
    the outcome as text ("value <v> <expiry>" or "<ExceptionType>: <message>")."""

    def __init__(self, client, getaddrinfo=socket.getaddrinfo):
        self.client = client
        self.server, self.port = serve(self.handle)
        self.fetcher = PeerFetcher(self.server, getaddrinfo=getaddrinfo)

    def handle(self, request):
        future = self.fetcher.fetch(self.client, "g", request.path[1:])
        assert isinstance(future, Promise)  # made on the loop, not a Condition-laden Future
        return then(future, self.answer)

    @staticmethod
    def answer(done):
        try:
            value, expiry = done.result()
        except Exception as exc:
            return render(200, f"{type(exc).__name__}: {exc}")
        return render(200, f"value {value.decode()} {expiry}")

    def ask(self, key, timeout=10):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(f"GET /{key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode()


@pytest.fixture
def stoppers():
    servers = []
    yield servers
    for server in servers:
        server.stop()


def asker_for(url, stoppers, getaddrinfo=socket.getaddrinfo, **options):
    asker = Asker(PeerClient(url, **options), getaddrinfo)
    stoppers.append(asker.server)
    return asker


def test_values_come_over_one_kept_alive_connection(stoppers):
    owner = Owner()
    stoppers.append(owner.server)
    asker = asker_for(owner.url, stoppers)
    for index in range(20):
        assert asker.ask(f"k{index}") == f"value value-of-k{index} 1000000000.0"
    assert len(owner.connections) == 1


def test_statuses_mean_what_they_mean_to_the_blocking_client(stoppers):
    owner = Owner()
    stoppers.append(owner.server)
    asker = asker_for(owner.url, stoppers)
    assert asker.ask("absent-1") == "NotFound: absent-1 not found"
    assert asker.ask("fail-1").startswith(f"{PeerError.__name__}: {owner.url} answered 500")
    with pytest.raises(NotFound):
        PeerClient(owner.url).fetch("g", "absent-2")


def test_a_refused_connection_is_peer_unavailable(stoppers):
    sock, port = listening()
    sock.close()
    asker = asker_for(f"http://127.0.0.1:{port}", stoppers)
    assert asker.ask("k").startswith(f"{PeerUnavailable.__name__}: http://127.0.0.1:{port}: ")


def test_a_peer_that_never_answers_times_out(stoppers):
    sock, port = listening()                  # accepts (the kernel does), never answers
    try:
        asker = asker_for(f"http://127.0.0.1:{port}", stoppers, read_timeout=0.3)
        begin = time.monotonic()
        assert asker.ask("k") == f"PeerUnavailable: http://127.0.0.1:{port}: timed out"
        assert 0.3 <= time.monotonic() - begin < 3
    finally:
        sock.close()


def test_an_idle_connection_the_peer_closed_is_replaced(stoppers):
    owner = Owner()
    stoppers.append(owner.server)
    asker = asker_for(owner.url, stoppers)
    assert asker.ask("k1") == "value value-of-k1 1000000000.0"
    for connection in list(owner.server.connections.values()):
        connection.sock.shutdown(socket.SHUT_RDWR)     # the owner drops its keep-alive
    time.sleep(0.1)
    assert asker.ask("k2") == "value value-of-k2 1000000000.0"
    assert len(owner.connections) == 2


def raw_peer(response, close=False):
    """A peer that answers every request with the bytes ``response``: its port."""
    sock, port = listening()

    def run():
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            with client:
                client.recv(65536)
                client.sendall(response)
                if not close:
                    client.recv(65536)
    threading.Thread(target=run, daemon=True).start()
    return sock, port


@pytest.mark.parametrize("framing, close", [
    (b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", False),
    (b"Connection: close\r\n\r\n%s", True),
])
def test_chunked_and_close_delimited_answers_are_read_whole(stoppers, framing, close):
    body = encode_get_response(b"v" * 3000)
    if b"%x" in framing:
        framing = framing.replace(b"%x", b"%x" % len(body))
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n" + \
        framing.replace(b"%s", body)
    sock, port = raw_peer(response, close=close)
    try:
        asker = asker_for(f"http://127.0.0.1:{port}", stoppers)
        assert asker.ask("k") == f"value {'v' * 3000} None"
    finally:
        sock.close()


def test_fetches_beyond_the_connection_cap_wait_for_a_free_connection(stoppers, monkeypatch):
    monkeypatch.setattr(peer_fetch, "MAX_CONNECTIONS", 2)
    owner = Owner()
    stoppers.append(owner.server)
    asker = asker_for(owner.url, stoppers)
    answers = {}

    def ask(index):
        answers[index] = asker.ask(f"k{index}")
    threads = [threading.Thread(target=ask, args=(index,)) for index in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {index: f"value value-of-k{index} 1000000000.0" for index in range(30)}
    assert len(owner.connections) <= 2


def test_cancelled_timers_do_not_pile_up():
    sock, _port = listening()
    server = HttpServer(sock, lambda request: b"")
    try:
        fired = []
        for index in range(20000):
            server.call_later(60, lambda: fired.append(1)).cancel()
        server.call_later(60, lambda: fired.append(2))
        assert len(server._timers) < 8192
        assert [entry[2].function is not None for entry in server._timers].count(True) == 1
    finally:
        sock.close()


# -- host names: resolved off the loop -----------------------------------------------------------

class Resolver:
    """The system's getaddrinfo, called through a gate: each lookup waits until the test
    opens it (``release``), and records the thread it ran on."""

    def __init__(self, gated=True):
        self.gate = threading.Semaphore(0)
        self.gated = gated
        self.threads = []
        self.started = threading.Semaphore(0)

    def __call__(self, host, port, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.started.release()
        if self.gated:
            assert self.gate.acquire(timeout=60), "the test never released the lookup"
        return socket.getaddrinfo(host, port, **kwargs)

    def release(self, count=1):
        for _ in range(count):
            self.gate.release()


def ask_in_thread(asker, key):
    answer = []
    thread = threading.Thread(target=lambda: answer.append(asker.ask(key, timeout=60)))
    thread.start()
    return thread, answer


def test_a_host_name_is_resolved_on_a_thread_not_the_loop(stoppers):
    owner = Owner()                            # listens on 127.0.0.1; "localhost" may say ::1 first
    stoppers.append(owner.server)
    resolver = Resolver(gated=False)
    asker = asker_for(f"http://localhost:{owner.port}", stoppers, getaddrinfo=resolver)
    assert asker.ask("k1") == "value value-of-k1 1000000000.0"
    assert resolver.threads == ["shmcache-resolve"]
    assert asker.ask("k2") == "value value-of-k2 1000000000.0"     # kept: no second lookup
    assert resolver.threads == ["shmcache-resolve"]


def test_a_slow_lookup_holds_up_only_the_fetches_that_need_it(stoppers):
    """While the lookup of one peer's name hangs, the same loop fetches from a peer named by
    address; the waiting fetches (one lookup for all of them) go on once it answers."""
    named, by_address = Owner(), Owner()
    stoppers.extend([named.server, by_address.server])
    resolver = Resolver()
    asker = asker_for(f"http://localhost:{named.port}", stoppers, getaddrinfo=resolver)
    waiting = [ask_in_thread(asker, f"slow{i}") for i in range(3)]
    assert resolver.started.acquire(timeout=60)
    other = Asker(PeerClient(by_address.url), getaddrinfo=resolver)
    stoppers.append(other.server)
    for index in range(5):                     # an IP address never waits for a lookup
        assert other.ask(f"quick{index}") == f"value value-of-quick{index} 1000000000.0"
    assert all(thread.is_alive() for thread, _answer in waiting)
    resolver.release()
    for index, (thread, answer) in enumerate(waiting):
        thread.join(60)
        assert answer == [f"value value-of-slow{index} 1000000000.0"]
    assert resolver.threads == ["shmcache-resolve"]                # one lookup for three


def test_a_lookup_that_never_answers_times_the_fetch_out(stoppers):
    owner = Owner()
    stoppers.append(owner.server)
    resolver = Resolver()
    asker = asker_for(f"http://localhost:{owner.port}", stoppers, getaddrinfo=resolver,
                      connect_timeout=0.3)
    begin = time.monotonic()
    assert asker.ask("k") == f"PeerUnavailable: http://localhost:{owner.port}: connect timed out"
    assert time.monotonic() - begin >= 0.3
    resolver.release()                         # the late answer finds nobody waiting: kept
    deadline = time.monotonic() + 60
    while ("localhost", owner.port) not in asker.fetcher._addresses:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert asker.ask("k") == "value value-of-k 1000000000.0"


def test_a_name_that_does_not_resolve_is_peer_unavailable(stoppers):
    asker = asker_for("http://no-such-host.invalid:80", stoppers)
    assert asker.ask("k").startswith(
        "PeerUnavailable: http://no-such-host.invalid:80: cannot resolve no-such-host.invalid")


def test_an_old_answer_serves_while_the_name_is_looked_up_again(stoppers, monkeypatch):
    """Past RESOLVE_TTL a new connection still connects at once, to the addresses known,
    while a new lookup runs beside it."""
    owner = Owner(close=True)                  # a new connection for every fetch
    stoppers.append(owner.server)
    resolver = Resolver()
    asker = asker_for(f"http://localhost:{owner.port}", stoppers, getaddrinfo=resolver)
    resolver.release()
    assert asker.ask("k1") == "value value-of-k1 1000000000.0"
    monkeypatch.setattr(peer_fetch, "RESOLVE_TTL", 0.0)
    for index in range(3):                     # the second lookup hangs: nobody waits for it
        assert asker.ask(f"k{index}") == f"value value-of-k{index} 1000000000.0"
    assert resolver.threads == ["shmcache-resolve"] * 2
    resolver.release()


def test_a_name_that_stops_resolving_keeps_its_last_addresses(stoppers, monkeypatch, caplog):
    owner = Owner(close=True)
    stoppers.append(owner.server)
    calls = []

    def flaky(host, port, **kwargs):         # the first lookup answers, later ones fail
        calls.append(host)
        if len(calls) > 1:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return socket.getaddrinfo(host, port, **kwargs)
    asker = asker_for(f"http://localhost:{owner.port}", stoppers, getaddrinfo=flaky)
    assert asker.ask("k0") == "value value-of-k0 1000000000.0"
    monkeypatch.setattr(peer_fetch, "RESOLVE_TTL", 0.0)
    assert asker.ask("k1") == "value value-of-k1 1000000000.0"     # starts the failing lookup
    deadline = time.monotonic() + 60
    while "no longer resolves" not in caplog.text:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert asker.ask("k2") == "value value-of-k2 1000000000.0"     # the last addresses serve
