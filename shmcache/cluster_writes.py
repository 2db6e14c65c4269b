"""A Node's writes: on this host only (a peer's request), or everywhere (a client's): the
owner stores the value and every other host drops its copy (mailgun's set and delete), and
the flush of a group on every host. The Get path: node.py."""

import threading
import time

from .errors import PeerUnavailable
from .futures import Promise
from .peers import PeerError

BATCH_CONCURRENCY = 16      # pool threads one batch of cluster writes may use at a time


class ClusterWrites:
    """The writes of a Node (node.py), which provides ``store``, ``groups``, ``peers``
    (a PeerPicker), ``pool`` and ``fanout`` (thread pools)."""


    def set(self, group, key, value, ttl=None, expire_at=None):
        """Store on this host only (the peer route's set)."""
        self.store.set(group, key, value, ttl=ttl, expire_at=expire_at)

    def delete(self, group, key):
        """Remove on this host only (the peer route's delete)."""
        return self.store.delete(group, key)

    def set_everywhere(self, group, key, value, ttl=None):
        """mailgun's set: store on the owner, drop every other host's copy. A dict saying
        where it went and which peers failed; ValueTooLarge before anything changes."""
        if ttl is None:
            ttl = self.groups[group].ttl
        expire_at = time.time() + ttl if ttl else None
        owner_url = self.peers.owner_url(key)
        owner = self.peers.clients.get(owner_url) if owner_url else None
        failed = {}
        if owner is None:
            self.store.set(group, key, value, expire_at=expire_at)
        else:
            self.store.check_fits(group, key, value)
            try:
                owner.store(group, key, value, expire_at)
                self.store.delete(group, key)                # our own copy, if any
            except (PeerUnavailable, PeerError) as exc:
                failed[owner.url] = str(exc)
                self.store.set(group, key, value, expire_at=expire_at)   # what fallback loads see
        others = [peer for peer in self.peers.others() if peer is not owner]
        failed.update(self._broadcast(others, "remove", group, key))
        return {"stored": owner is None or owner.url not in failed,
                "owner": owner_url or "self", "failed_peers": failed}

    def delete_everywhere(self, group, key):
        """mailgun's delete: remove on the owner, then on every other host."""
        owner_url = self.peers.owner_url(key)
        owner = self.peers.clients.get(owner_url) if owner_url else None
        failed, answers = {}, {}
        deleted = self.store.delete(group, key)
        if owner is not None:
            failed.update(self._broadcast([owner], "remove", group, key, answers=answers))
        others = [peer for peer in self.peers.others() if peer is not owner]
        failed.update(self._broadcast(others, "remove", group, key))
        # Whether the key was there: on its owner (this host when no other owns it).
        return {"deleted": deleted if owner is None else answers.get(owner.url, False),
                "failed_peers": failed}

    def clear_everywhere(self, group):
        """Flush: drop every entry of ``group`` (hot copies included) on every host, in two
        rounds, each clearing every host (the others at once, then this one), the second
        once the first is done everywhere. Once it returns, no host that answered holds a
        value from before the flush, whatever gets raced it:

        * a load that asked the getter before its host's clear stores nothing after it:
          the clear moves the group's generation on (Group.load_into);
        * a get after a clear joins no load from before it, and so neither waits for nor
          shares a pre-flush answer: the in-process flight is named by the generation,
          and the host-wide claim joins only a load of the same generation
          (singleflight.py);
        * a hot copy, though, is a value fetched from its owner, and in one round host B
          may fetch from owner C after B's clear but before C's, keeping a pre-flush
          value. The second round drops it: a hot copy stored after B's second clear
          was fetched after it (the fetch reads B's generation first and ``set_hot``
          checks it), so after the first round ended on C, and C answers only with what
          it loaded or was sent since.

        Hosts that failed are named, as for a delete, and not asked again."""
        failed = {}
        for _round in range(2):
            others = [peer for peer in self.peers.others() if peer.url not in failed]
            failed.update(self._broadcast(others, "clear", group))
            self.store.clear(group)
        return {"cleared": True, "failed_peers": failed}

    def run_all(self, function, calls, limit=BATCH_CONCURRENCY):
        """One Future per ``function(*args)`` of ``calls``, in order. They run on the pool,
        at most ``limit`` at a time so that one batch cannot take every thread; nothing
        blocks waiting for them."""
        calls = list(calls)
        outcomes = [Promise() for _ in calls]
        pending = iter(range(len(calls)))
        lock = threading.Lock()

        def runner():
            while True:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    outcomes[index].set_result(function(*calls[index]))
                except Exception as exc:
                    outcomes[index].set_exception(exc)
        for _ in range(min(limit, len(calls))):
            self.pool.submit(runner)
        return outcomes

    def _broadcast(self, peers, method, *args, answers=None):
        """Call ``method(*args)`` on every peer at once; {url: error} of those that failed.
        What each peer's call returned goes into ``answers`` ({url: result}) if given."""
        futures = {peer: self.fanout.submit(getattr(peer, method), *args) for peer in peers}
        failed = {}
        for peer, future in futures.items():
            try:
                result = future.result()
                if answers is not None:
                    answers[peer.url] = result
                self.peers.health.succeeded(peer.url)
            except PeerUnavailable as exc:
                failed[peer.url] = str(exc)
                self.peers.health.failed(peer.url, str(exc))
            except PeerError as exc:
                failed[peer.url] = str(exc)
        return failed

