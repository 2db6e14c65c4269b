"""--token: writes and the peer route need the bearer token on every host, peers send it,
reads stay open unless --token-reads."""

import subprocess
import sys

import pytest

import shmcache
from shmcache.wire import encode_set_request
from shmcache.ring import Ring

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2", "--hot-fraction", "0"]
TOKEN = "s3cret-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
BAD = {"Authorization": "Bearer wrong"}

# (method, path, body) of every route that needs the token
GUARDED = [
    ("PUT", "/cache/test/k", b"v"),
    ("DELETE", "/cache/test/k", None),
    ("GET", "/_kcache/test/k", None),
    ("PUT", "/_kcache/test/k", encode_set_request("test", "k", b"v")),
    ("DELETE", "/_kcache/test/k", None),
]


@pytest.fixture
def secured(cluster):
    return cluster(2, APP + ["--token", TOKEN])


@pytest.mark.parametrize("method, path, body", GUARDED)
def test_guarded_routes_refuse_without_the_token_and_work_with_it(secured, method, path, body):
    for host in secured:
        for headers in ({}, BAD, {"Authorization": TOKEN}, {"Authorization": "Basic abc"}):
            status, reply, response_headers = host.request(method, path, body=body, headers=headers)
            assert status == 401 and b"token" in reply
            assert response_headers["WWW-Authenticate"].startswith("Bearer")
        assert host.request(method, path, body=body, headers=GOOD)[0] == 200


def test_peers_send_the_token_and_reads_stay_open(secured):
    a, b = secured
    ring = Ring([a.url, b.url])
    key = next(k for k in (f"t{i}" for i in range(100)) if ring.owner_of(k) == b.url)
    assert a.get("test", key)[:2] == (200, f"value-of-{key}".encode())       # no token needed
    calls = [host for _pid, host, k in a.calls_with_hosts() if k == key]
    assert calls == [b.url]                         # A fetched it from B with the token
    assert a.request("PUT", "/cache/test/shared", body=b"v", headers=GOOD)[0] == 200
    assert b.get("test", "shared")[:2] == (200, b"v")   # the set reached the owner
    assert a.request("GET", "/healthz")[0] == 200
    assert a.request("GET", "/stats")[0] == 200


def test_token_reads_guards_reads_but_not_healthz(cluster):
    (host,) = cluster(1, APP + ["--token", TOKEN, "--token-reads"])
    for path in ("/cache/test/x", "/stats", "/metrics"):
        assert host.request("GET", path)[0] == 401
        assert host.request("GET", path, headers=GOOD)[0] == 200
    assert host.request("GET", "/healthz")[0] == 200
    with shmcache.connect(name=host.name, token=TOKEN) as cache:
        assert cache.get("test", "y") == b"value-of-y"
    with shmcache.connect(name=host.name, token="wrong") as cache:
        with pytest.raises(shmcache.AuthError, match="token") as refused:
            cache.get("test", "z")
        assert not isinstance(refused.value, shmcache.PeerUnavailable)   # not a network fault


def test_connect_clients_send_the_token_for_cluster_writes(secured, monkeypatch):
    a, b = secured
    monkeypatch.setenv("SHMCACHE_TOKEN", TOKEN)
    with shmcache.connect(name=a.name) as cache:
        cache.set("test", "via-client", b"ok")
        assert b.get("test", "via-client")[:2] == (200, b"ok")
        assert cache.delete("test", "via-client") is True
    monkeypatch.delenv("SHMCACHE_TOKEN")
    with shmcache.connect(name=a.name) as cache:
        with pytest.raises(shmcache.AuthError, match="token"):
            cache.set("test", "via-client", b"no")


def test_token_from_the_environment_and_bad_tokens(supervised):
    host = supervised(APP, env={"SHMCACHE_TOKEN": TOKEN})
    assert host.request("PUT", "/cache/test/k", body=b"v")[0] == 401
    assert host.request("PUT", "/cache/test/k", body=b"v", headers=GOOD)[0] == 200
    bad = subprocess.run([sys.executable, "-m", "shmcache.supervisor", "--token", "two words"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--token" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "shmcache.supervisor", "--token-reads"],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert bad.returncode == 2 and "needs --token" in bad.stderr
