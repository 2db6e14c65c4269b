"""The consistent-hash ring: determinism, balance, and what moves when peers come and go."""

import collections
import random

import pytest

from shmcache.ring import VNODES, Ring

pytestmark = pytest.mark.unit

KEYS = [f"user:{i}" for i in range(400_000)]


def peers(count, start=0):
    return [f"http://10.1.{i // 200}.{i % 200}:8001" for i in range(start, start + count)]


def owners(ring):
    return [ring.owner_of(key) for key in KEYS]


def test_same_owners_for_any_order_and_duplicates():
    urls = peers(7)
    a = Ring(urls)
    b = Ring(list(reversed(urls)) + urls[:3])
    assert a.peers == b.peers and len(a) == 7
    assert owners(a)[:20000] == owners(b)[:20000]
    assert a.owner_of("k") == a.owner_of(b"k")          # str and bytes hash alike


@pytest.mark.parametrize("count", [10, 100])
def test_default_vnodes_balance_within_ten_percent(count):
    load = collections.Counter(owners(Ring(peers(count))))
    assert len(load) == count
    assert max(load.values()) / (len(KEYS) / count) <= 1.10


@pytest.mark.parametrize("count", [10, 100])
def test_adding_a_peer_moves_about_its_share_and_only_to_it(count):
    before = owners(Ring(peers(count)))
    grown = Ring(peers(count + 1))
    new_peer = peers(1, start=count)[0]
    after = owners(grown)
    moved = [(old, new) for old, new in zip(before, after) if old != new]
    assert all(new == new_peer for _old, new in moved)       # never between old peers
    expected = len(KEYS) / (count + 1)
    assert 0.8 * expected <= len(moved) <= 1.2 * expected


def test_removing_a_peer_moves_only_its_keys():
    urls = peers(10)
    before = owners(Ring(urls))
    gone = urls[3]
    after = owners(Ring([url for url in urls if url != gone]))
    for old, new in zip(before, after):
        assert old == new or old == gone


@pytest.mark.parametrize("bad, error", [([], ValueError)])
def test_bad_rings(bad, error):
    with pytest.raises(error):
        Ring(bad)
    with pytest.raises(ValueError):
        Ring(["http://a:1"], vnodes=0)


def test_one_peer_owns_everything_and_default_vnodes():
    ring = Ring(["http://solo:1"])
    assert {ring.owner_of(key) for key in KEYS[:1000]} == {"http://solo:1"}
    assert ring.vnodes == VNODES


def test_peer_paths_escape_each_part_as_quote_does():
    """PeerClient.path skips quote() for plain keys; every key still travels escaped exactly
    as quote(part, safe='') escapes it (spaces, slashes, '%', non-ASCII, controls)."""
    from urllib.parse import quote
    from shmcache.peers import PeerClient
    client = PeerClient("http://127.0.0.1:1", base_path="/_groupcache/")
    rng = random.Random(7)
    alphabet = "aZ09_.~-/ %?#&=+ü中\x00\x7f\u2028"
    parts = ["plain-key_1.x~", "a b", "a/b", "100%", "ключ", "x" * 250]
    parts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(500)]
    for part in parts:
        assert client.path("g", part) == f"/_groupcache/g/{quote(part, safe='')}"
        assert client.path(part, "k") == f"/_groupcache/{quote(part, safe='')}/k"
