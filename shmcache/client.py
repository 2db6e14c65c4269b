"""``Client``: a co-located process's handle on a host's cache (made by ``connect()`` or
``create()``, handles.py).

Hits are read straight from shared memory. A miss goes to the host's HTTP front (the
address its supervisor wrote into the segment), which loads it once for the whole host.
A front that speaks TLS (the supervisor has --tls-cert) is reached over HTTPS, its
certificate verified for the host name of the supervisor's --self URL, against the CA file
of its --tls-ca (the system's CA store without one): both recorded in the segment, both
overridable with ``connect(tls_ca=..., tls_server_name=...)``. How the front is reached and
spoken to: front_client.py.
Nothing heavy is imported here (no requests, no protobuf), so attaching stays cheap.
"""

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping

from . import batch
from .arena import retire
from .attachment import Attachment
from .errors import (ClientClosed, InvalidArgument, InvalidKey, LoadError, NotFound,
                     PeerUnavailable, SegmentNotFound, UnknownGroup)
from .front_client import (BATCH_HEADERS, FrontConnection, batch_path, distinct_keys,
                           fetch_answer, front_key, front_path, given_keys, many_answer,
                           many_result, set_many_body, ttl_query, write_answer)
from .group import Group
from .layout import HEADER
from .lru_index import encode_key
from .metrics import host_stats
from .stale import Refreshes
from .store import Store
from .validate import check_ttl, encode_value

DEFAULT_TIMEOUT = 35.0        # a little over the front's default load timeout


class Client:
    """Reads hits straight from shared memory; writes take the segment's write lock.

    The client stays on the live segment of its name: when the cache restarts it moves to
    the new segment within about CHECK_INTERVAL, never writes into a dead one, and while
    there is none raises SegmentNotFound (attachment.py). ``close()`` detaches (idempotent);
    afterwards every call raises ClientClosed. A client made by ``create()`` owns the
    segment and also unlinks it when used as a context manager.
    """
    _attachment = None
    owner = False

    def __init__(self, store, owner=False, timeout=DEFAULT_TIMEOUT, token=None, tls_ca=None,
                 tls_server_name=None):
        self.owner = owner
        self.timeout = timeout
        self._front = FrontConnection(self, token, tls_ca, tls_server_name)
        self._groups = {}                # name -> Group whose getter this process runs on a miss
        self._flights = None             # HostFlights of the current segment, made on first load
        self._flights_lock = threading.Lock()
        self._refreshes = Refreshes()    # background refreshes of stale values (own getters)
        self._front_generation = 0       # bumped when the segment or its front changes
        self._path, self._identity = store.arena.path, store.arena.identity  # for unlink()
        # Sets self.peek, the hit path: the segment's own reader, one call, no wrapper.
        self._attachment = Attachment(store, self._switch, self._peek_current)

    def _switch(self, store):
        """The attachment moved to ``store`` (None: no live segment), or the front moved."""
        self.peek = store.get if store is not None else self._peek_without_segment
        self._read = store.get_leaving_miss if store is not None else self._read_without_segment
        self._front_generation += 1

    @property
    def name(self) -> str:
        return self._attachment.name

    def peek(self, group: str, key: str | bytes) -> bytes | None:
        """The cached value, or None; never loads. SegmentNotFound while the cache has no
        live segment. (Replaced per instance by the segment's reader.)"""
        return self._attachment.current.get(group, key)

    def _peek_current(self, group, key):
        return self.peek(group, key)

    def _peek_without_segment(self, group, key):
        if self._attachment.refresh():              # one may have appeared since
            return self.peek(group, key)
        raise self._attachment.unavailable()

    def _read(self, group, key):
        """``get``'s read: ``peek``, but a miss is left to whoever answers it (node.py
        counts it). (Replaced per instance by the segment's reader.)"""
        return self._attachment.current.get_leaving_miss(group, key)

    def _read_without_segment(self, group, key):
        if self._attachment.refresh():
            return self._read(group, key)
        raise self._attachment.unavailable()

    def _peek_closed(self, group, key):
        raise ClientClosed(f"this client of segment {self.name!r} is closed")

    def get(self, group: str, key: str | bytes) -> bytes:
        """The value: from shared memory, else loaded once for the whole host: by this
        process's own getter for a group given to ``create(groups=...)``, else through the
        host's front. A value past its ttl but within its group's stale window is answered
        at once, and reloaded in the background: by the front, or by this process's getter
        (``peek`` never answers one). NotFound (a KeyError) if the key does not exist, or is
        not cached in a segment with neither getter nor front; LoadError / LoadTimeout if loading failed;
        AuthError if the front wants a token; PeerUnavailable if the front cannot be reached;
        SegmentNotFound if the cache has no live segment and its front does not answer."""
        try:
            value = self._read(group, key)          # a hit counts; a miss is counted
        except SegmentNotFound:                     # where it is answered (node.py)
            return self._fetch_without_segment(group, key)
        if value is not None:
            return value
        local = self._local_group(group)
        if local is not None:
            return self._load_or_stale(*local, key)
        self._miss_to_front(group, key)
        return self._fetch(group, key)

    def _load_or_stale(self, store, group, key):
        """A missed key's value loaded by this process's getter (``_load_here``); or its
        stale value, if it has one, while a refresh reloads it in the background."""
        from .node import refresh, stale_or_miss      # the miss path: counted there
        found = stale_or_miss(store, group.name, key)
        if found is None:
            return self._load_here(store, group, key)
        self._refreshes.start((group.name, key), lambda: refresh(
            store, group, key, lambda: self._load_here(store, group, key, wait=False)))
        return found[0]

    def _miss_to_front(self, group, key, count=1):
        """Before ``count`` missed keys of ``group`` go to the front, which counts each get
        when it answers: NotFound (the miss counted here) if the segment has no front."""
        store = self._attachment.current
        if store is None:
            return
        if store.arena.front() is None:
            from .node import count_misses
            count_misses(store, group, count)
            raise NotFound(f"{group}/{key} is not cached, and segment {self.name!r} has "
                           f"no getter for {group!r} in this process and no front to load it")

    def _load_here(self, store, group, key, wait=True):
        """Load with this process's getter, once for every process of the host: the arena's
        in-flight table makes other processes that miss the same key wait for this load
        (or this one wait for theirs), as a supervisor's workers do. ``wait=False`` (a
        refresh): leave the key to a load already in flight, if any (None)."""
        flights = self._host_flights(store)
        load = flights.load if wait else flights.load_unless_loading
        return load(store.group_id(group.name), encode_key(key),
                    lambda: self._load_and_store(store, group, key))

    def _local_group(self, group):
        """(live store, Group) if this process loads ``group``'s misses itself, else None."""
        loader = self._groups.get(group)
        store = self._attachment.current
        if loader is not None and loader.getter is not None and store is not None:
            return store, loader
        return None

    @staticmethod
    def _load_and_store(store, group, key):
        """``group``'s getter's value for ``key``, stored in ``store`` (Group.load_into)."""
        return group.load_into(store, key if isinstance(key, str) else _key_text(key))

    def _host_flights(self, store):
        """The host-wide singleflight of ``store``, one per client and segment."""
        with self._flights_lock:
            flights = self._flights
            if flights is None or flights.store is not store:
                from .singleflight import HostFlights
                flights = self._flights = HostFlights(store, load_timeout=self.timeout)
            return flights

    def memoize(self, group: str, ttl: float | None = None, *, serializer=None,
                key: "Callable | None" = None):
        """A decorator: cache a function's results (sync or async) in ``group``, for ``ttl``
        seconds (None: the group's TTL), and run it once per arguments across every process
        of the host. ``serializer`` (default pickle) has dumps/loads; ``key`` is a function
        of the same arguments whose result names the call, for arguments that cannot be
        encoded as they are. The decorated function gains ``invalidate(*args, **kwargs)``
        and ``key(*args, **kwargs)``. Keys, exceptions: see shmcache/memoize.py."""
        from .memoize import memoize
        return memoize(self, group, ttl, serializer=serializer, key=key)

    def _fetch_without_segment(self, group, key):
        with self._without_segment():
            return self._fetch(group, key)

    @contextlib.contextmanager
    def _without_segment(self):
        """Around a request to the last known front while no live segment exists: it may
        still answer (a new supervisor whose segment this client has not found yet). Raises
        why there is no segment if there is no front to ask, or if it does not answer."""
        unavailable = self._attachment.unavailable()
        if self._attachment.front is None:
            raise unavailable
        try:
            yield
        except PeerUnavailable as exc:
            raise type(unavailable)(f"{unavailable}; its front did not answer: {exc}") from None

    def get_many(self, group: str, keys: Iterable[str | bytes]) -> dict:
        """{key: value} of the keys that exist, keyed by the keys as given (a key given
        twice is looked up once). Hits are read from shared memory; every miss is loaded
        as ``get`` would, but all in one request to the front (which loads them at once),
        or by this process's getter (one key after another, in the calling thread: a
        getter need not be thread-safe). If some keys failed to load, the values that did
        load are cached all the same and LoadError is raised (LoadTimeout or
        PeerUnavailable if every failure was one), naming the keys; its ``values`` holds
        what was found and its ``failed`` {key: exception}. Other errors as ``get``."""
        wanted = distinct_keys(keys)
        found, missed = {}, []
        read = self._read                   # misses: counted where they are answered
        for index, key in enumerate(wanted):
            try:
                value = read(group, key)
            except SegmentNotFound:
                missed += wanted[index:]
                with self._without_segment():
                    return self._fetch_many(group, missed, found)
            if value is None:
                missed.append(key)
            else:
                found[key] = value
        if not missed:
            return found
        local = self._local_group(group)
        if local is not None:
            failed = {}
            for key in missed:
                try:
                    found[key] = self._load_or_stale(*local, key)
                except NotFound:
                    pass
                except (LoadError, PeerUnavailable) as exc:
                    failed[key] = exc
            return many_result(group, found, failed)
        store = self._attachment.current
        if store is not None and store.arena.front() is None:
            from .node import count_misses
            count_misses(store, group, len(missed))
            return found                    # nothing here can load them: absent
        self._miss_to_front(group, missed[0], count=len(missed))
        return self._fetch_many(group, missed, found)

    def _fetch_many(self, group, keys, found):
        """Load ``keys`` through the front's batch route (one request per MAX_BATCH_KEYS),
        adding what it found to ``found``; the error of the keys that failed."""
        given = given_keys(keys)
        failed = {}
        for chunk in batch.chunks(list(given)):
            status, data = self._front.call("POST", batch_path(group, "get"),
                                            batch.encode({"keys": chunk}), BATCH_HEADERS)
            many_answer(group, given, status, data, found, failed)
        return many_result(group, found, failed)

    def set_many(self, group: str, mapping: Mapping[str | bytes, bytes | str],
                 ttl: float | None = None) -> None:
        """``set`` of every key and value of ``mapping``. Every value is checked first:
        ValueTooLarge (or InvalidKey) and nothing is stored. On a host alone the writes
        take the write lock once per few dozen keys; with peers they go through the front,
        each key to its owner (PeerUnavailable, after the others are done, if a peer
        failed)."""
        items = list(mapping.items())
        store = self._live_store()
        if not self._clustered(store):
            self._write(store, Store.set_many, group, items, ttl)
            return
        store.check_fits_many(group, items)
        ttl = check_ttl(ttl)
        for chunk in batch.chunks(items):
            self._batch_request(group, "set", set_many_body(chunk, ttl))

    def delete_many(self, group: str, keys: Iterable[str | bytes]) -> int:
        """``delete`` of every key (from every host, when the host has peers); the number
        of keys that were there."""
        keys = distinct_keys(keys)
        store = self._live_store()
        if not self._clustered(store):
            return sum(self._write(store, Store.delete_many, group, keys))
        deleted = 0
        for chunk in batch.chunks(list(dict.fromkeys(map(front_key, keys)))):
            deleted += len(self._batch_request(group, "delete", {"keys": chunk})["deleted"])
        return deleted

    def _batch_request(self, group, op, body):
        """The JSON of the front's 200 answer to a batch write; the error of any other."""
        status, data = self._front.call("POST", batch_path(group, op), batch.encode(body),
                                        BATCH_HEADERS)
        return write_answer(f"{op} batch of {group!r}", status, data)

    def set(self, group: str, key: str | bytes, value: bytes | str,
            ttl: float | None = None) -> None:
        """Store ``value`` (for ``ttl`` seconds, default the group's). On a host with peers it
        goes through the front, to the key's owner, and other hosts drop their copies."""
        store = self._live_store()
        if not self._clustered(store):
            self._write(store, Store.set, group, key, value, ttl)
            return
        store.check_fits(group, key, value)
        self._cluster_write("PUT", group, key, encode_value(value), ttl_query(ttl))

    def delete(self, group: str, key: str | bytes) -> bool:
        """Remove the key (from every host, when the host has peers); True if it was there."""
        store = self._live_store()
        if not self._clustered(store):
            return self._write(store, Store.delete, group, key)
        return self._cluster_write("DELETE", group, key)["deleted"]

    # Atomic on this host: one step under the segment's write lock, whichever processes race.
    # A host with peers has no cluster-wide form of them: they refuse (see ``clustered``).

    def add(self, group: str, key: str | bytes, value: bytes | str,
            ttl: float | None = None) -> bool:
        """Store ``value`` (as ``set``) only if the key holds no live value; True if stored.
        Of processes adding one key at once, exactly one gets True."""
        return self._host_write("add", Store.add, group, key, value, ttl)

    def incr(self, group: str, key: str | bytes, delta: int = 1) -> int | None:
        """Add ``delta`` to the whole number the key holds as decimal digits (b"41" -> 42),
        keeping its expiry; the new number, or None if the key holds no live value.
        NotAnInteger if the value is anything else."""
        return self._host_write("incr", Store.incr, group, key, delta)

    def touch(self, group: str, key: str | bytes, ttl: float | None = None) -> bool:
        """Give a live key a new expiry: ``ttl`` seconds from now (default the group's);
        True if the key was there."""
        return self._host_write("touch", Store.touch, group, key, ttl)

    @property
    def clustered(self) -> bool:
        """True if this host has peers: ``set`` and ``delete`` then go cluster-wide, and the
        host-local ``add``, ``incr`` and ``touch`` refuse."""
        return self._clustered(self._live_store())

    def _host_write(self, what, operation, *args):
        store = self._live_store()
        if self._clustered(store):
            raise InvalidArgument(f"{what}() is atomic on one host only, and the host of "
                                  f"segment {self.name!r} has peers")
        return self._write(store, operation, *args)

    @staticmethod
    def _clustered(store):
        return store.arena.get_u32(HEADER.peer_count) > 1

    def _cluster_write(self, method, group, key, body=None, query=""):
        status, data = self._front_request(method, group, key, body, query)
        return write_answer(f"{method} {group}/{key}", status, data)

    def clear(self, group: str | None = None) -> None:
        """Remove every entry of ``group`` (of every group when None). On a host alone,
        in this segment; on a host with peers, on every host, through the front (a flush:
        PeerUnavailable, after the others are flushed, if a peer failed); a group the front
        does not serve is cleared in this segment only."""
        store = self._live_store()
        if not self._clustered(store):
            self._write(store, Store.clear, group)
            return
        for name in [group] if group is not None else list(store.index.groups()):
            try:
                status, data = self._front.call("DELETE", front_path(name))
                write_answer(f"flush of {name!r}", status, data)
            except UnknownGroup:
                self._write(store, Store.clear, name)

    def define_group(self, name: str, cache_bytes: int | str, ttl: float | None = None,
                     getter: "Callable[[str], bytes | str] | None" = None,
                     stale: float | None = None) -> None:
        """Define group ``name`` in the segment, or change its budget (key + value bytes, an
        int or a size such as "64MiB"; a smaller one evicts at once), default TTL in
        seconds (None: until evicted) and stale window (see ``Group``). With ``getter``,
        this client loads the group's misses itself, once for the host (see ``create``).
        Every process attached to the segment sees the group at once."""
        group = Group(name, cache_bytes, getter, ttl, stale)
        self._write(self._live_store(), Store.define_group, name, group.cache_bytes, ttl,
                    group.stale)
        if getter is not None:
            self._groups[name] = group

    def stats(self) -> dict:
        """The segment's figures, each group's counters summed over the host's processes."""
        return host_stats(self._live_store())

    # -- the live segment ----------------------------------------------------------------------

    @property
    def _store(self):
        return self._live_store()

    def _live_store(self):
        """The live segment's Store; SegmentNotFound if there is none, ClientClosed."""
        attachment = self._attachment
        store = attachment.current
        if store is not None:
            return store
        if attachment.refresh():                    # one may have appeared since
            store = attachment.current
            if store is not None:
                return store
        if attachment.closed:
            raise ClientClosed(f"this client of segment {self.name!r} is closed")
        raise attachment.unavailable()

    def _write(self, store, operation, *args):
        """``operation(store, *args)``, on the live segment. The store checks, under its write
        lock, that the segment was not retired before the change commits (Store.locked), so a
        write that returns did not go into a removed or replaced segment; one that met a
        retired segment was undone, and is made once more on the new one if the cache
        restarted meanwhile."""
        try:
            return operation(store, *args)
        except SegmentNotFound:
            if not self._attachment.refresh():
                raise
        except ValueError:
            if not store.closed:                    # closed: left behind for long meanwhile
                raise
        return operation(self._live_store(), *args)

    def close(self) -> None:
        """Detach (idempotent). Every later call, through this client or a reference to its
        ``peek``, raises ClientClosed."""
        self.peek = self._read = self._peek_closed
        if self._attachment is not None:
            self._attachment.close(self._peek_closed)
        self._front.close()

    def unlink(self) -> None:
        """Remove the segment's name (owners only; mappings stay valid until closed). A segment
        that has replaced ours under the name is not ours to remove and is left alone."""
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            st = os.fstat(fd)
            # A replacement appearing between the open and the unlink would be removed: only
            # a second creator racing the owner's own unlink can cause that; it starts again.
            if (st.st_dev, st.st_ino) == self._identity:
                retire(f"/proc/self/fd/{fd}")   # attached clients stop writing into it first
                try:
                    os.unlink(self._path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()

    # -- the front (front_client.py) ---------------------------------------------------------

    def _fetch(self, group, key):
        return fetch_answer(*self._front_request("GET", group, key))

    def _front_request(self, method, group, key, body=None, query=""):
        """(status, body) of a request to this host's front for ``group``/``key``."""
        return self._front.call(method, front_path(group, key) + query, body)


def _key_text(key):
    try:
        return bytes(key).decode()
    except UnicodeDecodeError:
        raise InvalidKey("a key loaded by a getter must be UTF-8 text") from None
