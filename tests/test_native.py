"""The C reader (shmcache/_native.c) against the pure-Python one (reader.py): the reader in
use is the one asked for, and on many arena states, whole and torn, the two answer, count,
fall back and set reference bits alike."""

import logging
import os
import random
import struct
import time
import warnings

import pytest

import shmcache
from shmcache import reader
from shmcache.arena import GROUP_RECORD_BYTES, ITEM_HEADER_BYTES
from shmcache.errors import InvalidKey
from shmcache.lru_index import _G_STALE
from shmcache.reader import MAX_CHAIN, NOT_FOUND, make_reader

pytestmark = pytest.mark.unit

PURE_ASKED = os.environ.get("SHMCACHE_PURE_PYTHON", "") not in ("", "0")
native_only = pytest.mark.skipif(reader._native is None,
                                 reason="the C reader is not built (see the test below)")


def test_the_reader_in_use_is_the_one_asked_for(make_cache):
    """Installing the package builds the C reader where a compiler is; this fails rather
    than let a run fall back to the pure-Python reader unnoticed."""
    store = make_cache()._store
    if PURE_ASKED:
        assert store.get.__class__.__name__ == "function"
        return
    assert reader._native is not None, (
        f"the C reader was not built ({reader._native_missing}); reinstall with a C compiler "
        f"and Python headers, or set SHMCACHE_PURE_PYTHON=1 to test the pure-Python reader")
    for get in (store.get, store.get_leaving_miss, store.get_with_expiry, store.recheck,
                store.get_stale):
        assert type(get) is reader._native.Reader
        if not get.xxh3_direct:          # slower, not wrong: it calls xxh3_64_intdigest
            warnings.warn(f"the C reader calls xxhash through Python ({reader.XXH3_LIBRARY})")


@native_only
def test_the_environment_turns_the_c_reader_off(make_cache, monkeypatch):
    monkeypatch.setenv("SHMCACHE_PURE_PYTHON", "1")
    cache = make_cache()
    cache.set("g", "k", b"v")
    assert cache._store.get.__class__.__name__ == "function"
    assert cache.peek("g", "k") == b"v"
    monkeypatch.setenv("SHMCACHE_PURE_PYTHON", "0")
    assert reader.native_wanted()


def test_without_the_c_reader_reads_are_pure_python_and_say_so_once(
        make_cache, segment_name, monkeypatch, caplog):
    monkeypatch.setattr(reader, "_native", None)
    monkeypatch.setattr(reader, "_native_missing", ImportError("not built"))
    monkeypatch.setattr(reader, "_said", False)
    with caplog.at_level(logging.INFO, logger="shmcache"):
        cache = make_cache()
        cache.set("g", "k", b"v")
        with shmcache.connect(name=segment_name) as other:
            assert other.peek("g", "k") == b"v"
            assert other._live_store().get.__class__.__name__ == "function"
    said = [r.getMessage() for r in caplog.records if "lock-free reads" in r.getMessage()]
    assert said == ["lock-free reads in pure Python (the C reader is not built: not built)"]
    with pytest.raises(ImportError):
        make_reader(cache._store.index, {}, None, None, [], native=True)


@pytest.mark.parametrize("native", [True, False])
def test_a_reader_leaving_its_misses_counts_its_hits_only(make_cache, native):
    if native and reader._native is None:
        pytest.skip("the C reader is not built")
    from shmcache.metrics import HITS, MISSES, NEGATIVE_HITS, PER_GROUP
    cache = make_cache()
    store = cache._store
    store.set("g", "k", b"v")
    store.remember_not_found("g", "gone", 300)
    gid = store.group_id("g")
    for kind in ("get_leaving_miss", "with_expiry"):
        counts = [0] * len(store.counters.values)
        get = make_reader(store.index, dict(store._group_ids), store._reader_group_id,
                          store._locked_get, counts, native=native, **KINDS[kind])
        for key in ("k", "absent", "gone"):
            get("g", key)
        mine = counts[gid * PER_GROUP:(gid + 1) * PER_GROUP]
        assert (mine[HITS], mine[MISSES]) == (1, 0), kind
        assert mine[NEGATIVE_HITS] == (1 if kind == "with_expiry" else 0), kind
        assert mine[reader.MISS_LEFT] == (2 if kind == "get_leaving_miss" else 1), kind


# -- the two readers on the same memory ---------------------------------------------------

class Calls:
    """Stand-ins for the store's callbacks that record how they were called."""

    def __init__(self, group_ids, known):
        self.group_ids, self.known, self.log = group_ids, known, []

    def resolve(self, name):
        self.log.append(("resolve", name))
        gid = self.known.get(name)
        if gid is not None:
            self.group_ids[name] = gid
        return gid

    def locked(self, gid, key, with_expiry, negative):
        self.log.append(("locked", gid, key, with_expiry, negative))
        return ("locked", gid, key)

    def detour(self, group, key):
        self.log.append(("detour", group, key))
        return ("detour", group, key)


KINDS = {   # name: make_reader keywords (as store.py builds its readers)
    "get": {},
    "get_leaving_miss": {"count_misses": False},
    "with_expiry": {"with_expiry": True, "negative": NOT_FOUND, "count_misses": False},
    "with_expiry_counted": {"with_expiry": True, "negative": NOT_FOUND},
    "stale": {"with_expiry": True, "stale": True},
}


def outcome(get, group, key):
    try:
        return get(group, key)
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def both(store, known, kind, group, key):
    """(native outcome, python outcome), each reader on the same memory from the same
    starting reference bits, with its own counters and callbacks."""
    index, buf = store.index, store.buf
    bits = slice(index.refbits_off, index.buckets_off)
    before = bytes(buf[bits])
    results = []
    for native in (True, False):
        buf[bits] = before
        group_ids = {name: gid for name, gid in known.items() if name != "late"}
        calls = Calls(group_ids, known)
        counts = [0] * len(store.counters.values)
        get = make_reader(index, group_ids, calls.resolve, calls.locked, counts,
                          detour=calls.detour, native=native, **KINDS[kind])
        results.append((outcome(get, group, key), counts, calls.log, bytes(buf[bits])))
    return results


def item_offsets(index):
    buf = index.buf
    heads = struct.unpack_from(f"{index.nbuckets}I", buf, index.buckets_off)
    offsets = []
    for ref in heads:
        hops = 0
        while ref and hops < 1000:
            offsets.append(ref << 3)
            ref = struct.unpack_from("I", buf, ref << 3)[0]
            hops += 1
    return offsets


def populate(cache, rng):
    store = cache._store
    now = time.time()
    keys = []
    gid = store.group_id("g")
    # one crowded bucket: a real chain several items long
    by_bucket = {}
    for i in range(30_000):
        by_bucket.setdefault(store.index._bucket(gid, b"c%d" % i), []).append("c%d" % i)
    crowded = max(by_bucket.values(), key=len)
    assert len(crowded) >= 5
    for n, key in enumerate(crowded + [f"k{i}" for i in range(120)] + ["é-ü", "x" * 250]):
        group = rng.choice(("g", "g", "h"))
        value = rng.randbytes(rng.choice((0, 1, 10, 100, 1000, 5000)))
        roll = n % 8
        if roll == 0:
            store.set(group, key, value, expire_at=now - 50)          # stale in g, gone in h
        elif roll == 1:
            store.set(group, key, value, expire_at=now - 500)         # past every window
        elif roll == 2:
            store.set(group, key, value, expire_at=now + 500.3)
        elif roll == 3:
            store.set_hot(group, key, value, now + 300, store.version(group, key))
        elif roll == 4:
            store.remember_not_found(group, key, 300)
        elif roll == 5:
            store.remember_not_found(group, key, 300)
            store.set(group, key, value)
        else:
            store.set(group, key, value)
        keys.append((group, key))
    return keys


def corrupt(store, rng, offsets):
    """Tear or change a few words as a crash or a racing writer could leave them."""
    index, buf = store.index, store.buf
    now = int(time.time())
    for _ in range(rng.randrange(1, 4)):
        offset = rng.choice(offsets)
        what = rng.randrange(10)
        if what == 0:       # the chain: out of range, into a page, onto itself, cut
            ref = rng.choice((1, 0xFFFFFFFF, index.pages_end >> 3,
                              (index.pages_end - ITEM_HEADER_BYTES) >> 3,
                              (index.pages_off >> 3) - 1, offset >> 3, 0,
                              rng.choice(offsets) >> 3, rng.randrange(1 << 32)))
            struct.pack_into("I", buf, offset, ref)
        elif what == 1:
            buf[offset + 4] = rng.choice((0, 1, 2, 3, 5, 7, 255))            # state
        elif what == 2:
            buf[offset + 5] = rng.randrange(256)                             # key length
        elif what == 3:
            buf[offset + 6] = rng.choice((0, 1, 2, 255))                     # group
        elif what == 4:                                                      # expiry
            buf[offset + 7] = rng.randrange(256)
            struct.pack_into("I", buf, offset + 8,
                             rng.choice((0, now - 50, now - 500, now + 500, 0xFFFFFFFF)))
        elif what == 5:                                                      # value length
            struct.pack_into("I", buf, offset + 12, rng.choice((
                0, 7, index.max_item_size, index.max_item_size + 1, 0xFFFFFFFF,
                index.pages_end - offset - ITEM_HEADER_BYTES, rng.randrange(1 << 32))))
        elif what == 6:                                                      # key bytes
            buf[offset + ITEM_HEADER_BYTES] ^= 1 << rng.randrange(8)
        elif what == 7:                                                      # a bucket head
            bucket = rng.randrange(index.nbuckets)
            struct.pack_into("I", buf, index.buckets_off + 4 * bucket,
                             rng.choice((offset >> 3, 1, 0xFFFFFFFF, 0)))
        elif what == 8:                                         # a writer inside its stripe
            klen, gid = buf[offset + 5], buf[offset + 6]
            start = offset + ITEM_HEADER_BYTES
            stripe = index._bucket(gid, bytes(buf[start:start + klen])) % index.nstripes
            seq_off = index.stripes_off + 4 * stripe
            struct.pack_into("I", buf, seq_off, struct.unpack_from("I", buf, seq_off)[0] | 1)
        else:                                                                # the stale window
            struct.pack_into("d", buf, index.groups_off + GROUP_RECORD_BYTES * store.group_id("g")
                             + _G_STALE,
                             rng.choice((0.0, 10.0, 100.0, 1e9)))


@native_only
@pytest.mark.parametrize("xxh3", ["direct", "through Python"])
def test_both_readers_agree_on_random_arena_states(make_cache, monkeypatch, xxh3):
    if xxh3 != "direct":
        monkeypatch.setattr(reader, "XXH3_LIBRARY", None)
    rng = random.Random(11)
    cache = make_cache(memory="4MiB", max_item_size="16KiB",
                       groups={"g": 1 << 21, "h": 1 << 21, "late": 1 << 20})
    store = cache._store
    store.define_group("g", 1 << 21, stale=100)
    keys = populate(cache, rng)
    known = {name: store.group_id(name) for name in ("g", "h", "late")}
    probes = keys + [("g", "absent"), ("h", "absent-too"), ("late", "k1"), ("nosuch", "k1"),
                     ("g", b"k2"), ("g", bytearray(b"k3")), ("g", ""), ("g", "y" * 251),
                     ("g", 17), ("g", "\udc80"), ([], "k1")]
    probe = make_reader(store.index, {}, None, None, [], native=True)
    assert probe.xxh3_direct == (xxh3 == "direct" and reader.XXH3_LIBRARY is not None)
    region = slice(store.index.stripes_off, store.index.pages_end)
    pristine = bytes(store.buf[region])
    offsets = item_offsets(store.index)
    assert len(offsets) > 100
    compared = set()
    for round_ in range(80):
        store.buf[region] = pristine
        if round_:
            corrupt(store, rng, offsets)
        for kind in KINDS:
            for group, key in probes:
                native, python = both(store, known, kind, group, key)
                assert native == python, (round_, kind, group, key)
                answer = native[0]
                compared.add(("locked" if isinstance(answer, tuple) and answer[:1] == ("locked",)
                              else "raised" if isinstance(answer, tuple) and answer[0] == "raised"
                              else "detour" if isinstance(answer, tuple) and answer[0] == "detour"
                              else "not found" if answer is NOT_FOUND
                              else "none" if answer is None else "value"))
    store.buf[region] = pristine
    # every outcome was met: values, misses, remembered not-founds, lock fallbacks
    # (odd stripes, cycles longer than MAX_CHAIN), detours and refused keys
    assert compared >= {"value", "none", "not found", "locked", "detour", "raised"}, compared
    assert MAX_CHAIN < 1000


@native_only
def test_both_readers_agree_on_a_cycle_and_on_a_closed_segment(make_cache):
    cache = make_cache()
    store = cache._store
    cache.set("g", "loop", b"v")
    known = {"g": store.group_id("g")}
    offset = [o for o in item_offsets(store.index)][0]
    struct.pack_into("I", store.buf, offset, offset >> 3)        # the item's chain: itself
    buf, index = store.buf, store.index
    bucket = index._bucket(known["g"], b"other")                 # and another key's chain
    struct.pack_into("I", buf, index.buckets_off + 4 * bucket, offset >> 3)
    for kind in KINDS:
        native, python = both(store, known, kind, "g", "other")
        assert native == python and native[0][0] == "locked", native
    struct.pack_into("I", buf, offset, 0)
    struct.pack_into("I", buf, index.buckets_off + 4 * bucket, 0)
    gets = [make_reader(store.index, dict(known), None, None, [0] * 1024, native=native)
            for native in (True, False)]
    assert [get("g", "loop") for get in gets] == [b"v", b"v"]
    cache.close()
    outcomes = [outcome(get, "g", "loop") for get in gets]
    assert outcomes[0][:2] == outcomes[1][:2] == ("raised", ValueError), outcomes


@native_only
def test_both_readers_refuse_bad_keys_alike(make_cache):
    store = make_cache()._store
    for key in ("", "z" * 251, b"", 3, None):
        answers = [outcome(make_reader(store.index, {"g": 0}, None, None, [0] * 1024,
                                       native=native), "g", key) for native in (True, False)]
        assert answers[0] == answers[1] and answers[0][0] == "raised", answers
        assert answers[0][1] in (InvalidKey, TypeError)
