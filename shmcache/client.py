"""``connect()``: a co-located process's handle on a host's cache.

Hits are read straight from shared memory. A miss goes to the host's HTTP front (the
address its supervisor wrote into the segment), which loads it once for the whole host.
Nothing heavy is imported here (no requests, no protobuf), so attaching stays cheap.
"""

import http.client
import json
import os
import threading
from urllib.parse import quote

from .arena import _OFFSET_PEER_COUNT
from .errors import InvalidKey, LoadError, NotFound, PeerUnavailable, ValueTooLarge
from .metrics import MISSES, host_stats
from .store import Store, check_ttl, encode_value

DEFAULT_TIMEOUT = 35.0        # a little over the front's default load timeout


def segment_name(port=None, name=None):
    """The segment of the supervisor on ``port`` (``kcache-<port>``), or ``name`` as given."""
    if (port is None) == (name is None):
        raise ValueError("give exactly one of port= or name=")
    return name if name is not None else f"kcache-{int(port)}"


class Client:
    """Reads hits straight from shared memory; writes take the segment's write lock.

    ``close()`` detaches (idempotent). A client made by ``create()`` owns the segment and
    also unlinks it when used as a context manager.
    """
    _store = None
    owner = False

    def __init__(self, store, owner=False, timeout=DEFAULT_TIMEOUT, token=None):
        self._store = store
        self.owner = owner
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.peek = store.get          # the hit path: one call, no wrapper
        self._local = threading.local()  # per thread: (pid, HTTPConnection) to the front

    @property
    def name(self):
        return self._store.arena.name

    def peek(self, group, key):
        """The cached value, or None; never loads. (Replaced per instance by the store's get.)"""
        return self._store.get(group, key)

    def get(self, group, key):
        """The value: from shared memory, else loaded through the host's front (once for the
        whole host). NotFound, LoadError, or PeerUnavailable if the front cannot be reached."""
        value = self.peek(group, key)
        if value is not None:
            return value
        # The front counts this get again when it answers: count it once.
        self._store.counters.add(self._store.group_id(group), MISSES, -1)
        return self._fetch(group, key)

    def set(self, group, key, value, ttl=None):
        """Store ``value`` (for ``ttl`` seconds, default the group's). On a host with peers it
        goes through the front, to the key's owner, and other hosts drop their copies."""
        if not self._clustered():
            self._store.set(group, key, value, ttl)
            return
        self._store.check_fits(group, key, value)
        query = f"?ttl={check_ttl(ttl)!r}" if ttl is not None else ""
        self._cluster_write("PUT", group, key, encode_value(value), query)

    def delete(self, group, key):
        """Remove the key (from every host, when the host has peers); True if it was there."""
        if not self._clustered():
            return self._store.delete(group, key)
        return self._cluster_write("DELETE", group, key)["deleted"]

    def _clustered(self):
        return self._store.arena.get_u32(_OFFSET_PEER_COUNT) > 1

    def _cluster_write(self, method, group, key, body=None, query=""):
        status, data = self._front_request(method, group, key, body, query)
        if status == 200:
            return json.loads(data)
        if status == 502:
            raise PeerUnavailable(f"{method} {group}/{key} reached only part of the cluster: "
                                  f"{data.decode(errors='replace').strip()}")
        if status == 413:
            raise ValueTooLarge(data.decode(errors="replace").strip())
        raise LoadError(f"{status}: {data.decode(errors='replace').strip()}")

    def clear(self, group=None):
        self._store.clear(group)

    def define_group(self, name, cache_bytes, ttl=None):
        self._store.define_group(name, cache_bytes, ttl)

    def stats(self):
        """The segment's figures, each group's counters summed over the host's processes."""
        return host_stats(self._store)

    def close(self):
        if self._store is not None:
            self._store.close()
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection[1].close()
            self._local.connection = None

    def unlink(self):
        """Remove the segment's name (owners only; mappings stay valid until closed)."""
        self._store.arena.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self.owner:
            self.unlink()

    # -- the front ---------------------------------------------------------------------------

    def _connection(self):
        cached = getattr(self._local, "connection", None)
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        front = self._store.arena.front()
        if front is None:
            raise PeerUnavailable(f"segment {self.name!r} has no HTTP front to load misses")
        host, port = front
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
        self._local.connection = (os.getpid(), connection)
        return connection

    def _fetch(self, group, key):
        status, body = self._front_request("GET", group, key)
        if status == 200:
            return body
        reason = body.decode(errors="replace").strip()
        if status == 404:
            raise NotFound(reason)
        if status in (502, 503):
            raise PeerUnavailable(reason)
        if status == 401:
            raise PeerUnavailable(f"the front wants a token (connect(token=...) or "
                                  f"$SHMCACHE_TOKEN): {reason}")
        raise LoadError(f"{status}: {reason}")

    def _front_request(self, method, group, key, body=None, query=""):
        """(status, body) of a request to this host's front for ``group``/``key``."""
        if isinstance(key, (bytes, bytearray)):
            try:
                key = bytes(key).decode()
            except UnicodeDecodeError:
                raise InvalidKey("a key sent to the front must be UTF-8 text") from None
        path = f"/cache/{quote(group, safe='')}/{quote(key, safe='')}{query}"
        for attempt in (1, 2):                      # a kept-alive connection may have closed
            connection = self._connection()
            try:
                connection.request(method, path, body=body, headers=self._headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise PeerUnavailable(f"front of {self.name!r} closed the connection: {exc}") from None
            except OSError as exc:
                connection.close()
                self._local.connection = None
                raise PeerUnavailable(f"cannot reach the front of {self.name!r}: {exc}") from None


def connect(port=None, *, name=None, timeout=DEFAULT_TIMEOUT, token=None):
    """Attach to the segment of the supervisor on ``port`` (or the segment ``name``).
    ``token`` (default $SHMCACHE_TOKEN) is sent to the front when it has one."""
    store = Store.attach(segment_name(port, name))
    store.start_counting()
    return Client(store, timeout=timeout, token=token or os.environ.get("SHMCACHE_TOKEN"))


def create(name, memory="64MiB", *, max_item_size="1MiB", max_groups=64):
    """Create a segment without a supervisor (tests, embedding). The caller owns it:
    ``with create(...) as cache:`` unlinks it at the end."""
    return Client(Store.create(name, memory, max_item_size, max_groups), owner=True)
