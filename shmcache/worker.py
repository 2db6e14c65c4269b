"""One worker process: the Get path of DESIGN.md (local hit, owner elsewhere, host-wide
singleflight load), set and delete, and the process around them (signals, boot, serving).

The worker's ``__init__`` runs in the supervisor before fork and touches nothing process-wide;
``init_process()`` runs in the child after fork. A worker that cannot boot exits with
WORKER_BOOT_ERROR, and the supervisor stops instead of respawning it forever.
"""

import ctypes
import logging
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import LoadError, NotFound, ValueTooLarge
from .lru_index import encode_key
from .singleflight import Flights, HostFlights
from .store import Store

log = logging.getLogger("shmcache")

WORKER_BOOT_ERROR = 3
_PR_SET_PDEATHSIG = 1


class NoPeers:
    """The peer picker of a host alone: it owns every key (groupcache's NoPeers)."""

    def owner_of(self, key):
        """The peer client that owns ``key``, or None when this host does."""
        return None


class Node:
    """What a worker does for requests. Hits are answered from the arena inline; anything
    that may block runs on ``pool`` and is handed back as a Future."""

    def __init__(self, store, groups, pool, peers=None, load_timeout=30.0):
        self.store = store
        self.groups = {group.name: group for group in groups}
        self.pool = pool
        self.peers = peers or NoPeers()
        self.flights = Flights()
        self.host_flights = HostFlights(store, load_timeout)

    def group(self, name):
        """The Group, or None if this host does not serve it."""
        return self.groups.get(name)

    def peek(self, group, key):
        """(value, expiry) from shared memory, or None; never blocks."""
        return self.store.get_with_expiry(group, key)

    def get_future(self, group, key, from_peer=False):
        """Future of (value, expiry) for a missed key: one per key per process at a time."""
        return self.flights.run((group, key, from_peer),
                                lambda: self.pool.submit(self._get_slow, group, key, from_peer))

    def _get_slow(self, group, key, from_peer):
        hit = self.store.get_with_expiry(group, key)
        if hit is not None:
            return hit
        if not from_peer:
            owner = self.peers.owner_of(key)
            if owner is not None:
                return owner.fetch(group, key)
        value = self._load_locally(group, key)
        return value, None

    def _load_locally(self, group, key):
        """Host-wide singleflight: the getter runs once on this host however many ask."""
        target = self.groups[group]
        gid = self.store.group_id(group)

        def load_and_store():
            value = target.load(key)
            try:
                self.store.set(group, key, value)          # the group's TTL applies
            except ValueTooLarge as exc:
                log.info("not caching %s/%s: %s", group, key, exc)
            return value
        return self.host_flights.load(gid, encode_key(key), load_and_store)

    def set(self, group, key, value, ttl=None, expire_at=None):
        self.store.set(group, key, value, ttl=ttl, expire_at=expire_at)

    def delete(self, group, key):
        return self.store.delete(group, key)

    def stats(self):
        stats = self.store.stats()
        stats["worker_pid"] = os.getpid()
        stats["loads_in_flight"] = len(self.flights)
        return stats


def done_future(result=None, exception=None):
    future = Future()
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
    return future


class Worker:
    """One worker process. Build in the supervisor, then ``run()`` in the forked child."""

    def __init__(self, index, config, listener, groups, app_factory=None):
        self.index = index
        self.config = config
        self.listener = listener
        self.groups = groups
        self.app_factory = app_factory     # a callable --app: called again after fork
        self.supervisor_pid = os.getpid()
        self.server = None
        self.node = None

    def run(self):
        """Boot, serve until told to stop, exit. Never returns."""
        try:
            self.init_process()
        except Exception:
            log.exception("worker %d failed to boot", self.index)
            logging.shutdown()
            os._exit(WORKER_BOOT_ERROR)
        code = 0
        try:
            self.server.serve(tick=self.check_supervisor, tick_interval=0.5)
        except Exception:
            log.exception("worker %d crashed", self.index)
            code = 1
        log.info("worker %d (pid %d) stopped", self.index, os.getpid())
        if os.getppid() != self.supervisor_pid:
            self.remove_orphaned_segment()
        logging.shutdown()
        os._exit(code)

    def remove_orphaned_segment(self):
        """The supervisor died without a clean stop: unless a new supervisor has taken the
        segment over, remove its name so that /dev/shm does not keep a dead segment.

        Safe against a restart racing us: a new supervisor either made a new file under the
        name (the inode check fails) or holds the owner lock on this one (try_lock fails)."""
        from .supervisor import OWNER_LOCK_BYTE
        store = self.node.store
        try:
            if os.stat(store.arena.path).st_ino != os.fstat(store.arena.fd).st_ino:
                return
            if store.lock_file.try_lock_byte(OWNER_LOCK_BYTE):
                os.unlink(store.arena.path)
                log.warning("worker %d: supervisor died; removed its segment %s", self.index,
                            store.arena.name)
                store.lock_file.unlock_byte(OWNER_LOCK_BYTE)
        except FileNotFoundError:
            pass                                  # another worker was first

    def init_process(self):
        from .http_front import Front
        from .httpserver import HttpServer, Limits
        os.environ["SHMCACHE_WORKER"] = str(self.index)
        _die_with_parent()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self.handle_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        groups = self.groups
        if self.app_factory is not None:   # per-process resources, made after fork
            from .group import check_groups
            groups = check_groups(list(self.app_factory()), "--app")
            wanted = {(g.name, g.cache_bytes, g.ttl) for g in self.groups}
            if {(g.name, g.cache_bytes, g.ttl) for g in groups} != wanted:
                raise RuntimeError("--app returned different groups in the worker than in "
                                   "the supervisor")
        config = self.config
        store = Store.attach(config.name)
        pool = ThreadPoolExecutor(max_workers=config.threads,
                                  thread_name_prefix=f"worker{self.index}")
        node = self.node = Node(store, groups, pool, load_timeout=config.load_timeout)
        front = Front(node, base_path=config.base_path)
        limits = Limits(max_body=store.arena.layout.max_item_size + 4096)
        self.server = HttpServer(self.listener, front.handle, limits)
        log.info("worker %d (pid %d) serving", self.index, os.getpid())

    def handle_stop(self, signum, frame):
        if self.server is not None:
            self.server.stop()
        else:
            os._exit(0)

    def check_supervisor(self):
        """Every tick: if the supervisor is gone, stop (no orphans)."""
        if os.getppid() != self.supervisor_pid:
            log.warning("worker %d: supervisor %d is gone; stopping", self.index,
                        self.supervisor_pid)
            self.server.stop()


def _die_with_parent():
    """Ask the kernel for SIGTERM when the supervisor dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):       # not fatal: check_supervisor polls as well
        pass
