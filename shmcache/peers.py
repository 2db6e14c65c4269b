"""A worker's view of the other hosts: who owns a key (the ring), how to reach a peer
(``PeerClient``), and which peers are failing (``PeerHealth``, shared by the host's workers
through the arena so that one timeout spares every worker the next).

A peer given as ``https://`` is reached over TLS, its certificate verified (for the host
name of its URL) against --tls-ca, or the system's CA store. One whose certificate does not
verify is refused: logged as such, and a failure like any other (suspect, backoff; the key
is loaded here meanwhile).

The peer client uses ``http.client`` with a small keep-alive pool per peer rather than
``requests``: measured on loopback against a worker, a requests.Session GET costs 419 us
p50 and http.client 87 us, and a remote hit must stay under half a millisecond. Pools are
made after fork (workers build their Peers in init_process).

PeerHealth slots (PEER, open addressing by URL hash; changed only under the arena's write
lock, read without it) are declared in layout.py.
"""

import http.client
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import quote, urlsplit

import xxhash

from .errors import NotFound, PeerUnavailable
from .layout import PEER, PEER_SLOT_BYTES, PEER_SLOTS
from .ring import Ring
from .tls import NamedHTTPSConnection, client_context, trust_of, verify_problem
from .wire import decode_get_response, encode_set_request

log = logging.getLogger("shmcache")

MIN_BACKOFF = 1.0            # seconds a peer is skipped after its first failure
MAX_BACKOFF = 30.0
COLD_PEEKS = 64             # empty peeks in a row after which a previous owner is not asked
POOL_SIZE = 16               # idle keep-alive connections kept per peer

_SLOT = PEER.struct("url_hash", "last_failure")
_HASH = PEER.struct("url_hash")
_UNTIL = PEER.struct("suspect_until")
_FAILURES = PEER.struct("failures")
_FAILURE = PEER.struct("suspect_until", "last_failure")    # until, failures, last failure
_CLEARED = PEER.struct("suspect_until", "failures")        # until, failures
_HASH_OFF, _UNTIL_OFF, _FAILURES_OFF = PEER.url_hash, PEER.suspect_until, PEER.failures
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+").fullmatch       # what quote(safe='') leaves as is


def _escaped(part):
    """``part`` percent-escaped for a path segment, as ``quote(part, safe='')``; most keys
    need no escape, and the check costs a fraction of quote's."""
    return part if _PLAIN(part) else quote(part, safe="")


class PeerError(Exception):
    """The peer answered, but not with a value or a 404 (a 5xx: its getter failed)."""


def normalize_url(url):
    """``http://host:port`` or ``https://host:port`` without a trailing slash; ValueError
    for anything else."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ValueError(f"peer URL must look like http://host:port or https://host:port, "
                         f"not {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def load_peer_list(static=(), path=None):
    """Peer URLs from ``--peers`` and ``--peers-file`` (one per line or comma-separated;
    ``#`` starts a comment). ValueError names the bad entry; OSError if the file is missing."""
    entries = list(static)
    if path:
        with open(path) as peers_file:
            for line in peers_file:
                line = line.split("#", 1)[0]
                entries.extend(part for part in line.replace(",", " ").split())
    return sorted({normalize_url(entry) for entry in entries if entry.strip()})


class PeerClient:
    """Requests to one peer's peer route. Thread-safe. PeerUnavailable on any transport
    failure (refused, reset, timed out); NotFound on 404; PeerError on other statuses."""

    def __init__(self, url, base_path="/_kcache/", connect_timeout=0.5, read_timeout=10.0,
                 token=None, tls_ca=None, tls_context=None):
        self.url = url
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.tls else 80)
        self.tls_ca = tls_ca
        self._context = (tls_context or client_context(tls_ca)) if self.tls else None
        self.base_path = "/" + base_path.strip("/") + "/"
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.header_lines = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        self._idle = []                   # idle HTTPConnections; guarded by _lock
        self._lock = threading.Lock()

    def __repr__(self):
        return f"PeerClient({self.url!r})"

    def path(self, group, key):
        return f"{self.base_path}{_escaped(group)}/{_escaped(key)}"

    @property
    def tls_context(self):
        """The SSLContext that verifies this peer (https:// peers only)."""
        return self._context

    def fetch(self, group, key):
        """(value, expiry) from the owner; its GetResponse decoded."""
        return self.fetch_answer(*self.request("GET", self.path(group, key)))

    def fetch_answer(self, status, body):
        """What a fetch answered with ``status`` and ``body`` means: (value, expiry);
        NotFound on 404, PeerError on other statuses (peer_fetch.py answers alike)."""
        if status == 404:
            raise NotFound(body.decode(errors="replace").strip() or "not found")
        return self._value(status, body)

    def peek(self, group, key):
        """(value, expiry) the peer holds in memory, or None: it neither loads nor forwards."""
        status, body = self.request("GET", self.path(group, key) + "?peek=1")
        return None if status == 404 else self._value(status, body)

    def _value(self, status, body):
        if status == 200:
            try:
                return decode_get_response(body)
            except ValueError as exc:
                raise PeerError(f"{self.url} sent a bad GetResponse: {exc}") from None
        raise PeerError(f"{self.url} answered {status}: {body[:200].decode(errors='replace').strip()}")

    def store(self, group, key, value, expire_at=None):
        status, body = self.request("PUT", self.path(group, key),
                                    encode_set_request(group, key, value, expire_at))
        if status != 200:
            raise self._refused(status, body, "a set")

    def remove(self, group, key):
        """Remove the key on the peer; False if the peer says it was not there (a peer
        that does not say is taken to have had it)."""
        status, body = self.request("DELETE", self.path(group, key))
        if status != 200:
            raise self._refused(status, body, "a delete")
        return body.strip() != b"absent"

    def clear(self, group):
        """Drop every entry of ``group`` on the peer (its part of a flush)."""
        status, body = self.request("DELETE", f"{self.base_path}{quote(group, safe='')}")
        if status != 200:
            raise self._refused(status, body, "a flush")

    def _refused(self, status, body, what):
        return PeerError(f"{self.url} answered {status} to {what}: "
                         f"{body[:200].decode(errors='replace').strip()}")

    def request(self, method, path, body=None):
        """(status, body). A pooled connection the peer closed meanwhile is retried once."""
        for attempt in (1, 2):
            connection, reused = self._checkout()
            try:
                connection.request(method, path, body=body, headers=self.headers)
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError) as exc:
                connection.close()
                if reused and attempt == 1:
                    continue
                raise PeerUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                what = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else str(exc)
                raise PeerUnavailable(f"{self.url}: {what}") from None
            if response.will_close:
                connection.close()
            else:
                self._checkin(connection)
            return response.status, data
        raise AssertionError("unreachable")

    def _checkout(self):
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        if self.tls:
            connection = NamedHTTPSConnection(self.host, self.port, context=self._context,
                                              timeout=self.connect_timeout)
        else:
            connection = http.client.HTTPConnection(self.host, self.port,
                                                    timeout=self.connect_timeout)
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            log.error("peer %s refused: its TLS certificate does not verify against %s: %s",
                      self.url, trust_of(self.tls_ca), verify_problem(exc))
            raise PeerUnavailable(f"{self.url}: TLS certificate not trusted: "
                                  f"{verify_problem(exc)}") from None
        except ssl.SSLError as exc:
            connection.close()
            raise PeerUnavailable(f"{self.url}: TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            connection.close()
            what = "connect timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else exc.strerror or str(exc)
            raise PeerUnavailable(f"{self.url}: {what}") from None
        connection.sock.settimeout(self.read_timeout)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, False

    def _checkin(self, connection):
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append(connection)
                return
        connection.close()

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class PeerHealth:
    """Suspect marks shared by every process attached to the arena."""

    def __init__(self, store):
        self.store = store
        self.buf = store.buf
        self.base = store.arena.layout.peers_off
        self._slots = {}                  # url -> slot offset; a cache, any thread

    def _find(self, url, create):
        offset = self._slots.get(url)
        if offset is not None:
            return offset
        wanted = xxhash.xxh3_64_intdigest(url.encode()) or 1
        start = wanted % PEER_SLOTS
        for step in range(PEER_SLOTS):
            offset = self.base + ((start + step) % PEER_SLOTS) * PEER_SLOT_BYTES
            found = _HASH.unpack_from(self.buf, offset + _HASH_OFF)[0]
            if found == wanted:
                self._slots[url] = offset
                return offset
            if not found:
                if not create:
                    return None
                _SLOT.pack_into(self.buf, offset + _HASH_OFF, wanted, 0.0, 0, 0.0)
                self._slots[url] = offset
                return offset
        return None                       # table full: no shared health for this peer

    def suspect_until(self, url):
        offset = self._find(url, create=False)
        return _UNTIL.unpack_from(self.buf, offset + _UNTIL_OFF)[0] if offset is not None else 0.0

    def is_suspect(self, url, now=None):
        return self.suspect_until(url) > (now or time.time())

    def failed(self, url, reason):
        """Count a failure; the peer is skipped for a backoff that doubles each time."""
        def mark():
            offset = self._find(url, create=True)
            if offset is None:
                return 0, 0.0
            _hash, _until, failures, _last = _SLOT.unpack_from(self.buf, offset + _HASH_OFF)
            now = time.time()
            failures += 1
            backoff = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (failures - 1))
            _FAILURE.pack_into(self.buf, offset + _UNTIL_OFF, now + backoff, failures, now)
            return failures, backoff
        failures, backoff = self.store.locked(mark)
        log.warning("peer %s suspect for %.0fs (failure %d: %s)", url, backoff, failures, reason)

    def succeeded(self, url):
        """A peer that answered is healthy again (cheap when it already was)."""
        offset = self._find(url, create=False)
        if offset is None or not _FAILURES.unpack_from(self.buf, offset + _FAILURES_OFF)[0]:
            return

        def clear():
            if _FAILURES.unpack_from(self.buf, offset + _FAILURES_OFF)[0]:
                _CLEARED.pack_into(self.buf, offset + _UNTIL_OFF, 0.0, 0)
                return True
            return False
        if self.store.locked(clear):
            log.info("peer %s recovered", url)

    def failures(self, url):
        offset = self._find(url, create=False)
        return (_FAILURES.unpack_from(self.buf, offset + _FAILURES_OFF)[0] if offset is not None
                else 0)


class PeerPicker(Protocol):
    """What a Node asks of its peer picker (``Peers``, or ``NoPeers`` for a host alone).
    ``health`` needs ``failed(url, reason)`` and ``succeeded(url)`` (as ``PeerHealth``);
    ``clients`` maps a peer URL to its PeerClient; the client objects are used for ``url``,
    ``fetch``, ``peek``, ``store``, ``remove`` and ``clear``."""
    self_url: str | None
    health: "PeerHealth"
    clients: "Mapping[str, PeerClient]"

    def owner_of(self, key: str) -> "PeerClient | None":
        """The owner's client, or None: this host loads the key (it owns it, or the owner
        is suspect)."""

    def owner_url(self, key: str) -> str | None:
        """The owner's URL by the ring, suspect or not; None when there is no ring."""

    def previous_owner_of(self, key: str) -> "PeerClient | None":
        """The owner by the ring before a change, to peek before loading here; or None."""

    def peeked(self, url: str, found: bool) -> None:
        """What a peek of the previous owner ``url`` answered: a value (``found``) or none."""

    def others(self) -> "list[PeerClient]":
        """Every other host's client."""

    def stats(self) -> dict:
        """{url: {"suspect": bool, "failures": int}}."""

    def close(self) -> None:
        """Close the clients' connections."""


class _View:
    """One peer set as a worker uses it; replaced whole, so a reader sees old or new.
    ``empty_peeks``: previous owner url -> peeks in a row that found nothing there."""
    __slots__ = ("self_url", "ring", "clients", "previous", "previous_until", "empty_peeks")

    def __init__(self, self_url, ring, clients, previous, previous_until):
        self.self_url, self.ring, self.clients = self_url, ring, clients
        self.previous, self.previous_until = previous, previous_until
        self.empty_peeks = {}


class Peers:
    """The peer picker: ``owner_of(key)`` is the PeerClient of the owner, or None when this
    host owns the key or its owner is suspect (then we load locally). For a while after the
    peer set changed, ``previous_owner_of(key)`` names the owner by the ring before."""

    def __init__(self, self_url, urls, store, base_path="/_kcache/", connect_timeout=0.5,
                 read_timeout=10.0, token=None, tls_ca=None, previous=(), previous_until=0.0):
        self.options = dict(base_path=base_path, connect_timeout=connect_timeout,
                            read_timeout=read_timeout, token=token, tls_ca=tls_ca)
        self.health = PeerHealth(store)
        # One context for every https:// peer, its CA file read once, at boot: a reload
        # of the peer list does not depend on it again.
        if tls_ca or any(urlsplit(url).scheme == "https" for url in urls):
            self.options["tls_context"] = client_context(tls_ca)
        self._view = None
        self.update(urls, self_url, previous, previous_until)

    @property
    def self_url(self):
        return self._view.self_url

    @property
    def ring(self):
        return self._view.ring

    @property
    def clients(self):
        return self._view.clients

    def update(self, urls, self_url=None, previous=(), previous_until=0.0):
        """Use a new peer list (this host is always in it), and the ring of ``previous``
        for peeks until the Unix time ``previous_until``."""
        old = self._view
        self_url = normalize_url(self_url) if self_url else old.self_url
        urls = {normalize_url(url) for url in urls} | {self_url}
        ring = old.ring if old and set(old.ring.peers) == urls else Ring(urls)
        previous = {normalize_url(url) for url in previous}
        if not previous or previous_until <= time.time():
            previous_ring = None
        elif old and old.previous and set(old.previous.peers) == previous:
            previous_ring = old.previous
        else:
            previous_ring = ring if previous == urls else Ring(previous)
        kept = old.clients if old else {}
        clients = {url: kept.get(url) or PeerClient(url, **self.options)
                   for url in ring.peers if url != self_url}
        self._view = _View(self_url, ring, clients, previous_ring, previous_until)
        for url, client in kept.items():
            if url not in clients:
                client.close()

    def owner_of(self, key):
        view = self._view
        owner = view.ring.owner_of(key)
        if owner == view.self_url or self.health.is_suspect(owner):
            return None
        return view.clients[owner]

    def owner_url(self, key):
        return self._view.ring.owner_of(key)

    def previous_owner_of(self, key):
        """The PeerClient to peek for ``key`` before loading it here: its owner by the
        previous ring, when this host owns it now and that owner is another peer still in
        the set and not suspect. None otherwise, and once the previous ring has expired."""
        view = self._view
        if view.previous is None or view.previous_until <= time.time():
            return None
        if view.ring.owner_of(key) != view.self_url:
            return None
        before = view.previous.owner_of(key)
        client = view.clients.get(before)
        if client is None or self.health.is_suspect(before) \
                or view.empty_peeks.get(before, 0) >= COLD_PEEKS:
            return None
        return client

    def peeked(self, url, found):
        """Count the peeks of ``url`` in a row that found nothing, for this view. A whole
        cluster that starts at once has every host's previous ring (the others) as cold as
        itself: past COLD_PEEKS empty answers in a row, this process stops peeking that host
        until the peer set changes again, instead of paying a round trip before every first
        load of the window. One found value starts the count again. Threads may lose an
        increment to each other; that only delays the cut-off a little."""
        counts = self._view.empty_peeks
        if found:
            counts.pop(url, None)
        else:
            counts[url] = counts.get(url, 0) + 1

    def others(self):
        return list(self._view.clients.values())

    def stats(self):
        now = time.time()
        return {url: {"suspect": self.health.suspect_until(url) > now,
                      "failures": self.health.failures(url)}
                for url in self._view.clients}

    def close(self):
        for client in self._view.clients.values():
            client.close()
