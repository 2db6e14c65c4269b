"""The Get path of DESIGN.md, top to bottom, and the one place that counts it.

``Node.get(group, key)`` answers a get in three steps:

1. **Local hit**, from shared memory, never blocking: a value (a hot copy too); the
   remembered not-found of a getter's "no such key" (the group's not_found_ttl); else a
   value past its ttl but within its group's stale window, answered at once while a
   refresh reloads it in the background (stale.py). Only then is the get a miss.
2. **Owner elsewhere**: a key the ring gives to another host is fetched from it: on the
   worker's event loop through its PeerFetcher (peer_fetch.py), or with a blocking request
   on the pool. A fresh answer is sometimes kept here as a hot copy (hot_fraction). If the
   owner cannot be reached or fails, the key is loaded here instead (groupcache's fallback).
   A request from a peer is never forwarded again.
3. **Host-wide load**: the getter runs once on this host however many processes ask
   (HostFlights, singleflight.py), once per key per process before that (Flights). When
   the peer set changed a moment ago, the key's previous owner is peeked first (churn moves
   warm keys instead of loading them again).

Counting. Every figure of the Get path (metrics.KINDS) is counted here, except one: a hit
read from shared memory is counted by the reader that read it (reader.py and its C twin
in _native.c), because that read IS the hit path and a wrapper around it would cost as
much as the hit. That reader leaves a miss uncounted (``count_misses=False``): a miss is
counted here, once it is one (no stale value either). A client forwarding its miss to the
front therefore counts nothing for it: the front's node counts that get. The client's own
getter (``create(groups=...)``) counts through ``stale_or_miss`` and ``refresh`` below.

The peer picker (``peers``) is anything implementing peers.PeerPicker: ``Peers`` (the
ring), or ``NoPeers`` for a host alone, which owns every key.
"""

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

from .cluster_writes import ClusterWrites
from .errors import LoadError, NotFound, PeerUnavailable, ValueTooLarge
from .futures import Promise, settle
from .lru_index import encode_key
from .metrics import (HITS, LOADS, LOADS_DEDUPED, LOCAL_LOAD_ERRORS, LOCAL_LOADS, MISSES,
                      PEER_ERRORS, PEER_LOADS, REFRESH_ERRORS, SERVER_REQUESTS, STALE_HITS,
                      host_stats, processes)
from .peers import PeerError
from .reader import NOT_FOUND
from .singleflight import Flights, HostFlights
from .stale import Refreshes, is_stale

log = logging.getLogger("shmcache")


class StaleHit(tuple):
    """(value, expiry, hot) of a value past its expiry, answered while it refreshes."""
    __slots__ = ()


def stale_or_miss(store, group, key):
    """Step 1, after the plain read missed: the ``StaleHit`` of ``key`` if its entry is
    within its group's stale window (or was refreshed a moment ago), counted as a hit and a
    stale hit; else None, counted as the get's miss. The caller starts the refresh."""
    found = store.get_stale(group, key)
    gid = store.group_id(group)
    if found is None:
        store.counters.add(gid, MISSES)
        return None
    store.counters.add(gid, HITS)
    if is_stale(found[1]):
        store.counters.add(gid, STALE_HITS)
    return StaleHit(found)


def count_misses(store, group, count=1):
    """Count ``count`` gets of ``group`` that missed and that nobody else will count (a
    client's keys that no getter and no front can load)."""
    store.count(group, MISSES, count)


def refresh(store, group, key, load):
    """Run ``load()``, the reload of the stale value of ``key`` in ``group`` (a Group),
    which stores what it loads. Never raises an Exception: a failure is counted (and logged,
    unless it is the getter's, which its group logged), and the stale value stays (stale-
    if-error); NotFound drops it."""
    try:
        load()
    except NotFound:
        try:
            store.drop_stale(group.name, key)
        except Exception as exc:                       # the segment went away meanwhile
            log.info("group %s: could not drop the stale value of %r: %s", group.name,
                     key[:200], exc)
    except Exception as exc:
        try:
            store.count(group.name, REFRESH_ERRORS)
        except Exception:                               # the segment went away meanwhile
            pass
        if not isinstance(exc, LoadError):             # a getter's failure is logged already
            log.warning("group %s: refreshing the stale value of %r failed: %s: %s",
                        group.name, key[:200], type(exc).__name__, exc)


class _NoHealth:
    """NoPeers' health board: there is no peer to mark."""

    def failed(self, url, reason):
        pass

    def succeeded(self, url):
        pass

    def is_suspect(self, url, now=None):
        return False


class NoPeers:
    """The peer picker of a host alone: it owns every key (groupcache's NoPeers). It
    implements the whole PeerPicker protocol (peers.py)."""
    self_url = None
    health = _NoHealth()
    clients = MappingProxyType({})

    def owner_of(self, key):
        """The PeerClient of the key's owner, or None when this host loads it itself."""
        return None

    def owner_url(self, key):
        return None

    def previous_owner_of(self, key):
        return None

    def peeked(self, url, found):
        pass

    def others(self):
        return []

    def stats(self):
        return {}

    def close(self):
        pass


class Node(ClusterWrites):
    """What a worker does for requests. Hits are answered from the arena inline; anything
    that may block runs on ``pool`` and is handed back as a Future. Writes: cluster_writes.py."""

    def __init__(self, store, groups, pool, peers=None, load_timeout=30.0, hot_fraction=0.1):
        self.store = store
        self.groups = {group.name: group for group in groups}
        self.pool = pool
        self.fanout = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fanout")
        self.peers = peers or NoPeers()
        self.hot_fraction = hot_fraction
        self.flights = Flights()
        self.host_flights = HostFlights(store, load_timeout)
        self.refreshes = Refreshes(pool.submit)
        self.fetcher = None        # a PeerFetcher (peer_fetch.py): owners asked on the loop

    @property
    def clustered(self):
        """True when other hosts share the keyspace (writes then go to every host)."""
        return bool(self.peers.others())

    def group(self, name):
        """The Group, or None if this host does not serve it."""
        return self.groups.get(name)

    # -- the Get path ---------------------------------------------------------------------------

    def get(self, group, key, from_peer=False):
        """A get, never blocking. From memory (step 1): the reader's (value, expiry, hot), a
        ``StaleHit`` (a refresh started), or NOT_FOUND (remembered). Else a Future of
        (value, expiry) from the owner or a load (steps 2 and 3); NotFound if it does not
        exist. ``from_peer``: a peer's request (counted as one; never forwarded again)."""
        store = self.store
        if from_peer:
            store.count(group, SERVER_REQUESTS)
        hit = store.get_with_expiry(group, key)       # 1. a hit counts itself; a miss not
        if hit is not None:
            return hit
        hit = stale_or_miss(store, group, key)        # 1. a stale value, or the miss counted
        if hit is not None:
            self.refreshes.start((group, key, from_peer),
                                 lambda: refresh(store, self.groups[group], key,
                                                 lambda: self._refresh(group, key, from_peer)))
            return hit
        return self.get_future(group, key, from_peer)  # 2. and 3.

    def peek(self, group, key, from_peer=False):
        """Step 1 without the stale window or a load (a peer's ``?peek=1``): (value, expiry,
        hot), NOT_FOUND, or None (counted as a miss)."""
        store = self.store
        if from_peer:
            store.count(group, SERVER_REQUESTS)
        hit = store.get_with_expiry(group, key)
        if hit is None:
            store.count(group, MISSES)
        return hit

    def get_future(self, group, key, from_peer=False):
        """Steps 2 and 3: a Future of (value, expiry) for a missed key, one per key per
        process at a time. A get that comes after a flush of the group does not join a load
        from before it (the group's generation is part of the flight's name)."""
        self.store.count(group, LOADS)
        return self.flights.run((group, key, from_peer, self.store.generation(group)),
                                lambda: self._start_get(group, key, from_peer))

    def _start_get(self, group, key, from_peer):
        """The flight's first get. A key another host owns is fetched from it on the event
        loop (when the worker has a PeerFetcher and this is its loop); anything that may
        block (a local load, its host-wide singleflight) runs on the pool (``_get_slow``)."""
        fetcher = self.fetcher
        owner = None
        if not from_peer and fetcher is not None and fetcher.in_loop():
            owner = self.peers.owner_of(key)
        if owner is None:
            return self.pool.submit(self._get_slow, group, key, from_peer)
        result = Promise()
        try:
            found = self._recheck(group, key)
        except NotFound as exc:
            result.set_exception(exc)
            return result
        if found is not None:
            result.set_result(found)
            return result
        version = self.store.version(group, key)
        generation = self.store.generation(group)      # a flush while fetching: no hot copy

        def fetched(done):
            try:
                answer = self._fetched(owner, group, key, done.result, version, generation)
                if answer is not None:
                    result.set_result(answer)
                    return
                fallback = self.pool.submit(self._load_here, group, key)    # 3. instead
                fallback.add_done_callback(lambda loaded: settle(result, loaded))
            except BaseException as exc:              # NotFound; a bug: the request gets a 500
                if not result.done():
                    result.set_exception(exc)
        fetcher.fetch(owner, group, key).add_done_callback(fetched)   # 2. on the loop
        return result

    def _get_slow(self, group, key, from_peer):
        """Steps 2 and 3 on the pool, with blocking requests to the owner."""
        found = self._recheck(group, key)
        if found is not None:
            return found
        if not from_peer:
            owner = self.peers.owner_of(key)
            if owner is not None:
                fetched = self._fetch_from_owner(owner, group, key)       # 2.
                if fetched is not None:
                    return fetched
        return self._load_here(group, key)                               # 3.

    def _recheck(self, group, key):
        """The get is a load now (deduplicated, the one of its flight). (value, expiry) if
        another load stored the key meanwhile, None if it is still missing; NotFound if a
        not-found is remembered. An uncounted read: the get was counted already."""
        self.store.count(group, LOADS_DEDUPED)
        hit = self.store.recheck(group, key)
        if hit is NOT_FOUND:
            raise NotFound(f"{group}/{key[:100]} does not exist (remembered not-found)")
        return None if hit is None else (hit[0], hit[1])

    def _fetch_from_owner(self, owner, group, key, keep=False):
        """Step 2 over a blocking request (on the pool): see ``_fetched``."""
        version = self.store.version(group, key)
        generation = self.store.generation(group)      # a flush while fetching: no hot copy
        return self._fetched(owner, group, key, lambda: owner.fetch(group, key), version,
                             generation, keep)

    def _fetched(self, owner, group, key, fetch, version, generation, keep=False):
        """What the owner's answer means here: (value, expiry) from ``fetch()``; None to
        load locally instead (groupcache's fallback) when the owner cannot be reached or
        fails. NotFound passes through. A fresh value is kept as a hot copy at random
        (hot_fraction), always if ``keep``; a stale one (the owner serves it while it
        refreshes) never is. ``version`` and ``generation`` were read before the fetch."""
        try:
            value, expiry = fetch()
        except PeerUnavailable as exc:
            self.store.count(group, PEER_ERRORS)
            self.peers.health.failed(owner.url, str(exc))
            return None
        except PeerError as exc:
            self.store.count(group, PEER_ERRORS)
            log.warning("peer error, loading %s/%s here: %s", group, key, exc)
            self.peers.health.succeeded(owner.url)
            return None
        except NotFound:
            self.peers.health.succeeded(owner.url)
            raise
        self.store.count(group, PEER_LOADS)
        self.peers.health.succeeded(owner.url)
        if (keep or self.hot_fraction and random.random() < self.hot_fraction) \
                and not is_stale(expiry):
            try:
                self.store.set_hot(group, key, value, expiry, version, generation)
            except ValueTooLarge:
                pass
        return value, expiry

    def _load_here(self, group, key):
        """Step 3: (value, expiry) loaded on this host (host-wide singleflight)."""
        value = self._load_locally(group, key)
        ttl = self.groups[group].ttl            # about when the value stored here expires
        return value, (time.time() + ttl if ttl else None)

    def _load_locally(self, group, key, wait=True):
        """Host-wide singleflight: the getter runs once on this host however many ask.
        ``wait=False``: if a load of the key is in flight on the host, leave it to that one
        (None)."""
        target = self.groups[group]

        def load_and_store():
            peeked = self._peek_previous_owner(group, key)
            if peeked is not None:
                return peeked
            try:
                value = target.load_into(self.store, key)
            except NotFound:
                self.store.count(group, LOCAL_LOADS)      # the getter answered: "no such key"
                raise
            except Exception:
                self.store.count(group, LOCAL_LOAD_ERRORS)
                raise
            self.store.count(group, LOCAL_LOADS)
            return value
        load = self.host_flights.load if wait else self.host_flights.load_unless_loading
        return load(self.store.group_id(group), encode_key(key), load_and_store)

    def _peek_previous_owner(self, group, key):
        """The value the key's previous owner holds in memory, stored here; None if it has
        none. A key whose owner became this host when the peer set changed is asked of its
        owner by the previous ring before the getter runs (galaxycache's peek), so churn
        moves warm keys instead of loading them again. A peek never loads or forwards."""
        previous = self.peers.previous_owner_of(key)
        if previous is None:
            return None
        try:
            found = previous.peek(group, key)
        except PeerUnavailable as exc:
            self.peers.health.failed(previous.url, str(exc))
            return None
        except PeerError as exc:
            log.warning("peek of %s/%s failed, loading it here: %s", group, key, exc)
            return None
        self.peers.peeked(previous.url, found is not None)
        if found is None:
            return None
        value, expiry = found
        if expiry is not None and expiry <= time.time():
            return None
        self.store.count(group, PEER_LOADS)
        try:
            self.store.set(group, key, value, expire_at=expiry)
        except ValueTooLarge:
            pass
        return value

    def _refresh(self, group, key, from_peer):
        """Reload a stale entry as a miss would load it (steps 2 and 3), except that nobody
        waits: an owner's fresh answer replaces the stale copy here, and a load already in
        flight on this host is left to finish on its own."""
        if self.store.recheck(group, key) is not None:
            return                                          # refreshed meanwhile
        if not from_peer:
            owner = self.peers.owner_of(key)
            if owner is not None and self._fetch_from_owner(owner, group, key, keep=True):
                return
        self._load_locally(group, key, wait=False)

    # -- the host -------------------------------------------------------------------------------

    def stats(self):
        """The host's figures: the segment, every group (its counters summed over all the
        host's processes), the workers' memory and CPU, and peer health."""
        import psutil
        stats = host_stats(self.store)
        workers, clients = [], 0
        for pid, role in processes(self.store):
            if not role:
                clients += 1
                continue
            try:
                process = psutil.Process(pid)
                cpu = process.cpu_times()
                workers.append({"worker": role, "pid": pid, "rss_bytes": process.memory_info().rss,
                                "cpu_seconds": cpu.user + cpu.system})
            except psutil.Error:
                continue
        stats["workers"] = sorted(workers, key=lambda worker: worker["worker"])
        stats["clients"] = clients
        stats["worker_pid"] = os.getpid()
        stats["loads_in_flight"] = len(self.flights)
        stats["refreshes_in_flight"] = len(self.refreshes)
        stats["self"] = self.peers.self_url
        stats["peers"] = self.peers.stats()
        return stats

    def close(self):
        """Publish the last counts and stop background threads (the worker is exiting)."""
        self.store.counters.stop()
        self.store.counters.release()
        self.fanout.shutdown(wait=False)
        self.peers.close()
        if self.fetcher is not None:
            self.fetcher.close()
