"""Group flush: ``DELETE /cache/<group>`` and ``Client.clear(group)`` drop a group on every
host, hot copies included; a flush racing a load does not leave the pre-flush value cached."""

import json
import threading
import time

import pytest

import shmcache
from shmcache.errors import PeerUnavailable
from apps.counting import open_gate
from test_cluster import APP, owner

pytestmark = pytest.mark.integration

KEYS = [f"flush-{i}" for i in range(30)]


def cached(host, group, keys):
    """The keys of ``group`` that ``host`` holds in shared memory (values or hot copies)."""
    with shmcache.connect(name=host.name) as cache:
        return [key for key in keys if cache.peek(group, key) is not None]


def wait_until(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- the store: a clear keeps loads asked for before it out ---------------------------------

def test_a_value_asked_for_before_a_clear_is_not_stored_after_it(make_cache):
    cache = make_cache(groups={"g": 1 << 20, "other": 1 << 20})
    store = cache._live_store()
    before = store.generation("g")
    store.clear("g")
    assert store.generation("g") != before and store.generation("other") == 0
    assert store.set("g", "k", b"old", generation=before) is False
    assert store.remember_not_found("g", "k", 60, generation=before) is False
    assert store.set_hot("g", "k", b"old", None, store.version("g", "k"), before) is False
    assert cache.peek("g", "k") is None
    assert store.set("g", "k", b"new", generation=store.generation("g")) is True
    assert cache.peek("g", "k") == b"new"
    cache.clear()                                     # every group moves on
    assert store.generation("other") == 1
    store.audit()


# -- a cluster -------------------------------------------------------------------------------

def test_flush_drops_every_hosts_entries_including_hot_copies(cluster):
    hosts = cluster(3, APP + ["--hot-fraction", "1.0"])
    for host in hosts:
        for key in KEYS:
            assert host.get("test", key)[:2] == (200, f"value-of-{key}".encode())
    assert hosts[0].request("PUT", "/cache/remember/kept", body=b"other group")[0] == 200
    for host in hosts:                          # owners hold values, the others hot copies
        assert cached(host, "test", KEYS) == KEYS
    status, body, _ = hosts[1].request("DELETE", "/cache/test")
    assert (status, json.loads(body)) == (200, {"cleared": True, "failed_peers": {}})
    for host in hosts:
        assert cached(host, "test", KEYS) == []
        with shmcache.connect(name=host.name) as cache:
            assert cache.stats()["groups"]["test"]["items"] == 0
    assert owner(hosts, "kept").get("remember", "kept")[:2] == (200, b"other group")
    loads = len(hosts[0].calls())
    key = KEYS[0]
    assert hosts[2].get("test", key)[:2] == (200, f"value-of-{key}".encode())
    assert len(hosts[0].calls()) == loads + 1           # loaded again, on its owner
    with shmcache.connect(name=hosts[0].name) as cache:   # through the front, cluster-wide
        assert cache.clustered
        cache.clear("test")
    for host in hosts:
        assert cached(host, "test", [key]) == []


def test_a_flush_with_a_host_down_answers_502_naming_it(cluster):
    hosts = cluster(3, APP + ["--hot-fraction", "0", "--peer-timeout", "2"])
    down = hosts[2]
    for key in KEYS:
        assert hosts[0].get("test", key)[0] == 200
    down.kill()                                  # the supervisor and, soon, its workers
    status, body, _ = hosts[0].request("DELETE", "/cache/test")
    answer = json.loads(body)
    assert status == 502 and answer["cleared"] is True
    assert list(answer["failed_peers"]) == [down.url]
    for host in hosts[:2]:                       # the hosts that are up are flushed
        assert cached(host, "test", KEYS) == []
    with shmcache.connect(name=hosts[1].name) as cache:
        with pytest.raises(PeerUnavailable, match=down.url):
            cache.clear("test")


# -- one host ----------------------------------------------------------------------------------

def test_flush_needs_the_token_and_keeps_the_other_routes(supervised):
    host = supervised(["--app", "apps.counting:groups", "--workers", "2", "--token", "s3cret"])
    auth = {"Authorization": "Bearer s3cret"}
    assert host.get("test", "a")[0] == 200
    assert host.request("DELETE", "/cache/test")[0] == 401
    assert host.request("DELETE", "/_kcache/test")[0] == 401
    assert cached(host, "test", ["a"]) == ["a"]
    status, body, _ = host.request("DELETE", "/cache/test", headers=auth)
    assert (status, json.loads(body)) == (200, {"cleared": True, "failed_peers": {}})
    assert cached(host, "test", ["a"]) == []
    assert host.get("test", "a")[0] == 200
    status, body, _ = host.request("DELETE", "/_kcache/test", headers=auth)  # a peer's flush
    assert (status, body) == (200, b"cleared\n") and cached(host, "test", ["a"]) == []
    assert host.request("DELETE", "/cache/nosuch", headers=auth)[0] == 404
    assert host.request("DELETE", "/cache/bad%20name", headers=auth)[0] == 400
    assert host.request("GET", "/cache/test", headers=auth)[0] == 400
    assert host.request("PUT", "/cache/test", body=b"x", headers=auth)[0] == 400
    assert host.get("test", "b")[0] == 200
    with shmcache.connect(name=host.name) as cache:      # alone: a shared-memory clear,
        assert not cache.clustered                       # which needs no token
        cache.clear("test")
        assert cache.peek("test", "b") is None


@pytest.mark.parametrize("get_after_flush", [False, True])
def test_a_flush_racing_a_slow_load_does_not_leave_the_old_value_cached(
        supervised, tmp_path, get_after_flush):
    host = supervised(["--app", "apps.counting:groups", "--workers", "2"])
    key = "gate-versioned-flush"
    (tmp_path / "version").write_text("1")
    before, after = [], []
    loading = threading.Thread(target=lambda: before.append(host.get("test", key)[:2]))
    loading.start()
    wait_until(lambda: calls_of(host, key) == 1)                # the getter read "1"
    (tmp_path / "version").write_text("2")
    status, body, _ = host.request("DELETE", "/cache/test")
    assert (status, json.loads(body)) == (200, {"cleared": True, "failed_peers": {}})
    if get_after_flush:              # does not wait for the load from before the flush:
        later = threading.Thread(target=lambda: after.append(host.get("test", key)[:2]))
        later.start()
        wait_until(lambda: calls_of(host, key) == 2)            # its own, reading "2"
    open_gate(tmp_path, key)
    loading.join(60)
    assert before == [(200, f"value-of-{key}@1".encode())]    # it began before the flush
    if get_after_flush:
        later.join(60)
        assert after == [(200, f"value-of-{key}@2".encode())]
        with shmcache.connect(name=host.name) as cache:
            assert cache.peek("test", key) == f"value-of-{key}@2".encode()
    else:
        with shmcache.connect(name=host.name) as cache:
            assert cache.peek("test", key) is None             # but it is not kept
        assert host.get("test", key)[:2] == (200, f"value-of-{key}@2".encode())
    assert calls_of(host, key) == 2


def calls_of(host, key):
    return [k for _pid, k in host.calls()].count(key)
