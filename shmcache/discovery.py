"""Where a host's peer set comes from, and how its workers learn it.

Sources, any mix of them, united: ``--peers`` URLs, ``--peers-file`` (re-read when its inode,
mtime or size changes, polled every ``--peers-refresh`` seconds; SIGHUP re-reads at once) and
``--peers-dns NAME[:PORT]`` (every A/AAAA record ``getaddrinfo`` gives for NAME is a peer,
re-resolved every refresh). A source that fails keeps its last good answer; the failure is
logged once, and so is its recovery.

The supervisor alone polls and resolves (``PeerSource``), so a host does one lookup per
refresh and logs a change once. When the set changes it publishes a ``PeerView`` on the
``PeerBoard`` (a memfd the workers inherit at fork) and sends its workers SIGHUP; each reads
the board in its next tick (half a second), and a worker forked later reads it at boot.

After the first lookup (at boot, waited for), each runs in a child process forked for it
(``DnsLookup``) while the supervisor's loop goes on: a resolver that hangs must not keep it
from reaping and replacing workers, or from stopping. A child, not a thread, so that the
supervisor stays single-threaded when it forks workers (a thread inside getaddrinfo at a
fork could leave the resolver's locks held in the worker). LOOKUP_TIMEOUT bounds a lookup;
one that runs out counts as failed.

The view carries the previous peer set for ``PREVIOUS_WINDOW`` seconds after a change: a
host that becomes a key's owner asks the key's owner by the previous ring for the value
(a peek) before calling the getter, so churn does not cold-start the keys that move. At a
host's start the previous set is the others without this host: the ring the other hosts
had before it joined.

Test and ops facility: when ``$SHMCACHE_HOSTS_FILE`` names a hosts-style file (``ADDRESS
NAME...`` per line, ``#`` comments), ``--peers-dns`` names are looked up in it instead of DNS;
a name it does not list fails to resolve, as an unknown name would.
"""

import ctypes
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import asdict, dataclass

import xxhash

from .peers import load_peer_list

log = logging.getLogger("shmcache")

HOSTS_FILE_ENV = "SHMCACHE_HOSTS_FILE"
LOOKUP_TIMEOUT = 30.0        # seconds a --peers-dns lookup may take before it is given up
LOOKUP_PROCESS_NAME = b"kcache-lookup"    # a lookup child's name (ps; tests tell it from workers)
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
PREVIOUS_WINDOW = 60.0       # seconds the previous peer set is kept for peeks after a change
WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class PeerView:
    """A host's peer set: its own URL, every peer's (its own included, sorted), and the
    set before the last change with the Unix time until which peeks may use it."""
    self_url: str
    peers: tuple
    previous: tuple = ()
    previous_until: float = 0.0


# -- resolving ---------------------------------------------------------------------------------

def parse_dns_target(target, default_port):
    """(name, port) of ``NAME[:PORT]``; ValueError if malformed."""
    name, sep, port = target.strip().rpartition(":")
    if not sep or not port.isdigit():
        name, port = target.strip(), str(default_port)
    if not name or any(c.isspace() or c in "/[]" for c in name):
        raise ValueError(f"--peers-dns must look like NAME[:PORT], not {target!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"--peers-dns port must be 1..65535, not {port}")
    return name, int(port)


def resolve(name):
    """The sorted addresses of ``name``: from $SHMCACHE_HOSTS_FILE when set, else from
    getaddrinfo (A and AAAA). OSError (socket.gaierror included) when it does not resolve."""
    path = os.environ.get(HOSTS_FILE_ENV)
    if path:
        return _from_hosts_file(path, name)
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _from_hosts_file(path, name):
    addresses = set()
    with open(path) as hosts:
        for line in hosts:
            fields = line.split("#", 1)[0].split()
            if len(fields) > 1 and name.lower() in (field.lower() for field in fields[1:]):
                addresses.add(fields[0])
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{name} is not in {path}")
    return sorted(addresses)


def peer_url(scheme, address, port):
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def local_addresses(bind_host):
    """The addresses a server bound to ``bind_host`` answers on: every interface's when it
    is a wildcard, else that address (a name is resolved)."""
    if bind_host in WILDCARDS:
        import psutil
        found = {entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                 if entry.family in (socket.AF_INET, socket.AF_INET6)}
    else:
        try:
            found = {str(ipaddress.ip_address(bind_host))}
        except ValueError:
            try:
                found = set(resolve(bind_host))
            except OSError:
                found = set()
    return {_canonical(address) for address in found}


def _canonical(address):
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return address


# -- the sources -------------------------------------------------------------------------------

class DnsLookup:
    """One ``resolve(name)`` in a child process: its answer comes back over a pipe, which the
    supervisor's loop watches (``fd``). ``collect()`` once it is readable, or ``cancel()``.

    The child: the signals the supervisor handles back to their defaults, every inherited
    descriptor but the pipe closed (the segment, the listener, the owner lock: a hung child
    must hold none of them), an alarm as a last bound, then the lookup, one write, _exit."""

    def __init__(self, name, blocked=()):
        self.name = name
        self.started = time.monotonic()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if blocked else None
        try:
            pid = os.fork()
        except BaseException:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for signum in blocked:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, previous or set())
                os.closerange(3, write_fd)
                os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
                _lookup_child_setup()
                signal.alarm(int(LOOKUP_TIMEOUT) + 5)
                try:
                    answer = {"addresses": resolve(name)}
                except (OSError, UnicodeError) as exc:
                    answer = {"error": str(exc)}
                os.write(write_fd, json.dumps(answer).encode())
            finally:
                os._exit(0)
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(write_fd)
        self.pid, self.fd = pid, read_fd

    def overdue(self, now=None):
        return (now or time.monotonic()) - self.started > LOOKUP_TIMEOUT

    def collect(self):
        """The addresses; OSError if the lookup failed, or ended without an answer. The pipe
        is closed; the child has exited or is about to (the supervisor reaps it)."""
        data = b""
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
        finally:
            os.close(self.fd)
        try:
            answer = json.loads(data)
        except ValueError:
            raise OSError(f"the lookup of {self.name} ended without an answer") from None
        if "error" in answer:
            raise OSError(answer["error"])
        return answer["addresses"]

    def cancel(self):
        """Kill the child (it is reaped by the supervisor's loop, or by init) and close."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self.fd)


def _lookup_child_setup():
    """Name the lookup child (its own name in ps) and have the kernel kill it with the
    supervisor (Linux prctl; the alarm bounds it anyway)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, LOOKUP_PROCESS_NAME, 0, 0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class PeerSource:
    """The supervisor's peer set: ``refresh()`` polls the file and resolves the name.

    ``scheme`` is the scheme of discovered peers' URLs (``config.scheme``). Only the first
    refresh waits for the name's lookup; the later ones start a ``DnsLookup`` (``lookup``,
    while it runs) and take its answer at the refresh after it is in (``answer_ready``)."""

    def __init__(self, config, blocked=()):
        self.config = config
        self.dns = parse_dns_target(config.peers_dns, config.port) if config.peers_dns else None
        self.local = local_addresses(config.host) if self.dns else set()
        self.blocked = blocked              # signals to block across a lookup's fork
        self.lookup = None                  # the DnsLookup under way
        self._answer = None                 # (addresses or OSError) in, not yet taken
        self._resolved_once = False
        self._file_signature = None
        self._file_urls = set()
        self._dns_urls = set()
        self._dns_self = None
        self._failing = set()               # sources whose failure has been logged

    def refresh(self, force=False, lookup=True):
        """(self_url, sorted peer URLs, this host's included). ``force``: re-read the file
        even if it looks unchanged, and log a failure even if it was logged already.
        ``lookup``: start a new lookup of the name (False: only take an answer that is in)."""
        if force:
            self._failing.clear()
        if self.config.peers_file:
            self._poll_file(force)
        if self.dns:
            if not self._resolved_once:          # at boot: the first set has the name's hosts
                self._resolved_once = True
                try:
                    self._resolved(resolve(self.dns[0]))
                except (OSError, UnicodeError) as exc:
                    self._resolved(exc)
            else:
                self._take_answer()
                if lookup and self.lookup is None:
                    self.lookup = DnsLookup(self.dns[0], self.blocked)
        config = self.config
        self_url = config.self_url if config.self_explicit else self._dns_self or config.self_url
        urls = set(config.peers) | self._file_urls | self._dns_urls
        if urls and self_url not in urls:
            self._trouble("self", f"this host ({self_url}) is not in its peer list: adding it")
        else:
            self._recovered("self", f"this host ({self_url}) is in its peer list now")
        return self_url, tuple(sorted(urls | {self_url}))

    @property
    def answer_ready(self):
        return self._answer is not None

    def lookup_done(self):
        """(The loop: the lookup's pipe is readable, or it ran out of time.) Keep its answer
        for the next refresh."""
        lookup, self.lookup = self.lookup, None
        if lookup.overdue() and not select.select([lookup.fd], [], [], 0)[0]:
            lookup.cancel()
            self._answer = OSError(f"no answer within {LOOKUP_TIMEOUT:.0f} s")
            return
        try:
            self._answer = lookup.collect()
        except OSError as exc:
            self._answer = exc

    def close(self):
        if self.lookup is not None:
            self.lookup.cancel()
            self.lookup = None

    def _take_answer(self):
        answer, self._answer = self._answer, None
        if answer is not None:
            self._resolved(answer)

    def _poll_file(self, force):
        path = self.config.peers_file
        try:
            stat = os.stat(path)
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if signature == self._file_signature and not force:
                return
            urls = set(load_peer_list((), path))
        except (OSError, ValueError) as exc:
            self._trouble("file", f"keeping the old peers: {exc}")
            return
        self._file_signature, self._file_urls = signature, urls
        self._recovered("file", f"{path} gives peers again")

    def _resolved(self, answer):
        """Use a lookup's answer: its addresses, or the OSError it failed with (the last
        addresses are kept)."""
        name, port = self.dns
        if isinstance(answer, (OSError, UnicodeError)):
            self._trouble("dns", f"cannot resolve {name} ({answer}): keeping the last "
                                 f"{len(self._dns_urls)} peers it gave")
            return
        addresses = answer
        scheme = self.config.scheme
        self._dns_urls = {peer_url(scheme, address, port) for address in addresses}
        self._dns_self = next((peer_url(scheme, address, port) for address in addresses
                               if port == self.config.port and _canonical(address) in self.local),
                              None)
        self._recovered("dns", f"{name} resolves again: {len(addresses)} addresses")

    def _trouble(self, source, message):
        if source not in self._failing:
            self._failing.add(source)
            log.warning("%s", message)

    def _recovered(self, source, message):
        if source in self._failing:
            self._failing.discard(source)
            log.info("%s", message)


# -- the board ---------------------------------------------------------------------------------

_RECORD = struct.Struct("QQ")          # payload length, xxh3_64 of the payload


class PeerBoard:
    """The supervisor's current PeerView, readable by its workers (they inherit the memfd at
    fork). One writer; a reader that catches a write half done sees a bad checksum and
    reads again."""

    def __init__(self):
        self.fd = os.memfd_create("kcache-peers", os.MFD_CLOEXEC)

    def publish(self, view):
        payload = json.dumps(asdict(view)).encode()
        os.pwrite(self.fd, _RECORD.pack(len(payload), xxhash.xxh3_64_intdigest(payload)) + payload, 0)

    def read(self, attempts=100):
        """The last PeerView published; None if none was."""
        for _ in range(attempts):
            header = os.pread(self.fd, _RECORD.size, 0)
            if len(header) < _RECORD.size:
                return None
            length, digest = _RECORD.unpack(header)
            payload = os.pread(self.fd, length, _RECORD.size)
            if len(payload) == length and xxhash.xxh3_64_intdigest(payload) == digest:
                fields = json.loads(payload)
                return PeerView(fields["self_url"], tuple(fields["peers"]),
                                tuple(fields["previous"]), fields["previous_until"])
            time.sleep(0.005)
        raise OSError("the peer board kept changing while being read")

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def next_view(current, self_url, peers, now=None):
    """The PeerView after a refresh gave ``self_url`` and ``peers``: ``current`` itself if
    nothing changed. A change keeps the set it replaces as the previous one for
    PREVIOUS_WINDOW; the first view's previous set is the others, without this host."""
    now = time.time() if now is None else now
    if current is None:
        others = tuple(url for url in peers if url != self_url)
        return PeerView(self_url, peers, others, now + PREVIOUS_WINDOW if others else 0.0)
    if (self_url, peers) == (current.self_url, current.peers):
        return current
    return PeerView(self_url, peers, current.peers, now + PREVIOUS_WINDOW)
