"""One worker process: the Get path of DESIGN.md (local hit, owner elsewhere, host-wide
singleflight load), set and delete, and the process around them (signals, boot, serving).

The worker's ``__init__`` runs in the supervisor before fork and touches nothing process-wide;
``init_process()`` runs in the child after fork. A worker that cannot boot exits with
WORKER_BOOT_ERROR, and the supervisor stops instead of respawning it forever.

A miss another host owns is fetched from it on the worker's event loop (peer_fetch.py); the
environment variable SHMCACHE_PEER_FETCH=pool makes the worker fetch on its thread pool
with blocking requests instead, as it did before (benchmarks compare the two).
"""

import ctypes
import logging
import os
import random
import signal
import time
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType

import psutil

from .arena import OWNER_LOCK_BYTE, retire
from .errors import NotFound, PeerUnavailable, ValueTooLarge
from .http_front import settle
from .lru_index import encode_key
from .metrics import (LOADS, LOADS_DEDUPED, LOCAL_LOAD_ERRORS, LOCAL_LOADS, PEER_ERRORS,
                      PEER_LOADS, host_stats, processes)
from .peers import PeerError
from .reader import NOT_FOUND
from .singleflight import Flights, HostFlights
from .stale import Refreshes, is_stale, refresh, stale_hit
from .store import Store

log = logging.getLogger("shmcache")

WORKER_BOOT_ERROR = 3
BATCH_CONCURRENCY = 16      # pool threads one batch of cluster writes may use at a time


class BootInterrupted(BaseException):
    """A stop signal arrived while the worker was booting. A BaseException, so that an
    ``except Exception`` in an --app factory does not swallow it."""


_PR_SET_PDEATHSIG = 1


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

    def others(self):
        return []

    def stats(self):
        return {}

    def close(self):
        pass


class Node:
    """What a worker does for requests. Hits are answered from the arena inline; anything
    that may block runs on ``pool`` and is handed back as a Future."""

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

    def peek(self, group, key):
        """(value, expiry, is_hot_copy) from shared memory, NOT_FOUND for a remembered
        not-found (the group's not_found_ttl), or None; never blocks."""
        return self.store.get_with_expiry(group, key)

    def peek_stale(self, group, key, from_peer=False):
        """After ``peek`` missed: (value, expiry, is_hot_copy) of an entry past its ttl but
        within its group's stale window, and a refresh of it started in the background; or
        None. Never blocks (stale.py)."""
        found = stale_hit(self.store, group, key)
        if found is not None:
            self.refreshes.start((group, key, from_peer),
                                 lambda: refresh(self.store, self.groups[group], key,
                                                 lambda: self._refresh(group, key, from_peer)))
        return found

    def _refresh(self, group, key, from_peer):
        """Reload a stale entry as a miss would load it (steps 2 and 3 of the Get path),
        except that nobody waits: an owner's fresh answer replaces the stale copy here, and
        a load already in flight on this host is left to finish on its own."""
        if self.store.recheck(group, key) is not None:
            return                                          # refreshed meanwhile
        if not from_peer:
            owner = self.peers.owner_of(key)
            if owner is not None and self._fetch_from_owner(owner, group, key, keep=True):
                return
        self._load_locally(group, key, wait=False)

    def get_future(self, group, key, from_peer=False):
        """Future of (value, expiry) for a missed key: one per key per process at a time.
        A get that comes after a flush of the group does not join a load from before it
        (the group's generation is part of the flight's name)."""
        self.store.count(group, LOADS)
        return self.flights.run((group, key, from_peer, self.store.generation(group)),
                                lambda: self._start_get(group, key, from_peer))

    def _start_get(self, group, key, from_peer):
        """Steps 2 and 3 of the Get path, begun. A key another host owns is fetched from it
        on the event loop (when the worker has a PeerFetcher and this is its loop); anything
        that may block (a local load, its host-wide singleflight) runs on the pool."""
        fetcher = self.fetcher
        if from_peer or fetcher is None or not fetcher.in_loop():
            return self.pool.submit(self._get_slow, group, key, from_peer)
        owner = self.peers.owner_of(key)
        if owner is None:
            return self.pool.submit(self._get_slow, group, key, from_peer)
        self.store.count(group, LOADS_DEDUPED)
        result = Future()
        hit = self.store.recheck(group, key)
        if hit is NOT_FOUND:
            result.set_exception(NotFound(f"{group}/{key[:100]} does not exist "
                                          f"(remembered not-found)"))
            return result
        if hit is not None:
            result.set_result((hit[0], hit[1]))
            return result
        version = self.store.version(group, key)
        generation = self.store.generation(group)      # a flush while fetching: no hot copy

        def fetched(done):
            try:
                try:
                    answer = self._fetched(owner, group, key, done.result, version, generation)
                except NotFound as exc:
                    result.set_exception(exc)
                    return
                if answer is not None:
                    result.set_result(answer)
                    return
                fallback = self.pool.submit(self._load_here, group, key)
                fallback.add_done_callback(lambda loaded: settle(result, loaded))
            except BaseException as exc:              # a bug: the request gets a 500
                if not result.done():
                    result.set_exception(exc)
        fetcher.fetch(owner, group, key).add_done_callback(fetched)
        return result

    def _get_slow(self, group, key, from_peer):
        """Steps 2 and 3 of the Get path, on the pool. Requests from peers are never
        forwarded again."""
        self.store.count(group, LOADS_DEDUPED)
        hit = self.store.recheck(group, key)
        if hit is NOT_FOUND:
            raise NotFound(f"{group}/{key[:100]} does not exist (remembered not-found)")
        if hit is not None:
            return hit[0], hit[1]
        if not from_peer:
            owner = self.peers.owner_of(key)
            if owner is not None:
                fetched = self._fetch_from_owner(owner, group, key)
                if fetched is not None:
                    return fetched
        return self._load_here(group, key)

    def _load_here(self, group, key):
        """(value, expiry) loaded on this host (host-wide singleflight)."""
        value = self._load_locally(group, key)
        ttl = self.groups[group].ttl            # about when the value stored here expires
        return value, (time.time() + ttl if ttl else None)

    def _fetch_from_owner(self, owner, group, key, keep=False):
        """(value, expiry) from the owner over a blocking request (on the pool); None to
        load locally instead. See ``_fetched``."""
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

    def _load_locally(self, group, key, wait=True):
        """Host-wide singleflight: the getter runs once on this host however many ask.
        ``wait=False``: if a load of the key is in flight on the host, leave it to that one
        (None)."""
        target = self.groups[group]
        gid = self.store.group_id(group)

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
        return load(gid, encode_key(key), load_and_store)

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

    # -- writes -------------------------------------------------------------------------------

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
        outcomes = [Future() for _ in calls]
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

    def stats(self):
        """The host's figures: the segment, every group (its counters summed over all the
        host's processes), the workers' memory and CPU, and peer health."""
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


class Worker:
    """One worker process. Build in the supervisor, then ``run()`` in the forked child."""

    def __init__(self, index, config, listener, groups, app_factory=None, peer_board=None):
        self.index = index
        self.peer_board = peer_board       # the supervisor's PeerView (discovery.py)
        self.config = config
        self.listener = listener
        self.groups = groups
        self.app_factory = app_factory     # a callable --app: called again after fork
        self.supervisor_pid = os.getpid()
        self.server = None
        self.node = None
        self.reload_wanted = False
        self.stop_wanted = False
        self.booting = False            # True while a stop signal may interrupt the boot

    def run(self, unblock=()):
        """Boot, serve until told to stop, exit. Never returns. ``unblock``: signals the
        supervisor blocked across fork; they are unblocked once this worker's handlers are in
        place, so a stop signal sent at any moment of boot reaches ``handle_stop``."""
        try:
            self.booting = True
            try:
                self.install_signal_handlers()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)   # pending ones land now
            self.init_process()
            self.booting = False
        except BootInterrupted:
            self.exit_before_serving()
        except Exception:
            log.exception("worker %d failed to boot", self.index)
            logging.shutdown()
            os._exit(WORKER_BOOT_ERROR)
        if self.stop_wanted:
            self.exit_before_serving()
        code = 0
        try:
            self.server.serve(tick=self.tick, tick_interval=0.5)
        except Exception:
            log.exception("worker %d crashed", self.index)
            code = 1
        log.info("worker %d (pid %d) stopped", self.index, os.getpid())
        self.node.close()
        if os.getppid() != self.supervisor_pid:
            self.remove_orphaned_segment()
        logging.shutdown()
        os._exit(code)

    def exit_before_serving(self):
        """A stop signal came during boot: leave without serving a request."""
        self.booting = False
        log.info("worker %d (pid %d) stopped while booting", self.index, os.getpid())
        if self.node is not None:
            self.node.close()
        logging.shutdown()
        os._exit(0)

    def remove_orphaned_segment(self):
        """The supervisor died without a clean stop: unless a new supervisor has taken the
        segment over, remove its name so that /dev/shm does not keep a dead segment.

        Safe against a restart racing us: a new supervisor either made a new file under the
        name (the inode check fails) or holds the owner lock on this one (try_lock fails)."""
        store = self.node.store
        try:
            if os.stat(store.arena.path).st_ino != os.fstat(store.arena.fd).st_ino:
                return
            if store.lock_file.try_lock_byte(OWNER_LOCK_BYTE):
                retire(f"/proc/self/fd/{store.arena.fd}")
                os.unlink(store.arena.path)
                log.warning("worker %d: supervisor died; removed its segment %s", self.index,
                            store.arena.name)
                store.lock_file.unlock_byte(OWNER_LOCK_BYTE)
        except FileNotFoundError:
            pass                                  # another worker was first

    def init_process(self):
        from .batch import max_batch_body
        from .http_front import Front
        from .httpserver import HttpServer, Limits
        os.environ["SHMCACHE_WORKER"] = str(self.index)
        _die_with_parent()
        groups = self.groups
        if self.app_factory is not None:   # per-process resources, made after fork
            from .group import check_groups
            groups = check_groups(list(self.app_factory()), "--app")
            wanted = {(g.name, g.cache_bytes, g.ttl, g.stale, g.not_found_ttl)
                      for g in self.groups}
            if {(g.name, g.cache_bytes, g.ttl, g.stale, g.not_found_ttl)
                    for g in groups} != wanted:
                raise RuntimeError("--app returned different groups in the worker than in "
                                   "the supervisor")
        config = self.config
        store = Store.attach(config.name)
        store.start_counting(role=self.index)
        pool = ThreadPoolExecutor(max_workers=config.threads,
                                  thread_name_prefix=f"worker{self.index}")
        peers = None
        if self.peer_board is not None:
            from .peers import Peers
            view = self.peer_board.read()
            peers = Peers(view.self_url, view.peers, store, base_path=config.base_path,
                          connect_timeout=config.peer_connect_timeout,
                          read_timeout=config.peer_timeout, token=config.token,
                          tls_ca=config.tls_ca, previous=view.previous,
                          previous_until=view.previous_until)
            log.debug("worker %d: %d peers", self.index, len(peers.ring))
        node = self.node = Node(store, groups, pool, peers=peers, load_timeout=config.load_timeout,
                                hot_fraction=config.hot_fraction)
        front = Front(node, base_path=config.base_path, token=config.token,
                      token_reads=config.token_reads, max_key_bytes=config.max_key_bytes)
        max_item_size = store.arena.layout.max_item_size
        limits = Limits(max_body=max_item_size + 4096, max_post_body=max_batch_body(max_item_size),
                        header_timeout=config.request_timeout,
                        idle_timeout=config.keepalive_timeout)
        handle = access_logged(front.handle) if config.access_log else front.handle
        tls = None
        if config.tls_cert:                # a context of its own, made after fork
            from .tls import server_context
            tls = server_context(config.tls_cert, config.tls_key)
        self.server = HttpServer(self.listener, handle, limits, tls=tls)
        if peers is not None and os.environ.get("SHMCACHE_PEER_FETCH") != "pool":
            from .peer_fetch import PeerFetcher
            node.fetcher = PeerFetcher(self.server)
        log.info("worker %d (pid %d) serving", self.index, os.getpid())

    def install_signal_handlers(self):
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self.handle_stop)
        signal.signal(signal.SIGHUP, self.handle_hup)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def handle_hup(self, signum, frame):
        self.reload_wanted = True                 # done in the loop's tick, not here

    def reload_peers(self):
        """Use the peer set the supervisor published (it logs the change, once per host)."""
        self.reload_wanted = False
        peers = self.node.peers
        if self.peer_board is None or not hasattr(peers, "update"):
            return
        try:
            view = self.peer_board.read()
        except OSError as exc:
            log.error("worker %d: keeping the old peers: %s", self.index, exc)
            return
        peers.update(view.peers, view.self_url, view.previous, view.previous_until)
        log.debug("worker %d: %d peers", self.index, len(peers.ring))

    def handle_stop(self, signum, frame):
        """Serving: drain and stop. Booting: stop at once. The boot is interrupted by an
        exception raised from here (in the main thread, between two bytecodes); any step it
        interrupts is one a crash could interrupt too: the arena's journal and locks survive
        that, and nothing else the boot makes outlives the process."""
        self.stop_wanted = True
        if self.server is not None:
            self.server.stop()
        elif self.booting:
            self.booting = False
            raise BootInterrupted()

    def tick(self):
        """Every half second: reload peers if asked; stop if the supervisor is gone."""
        if self.reload_wanted:
            self.reload_peers()
        if os.getppid() != self.supervisor_pid:
            log.warning("worker %d: supervisor %d is gone; stopping", self.index,
                        self.supervisor_pid)
            self.server.stop()


def access_logged(handle):
    """``handle`` that also logs one line per request to the logger shmcache.access."""
    access = logging.getLogger("shmcache.access")

    def logged(request):
        started = time.monotonic()
        response = handle(request)

        def line(data):
            access.info("%s %s %s %s %d %.1fms", request.peer[0] if request.peer else "-",
                        request.method, request.target[:200], data[9:12].decode(errors="replace"),
                        len(data), (time.monotonic() - started) * 1000)
        if isinstance(response, (bytes, bytearray)):
            line(response)
        else:
            response.add_done_callback(lambda done: line(done.result()) if not done.exception() else None)
        return response
    return logged


def _die_with_parent():
    """Ask the kernel for SIGTERM when the supervisor dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):       # not fatal: tick() polls as well
        pass
