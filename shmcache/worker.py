"""One worker process: the process around a Node (node.py, the Get path; cluster_writes.py,
set and delete): boot, signals, the serving loop.

The worker's ``__init__`` runs in the supervisor before fork and touches nothing process-wide;
``init_process()`` runs in the child after fork. A worker that cannot boot exits with
WORKER_BOOT_ERROR, and the supervisor stops instead of respawning it forever.

A miss another host owns is fetched from it on the worker's event loop (peer_fetch.py); the
environment variable SHMCACHE_PEER_FETCH=pool makes the worker fetch on its thread pool
with blocking requests instead, as it did before (benchmarks compare the two).
"""

import ctypes
import gc
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from .arena import OWNER_LOCK_BYTE, retire
from .node import Node
from .store import Store

log = logging.getLogger("shmcache")

WORKER_BOOT_ERROR = 3


class BootInterrupted(BaseException):
    """A stop signal arrived while the worker was booting. A BaseException, so that an
    ``except Exception`` in an --app factory does not swallow it."""


_PR_SET_PDEATHSIG = 1


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
        # What boot made lives as long as the worker: out of the collector's sight, every
        # full collection no longer walks it (a few per cent of a busy worker's CPU).
        gc.freeze()
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
