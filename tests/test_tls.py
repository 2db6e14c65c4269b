"""--tls-cert/--tls-key/--tls-ca: the front over HTTPS (and what it does with clients that
do not speak TLS), peers over TLS and the refusal of an untrusted one, and connect() clients
reaching a TLS front. Certificates are made at run time (tlscerts.py)."""

import asyncio
import http.client
import socket
import ssl
import subprocess
import sys
import time

import pytest

import shmcache
import shmcache.asyncio
from shmcache.arena import Front
from shmcache.errors import PeerUnavailable
from shmcache.ring import Ring
from tlscerts import make_ca, make_server_cert

from conftest import REPO, free_port, http_request

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]
DNS_NAME = "cache.shmcache.test"          # a name no resolver knows: only verified, never looked up


class Pki:
    """Two unrelated CAs and server certificates they signed."""

    def __init__(self, directory):
        self.ca = make_ca(directory)
        self.cert = make_server_cert(directory, self.ca)                  # localhost, 127.0.0.1
        self.dns_cert = make_server_cert(directory, self.ca, names=(DNS_NAME,), stem="dns")
        self.other_ca = make_ca(directory, stem="other-ca", common_name="another CA")
        self.other_cert = make_server_cert(directory, self.other_ca, stem="other")

    def args(self, cert=None, ca=True):
        cert = cert or self.cert
        return ["--tls-cert", cert[0], "--tls-key", cert[1], *(["--tls-ca", self.ca[0]] if ca else [])]

    def client(self, name="127.0.0.1", ca=None):
        """(SSLContext, server name), as Supervised and http_request take it."""
        return ssl.create_default_context(cafile=(ca or self.ca)[0]), name


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def run_supervisor(*args):
    return subprocess.run([sys.executable, "-m", "shmcache.supervisor", "--port", str(free_port()),
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60)


# -- the command line ---------------------------------------------------------------------------

def test_a_certificate_without_its_key_or_the_reverse_is_a_usage_error(pki):
    for args in (["--tls-cert", pki.cert[0]], ["--tls-key", pki.cert[1]]):
        result = run_supervisor(*args)
        assert result.returncode == 2
        assert "--tls-cert and --tls-key go together" in result.stderr


def test_unreadable_or_wrong_tls_files_are_refused_at_start(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (["--tls-cert", tmp_path / "absent.pem", "--tls-key", pki.cert[1]], "cannot read --tls-cert"),
        (["--tls-cert", garbage, "--tls-key", pki.cert[1]], "not a PEM certificate"),
        (["--tls-cert", pki.cert[0], "--tls-key", pki.other_cert[1]], "not a PEM certificate"),
        (["--tls-ca", tmp_path / "absent-ca.pem"], "cannot read CA file"),
        (["--tls-ca", garbage], "holds no PEM certificate"),
        ([*pki.args(), "--self", "http://127.0.0.1:1"], "--self must be an https:// URL"),
    ]
    for args, message in cases:
        result = run_supervisor(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_the_segment_records_how_to_verify_a_tls_front(make_cache):
    cache = make_cache()
    arena = cache._store.arena
    arena.set_front("127.0.0.1", 8443, tls=True, tls_name=DNS_NAME, tls_ca="/etc/ca.pem")
    assert arena.front() == Front("127.0.0.1", 8443, True, DNS_NAME, "/etc/ca.pem")
    arena.set_front("127.0.0.1", 8001)
    assert arena.front() == Front("127.0.0.1", 8001) and not arena.front().tls
    with pytest.raises(ValueError):
        arena.set_front("127.0.0.1", 8443, tls=True, tls_name="x" * 300)


# -- the front --------------------------------------------------------------------------------

def test_https_get_put_delete_and_healthz(supervised, pki):
    host = supervised(APP + pki.args(), tls=pki.client())
    assert host.request("GET", "/healthz")[0] == 200
    assert host.get("test", "k1")[:2] == (200, b"value-of-k1")
    assert host.request("PUT", "/cache/test/k1", body=b"new")[0] == 200
    assert host.get("test", "k1")[:2] == (200, b"new")
    assert host.request("DELETE", "/cache/test/k1")[0] == 200
    assert host.get("test", "k1")[:2] == (200, b"value-of-k1")          # loaded again
    assert host.request("PUT", "/cache/test/big", body=b"x" * 200_000)[0] == 200
    assert host.get("test", "big")[:2] == (200, b"x" * 200_000)       # many TLS records
    assert http_request(host.port, "GET", "/healthz", host="localhost",
                        tls=pki.client("localhost"))[0] == 200
    assert "listening on https://" in host.log()


def test_clients_that_do_not_speak_tls_do_not_disturb_the_server(supervised, pki):
    host = supervised(APP + pki.args() + ["--request-timeout", "1"], tls=pki.client())
    kept = http.client.HTTPSConnection("127.0.0.1", host.port, context=pki.client()[0], timeout=10)
    kept.request("GET", "/cache/test/before")
    assert kept.getresponse().read() == b"value-of-before"

    # Plain HTTP to the TLS port: a plain answer that says so, then the connection closes.
    status, body, headers = http_request(host.port, "GET", "/cache/test/plain")
    assert (status, body) == (400, b"this port speaks HTTPS: use https://\n")
    assert headers["Connection"] == "close"
    # Bytes that start like TLS and are not: closed, nothing answered.
    with socket.create_connection(("127.0.0.1", host.port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05hello, not really TLS" * 4)
        assert b"HTTP" not in _read_until_closed(raw)       # a TLS alert at most
    # A client that does not trust the server gives up mid-handshake.
    untrusting = ssl.create_default_context(cafile=pki.other_ca[0])
    with pytest.raises(ssl.SSLCertVerificationError):
        http_request(host.port, "GET", "/healthz", tls=(untrusting, "127.0.0.1"))
    # Records that do not decrypt, after a good handshake: closed.
    with socket.create_connection(("127.0.0.1", host.port), timeout=10) as raw:
        _handshake(raw, pki)
        raw.sendall(b"\x17\x03\x03\x00\x20" + bytes(range(32)))
        assert b"HTTP" not in _read_until_closed(raw)
    # A client that connects and never says anything is closed within the request timeout.
    silent = socket.create_connection(("127.0.0.1", host.port), timeout=10)
    started = time.monotonic()
    assert _read_until_closed(silent) == b""
    assert time.monotonic() - started < 5
    silent.close()
    # A client that stops mid-handshake too.
    stalled = socket.create_connection(("127.0.0.1", host.port), timeout=10)
    stalled.sendall(_client_hello(pki)[:20])
    assert _read_until_closed(stalled) == b""
    stalled.close()

    kept.request("GET", "/cache/test/after")                # the kept connection still works
    assert kept.getresponse().read() == b"value-of-after"
    kept.close()
    assert host.get("test", "again")[:2] == (200, b"value-of-again")
    assert len(host.worker_pids()) == 2
    assert "Traceback" not in host.log()


def test_a_handshake_that_arrives_a_byte_at_a_time_completes(supervised, pki):
    """Every step of the server's handshake finds only part of what it wants to read."""
    host = supervised(APP + pki.args(), tls=pki.client())
    with socket.create_connection(("127.0.0.1", host.port), timeout=10) as raw:
        tls, incoming, outgoing = _handshake(raw, pki, dribble=True)
        tls.write(b"GET /cache/test/dribbled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        request = outgoing.read()
        for index in range(0, len(request), 7):
            raw.sendall(request[index:index + 7])
        answer = b""
        while b"value-of-dribbled" not in answer:
            data = raw.recv(65536)
            assert data, answer
            incoming.write(data)
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


def _handshake(raw, pki, dribble=False):
    """(SSLObject, incoming, outgoing) of a TLS session made over the socket ``raw``, the
    client's messages sent a byte at a time if ``dribble``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client()[0].wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            break
        _send(raw, outgoing.read(), dribble)
        incoming.write(raw.recv(65536))
    _send(raw, outgoing.read(), dribble)                  # the client's Finished
    return tls, incoming, outgoing


def _send(raw, data, dribble):
    if not dribble:
        raw.sendall(data)
        return
    for byte in data:
        raw.sendall(bytes([byte]))
        time.sleep(0.001)


def _client_hello(pki):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client()[0].wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _read_until_closed(sock):
    """Everything the server sends until it closes the connection (timeout: the socket's)."""
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


# -- peers ------------------------------------------------------------------------------------

def owned_by(url, urls, prefix):
    ring = Ring(urls)
    return next(k for k in (f"{prefix}-{i}" for i in range(1000)) if ring.owner_of(k) == url)


def test_two_tls_hosts_fetch_from_owners_over_tls(cluster, pki):
    a, b = cluster(2, APP + pki.args() + ["--hot-fraction", "0"], tls=pki.client())
    assert a.url.startswith("https://")
    key = owned_by(b.url, [a.url, b.url], "tls")
    assert a.get("test", key)[:2] == (200, f"value-of-{key}".encode())
    assert [h for _p, h, k in a.calls_with_hosts() if k == key] == [b.url]   # loaded on B
    assert a.request("PUT", f"/cache/test/{key}", body=b"set over tls")[0] == 200
    assert b.get("test", key)[:2] == (200, b"set over tls")                 # stored on B
    assert "suspect" not in a.log() + b.log()


def test_a_peer_whose_certificate_does_not_verify_is_refused_and_the_key_loads_here(
        supervised, pki):
    ports = [free_port(), free_port()]
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    peers = ["--peers", ",".join(urls), "--hot-fraction", "0"]
    a = supervised(APP + pki.args() + peers, env={"KCACHE_TEST_HOST": urls[0]}, port=ports[0],
                   tls=pki.client())
    b = supervised(APP + pki.args(cert=pki.other_cert) + peers,
                   env={"KCACHE_TEST_HOST": urls[1]}, port=ports[1],
                   tls=pki.client(ca=pki.other_ca))
    key = owned_by(urls[1], urls, "untrusted")
    assert a.get("test", key)[:2] == (200, f"value-of-{key}".encode())
    assert [h for _p, h, k in a.calls_with_hosts() if k == key] == [urls[0]]   # loaded on A
    log = a.log()
    assert (f"peer {urls[1]} refused: its TLS certificate does not verify against the CA "
            f"file {pki.ca[0]}") in log
    assert f"peer {urls[1]} suspect" in log                 # counted as a peer failure
    assert "Traceback" not in log + b.log()


# -- connect() clients --------------------------------------------------------------------------

@pytest.fixture
def dns_named(supervised, pki):
    """A TLS host whose certificate names only DNS_NAME, its --self."""
    port = free_port()
    return supervised(APP + pki.args(cert=pki.dns_cert) + ["--self", f"https://{DNS_NAME}:{port}"],
                      port=port, tls=pki.client(DNS_NAME))


def test_connect_loads_misses_through_a_tls_front(dns_named):
    with shmcache.connect(name=dns_named.name) as cache:
        front = cache._front.address()
        assert front.tls and front.tls_name == DNS_NAME
        assert cache.get("test", "sync-miss") == b"value-of-sync-miss"
        assert cache.get_many("test", ["sync-a", "sync-b"]) == {
            "sync-a": b"value-of-sync-a", "sync-b": b"value-of-sync-b"}
    loaded = sorted(k for _p, _h, k in dns_named.calls_with_hosts())
    assert loaded == ["sync-a", "sync-b", "sync-miss"]          # by the front's workers
    assert dns_named.get("test", "sync-miss")[:2] == (200, b"value-of-sync-miss")


def test_async_connect_loads_misses_through_a_tls_front(dns_named):
    async def main():
        async with shmcache.asyncio.connect(name=dns_named.name) as cache:
            values = await asyncio.gather(*(cache.get("test", "async-miss") for _ in range(5)))
            assert values == [b"value-of-async-miss"] * 5
            assert await cache.get_many("test", ["async-a"]) == {"async-a": b"value-of-async-a"}
    asyncio.run(main())
    assert [k for _p, _h, k in dns_named.calls_with_hosts()] == ["async-miss", "async-a"]


def test_connect_refuses_a_front_whose_certificate_does_not_verify(dns_named, pki):
    with shmcache.connect(name=dns_named.name, tls_server_name="other.test") as cache:
        with pytest.raises(PeerUnavailable, match="does not verify for 'other.test'"):
            cache.get("test", "wrong-name")
    with shmcache.connect(name=dns_named.name, tls_ca=pki.other_ca[0]) as cache:
        with pytest.raises(PeerUnavailable, match=f"against the CA file {pki.other_ca[0]}"):
            cache.get("test", "wrong-ca")

    async def main():
        async with shmcache.asyncio.connect(name=dns_named.name,
                                            tls_server_name="other.test") as cache:
            with pytest.raises(PeerUnavailable, match="does not verify"):
                await cache.get("test", "async-wrong-name")
    asyncio.run(main())
    with shmcache.connect(name=dns_named.name, tls_ca=pki.ca[0],
                          tls_server_name=DNS_NAME) as cache:       # said explicitly: fine
        assert cache.get("test", "explicit") == b"value-of-explicit"


def test_stats_reads_a_tls_front(dns_named, pki):
    result = subprocess.run([sys.executable, "-m", "shmcache.stats", "--port", str(dns_named.port),
                             "--tls-ca", pki.ca[0], "--tls-server-name", DNS_NAME],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"segment {dns_named.name}" in result.stdout


def test_a_client_follows_its_front_to_tls_across_a_warm_restart(supervised, pki):
    plain = supervised(APP + ["--warm-restart"])
    with shmcache.connect(name=plain.name) as cache:
        assert cache.get("test", "before") == b"value-of-before"
        assert plain.stop() == 0
        secure = supervised(APP + ["--warm-restart", *pki.args()], port=plain.port,
                            name=plain.name, tls=pki.client())
        assert "warm start" in secure.log()
        deadline = time.monotonic() + 10
        while not cache._front.address().tls and time.monotonic() < deadline:
            time.sleep(0.05)                     # the client's next segment check sees it
        assert cache.get("test", "before") == b"value-of-before"      # kept
        assert cache.get("test", "after") == b"value-of-after"        # loaded over HTTPS
    assert sorted(k for _p, _h, k in secure.calls_with_hosts()) == ["after", "before"]
