"""The Get path of a Node (node.py) against a fake peer picker, as golang/groupcache's
``fakePeers``: no processes and no sockets. The Node runs over a segment made with
``shmcache.create`` and a thread pool; its picker's ``owner_of`` hands out fake peers that
record what they are asked and answer with a value or an error.

The Node here has no PeerFetcher (``fetcher`` is None), so a miss goes the pool path
(``_get_slow``): the event-loop path (peer_fetch.py) needs a real server socket and is
tested in test_peer_fetch.py and the cluster tests."""

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shmcache import Group
from shmcache.errors import LoadError, NotFound, PeerUnavailable
from shmcache.peers import PeerError, PeerHealth, PeerPicker, Peers
from shmcache.node import Node, NoPeers

pytestmark = pytest.mark.unit

SELF = "http://self.invalid:1"
OTHER = "http://other.invalid:2"


class FakePeer:
    """A peer that records the keys it is asked for and answers with ``answer(key)``:
    (value, expiry), or raises what it returns if that is an exception."""

    def __init__(self, url, answer):
        self.url = url
        self.answer = answer
        self.fetched = []
        self.lock = threading.Lock()

    def fetch(self, group, key):
        with self.lock:
            self.fetched.append((group, key))
        outcome = self.answer(key)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def peek(self, group, key):
        return None


class FakePeers:
    """A picker whose every key is owned by ``owner`` (a FakePeer, or None: this host),
    skipping it while the health board says it is suspect, as Peers does."""

    def __init__(self, store, owner):
        self.self_url = SELF
        self.health = PeerHealth(store)
        self.owner = owner
        self.clients = {owner.url: owner} if owner else {}

    def owner_of(self, key):
        if self.owner is None or self.health.is_suspect(self.owner.url):
            return None
        return self.owner

    def owner_url(self, key):
        return self.owner.url if self.owner else SELF

    def previous_owner_of(self, key):
        return None

    def peeked(self, url, found):
        pass

    def others(self):
        return list(self.clients.values())

    def stats(self):
        return {}

    def close(self):
        pass


class Getter:
    """A group's getter that counts its calls; ``gate``, if set, holds every call until set."""

    def __init__(self, gate=None):
        self.calls = []
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, key):
        with self.lock:
            self.calls.append(key)
        if self.gate is not None:
            assert self.gate.wait(10)
        if key.startswith("missing"):
            raise KeyError(key)
        if key.startswith("broken"):
            raise RuntimeError("the database is down")
        return f"local:{key}".encode()


@pytest.fixture
def node_for(make_cache):
    """node_for(owner=FakePeer|None, hot_fraction=0.0, gate=None) -> (node, getter)."""
    made = []

    def make(owner=None, hot_fraction=0.0, gate=None):
        getter = Getter(gate)
        cache = make_cache(groups={"g": 1 << 20})
        store = cache._live_store()
        pool = ThreadPoolExecutor(max_workers=8)
        node = Node(store, [Group("g", 1 << 20, getter=getter)], pool,
                    peers=FakePeers(store, owner), hot_fraction=hot_fraction)
        made.append(node)
        return node, getter

    yield make
    for node in made:
        node.pool.shutdown(wait=True)
        node.fanout.shutdown(wait=True)


def get(node, key, from_peer=False):
    """What a request for ``key`` gets: a hit from shared memory, else the Get path's load."""
    hit = node.peek("g", key)
    if hit is not None:
        return hit[0]
    return node.get_future("g", key, from_peer).result(timeout=10)[0]


def test_a_local_hit_asks_neither_the_owner_nor_the_getter(node_for):
    peer = FakePeer(OTHER, lambda key: (b"remote", None))
    node, getter = node_for(owner=peer)
    node.set("g", "k", b"here")
    assert get(node, "k") == b"here"
    assert peer.fetched == [] and getter.calls == []


def test_a_key_this_host_owns_is_loaded_once_then_hit(node_for):
    node, getter = node_for(owner=None)
    assert get(node, "k") == b"local:k"
    assert get(node, "k") == b"local:k"
    assert getter.calls == ["k"]


def test_a_key_owned_elsewhere_is_fetched_from_its_owner(node_for):
    peer = FakePeer(OTHER, lambda key: (f"remote:{key}".encode(), None))
    node, getter = node_for(owner=peer, hot_fraction=0.0)
    assert get(node, "k") == b"remote:k"
    assert peer.fetched == [("g", "k")]
    assert getter.calls == []
    assert node.peek("g", "k") is None                     # hot_fraction 0: no hot copy
    assert get(node, "k") == b"remote:k"
    assert peer.fetched == [("g", "k")] * 2


def test_a_fetched_value_is_kept_as_a_hot_copy_per_hot_fraction(node_for):
    peer = FakePeer(OTHER, lambda key: (f"remote:{key}".encode(), None))
    node, getter = node_for(owner=peer, hot_fraction=1.0)
    assert get(node, "k") == b"remote:k"
    value, _expiry, hot = node.peek("g", "k")
    assert (value, hot) == (b"remote:k", True)
    assert get(node, "k") == b"remote:k"                   # a hit: the owner is not asked again
    assert peer.fetched == [("g", "k")] and getter.calls == []


def test_an_unreachable_owner_is_marked_suspect_and_the_key_loaded_here(node_for):
    peer = FakePeer(OTHER, lambda key: PeerUnavailable(f"{OTHER}: connection refused"))
    node, getter = node_for(owner=peer)
    assert get(node, "a") == b"local:a"                    # groupcache's fallback
    assert peer.fetched == [("g", "a")] and getter.calls == ["a"]
    assert node.peers.health.is_suspect(OTHER)
    assert node.peers.health.failures(OTHER) == 1
    assert get(node, "b") == b"local:b"                    # suspect: not asked meanwhile
    assert peer.fetched == [("g", "a")] and getter.calls == ["a", "b"]


def test_an_owner_whose_getter_failed_is_not_suspect_and_the_key_is_loaded_here(node_for):
    peer = FakePeer(OTHER, lambda key: PeerError(f"{OTHER} answered 500: getter failed"))
    node, getter = node_for(owner=peer)
    assert get(node, "a") == b"local:a"
    assert getter.calls == ["a"]
    assert not node.peers.health.is_suspect(OTHER)         # it answered: it is up


def test_the_owners_not_found_is_the_answer(node_for):
    peer = FakePeer(OTHER, lambda key: NotFound(f"{key} does not exist"))
    node, getter = node_for(owner=peer)
    with pytest.raises(NotFound):
        get(node, "k")
    assert peer.fetched == [("g", "k")] and getter.calls == []


def test_a_getters_errors_reach_the_caller(node_for):
    node, getter = node_for(owner=None)
    with pytest.raises(NotFound):
        get(node, "missing")
    with pytest.raises(LoadError):
        get(node, "broken")
    assert getter.calls == ["missing", "broken"]


def test_requests_from_peers_are_never_forwarded(node_for):
    peer = FakePeer(OTHER, lambda key: (b"remote", None))
    node, getter = node_for(owner=peer)
    assert get(node, "k", from_peer=True) == b"local:k"
    assert peer.fetched == [] and getter.calls == ["k"]


def test_concurrent_gets_of_one_key_call_the_getter_once(node_for):
    gate = threading.Event()
    node, getter = node_for(owner=None, gate=gate)
    callers = 16
    with ThreadPoolExecutor(max_workers=callers) as callers_pool:
        futures = [callers_pool.submit(node.get_future, "g", "k") for _ in range(callers)]
        waits = [future.result(timeout=10) for future in futures]
        gate.set()
        answers = [wait.result(timeout=10)[0] for wait in waits]
    assert answers == [b"local:k"] * callers
    assert getter.calls == ["k"]


def test_concurrent_gets_of_a_key_owned_elsewhere_fetch_it_once(node_for):
    gate = threading.Event()

    def answer(key):
        assert gate.wait(10)
        return b"remote", None
    peer = FakePeer(OTHER, answer)
    node, getter = node_for(owner=peer)
    callers = 16
    with ThreadPoolExecutor(max_workers=callers) as callers_pool:
        futures = [callers_pool.submit(node.get_future, "g", "k") for _ in range(callers)]
        waits = [future.result(timeout=10) for future in futures]
        gate.set()
        answers = [wait.result(timeout=10)[0] for wait in waits]
    assert answers == [b"remote"] * callers
    assert peer.fetched == [("g", "k")] and getter.calls == []


# -- the picker protocol -------------------------------------------------------------------

def protocol_members():
    members = {name for name in vars(PeerPicker) if not name.startswith("_")}
    return members | set(PeerPicker.__annotations__)


@pytest.fixture
def real_peers(make_cache):
    store = make_cache()._live_store()
    peers = Peers(SELF, [SELF, OTHER], store)              # no connection until asked
    yield peers
    peers.close()


def test_the_protocol_names_what_a_node_uses():
    assert protocol_members() == {"self_url", "health", "clients", "owner_of", "owner_url",
                                  "previous_owner_of", "peeked", "others", "stats", "close"}


@pytest.mark.parametrize("picker", ["NoPeers", "Peers", "FakePeers"])
def test_every_picker_implements_the_whole_protocol(picker, real_peers):
    made = {"NoPeers": lambda: NoPeers(), "Peers": lambda: real_peers,
            "FakePeers": lambda: FakePeers(real_peers.health.store, None)}[picker]()
    for name in protocol_members():
        assert hasattr(made, name), f"{picker} lacks {name}"
        wanted = getattr(PeerPicker, name, None)
        if callable(wanted):
            have = inspect.signature(getattr(made, name))
            assert list(have.parameters) == list(inspect.signature(wanted).parameters)[1:], name
    for name in ("failed", "succeeded", "is_suspect"):
        assert callable(getattr(made.health, name)), f"{picker}.health lacks {name}"


def test_no_peers_owns_every_key_and_has_nothing_to_mark():
    peers = NoPeers()
    assert peers.owner_of("k") is None and peers.owner_url("k") is None
    assert peers.previous_owner_of("k") is None
    assert peers.others() == [] and dict(peers.clients) == {} and peers.stats() == {}
    peers.health.failed(OTHER, "no reason")
    peers.health.succeeded(OTHER)
    assert not peers.health.is_suspect(OTHER)


def test_a_node_alone_writes_deletes_and_flushes_here_only(make_cache):
    cache = make_cache()
    node = Node(cache._live_store(), [Group("g", 1 << 20)], ThreadPoolExecutor(max_workers=2))
    try:
        assert not node.clustered
        assert node.set_everywhere("g", "k", b"v") == {"stored": True, "owner": "self",
                                                       "failed_peers": {}}
        assert node.peek("g", "k")[0] == b"v"
        assert node.delete_everywhere("g", "k") == {"deleted": True, "failed_peers": {}}
        assert node.clear_everywhere("g") == {"cleared": True, "failed_peers": {}}
    finally:
        node.pool.shutdown(wait=True)
        node.fanout.shutdown(wait=True)


def test_peers_skips_a_suspect_owner_and_takes_it_back_once_it_answers(real_peers):
    key = next(f"k{n}" for n in range(1000) if real_peers.owner_url(f"k{n}") == OTHER)
    mine = next(f"k{n}" for n in range(1000) if real_peers.owner_url(f"k{n}") == SELF)
    assert real_peers.owner_of(mine) is None
    assert real_peers.owner_of(key).url == OTHER
    real_peers.health.failed(OTHER, "connection refused")
    assert real_peers.owner_of(key) is None                  # loaded here meanwhile
    assert real_peers.owner_url(key) == OTHER
    real_peers.health.succeeded(OTHER)
    assert real_peers.owner_of(key).url == OTHER


def test_a_node_uses_no_member_of_its_picker_the_protocol_does_not_name():
    """Every ``self.peers.<name>`` of node.py and cluster_writes.py is in the protocol, so
    a picker implementing the protocol (the test above) has all that a Node asks of it."""
    import ast
    from pathlib import Path

    import shmcache
    used = set()
    for module in ("node.py", "cluster_writes.py"):
        source = (Path(shmcache.__file__).parent / module).read_text()
        for found in ast.walk(ast.parse(source)):
            if (isinstance(found, ast.Attribute) and isinstance(found.value, ast.Attribute)
                    and found.value.attr == "peers" and isinstance(found.value.value, ast.Name)
                    and found.value.value.id == "self"):
                used.add(found.attr)
    assert used and used <= protocol_members(), used - protocol_members()


# -- counting: each get once, in node.py (the reader counts the hits it reads) ---------------

def group_counts(node, group="g"):
    from shmcache.metrics import host_stats
    return host_stats(node.store)["groups"][group]


def test_a_node_counts_each_get_once(node_for):
    node, getter = node_for()
    assert node.get("g", "k").result(timeout=10)[0] == b"local:k"      # a miss, loaded
    assert node.get("g", "k")[0] == b"local:k"                          # a hit
    assert node.peek("g", "absent") is None                             # a peek that missed
    counts = group_counts(node)
    assert (counts["gets"], counts["hits"], counts["misses"]) == (3, 1, 2)
    assert (counts["loads"], counts["loads_deduped"], counts["local_loads"]) == (1, 1, 1)
    assert counts["server_requests"] == 0
    node.get("g", "k", from_peer=True)
    node.peek("g", "k", from_peer=True)
    assert group_counts(node)["server_requests"] == 2


def test_a_stale_answer_counts_as_a_hit_and_a_stale_hit_not_as_a_miss(make_cache):
    import time

    from shmcache.node import StaleHit
    cache = make_cache()
    cache.define_group("s", 1 << 20, ttl=5, stale=60)
    store = cache._live_store()
    release = threading.Event()

    def getter(key):
        assert release.wait(10)
        return b"new"
    node = Node(store, [Group("s", 1 << 20, getter=getter, ttl=5, stale=60)],
                ThreadPoolExecutor(max_workers=2))
    try:
        store.set("s", "k", b"old", expire_at=time.time() - 1)
        answer = node.get("s", "k")
        assert answer.__class__ is StaleHit and bytes(answer[0]) == b"old"
        counts = group_counts(node, "s")
        assert (counts["gets"], counts["hits"], counts["stale_hits"], counts["misses"]) == \
            (1, 1, 1, 0)
    finally:
        release.set()
        node.pool.shutdown(wait=True)
        node.fanout.shutdown(wait=True)


def test_a_client_with_its_own_getter_counts_its_miss_once(segment_name):
    import shmcache
    group = Group("own", "1MiB", lambda key: b"v", ttl=300)
    with shmcache.create(segment_name, "8MiB", groups=[group]) as cache:
        assert cache.get("own", "k") == b"v" and cache.get("own", "k") == b"v"
        assert cache.get_many("own", ["k", "j"]) == {"k": b"v", "j": b"v"}
        counts = cache.stats()["groups"]["own"]
        assert (counts["gets"], counts["hits"], counts["misses"]) == (4, 2, 2)


def test_a_cold_previous_owner_is_not_peeked_past_a_run_of_empty_peeks(make_cache):
    """At a host's start the previous ring is the other hosts. After COLD_PEEKS empty peeks
    in a row of one of them it is asked no more (a whole cluster started at once: it is as
    cold as we are); one value found starts the count again; a new peer set, a new count."""
    from shmcache.peers import COLD_PEEKS
    real_peers = Peers(SELF, [SELF, OTHER], make_cache()._live_store(), previous=(OTHER,),
                       previous_until=2e9)
    mine = [k for k in (f"k{i}" for i in range(2000)) if real_peers.owner_url(k) == SELF]
    assert real_peers.previous_owner_of(mine[0]).url == OTHER      # the first view peeks
    for _ in range(COLD_PEEKS - 1):
        real_peers.peeked(OTHER, False)
    assert real_peers.previous_owner_of(mine[1]).url == OTHER
    real_peers.peeked(OTHER, True)                                  # warm after all
    for _ in range(COLD_PEEKS - 1):
        real_peers.peeked(OTHER, False)
    assert real_peers.previous_owner_of(mine[2]).url == OTHER
    real_peers.peeked(OTHER, False)
    assert all(real_peers.previous_owner_of(k) is None for k in mine)
    third = "http://third.invalid:3"
    real_peers.update([SELF, OTHER, third], previous=(OTHER,), previous_until=2e9)
    still_mine = [k for k in mine if real_peers.owner_url(k) == SELF]
    assert real_peers.previous_owner_of(still_mine[0]).url == OTHER  # a new view asks again


def test_a_batch_of_cold_keys_loads_at_most_batch_loads_at_once(make_cache):
    """POST /cache/g?op=get of 100 cold keys: the getter never runs for more than
    BATCH_LOADS of them at once (the rest wait for a slot, not in the pool's queue), and
    every key is answered once they are let through."""
    import json
    from shmcache.batch import unb64
    from shmcache.http_batch import BATCH_LOADS
    from shmcache.http_front import Front
    from shmcache.http_messages import Request
    lock, gate = threading.Lock(), threading.Semaphore(0)
    running, peak = [0], [0]

    def getter(key):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        assert gate.acquire(timeout=60)
        with lock:
            running[0] -= 1
        return f"loaded:{key}".encode()
    cache = make_cache(memory="32MiB", groups={"g": 8 << 20})
    node = Node(cache._live_store(), [Group("g", 8 << 20, getter=getter)],
                ThreadPoolExecutor(max_workers=3 * BATCH_LOADS))
    try:
        node.store.set("g", "warm", b"already here")
        keys = ["warm"] + [f"cold-{i}" for i in range(100)]
        body = json.dumps({"keys": keys}).encode()
        answer = Front(node).handle(Request("POST", "/cache/g?op=get", "HTTP/1.1", {}, body,
                                            True, None))
        deadline = time.monotonic() + 60
        while running[0] < BATCH_LOADS:                   # the first slots fill up
            assert time.monotonic() < deadline, running
            time.sleep(0.01)
        assert not answer.done()
        gate.release(len(keys))                           # let every load through
        head, _, payload = answer.result(timeout=60).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        document = json.loads(payload)
        assert peak[0] == BATCH_LOADS                    # never more at once
        assert {key: unb64(value) for key, value in document["values"].items()} == \
            {"warm": b"already here", **{k: f"loaded:{k}".encode() for k in keys[1:]}}
        assert document["missing"] == [] and document["errors"] == {}
    finally:
        node.pool.shutdown(wait=True)
        node.fanout.shutdown(wait=True)


def test_a_big_batch_of_cold_keys_with_a_quick_getter_answers_every_key(make_cache):
    """The largest batch, 10,000 cold keys, with a getter that answers at once: loads end
    while the batch is still taking keys, on the pool's threads; every key is answered."""
    import json
    from shmcache.batch import MAX_BATCH_KEYS
    from shmcache.http_front import Front
    from shmcache.http_messages import Request
    cache = make_cache(memory="64MiB", groups={"g": 32 << 20})
    node = Node(cache._live_store(), [Group("g", 32 << 20, getter=lambda key: key.encode())],
                ThreadPoolExecutor(max_workers=64))
    try:
        keys = [f"quick-{i}" for i in range(MAX_BATCH_KEYS)]
        body = json.dumps({"keys": keys}).encode()
        answer = Front(node).handle(Request("POST", "/cache/g?op=get", "HTTP/1.1", {}, body,
                                            True, None))
        data = answer if isinstance(answer, bytes) else answer.result(timeout=120)
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), data[:300]
        document = json.loads(payload)
        assert len(document["values"]) == len(keys) and document["errors"] == {}
    finally:
        node.pool.shutdown(wait=True)
        node.fanout.shutdown(wait=True)
