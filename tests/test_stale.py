"""A group's stale window: past its ttl a get answers the old value at once, marked stale over
HTTP, while one load per host refreshes it; a failing refresh keeps the old value until the
window ends; then the miss path as usual. Real supervisors run the counting app's groups
"stale" (ttl 0.5 s, window 600 s) and "stale_brief" (ttl 0.3 s, window 3 s); markers in
the test directory hold, fail or advance their getter (apps/counting.py)."""

import re
import subprocess
import sys
import threading
import time

import pytest

import shmcache
from apps.counting import switch
from shmcache.errors import InvalidArgument
from shmcache.ring import Ring

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "3"]
DEADLINE = 60.0             # seconds any awaited condition may take: generous


def wait_for(condition, what, deadline=DEADLINE):
    """Poll ``condition()`` until it returns something true; that."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"still waiting for {what} after {deadline:.0f}s")


def is_stale(answer):
    return answer[2].get("X-Cache") == "stale"


def first_stale_answer(server, group, key, old):
    """GET until the answer is stale (the ttl ended); every answer before is the fresh
    ``old`` value, unmarked. The stale answer."""
    def look():
        answer = server.get(group, key)
        assert answer[:2] == (200, old), answer
        return answer if is_stale(answer) else None
    return wait_for(look, f"{group}/{key} to go stale")


def first_error_answer(server, group, key, old):
    """GET until the answer is not a 200; every 200 before is the ``old`` value, stale.
    The first other answer."""
    def look():
        answer = server.get(group, key)
        if answer[0] == 200:
            assert answer[1] == old and is_stale(answer), answer
            return None
        return answer
    return wait_for(look, f"{group}/{key} to be served no more")


def calls_of(server, key):
    return [call for call in server.calls_with_hosts() if call[2] == key]


def metric(server, name, group):
    _status, body, _headers = server.request("GET", "/metrics")
    found = re.search(rf'^{name}{{group="{group}"}} (\d+)$', body.decode(), re.M)
    return int(found.group(1)) if found else 0


# -- the group option ---------------------------------------------------------------------

def test_stale_is_validated_like_a_ttl_and_defined_in_the_segment(make_cache):
    for bad in (-1, True, "60", float("inf")):
        with pytest.raises(InvalidArgument):
            shmcache.Group("g", stale=bad)
    assert shmcache.Group("g", ttl=1).stale is None and shmcache.Group("g", stale=0).stale is None
    cache = make_cache()
    cache.define_group("s", 1 << 20, ttl=5, stale=60)
    assert cache.stats()["groups"]["s"]["stale"] == 60.0
    assert cache.stats()["groups"]["g"]["stale"] is None


def test_plain_reads_miss_a_stale_entry_the_stale_read_finds_it_until_the_window_ends(make_cache):
    cache = make_cache()
    cache.define_group("s", 1 << 20, ttl=5, stale=60)
    store = cache._store
    now = time.time()
    store.set("s", "stale", b"old", expire_at=now - 1)
    store.set("s", "dead", b"older", expire_at=now - 61)
    store.set("s", "fresh", b"new")
    assert cache.peek("s", "stale") is None and store.recheck("s", "stale") is None
    value, expiry, hot = store.get_stale("s", "stale")
    assert (bytes(value), hot) == (b"old", False) and expiry <= now
    assert store.get_stale("s", "dead") is None
    assert bytes(store.get_stale("s", "fresh")[0]) == b"new"
    store.set("g", "other", b"x", expire_at=now - 1)          # a group without a window
    assert store.get_stale("g", "other") is None
    store.audit()


def test_a_client_with_its_own_getter_serves_stale_and_refreshes_once_in_the_background(
        segment_name):
    release, calls = threading.Event(), []

    def getter(key):
        calls.append(key)
        assert release.wait(DEADLINE)
        if key == "broken":
            raise RuntimeError("database down")
        return f"{key}#{len(calls)}"

    group = shmcache.Group("s", "1MiB", getter, ttl=300, stale=600)
    with shmcache.create(segment_name, "8MiB", groups=[group]) as cache:
        for key in ("k", "broken"):
            cache._store.set("s", key, b"old", expire_at=time.time() - 1)
        assert [cache.get("s", "k") for _ in range(20)] == [b"old"] * 20   # the getter waits
        assert cache.get_many("s", ["k", "broken"]) == {"k": b"old", "broken": b"old"}
        assert cache.peek("s", "k") is None
        wait_for(lambda: sorted(calls) == ["broken", "k"], "the two refreshes")
        release.set()
        assert wait_for(lambda: cache.peek("s", "k"), "the refreshed value").startswith(b"k#")
        wait_for(lambda: cache.stats()["groups"]["s"]["refresh_errors"] == 1, "the failure")
        assert cache.get("s", "broken") == b"old"     # served on after the failed refresh
        stats = cache.stats()["groups"]["s"]
        assert stats["stale_hits"] >= 23 and stats["stale_hits"] <= stats["hits"]


# -- a host's workers and connect() clients -----------------------------------------------

def test_after_the_ttl_gets_answer_the_old_value_at_once_while_one_load_refreshes_it(
        supervised, processes, tmp_path):
    server = supervised(APP)
    assert server.get("stale", "k")[:2] == (200, b"k@1")
    assert "X-Cache" not in server.get("stale", "k")[2]
    switch(tmp_path, "k", hold=True, generation=2)
    answer = first_stale_answer(server, "stale", "k", b"k@1")
    assert int(answer[2]["Age"]) >= 0
    wait_for(lambda: len(calls_of(server, "k")) == 2, "the refresh to start")
    assert server.request("GET", "/_kcache/stale/k?peek=1")[0] == 404   # peeks: fresh only

    # The refresh is held: many gets from several processes, through the front and from
    # connect() clients, all answer the old value at once, and none loads again.
    code = ("import sys, shmcache\n"
            "cache = shmcache.connect(name=sys.argv[1])\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "print(sorted({cache.get('stale', 'k') for _ in range(30)}), flush=True)\n")
    children = [processes.python(code, server.name, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=server.env) for _ in range(3)]
    answers = []

    def gets():
        for _ in range(10):
            answers.append(server.get("stale", "k"))
    threads = [threading.Thread(target=gets) for _ in range(6)]
    processes.release_together(children, go=b"go\n")
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for child in children:
        assert child.stdout.readline().strip() == b"[b'k@1']"
    assert all(a[:2] == (200, b"k@1") and is_stale(a) for a in answers), answers[:3]
    assert len(calls_of(server, "k")) == 2                   # one refresh for the host

    switch(tmp_path, "k", hold=False)
    wait_for(lambda: server.get("stale", "k")[1] == b"k@2", "the refreshed value")
    wait_for(lambda: metric(server, "kcache_stale_hits_total", "stale") >= 60 + 90,
             "the stale hits to be counted")


def test_a_failing_refresh_serves_the_old_value_on_and_is_counted_and_logged(
        supervised, tmp_path):
    server = supervised(APP)
    assert server.get("stale", "k")[:2] == (200, b"k@1")
    switch(tmp_path, "k", failing=True)
    first_stale_answer(server, "stale", "k", b"k@1")
    wait_for(lambda: metric(server, "kcache_refresh_errors_total", "stale") >= 1
             and server.get("stale", "k")[:2] == (200, b"k@1"), "a counted failure")
    for _ in range(20):                                   # each may start another refresh
        answer = server.get("stale", "k")
        assert answer[:2] == (200, b"k@1") and is_stale(answer)
    assert metric(server, "kcache_local_load_errors_total", "stale") >= 1
    wait_for(lambda: "getter failed for key 'k'" in server.log(), "the failure in the log")
    stats = server.request("GET", "/stats")[1].decode()
    assert '"refresh_errors"' in stats and '"stale_hits"' in stats


def test_after_the_window_a_get_takes_the_miss_path(supervised, tmp_path):
    server = supervised(APP)
    assert server.get("stale_brief", "k")[:2] == (200, b"k@1")
    switch(tmp_path, "k", failing=True)
    first_stale_answer(server, "stale_brief", "k", b"k@1")
    assert first_error_answer(server, "stale_brief", "k", b"k@1")[0] == 500   # window over
    assert server.get("stale_brief", "k")[0] == 500
    switch(tmp_path, "k", failing=False, gone=True)
    assert server.get("stale_brief", "k")[0] == 404


def test_a_refresh_that_finds_the_key_gone_drops_the_stale_value(supervised, tmp_path):
    server = supervised(APP)
    assert server.get("stale", "gone")[:2] == (200, b"gone@1")
    switch(tmp_path, "gone", gone=True)
    first_stale_answer(server, "stale", "gone", b"gone@1")
    assert first_error_answer(server, "stale", "gone", b"gone@1")[0] == 404


# -- a cluster ----------------------------------------------------------------------------

def test_a_non_owner_serving_stale_asks_the_owner_which_refreshes_once(cluster, tmp_path):
    hosts = cluster(2, args=[*APP[:2], "--workers", "2", "--hot-fraction", "1"])
    ring = Ring([host.url for host in hosts])
    key = next(k for k in (f"c{i}" for i in range(1000)) if ring.owner_of(k) == hosts[0].url)
    owner, other = hosts
    assert other.get("stale", key)[:2] == (200, f"{key}@1".encode())   # a hot copy kept
    switch(tmp_path, key, hold=True, generation=2)
    answer = first_stale_answer(other, "stale", key, f"{key}@1".encode())
    assert int(answer[2]["Age"]) >= 0
    wait_for(lambda: len(calls_of(owner, key)) == 2, "the owner's refresh to start")
    answers = []

    def gets(host):
        for _ in range(10):
            answers.append(host.get("stale", key))
    threads = [threading.Thread(target=gets, args=(host,)) for host in (owner, other) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(a[:2] == (200, f"{key}@1".encode()) and is_stale(a) for a in answers)
    assert [host for _pid, host, _k in calls_of(owner, key)] == [owner.url] * 2
    switch(tmp_path, key, hold=False)
    wait_for(lambda: other.get("stale", key)[1] == f"{key}@2".encode(),
             "the refreshed value on the non-owner")
    assert {host for _pid, host, _k in calls_of(owner, key)} == {owner.url}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
