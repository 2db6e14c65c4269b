"""``connect()`` for asyncio code: ``from shmcache.asyncio import connect``.

    cache = connect(port=8001)          # a plain call, not awaited: attaching maps memory
    async with cache:                   # and never waits on I/O
        value = await cache.get("scores", "Tom")

A hit is read from shared memory inside ``get`` itself: no thread, no await on I/O. The sync
``Client`` underneath attaches, follows restarts of the cache (attachment.py) and does the
shared-memory reads and writes; this module adds only the way to the host's front.

A miss goes to the front over asyncio streams, with a minimal HTTP/1.1 keep-alive client
(the front frames every answer with Content-Length, httpserver.py). Connections belong to
the event loop that made them: each loop the client is used from (one after another, as with
``asyncio.run`` twice, or several at once in several threads) gets its own few, and its own
in-flight table. When the client moves to a new segment or its front moves, the next request
connects to the new front and the old connections are closed.

Concurrent misses of one key on one loop share one request: the first starts a task, the
others await it too. Each waiter awaits it through ``asyncio.shield``, so a waiter that is
cancelled leaves the load to the others (if every waiter is cancelled, the load still
finishes and is cached). The front shares one load among every process of the host.

Writes on a single host go straight to shared memory (a short lock hold, as in the sync
client); on a host with peers they go through the front, which reaches every host.
"""

import asyncio
import os
import ssl
import weakref
from collections.abc import Iterable, Mapping

from . import batch
from .client import DEFAULT_TIMEOUT, Client
from .errors import ClientClosed, LoadError, NotFound, PeerUnavailable, SegmentNotFound
from .front_client import (batch_path, distinct_keys, fetch_answer, front_key, front_path,
                           given_keys, many_answer, many_result, set_many_body, ttl_query,
                           write_answer)
from .handles import connect as _connect, create as _create
from .lru_index import encode_key
from .store import Store
from .validate import check_ttl, encode_value

IDLE_CONNECTIONS = 8      # kept-alive connections to the front kept per event loop
MAX_CONNECTIONS = 64      # open at once per event loop; more requests wait for one
JSON = "application/json"

__all__ = ["AsyncClient", "connect", "create"]


def connect(port: int | None = None, *, name: str | None = None,
            timeout: float = DEFAULT_TIMEOUT, token: str | None = None,
            tls_ca: str | None = None, tls_server_name: str | None = None) -> "AsyncClient":
    """As ``shmcache.connect``, for asyncio code: the segment of the supervisor on ``port``
    (``kcache-<port>``), or the segment ``name``. A plain function (not awaited), usable
    outside any event loop: attaching maps memory and never waits on I/O. ``timeout``: seconds
    to wait for the front's answer to one request. ``token`` (default $SHMCACHE_TOKEN) is
    sent to the front. A front with TLS is reached over HTTPS, verified as ``shmcache.connect``
    says (``tls_ca``, ``tls_server_name``). SegmentNotFound if there is no such segment,
    SegmentIncompatible if it is not one this version reads."""
    return AsyncClient(_connect(port, name=name, timeout=timeout, token=token, tls_ca=tls_ca,
                                tls_server_name=tls_server_name))


def create(name: str, memory: int | str = "64MiB", **options) -> "AsyncClient":
    """As ``shmcache.create`` (same arguments), for asyncio code: a segment this process
    owns, without a supervisor. A miss of a group given with a getter is loaded by this
    process, once for the host; the getter is a plain function and runs on the loop.
    ``async with`` closes and removes the segment at the end."""
    return AsyncClient(_create(name, memory, **options))


class AsyncClient:
    """The asyncio face of a ``Client``: the same reads, writes and exceptions, with the
    front reached without blocking the event loop. ``close()`` (or the end of ``async
    with``) detaches; afterwards every call raises ClientClosed."""

    def __init__(self, client: Client):
        self._client = client
        self._closed = False
        self._loops = weakref.WeakKeyDictionary()   # event loop -> _LoopFront

    @property
    def name(self) -> str:
        return self._client.name

    def peek(self, group: str, key: str | bytes) -> bytes | None:
        """The cached value, or None; never loads and never waits (not a coroutine)."""
        return self._client.peek(group, key)

    async def get(self, group: str, key: str | bytes) -> bytes:
        """The value: from shared memory, else loaded once for the whole host through its
        front. NotFound (a KeyError) if the key does not exist; LoadError / LoadTimeout if
        loading failed; AuthError if the front wants a token; PeerUnavailable if the front
        cannot be reached; SegmentNotFound if the cache has no live segment and its front
        does not answer."""
        client = self._client
        try:
            value = client._read(group, key)        # a miss: counted where it is answered
        except SegmentNotFound:
            with client._without_segment():
                return await self._load(group, key)
        if value is not None:
            return value
        return await self._load(group, key)

    async def _load(self, group, key):
        """A missed key's value, one load for every waiter on this loop: by the front, or
        by this process's own getter for a group given to ``create(groups=...)``."""
        client = self._client
        path = front_path(group, key)
        front = await self._front()
        flight = front.flights.get(path)
        if flight is None:
            local = client._local_group(group)
            if local is not None:
                from .node import count_misses      # the miss path: counted in node.py
                count_misses(local[0], group)
                load = self._load_here(*local, key)
            else:                                   # the front counts this get
                client._miss_to_front(group, key)
                load = front.fetch(path)
            flight = asyncio.get_running_loop().create_task(load)
            front.flights[path] = flight
            flight.add_done_callback(lambda done: front.land(path, done))
        elif client._attachment.current is not None:            # joins the loop's load
            from .node import count_misses
            count_misses(client._attachment.current, group)
        # A cancelled waiter leaves the load running for the others (see the docstring).
        return await asyncio.shield(flight)

    async def _load_here(self, store, group, key):
        """Load with this process's getter, once for the host (the arena's in-flight table),
        waiting for another process's load of it on the loop. The getter is a plain
        function: it runs on the loop, so a slow one holds the loop up while it runs."""
        client = self._client

        async def load_and_store():
            return client._load_and_store(store, group, key)
        return await client._host_flights(store).aload(
            store.group_id(group.name), encode_key(key), load_and_store)

    async def get_many(self, group: str, keys: Iterable[str | bytes]) -> dict:
        """{key as given: value} of the keys that exist: hits from shared memory, and every
        miss in one request to the front. A key that does not exist is left out. If some
        keys failed to load, the others are cached all the same and LoadError is raised
        naming them (LoadTimeout or PeerUnavailable if every failure was of that kind),
        with ``values`` (what was found) and ``failed`` ({key: exception})."""
        client = self._client
        wanted = distinct_keys(keys)
        found, missed = {}, []
        try:
            for key in wanted:
                value = client._read(group, key)
                if value is None:
                    missed.append(key)
                else:
                    found[key] = value
        except SegmentNotFound:
            with client._without_segment():
                return await self._load_many(group, wanted, {})
        if not missed:
            return found
        if client._local_group(group) is not None:
            return await self._load_here_many(group, missed, found)
        store = client._attachment.current
        if store is not None and store.arena.front() is None:
            from .node import count_misses
            count_misses(store, group, len(missed))
            return found                    # nothing here can load them: absent
        client._miss_to_front(group, missed[0], count=len(missed))
        return await self._load_many(group, missed, found)

    async def _load_here_many(self, group, keys, found):
        """Load ``keys`` with this process's getter, one after another (as the sync client:
        a getter need not be safe to run concurrently)."""
        failed = {}
        for key in keys:
            try:
                found[key] = await self._load(group, key)
            except NotFound:
                pass
            except (LoadError, PeerUnavailable) as exc:
                failed[key] = exc
        return many_result(group, found, failed)

    async def _load_many(self, group, keys, found):
        given = given_keys(keys)
        failed = {}
        front = await self._front()
        for chunk in batch.chunks(list(given)):
            status, data = await front.request("POST", batch_path(group, "get"),
                                               batch.encode({"keys": chunk}), JSON)
            many_answer(group, given, status, data, found, failed)
        return many_result(group, found, failed)

    async def set(self, group: str, key: str | bytes, value: bytes | str,
                  ttl: float | None = None) -> None:
        """Store ``value`` (for ``ttl`` seconds, default the group's). On a host with peers
        it goes through the front, to the key's owner, and other hosts drop their copies."""
        client = self._client
        store = client._live_store()
        if not client._clustered(store):
            client._write(store, Store.set, group, key, value, ttl)
            return
        store.check_fits(group, key, value)
        await self._cluster_write("PUT", group, key, encode_value(value), ttl_query(ttl))

    async def delete(self, group: str, key: str | bytes) -> bool:
        """Remove the key (from every host, when the host has peers); True if it was there."""
        client = self._client
        store = client._live_store()
        if not client._clustered(store):
            return client._write(store, Store.delete, group, key)
        return (await self._cluster_write("DELETE", group, key))["deleted"]

    async def _cluster_write(self, method, group, key, body=b"", query=""):
        front = await self._front()
        status, data = await front.request(method, front_path(group, key) + query, body)
        return write_answer(f"{method} {group}/{key}", status, data)

    async def set_many(self, group: str, mapping: Mapping, ttl: float | None = None) -> None:
        """Store every (key, value) of ``mapping``, as ``set`` would. ValueTooLarge before
        anything is stored if one of them cannot be; on a host with peers they go to the
        front's batch route."""
        client = self._client
        store = client._live_store()
        items = list(mapping.items())
        if not client._clustered(store):
            client._write(store, Store.set_many, group, items, ttl)
            return
        store.check_fits_many(group, items)
        check_ttl(ttl)
        for chunk in batch.chunks(items):
            await self._batch_write(group, "set", set_many_body(chunk, ttl))

    async def delete_many(self, group: str, keys: Iterable[str | bytes]) -> int:
        """Remove the keys (from every host, when the host has peers); how many were there."""
        client = self._client
        store = client._live_store()
        keys = distinct_keys(keys)
        if not client._clustered(store):
            return sum(client._write(store, Store.delete_many, group, keys))
        deleted = 0
        for chunk in batch.chunks(list(dict.fromkeys(map(front_key, keys)))):
            deleted += len((await self._batch_write(group, "delete", {"keys": chunk}))["deleted"])
        return deleted

    async def _batch_write(self, group, op, body):
        front = await self._front()
        status, data = await front.request("POST", batch_path(group, op), batch.encode(body),
                                           JSON)
        return write_answer(f"{op} batch of {group!r}", status, data)

    def define_group(self, name: str, cache_bytes: int | str, ttl: float | None = None,
                     getter=None) -> None:
        """As ``Client.define_group`` (a short shared-memory write, not a coroutine): with
        ``getter``, this process loads the group's misses itself, once for the host."""
        self._client.define_group(name, cache_bytes, ttl, getter)

    async def stats(self) -> dict:
        """The segment's figures, each group's counters summed over the host's processes."""
        return self._client.stats()

    async def close(self) -> None:
        """Detach and close the connections to the front (idempotent). Loads in flight
        still answer the tasks awaiting them."""
        self._closed = True
        self._client.close()
        fronts, self._loops = list(self._loops.items()), weakref.WeakKeyDictionary()
        running = asyncio.get_running_loop()
        for loop, front in fronts:
            if loop is running:
                front.close_idle()
            elif not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(front.close_idle)
                except RuntimeError:             # closed meanwhile: its guard closed them
                    pass

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
        if self._client.owner:
            self._client.unlink()

    async def _front(self):
        """The running loop's way to the front, made on first use."""
        loop = asyncio.get_running_loop()
        front = self._loops.get(loop)
        if front is None or front.pid != os.getpid():
            if self._closed:
                raise ClientClosed(f"this client of segment {self.name!r} is closed")
            for old in [old for old in self._loops if old.is_closed()]:
                del self._loops[old]         # its front may hold it (a bound Semaphore)
            front = self._loops[loop] = _LoopFront(self)
            await front.start()
        return front


class _LoopFront:
    """An AsyncClient's requests to the front from one event loop: its kept-alive connections
    and its in-flight table. Used only from that loop, so it needs no lock."""

    def __init__(self, owner):
        self.owner = owner
        self.client = owner._client          # front address and generation, timeout, token
        self.pid = os.getpid()               # a forked child starts a front of its own
        self.generation = None               # the client's front generation of address
        self.address = None                  # the arena.Front connected to
        self.idle = []                       # kept-alive _Connections, most recent last
        self.flights = {}                    # path -> the Task of the one GET for it
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._guard = None

    async def start(self):
        # An async generator of this loop is closed by loop.shutdown_asyncgens(), which
        # asyncio.run calls before it closes the loop: the moment to close the idle
        # connections, whose transports cannot be closed once the loop is.
        self._guard = _close_with_loop(self)
        await self._guard.__anext__()

    def land(self, path, flight):
        """A request of the in-flight table finished: later misses send a new one."""
        if self.flights.get(path) is flight:
            del self.flights[path]

    async def fetch(self, path):
        return fetch_answer(*await self.request("GET", path))

    async def request(self, method, path, body=b"", content_type=None):
        """(status, body) of one request to the front, within the client's timeout."""
        client = self.client
        try:
            async with asyncio.timeout(client.timeout):
                async with self.slots:
                    return await self._exchange(method, path, body, content_type)
        except TimeoutError:
            raise PeerUnavailable(f"the front of {client.name!r} did not answer "
                                  f"{method} {path[:100]} within {client.timeout} s") from None

    async def _exchange(self, method, path, body, content_type):
        for attempt in (1, 2):               # a kept-alive connection may have closed
            connection = None
            try:
                connection, reused = await self._connection()
                status, data, keep_alive = await connection.exchange(
                    self._request_head(method, path, body, content_type) + body)
            except (ConnectionResetError, BrokenPipeError) as exc:
                if connection is not None:
                    connection.close()
                if attempt == 2 or connection is None or not reused:
                    raise PeerUnavailable(f"front of {self.client.name!r} closed the "
                                          f"connection: {exc}") from None
                continue
            except ssl.SSLCertVerificationError as exc:
                raise self.client._front.untrusted(exc) from None
            except OSError as exc:
                if connection is not None:
                    connection.close()
                raise PeerUnavailable(f"cannot reach the front of {self.client.name!r}: "
                                      f"{exc}") from None
            except BaseException:
                if connection is not None:   # cancelled or failed mid-exchange: the
                    connection.close()       # connection's state is unknown
                raise
            if keep_alive:
                self._release(connection)
            else:
                connection.close()
            return status, data

    async def _connection(self):
        """(a kept-alive connection to the current front, True), else (a new one, False)."""
        generation = self.client._front_generation
        if generation != self.generation:    # the segment or its front moved
            self.address = self.client._front.address()
            self.generation = generation
            self.close_idle()
        while self.idle:
            connection = self.idle.pop()
            if connection.open():
                return connection, True
            connection.close()
        front = self.address
        tls = self.client._front.tls(front)
        if tls is None:
            reader, writer = await asyncio.open_connection(front.host, front.port)
        else:
            reader, writer = await asyncio.open_connection(front.host, front.port, ssl=tls[0],
                                                           server_hostname=tls[1])
        return _Connection(reader, writer, self.generation), False

    def _request_head(self, method, path, body, content_type):
        host, port = self.address.host, self.address.port
        lines = [f"{method} {path} HTTP/1.1", f"Host: [{host}]:{port}" if ":" in host
                 else f"Host: {host}:{port}"]
        lines += [f"{name}: {value}" for name, value in self.client._front.headers.items()]
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}")
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _release(self, connection):
        if (len(self.idle) < IDLE_CONNECTIONS and connection.generation == self.generation
                and not self.owner._closed):
            self.idle.append(connection)
        else:
            connection.close()

    def close_idle(self):
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()


async def _close_with_loop(front):
    """Closes ``front``'s idle connections when its loop shuts down (see _LoopFront.start)."""
    try:
        yield
    finally:
        front.close_idle()


class _Connection:
    """One kept-alive HTTP/1.1 connection to the front: a request, then its answer."""

    def __init__(self, reader, writer, generation):
        self.reader, self.writer, self.generation = reader, writer, generation

    def open(self):
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self):
        self.writer.close()

    async def exchange(self, request):
        """(status, body, keep alive) of ``request``. ConnectionResetError if the front
        closed the connection before answering (a kept-alive one may have); PeerUnavailable
        if it closed it mid-answer or answered something that is not HTTP/1.x."""
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise PeerUnavailable("the front closed the connection mid-answer") from None
            raise ConnectionResetError("the front closed the connection") from None
        except asyncio.LimitOverrunError:
            raise PeerUnavailable("the front's answer has an oversized header") from None
        status, length, keep_alive = _parse_head(head)
        try:
            body = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise PeerUnavailable("the front closed the connection mid-answer") from None
        return status, body, keep_alive


def _parse_head(head):
    """(status, Content-Length, keep alive) of an answer's header block."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = rest[:3]
    if not version.startswith("HTTP/1.") or not (status.isascii() and status.isdigit()):
        raise PeerUnavailable(f"the front answered something else than HTTP: {lines[0][:80]!r}")
    length, keep_alive = None, version != "HTTP/1.0"
    for line in lines[1:]:
        field, _, value = line.partition(":")
        field, value = field.strip().lower(), value.strip()
        if field == "content-length" and value.isascii() and value.isdigit():
            length = int(value)
        elif field == "connection":
            keep_alive = value.lower() == "keep-alive"
    if length is None:
        raise PeerUnavailable("the front's answer has no Content-Length")
    return int(status), length, keep_alive
