"""``python -m shmcache.supervisor``: one host's arbiter.

It loads the groups, opens the arena (with ``--warm-restart``, re-attaching the one the
last supervisor of that name kept at a clean stop), binds the listening socket, forks the
workers, replaces any that die, and on SIGTERM/SIGINT drains and stops them. Signal handlers only enqueue; the main loop
dispatches. While it runs it holds an OFD lock on OWNER_LOCK_BYTE of the segment, so a
second supervisor can tell a live owner from a dead one. It alone polls the peer sources
(--peers-file, --peers-dns) and publishes each new peer set to its workers (discovery.py).

Exit codes: 0 after a clean stop; 2 bad command line or groups; 3 a worker could not boot;
4 the segment or the port could not be had.
"""

import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from urllib.parse import urlsplit

from .arena import retire
from .config import Config, check_tls, parse_args  # noqa: F401 (their old home)
from .discovery import LOOKUP_TIMEOUT, PeerBoard, PeerSource, next_view
from .errors import SegmentCreateError, SegmentIncompatible, SegmentInUse, SegmentNotFound
from .group import AppError, check_groups, demo_groups, load_app, origin_group, DEMO_SCORES
from .layout import DEFAULT_MAX_GROUPS, HEADER, OWNER_LOCK_BYTE
from .locks import LockFile
from .store import Store
from .units import format_size
from .worker import WORKER_BOOT_ERROR, Worker

log = logging.getLogger("shmcache")

EXIT_USAGE, EXIT_BOOT, EXIT_RESOURCE = 2, 3, 4
PORT_RETRY = 3.0            # seconds a busy port is retried when a dying supervisor may hold it
# Signals whose handlers differ between supervisor and worker: blocked across fork until the
# worker has installed its own (see spawn_worker).
FORK_BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD}


class Supervisor:
    """The arbiter. ``run()`` returns the process exit code."""
    store = None
    listener = None
    _owner_lock = None

    def __init__(self, config):
        self.config = config
        self.workers = {}                 # pid -> Worker
        self.signals = deque()            # filled by handlers, emptied by the main loop
        self.groups = []
        self.app_factory = None
        self.stopping = False
        self.exit_code = 0
        self.peer_source = PeerSource(config, FORK_BLOCKED) if config.clustered else None
        self.peer_board = None            # made in run(): the workers inherit it
        self.peer_view = None
        self.next_refresh = 0.0

    # -- main -------------------------------------------------------------------------------

    def run(self):
        # Handlers first: a SIGTERM while the segment is being made is queued, not fatal.
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                       signal.SIGCHLD):
            signal.signal(signum, self._enqueue)
        try:
            self.load_groups()
        except (AppError, ValueError, TypeError) as exc:
            log.error("cannot start: %s", exc)
            return EXIT_USAGE
        try:
            self.refresh_peers()
            self.listener = self.bind()
            self.open_segment()
        except (OSError, SegmentInUse, SegmentCreateError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            self.close()
            return EXIT_RESOURCE
        config = self.config
        log.info("listening on %s://%s:%d with %d workers (segment %s, pid %d)", config.scheme,
                 config.host, config.port, config.workers, config.name, os.getpid())
        try:
            self.dispatch_signals()
            if not self.stopping:
                self.manage_workers()
            while not self.stopping:
                lookup = self.peer_source.lookup if self.peer_source is not None else None
                watched = [wake_read] if lookup is None else [wake_read, lookup.fd]
                ready = select.select(watched, [], [], self.wait_time())[0]
                try:
                    while os.read(wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
                self.dispatch_signals()
                self.reap_workers()
                if lookup is not None and (lookup.fd in ready or lookup.overdue()):
                    self.peer_source.lookup_done()
                if self.peer_source is not None:
                    due = time.monotonic() >= self.next_refresh
                    if due or self.peer_source.answer_ready:
                        self.refresh_peers(lookup=due)
                if not self.stopping:
                    self.manage_workers()
            self.stop_workers()
        finally:
            self.close()
        return self.exit_code

    def _enqueue(self, signum, frame):
        self.signals.append(signum)

    def dispatch_signals(self):
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                log.info("received %s: stopping gracefully", signal.Signals(signum).name)
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.handle_hup()

    def handle_hup(self):
        """Re-read --peers-file (and resolve --peers-dns) now."""
        if self.peer_source is None or not (self.config.peers_file or self.config.peers_dns):
            log.info("SIGHUP: no --peers-file or --peers-dns to reload")
            return
        self.refresh_peers(reason="SIGHUP")

    def wait_time(self):
        """Seconds the main loop may sleep: at most one, and not past the next refresh
        (nor past the deadline of a lookup under way)."""
        if self.peer_source is None:
            return 1.0
        wake_at = self.next_refresh
        lookup = self.peer_source.lookup
        if lookup is not None:
            wake_at = min(wake_at, lookup.started + LOOKUP_TIMEOUT)
        return max(0.0, min(1.0, wake_at - time.monotonic()))

    def refresh_peers(self, reason=None, lookup=True):
        """Poll the peer sources; when the set changed, publish it and tell the workers,
        which read it within their next tick. Logged here, once for the host. ``lookup``:
        a refresh that is due (not one for a lookup's answer that came in): it starts the
        next lookup of --peers-dns."""
        if self.peer_source is None:
            return
        config = self.config
        if lookup:
            self.next_refresh = time.monotonic() + config.peers_refresh
        self_url, peers = self.peer_source.refresh(force=reason is not None, lookup=lookup)
        first = self.peer_view is None
        view = next_view(self.peer_view, self_url, peers)
        if reason:
            log.info("%s: %d peers: %s", reason, len(peers), ", ".join(peers))
        if view is self.peer_view:
            return
        if first:
            self.peer_board = PeerBoard()
            log.info("this host is %s among %d peers", self_url, len(peers))
        else:
            added = sorted(set(peers) - set(self.peer_view.peers))
            removed = sorted(set(self.peer_view.peers) - set(peers))
            log.info("peers changed: %d peers now (added: %s; removed: %s; this host: %s)",
                     len(peers), ", ".join(added) or "none", ", ".join(removed) or "none",
                     self_url)
        self.peer_view = view
        self.peer_board.publish(view)
        if self.store is not None:
            self.store.arena.set_u32(HEADER.peer_count, len(peers))
        for pid in list(self.workers):
            _signal(pid, signal.SIGHUP)

    # -- groups and the segment --------------------------------------------------------------

    def load_groups(self):
        config = self.config
        if config.app:
            self.groups = load_app(config.app)
            module_name, _, attr = config.app.partition(":")
            target = getattr(sys.modules[module_name], attr)
            self.app_factory = target if callable(target) else None
        if config.origin:
            self.groups = [*self.groups, origin_group(config.origin)]
            check_groups(self.groups, "--app and --origin")
        if not self.groups:
            self.groups = demo_groups()
            log.info("no --app or --origin: serving the built-in demo group 'scores' (%s)",
                     ", ".join(f"{k} -> {v.decode()}" for k, v in DEMO_SCORES.items()))

    def bind(self):
        """The listening socket, shared by every worker.

        A busy port is reported at once, naming its holder when it can be found. Only when
        that holder is (or may be) a worker of a supervisor that just died, whose workers let
        go of the port within a second or two, is the bind retried, for PORT_RETRY seconds,
        and the retry is logged."""
        config = self.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        deadline = None
        while True:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((config.host, config.port))
                sock.listen(1024)
                sock.set_inheritable(True)
                if deadline is not None:
                    log.info("port %d is free now", config.port)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise OSError(exc.errno, f"cannot listen on {config.host}:{config.port}: "
                                             f"{exc.strerror}") from None
                holder = _port_holder(config.port)
                if deadline is None:
                    if holder is not None and not holder[2]:
                        raise OSError(exc.errno, f"port {config.port} is busy: "
                                      f"{holder[1]} (pid {holder[0]}) listens on it") from None
                    deadline = time.monotonic() + PORT_RETRY
                    log.warning("port %d is busy%s; retrying for %.0f s in case a stopped "
                                "supervisor's workers are letting it go", config.port,
                                f" ({holder[1]}, pid {holder[0]})" if holder else "", PORT_RETRY)
                elif time.monotonic() > deadline:
                    raise OSError(exc.errno, f"port {config.port} is busy"
                                  + (f": {holder[1]} (pid {holder[0]}) listens on it"
                                     if holder else "")) from None
                time.sleep(0.1)

    def open_segment(self):
        """Warm: re-attach a segment its last owner stopped cleanly, same layout. Else clean.
        A new segment is published with its owner, front and groups already in place, so a
        client that finds it under the name never sees it half set up."""
        config = self.config
        for _attempt in range(5):
            try:
                Store.create(config.name, config.memory, config.max_item_size,
                             DEFAULT_MAX_GROUPS, before_publish=self._set_up_new)
                log.info("clean start: created segment %s (%s)", config.name,
                         format_size(config.memory))
                return
            except SegmentInUse:
                pass                                   # it exists: whose is it?
            if self._adopt_existing():
                self._claim()
                return
        raise SegmentInUse(f"could not open segment {config.name}")

    def _set_up_new(self, store):
        """Before a new segment is published: own it, claim it, define the groups."""
        self._owner_lock = LockFile(store.arena.path)
        if not self._owner_lock.try_lock_byte(OWNER_LOCK_BYTE):
            raise SegmentInUse("new segment already locked")   # cannot happen: it is ours
        self.store = store
        self._claim()

    def _claim(self):
        """Record this supervisor as the owner of ``self.store``, its front and groups."""
        config, arena = self.config, self.store.arena
        arena.set_u32(HEADER.clean, 0)
        arena.set_u32(HEADER.owner_pid, os.getpid())
        struct.pack_into("d", arena.buf, HEADER.owner_start, time.time())
        arena.set_front(config.host, config.port, **front_tls(config))
        arena.set_u32(HEADER.peer_count, len(self.peer_view.peers) if self.peer_view else 1)
        self.define_groups()

    def _adopt_existing(self):
        """True if we now own the existing segment (warm); False if we removed it (retry)."""
        config = self.config
        path = os.path.join(os.environ.get("SHMCACHE_SHM_DIR", "/dev/shm"), config.name)
        try:
            owner_lock = LockFile(path)
        except FileNotFoundError:
            return False
        if not owner_lock.try_lock_byte(OWNER_LOCK_BYTE):
            owner_lock.close()
            raise SegmentInUse(f"segment {config.name} belongs to a running supervisor; "
                               f"stop it first or pick another --name/--port")
        reason = None
        store = None
        if not config.warm_restart:
            reason = "no --warm-restart"
        else:
            try:
                store = Store.attach(config.name)
            except (SegmentIncompatible, SegmentNotFound) as exc:
                reason = f"cannot read it: {exc}"
        if store is not None:
            lay = store.arena.layout
            if not store.arena.get_u32(HEADER.clean):
                reason = "its last supervisor did not stop cleanly (crashed or was killed)"
            elif lay.total_size != config.memory:
                reason = (f"it has {format_size(lay.total_size)} and --memory asks for "
                          f"{format_size(config.memory)}")
            elif lay.max_item_size != config.max_item_size:
                reason = (f"its max item size is {format_size(lay.max_item_size)} and "
                          f"--max-item-size asks for {format_size(config.max_item_size)}")
        if reason is None:
            self.store, self._owner_lock = store, owner_lock
            store.arena.new_epoch()
            stats = store.stats()
            log.info("warm start: re-attached segment %s with %d items kept",
                     config.name, stats["items"])
            return True
        log.info("clean start: discarding the segment %s left under the name (%s)",
                 config.name, reason)
        retire(f"/proc/self/fd/{owner_lock.fd}")   # clients' writes into it stop here
        if store is not None:
            store.close()
        # Safe against a racing supervisor: we hold the owner lock on this file, so a second
        # supervisor cannot adopt it meanwhile; unlinking only removes the name, and one that
        # created a new file under it already would have made us fail try_lock on that file.
        os.unlink(path)
        owner_lock.close()
        return False

    def define_groups(self):
        store = self.store
        for group in self.groups:
            store.define_group(group.name, group.cache_bytes, group.ttl, group.stale)
        served = {group.name for group in self.groups}
        for name, info in store.stats()["groups"].items():
            if name not in served and info["cache_bytes"]:
                log.info("group %s is no longer served: dropping its %d items", name, info["items"])
                store.define_group(name, 0)

    # -- workers ----------------------------------------------------------------------------

    def manage_workers(self):
        """Keep ``config.workers`` workers running."""
        running = {worker.index for worker in self.workers.values()}
        for index in range(1, self.config.workers + 1):
            if index not in running:
                self.spawn_worker(index)

    def spawn_worker(self, index):
        """Fork worker ``index``.

        The child starts with the supervisor's signal handlers, which only enqueue into the
        supervisor's (now copied) queue: a SIGTERM handled by them in the child would be lost,
        and the worker would boot and serve forever. So the signals are blocked across the
        fork: a signal sent to the child before it has installed its own handlers stays
        pending (the kernel keeps it) and is delivered to the worker's handler when
        ``Worker.run`` unblocks them. The parent unblocks at once; whatever arrived for it
        meanwhile is delivered then. (Python clears its own not-yet-handled signal flags in
        the child at fork.)"""
        worker = Worker(index, self.config, self.listener, self.groups, self.app_factory,
                        self.peer_board)
        for handler in logging.getLogger().handlers:
            handler.flush()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            raise
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                worker.run(unblock=FORK_BLOCKED)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.workers[pid] = worker
        log.info("started worker %d (pid %d)", index, pid)

    def reap_workers(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code == WORKER_BOOT_ERROR:
                log.error("worker %d (pid %d) could not boot (see above): stopping", worker.index, pid)
                self.exit_code = EXIT_BOOT
                self.stopping = True
            elif not self.stopping:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                log.warning("worker %d (pid %d) died (%s): replacing it", worker.index, pid, how)

    def stop_workers(self):
        """SIGTERM every worker, wait for them to drain, SIGKILL what is left after the
        graceful timeout."""
        for pid in list(self.workers):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.graceful_timeout
        while self.workers and time.monotonic() < deadline:
            self.reap_workers()
            time.sleep(0.02)
        for pid, worker in list(self.workers.items()):
            log.warning("worker %d (pid %d) did not stop in time: killing it", worker.index, pid)
            _signal(pid, signal.SIGKILL)
        while self.workers:
            self.reap_workers()
            time.sleep(0.01)

    def close(self):
        """Mark a clean stop (if it was one), release the segment and the port."""
        if self.peer_source is not None:
            self.peer_source.close()              # a lookup under way: killed
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        store = self.store
        if store is not None:
            clean = self.exit_code == 0 and not self.workers
            arena = store.arena
            arena.set_u32(HEADER.clean, 1 if clean and self.config.warm_restart else 0)
            arena.set_u32(HEADER.owner_pid, 0)
            if clean and self.config.warm_restart:
                log.info("kept segment %s (%s, %d items) for a warm restart", arena.name,
                         format_size(arena.layout.total_size), store.stats()["items"])
            else:
                # Still holding the owner lock: no other supervisor has adopted this file.
                if _same_file(arena):
                    retire(f"/proc/self/fd/{arena.fd}")
                    arena.unlink()
                    log.info("removed segment %s%s", arena.name,
                             "" if clean else " (not a clean stop)")
            store.close()
            self.store = None
        if self._owner_lock is not None:
            self._owner_lock.close()
            self._owner_lock = None
        if self.peer_board is not None:
            self.peer_board.close()
            self.peer_board = None


def front_tls(config):
    """How connect() clients verify this host's front: for the host name of --self (what
    peers verify it for too), against --tls-ca or the system's store."""
    if not config.tls_cert:
        return {}
    return {"tls": True, "tls_name": urlsplit(config.self_url).hostname,
            "tls_ca": config.tls_ca or ""}


def _same_file(arena):
    """True if the segment's name still points to the file this process has mapped."""
    try:
        return os.stat(arena.path).st_ino == os.fstat(arena.fd).st_ino
    except FileNotFoundError:
        return False


def _port_holder(port):
    """(pid, description, orphaned) of a process listening on TCP ``port``, or None if none
    can be seen (another user's process, or no permission to look). ``orphaned``: a shmcache
    worker whose supervisor is gone, which lets the port go within a moment."""
    import psutil
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (connection.status == psutil.CONN_LISTEN and connection.laddr
                    and connection.laddr.port == port and connection.pid):
                process = psutil.Process(connection.pid)
                cmdline = " ".join(process.cmdline())[:120] or process.name()
                orphaned = "shmcache" in cmdline and process.ppid() in (0, 1)
                return connection.pid, cmdline, orphaned
    except (psutil.Error, OSError):    # no permission to look: only a better message is lost
        return None
    return None


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def main(argv=None):
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s [%(process)d] %(levelname)s %(message)s")
    sys.exit(Supervisor(config).run())


if __name__ == "__main__":
    main()
