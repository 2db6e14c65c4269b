"""Batches: Client.get_many / set_many / delete_many and the front's POST /cache/<group>?op=
route, on one host and on two, with its limits and token rules."""

import base64
import json
import os
import socket
import subprocess
import time

import pytest

import shmcache
from shmcache.batch import MAX_BATCH_KEYS
from shmcache.ring import Ring

from conftest import REPO

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]
TOKEN = "batch-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}


def b64(value):
    return base64.b64encode(value).decode()


def post(host, op, document, headers=None, group="test"):
    """(status, JSON or text answer) of a batch request."""
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    status, data, _ = host.request("POST", f"/cache/{group}?op={op}" if op else f"/cache/{group}",
                                   body=body, headers=headers)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


def batch_requests(host):
    """Batch get requests in the host's access log."""
    return host.log().count("POST /cache/test?op=get ")


def loaded(host):
    return sorted(key for _pid, key in host.calls())


def test_get_many_reads_hits_and_sends_every_miss_in_one_request(supervised):
    server = supervised(APP + ["--access-log"])
    with shmcache.connect(name=server.name) as cache:
        assert cache.get_many("test", []) == {}
        assert cache.get("test", "hit-1") == b"value-of-hit-1"
        assert cache.get("test", "hit-2") == b"value-of-hit-2"
        keys = ["hit-1", "cold-1", "missing-1", "hit-2", b"cold-2", "cold-1", "ünï/ ✓"]
        assert cache.get_many("test", keys) == {
            "hit-1": b"value-of-hit-1", "hit-2": b"value-of-hit-2",
            "cold-1": b"value-of-cold-1", b"cold-2": b"value-of-cold-2",
            "ünï/ ✓": "value-of-ünï/ ✓".encode()}
        assert batch_requests(server) == 1
        assert loaded(server) == sorted(["hit-1", "hit-2", "cold-1", "cold-2", "missing-1",
                                         "ünï/ ✓"])
        assert cache.peek("test", "cold-1") == b"value-of-cold-1"   # cached for everyone
        assert cache.get_many("test", ["hit-1", "cold-1", "cold-2"]) == {
            "hit-1": b"value-of-hit-1", "cold-1": b"value-of-cold-1",
            "cold-2": b"value-of-cold-2"}
        assert batch_requests(server) == 1                        # all hits: no request
        with pytest.raises(shmcache.UnknownGroup):
            cache.get_many("nope", ["x"])
        with pytest.raises(shmcache.InvalidArgument):
            cache.get_many("test", "hit-1")                    # one key, not a list of them
        with pytest.raises(shmcache.InvalidArgument):
            cache.delete_many("test", b"hit-1")


def test_get_many_with_a_failing_key_returns_the_rest_cached_and_names_it(supervised):
    server = supervised(APP)
    with shmcache.connect(name=server.name) as cache:
        with pytest.raises(shmcache.LoadError, match="fail-1") as failed:
            cache.get_many("test", ["good-1", "fail-1", "missing-2", "good-2"])
        assert type(failed.value) is shmcache.LoadError
        assert "cannot load fail-1" in str(failed.value)
        assert failed.value.values == {"good-1": b"value-of-good-1", "good-2": b"value-of-good-2"}
        assert list(failed.value.failed) == ["fail-1"]
        assert cache.peek("test", "good-1") == b"value-of-good-1"
        assert cache.peek("test", "good-2") == b"value-of-good-2"
        assert cache.peek("test", "fail-1") is None


CLIENT = """
import json, sys
import shmcache
name, keys = sys.argv[1], sys.argv[2].split(",")
with shmcache.connect(name=name) as cache:
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps({k: v.decode() for k, v in cache.get_many("test", keys).items()}), flush=True)
"""


def test_two_processes_get_many_the_same_cold_keys_and_each_loads_once(supervised, processes):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "0.5"})
    keys = [f"slow-{i}" for i in range(20)] + [f"quick-{i}" for i in range(20)]
    env = {**os.environ, "PYTHONPATH": REPO}
    children = [processes.python(CLIENT, server.name, ",".join(keys), env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for _ in range(2)]
    processes.release_together(children)
    for child in children:
        assert json.loads(child.stdout.readline()) == {k: f"value-of-{k}" for k in keys}
        assert child.wait(60) == 0
    assert loaded(server) == sorted(keys)


def test_set_many_and_delete_many_on_one_host(supervised):
    server = supervised(APP)
    with shmcache.connect(name=server.name) as cache:
        values = {f"missing-{i}": f"v{i}".encode() for i in range(200)}
        values[b"missing-bytes"] = "text value"
        cache.set_many("test", values, ttl=60)
        assert server.get("test", "missing-7")[:2] == (200, b"v7")
        assert cache.peek("test", "missing-bytes") == b"text value"
        assert cache.get_many("test", list(values)) == {
            k: v.encode() if isinstance(v, str) else v for k, v in values.items()}
        with pytest.raises(shmcache.ValueTooLarge):
            cache.set_many("test", {"missing-small": b"x", "missing-big": b"x" * (300 << 10)})
        assert cache.peek("test", "missing-small") is None        # nothing was stored
        with pytest.raises(shmcache.InvalidArgument):
            cache.set_many("test", {"missing-small": b"x"}, ttl=-1)
        assert cache.delete_many("test", ["missing-1", "missing-2", "missing-1", "absent"]) == 2
        assert server.get("test", "missing-1")[0] == 404
        assert cache.delete_many("test", list(values)) == len(values) - 2
        assert cache.delete_many("test", []) == 0
        assert cache.stats()["groups"]["test"]["items"] == 0


def test_the_batch_route_gets_sets_and_deletes(supervised):
    server = supervised(APP)
    assert server.request("PUT", "/cache/test/missing-set", body=b"\x00\xff")[0] == 200
    status, answer = post(server, "get", {"keys": ["missing-set", "a", "missing-x", "fail-y",
                                                   "a"]})
    assert status == 200
    assert answer["values"] == {"missing-set": b64(b"\x00\xff"), "a": b64(b"value-of-a")}
    assert answer["missing"] == ["missing-x"]
    assert list(answer["errors"]) == ["fail-y"]
    assert answer["errors"]["fail-y"]["status"] == 500
    assert "cannot load fail-y" in answer["errors"]["fail-y"]["reason"]
    status, answer = post(server, "set", {"items": {"missing-1": b64(b"one"), "missing-2": ""},
                                          "ttl": 30})
    assert (status, answer) == (200, {"stored": 2})
    assert server.get("test", "missing-1")[:2] == (200, b"one")
    assert server.get("test", "missing-2")[:2] == (200, b"")
    status, answer = post(server, "delete", {"keys": ["missing-1", "missing-3", "missing-2"]})
    assert (status, answer) == (200, {"deleted": ["missing-1", "missing-2"]})
    assert server.get("test", "missing-1")[0] == 404
    status, answer = post(server, "set", {"items": {"missing-small": b64(b"x"),
                                                    "missing-big": b64(b"x" * (300 << 10))}})
    assert status == 413 and "max item size" in answer
    assert server.get("test", "missing-small")[0] == 404          # nothing was stored


LONG_KEY = "k" * 251
BAD_BODIES = [
    ("get", b"{not json"),
    ("get", b"[]"),
    ("get", b'{"keys": "a"}'),
    ("get", b'{"keys": [1]}'),
    ("get", b'{"keys": [""]}'),
    ("get", json.dumps({"keys": [LONG_KEY]}).encode()),
    ("get", b'{"keys": ["\\ud800"]}'),
    ("get", b'{"keys": ["a"], "extra": 1}'),
    ("get", b"[" * 100000 + b"]" * 100000),
    ("get", json.dumps({"keys": [f"k{i}" for i in range(MAX_BATCH_KEYS + 1)]}).encode()),
    ("delete", b'{"keys": {"a": 1}}'),
    ("set", b'{"items": ["a"]}'),
    ("set", b'{"items": {"a": "not base64!"}}'),
    ("set", b'{"items": {"a": 5}}'),
    ("set", b'{"items": {"a": ""}, "ttl": 0}'),
    ("set", b'{"items": {"a": ""}, "ttl": -1}'),
    ("set", b'{"items": {"a": ""}, "ttl": "60"}'),
    ("set", b'{"items": {"a": ""}, "ttl": true}'),
    ("set", b'{"items": {"a": ""}, "ttl": 1e400}'),
    ("set", json.dumps({"items": {LONG_KEY: ""}}).encode()),
    ("set", json.dumps({"items": {f"k{i}": "" for i in range(MAX_BATCH_KEYS + 1)}}).encode()),
    (None, b'{"keys": ["a"]}'),
    ("put", b'{"keys": ["a"]}'),
    ("get&op=set", b'{"keys": ["a"]}'),
    ("get&x=1", b'{"keys": ["a"]}'),
]


def test_bad_batches_are_400_with_a_reason_and_the_server_keeps_serving(supervised):
    server = supervised(APP)
    for op, body in BAD_BODIES:
        status, answer = post(server, op, body)
        assert status == 400, (op, body[:60], answer)
        assert isinstance(answer, str) and answer.count("\n") == 1 and answer.strip()
        assert "Traceback" not in answer
    assert post(server, "get", {"keys": ["a"]}, group="nope")[0] == 404
    assert post(server, "set", {"items": {}}, group="nope")[0] == 404
    assert post(server, "get", {"keys": ["a"]}, group="bad%2Fname")[0] == 400
    assert post(server, "get", {"keys": [f"k{i}" for i in range(MAX_BATCH_KEYS)]})[0] == 200
    assert post(server, "get", {"keys": []}) == (200, {"values": {}, "missing": [],
                                                       "errors": {}})
    assert server.request("POST", "/cache/test/a", body=b"")[0] == 405
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /cache/test?op=set HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 70000000\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
    assert server.get("test", "still-alive")[:2] == (200, b"value-of-still-alive")


def test_a_batch_body_larger_than_one_item_is_taken(supervised):
    server = supervised(APP)                       # max item size 256 KiB
    items = {f"missing-{i}": b64(bytes([i]) * (200 << 10)) for i in range(10)}
    assert post(server, "set", {"items": items}) == (200, {"stored": 10})
    assert server.get("test", "missing-3")[:2] == (200, bytes([3]) * (200 << 10))


def test_batch_gets_are_reads_and_batch_writes_need_the_token(supervised):
    server = supervised(APP + ["--token", TOKEN])
    assert post(server, "get", {"keys": ["a"]})[0] == 200
    for op, document in (("set", {"items": {"missing-a": ""}}), ("delete", {"keys": ["a"]}),
                         ("bogus", {"keys": ["a"]}), (None, {"keys": ["a"]})):
        assert post(server, op, document)[0] == 401
        assert post(server, op, document, headers=GOOD)[0] in (200, 400)
    assert post(server, "set", {"items": {"missing-a": ""}}, headers=GOOD)[0] == 200
    secured = supervised(APP + ["--token", TOKEN, "--token-reads"])
    assert post(secured, "get", {"keys": ["a"]})[0] == 401
    assert post(secured, "get", {"keys": ["a"]}, headers=GOOD)[0] == 200
    with shmcache.connect(name=secured.name) as cache:
        with pytest.raises(shmcache.AuthError):
            cache.get_many("test", ["b"])
    with shmcache.connect(name=secured.name, token=TOKEN) as cache:
        assert cache.get_many("test", ["b"]) == {"b": b"value-of-b"}


def owned(hosts, count, prefix="missing-k"):
    """``count`` keys owned by each host, as {url: [keys]}."""
    ring = Ring([host.url for host in hosts])
    keys = {host.url: [] for host in hosts}
    index = 0
    while min(len(k) for k in keys.values()) < count:
        key = f"{prefix}{index}"
        index += 1
        if len(keys[ring.owner_of(key)]) < count:
            keys[ring.owner_of(key)].append(key)
    return keys


def test_batches_on_a_cluster_go_to_each_keys_owner(cluster):
    a, b = cluster(2, APP + ["--hot-fraction", "0"])
    keys = owned([a, b], 10)
    every = keys[a.url] + keys[b.url]
    with shmcache.connect(name=a.name) as cache:
        cache.set_many("test", {key: key.encode() for key in every}, ttl=60)
        for host in (a, b):
            with shmcache.connect(name=host.name) as local:
                assert all(local.peek("test", key) == key.encode() for key in keys[host.url])
                others = keys[b.url if host is a else a.url]
                assert all(local.peek("test", key) is None for key in others)
        assert cache.get_many("test", every) == {key: key.encode() for key in every}
        assert cache.delete_many("test", every) == len(every)
        for host in (a, b):
            assert all(host.get("test", key)[0] == 404 for key in every)
        cold = owned([a, b], 5, prefix="cold-")
        wanted = cold[a.url] + cold[b.url]
        assert cache.get_many("test", wanted) == {key: f"value-of-{key}".encode()
                                                  for key in wanted}
    loads = {key: host for _pid, host, key in a.calls_with_hosts() if key.startswith("cold-")}
    assert loads == {key: url for url in cold for key in cold[url]}     # on the owner, once


def test_cluster_batch_writes_name_a_peer_that_is_down(cluster):
    a, b = cluster(2, APP + ["--hot-fraction", "0", "--peer-timeout", "2"])
    keys = owned([a, b], 3)
    b.stop()
    items = {key: b64(b"v") for key in keys[a.url] + keys[b.url]}
    status, answer = post(a, "set", {"items": items})
    assert status == 502
    assert answer["stored"] == 3                              # the keys A owns
    assert answer["failed_peers"] == [b.url] and b.url in answer["peer_errors"]
    assert all(a.get("test", key)[:2] == (200, b"v") for key in items)   # kept here meanwhile
    status, answer = post(a, "delete", {"keys": list(items)})
    assert status == 502 and answer["failed_peers"] == [b.url]
    assert answer["deleted"] == keys[a.url]
    with shmcache.connect(name=a.name) as cache:
        with pytest.raises(shmcache.PeerUnavailable, match=b.url):
            cache.set_many("test", {keys[b.url][0]: b"w"})


def test_get_many_in_a_process_with_the_getter_and_no_front(segment_name):
    calls = []

    def load(key):
        calls.append(key)
        if key.startswith("missing"):
            raise KeyError(key)
        if key.startswith("fail"):
            raise RuntimeError(f"no {key}")
        return f"loaded {key}"

    with shmcache.create(segment_name, "8MiB",
                         groups=[shmcache.Group("users", "1MiB", load)]) as cache:
        cache.set("users", "cached", b"c")
        assert cache.get_many("users", ["cached", "a", "missing-1", "a", b"b"]) == {
            "cached": b"c", "a": b"loaded a", b"b": b"loaded b"}
        assert calls == ["a", "missing-1", "b"]
        with pytest.raises(shmcache.LoadError, match="fail-1") as failed:
            cache.get_many("users", ["a", "fail-1", "c"])
        assert failed.value.values == {"a": b"loaded a", "c": b"loaded c"}
        assert cache.peek("users", "c") == b"loaded c"
        cache.set_many("users", {"x": b"1", "y": b"2"})
        assert cache.get_many("users", ["x", "y"]) == {"x": b"1", "y": b"2"}
        assert cache.delete_many("users", ["x", "y", "z"]) == 2
        cache.define_group("plain", "1MiB")
        cache.set("plain", "p", b"v")
        assert cache.get_many("plain", ["p", "q"]) == {"p": b"v"}   # no getter, no front


def test_store_batches_take_the_lock_per_chunk_and_keep_the_arena_consistent(make_cache):
    cache = make_cache(memory="16MiB", groups={"g": 64 << 10})     # a small budget: evicts
    store = cache._live_store()
    store.set_many("g", [(f"key-{i}", os.urandom(500)) for i in range(1000)])
    assert store.stats()["groups"]["g"]["bytes"] <= 64 << 10
    found = store.delete_many("g", [f"key-{i}" for i in range(1000)])
    assert 0 < sum(found) < 1000 and found[-1]              # the newest survived eviction
    store.audit()


def test_get_many_without_a_live_segment_asks_the_last_known_front(supervised):
    from shmcache.arena import shm_dir
    server = supervised(APP)
    deadline = time.monotonic() + 30
    while server.log().count(") serving") < 2:    # both workers attached: they outlive
        assert time.monotonic() < deadline          # the name
        time.sleep(0.01)
    with shmcache.connect(name=server.name) as cache:
        assert cache.get("test", "before") == b"value-of-before"
        os.unlink(os.path.join(shm_dir(), server.name))      # the name removed by hand
        deadline = time.monotonic() + 30
        while True:
            try:
                cache.peek("test", "before")
            except shmcache.SegmentNotFound:
                break
            assert time.monotonic() < deadline, "the client never noticed the removal"
            time.sleep(0.01)
        assert cache.get_many("test", ["before", "after", "missing-1"]) == {
            "before": b"value-of-before", "after": b"value-of-after"}
        server.stop()
        with pytest.raises(shmcache.SegmentNotFound, match="front did not answer"):
            cache.get_many("test", ["before"])
