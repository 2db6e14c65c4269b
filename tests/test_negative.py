"""Negative caching: ``Group(..., not_found_ttl=SECONDS)`` remembers a getter's KeyError for
every process of the host (on a cluster, on the key's owner), until the window ends or a
set or delete of the key."""

import json
import re
import subprocess
import sys
import time

import pytest

import shmcache
from shmcache import Group
from shmcache.errors import InvalidArgument, NotFound
from test_cluster import APP, owner
from test_flush import calls_of, wait_until

pytestmark = pytest.mark.integration

COUNTING = ["--app", "apps.counting:groups", "--workers", "4"]


@pytest.mark.parametrize("seconds", [0, -1, True, "5", 1e9, float("nan")])
def test_not_found_ttl_is_validated_like_a_ttl(seconds):
    with pytest.raises(InvalidArgument, match="not_found_ttl"):
        Group("g", 1 << 20, dict().__getitem__, not_found_ttl=seconds)
    assert Group("g", 1 << 20, not_found_ttl=2.5).not_found_ttl == 2.5
    assert Group("g", 1 << 20).not_found_ttl is None


def test_an_embedded_getters_not_found_is_remembered_until_a_set_or_delete(segment_name):
    calls = []

    def getter(key):
        calls.append(key)
        raise KeyError(key)
    with shmcache.create(segment_name, "8MiB", groups=[
            Group("g", 1 << 20, getter, not_found_ttl=600),
            Group("plain", 1 << 20, getter)]) as cache:
        for _ in range(5):
            with pytest.raises(NotFound):
                cache.get("g", "nobody")
            assert cache.peek("g", "nobody") is None
        assert calls == ["nobody"]
        assert cache.get_many("g", ["nobody"]) == {} and calls == ["nobody"]
        assert cache.delete("g", "nobody") is False           # no value was there
        with pytest.raises(NotFound):
            cache.get("g", "nobody")
        assert calls == ["nobody"] * 2                          # the delete forgot it
        cache.set("g", "nobody", b"")                           # even an empty value
        assert cache.get("g", "nobody") == b"" and cache.peek("g", "nobody") == b""
        assert calls == ["nobody"] * 2
        for _ in range(2):
            with pytest.raises(NotFound):
                cache.get("plain", "nobody")                    # off by default
        assert calls == ["nobody"] * 4
        cache._live_store().audit()


def test_a_remembered_not_found_reads_alike_lock_free_and_under_the_lock(make_cache,
                                                                          monkeypatch):
    from shmcache import reader
    from shmcache.reader import NOT_FOUND
    from shmcache.slabs import STATE_NEGATIVE
    cache = make_cache()
    store = cache._live_store()
    assert store.remember_not_found("g", "gone", 600) is True
    for walk in (64, 0):                         # 0: every walk "too long", read locked
        monkeypatch.setattr(reader, "MAX_CHAIN", walk)
        assert store.get_with_expiry("g", "gone") is NOT_FOUND
        assert store.recheck("g", "gone") is NOT_FOUND
        assert cache.peek("g", "gone") is None
    monkeypatch.setattr(reader, "MAX_CHAIN", 64)
    counts = cache.stats()["groups"]["g"]
    assert (counts["negative_hits"], counts["misses"], counts["hits"]) == (2, 2, 0)
    assert counts["gets"] == 4 and counts["items"] == 1
    now = time.time()                            # one that has expired is a plain miss
    gid = store.group_id("g")
    store.locked(store.index.store, gid, b"old", b"", now - 1, now, STATE_NEGATIVE)
    assert store.get_with_expiry("g", "old") is None
    assert cache.touch("g", "gone", 60) is False and cache.incr("g", "gone") is None
    assert store.get_with_expiry("g", "gone") is NOT_FOUND      # neither changed it
    assert cache.add("g", "gone", b"1") is True                 # nor is it a value to add to
    assert cache.incr("g", "gone") == 2
    store.audit()


def test_a_hot_missing_key_calls_the_getter_once_for_every_process(supervised):
    host = supervised(COUNTING)
    key = "missing-hot"
    clients = [processes_get(host, key) for _ in range(4)]
    for _ in range(20):
        assert host.get("remember", key)[0] == 404
    for client in clients:
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        assert out.split() == [b"404"] * 50
    assert calls_of(host, key) == 1
    with shmcache.connect(name=host.name) as cache:
        assert cache.peek("remember", key) is None
        with pytest.raises(NotFound):
            cache.get("remember", key)
    status, body, _ = host.request("POST", "/cache/remember?op=get",
                                   body=json.dumps({"keys": [key]}).encode())
    assert status == 200 and json.loads(body)["missing"] == [key]
    assert calls_of(host, key) == 1
    wait_until(lambda: negative_hits_in_metrics(host) >= 20)    # workers publish each second


def negative_hits_in_metrics(host):
    metrics = host.request("GET", "/metrics")[1].decode()
    hits = re.search(r'kcache_negative_hits_total\{group="remember"\} (\d+)', metrics)
    return int(hits.group(1))


def processes_get(host, key, times=50):
    """A process that gets ``key`` ``times`` times through connect() and prints the outcome."""
    code = ("import sys, shmcache\n"
            "from shmcache.errors import NotFound\n"
            "cache = shmcache.connect(name=sys.argv[1])\n"
            "for _ in range(int(sys.argv[3])):\n"
            "    try:\n"
            "        cache.get('remember', sys.argv[2]); print(200)\n"
            "    except NotFound:\n"
            "        print(404)\n")
    return subprocess.Popen([sys.executable, "-c", code, host.name, key, str(times)],
                            env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_getter_is_asked_again_once_the_window_ends(supervised):
    host = supervised(COUNTING)
    key = "missing-window"
    assert host.get("remember-brief", key)[0] == 404
    deadline = time.monotonic() + 60
    while calls_of(host, key) < 2:                  # a 1 s window: asked again after it
        assert time.monotonic() < deadline, "the not-found was never asked for again"
        assert host.get("remember-brief", key)[0] == 404
        time.sleep(0.05)


def test_set_and_delete_over_http_forget_a_remembered_not_found(supervised):
    host = supervised(COUNTING)
    key = "missing-sd"
    path = f"/cache/remember/{key}"
    for _ in range(3):
        assert host.get("remember", key)[0] == 404
    assert calls_of(host, key) == 1
    assert host.request("PUT", path, body=b"now it exists")[0] == 200
    assert host.get("remember", key)[:2] == (200, b"now it exists")
    status, body, _ = host.request("DELETE", path)
    assert status == 200 and json.loads(body)["deleted"] is True
    assert host.get("remember", key)[0] == 404 and calls_of(host, key) == 2
    assert host.get("remember", key)[0] == 404 and calls_of(host, key) == 2
    status, body, _ = host.request("DELETE", path)            # forgetting is not a delete
    assert status == 200 and json.loads(body)["deleted"] is False
    assert host.get("remember", key)[0] == 404 and calls_of(host, key) == 3


def test_the_owner_remembers_a_not_found_for_its_peers(cluster):
    hosts = cluster(3, APP + ["--hot-fraction", "1.0"])
    key = "missing-clustered"
    home = owner(hosts, key)
    others = [host for host in hosts if host is not home]
    for _ in range(3):
        for host in others:
            assert host.get("remember", key)[0] == 404
    assert home.request("GET", f"/_kcache/remember/{key}")[0] == 404
    assert [(h, k) for _p, h, k in home.calls_with_hosts() if k == key] == [(home.url, key)]
    wait_until(lambda: negative_hits_in_metrics(home) >= 6)   # 5 peers after the load, 1 direct
    assert others[0].request("PUT", f"/cache/remember/{key}", body=b"v")[0] == 200
    for host in hosts:
        assert host.get("remember", key)[:2] == (200, b"v")
