"""``shmcache.django.ShmCache``: a Django cache backend on a shared-memory segment.

Two modes, told apart by LOCATION::

    "mysite"               embedded: the segment ``mysite``, made by the first process that
                           uses the cache and attached by every other one; no daemon.
                           OPTIONS: memory (default 64MiB), max_item_size (1MiB), group
                           ("django").
    "port:8001"            host: the segment of the supervisor on port 8001 (kcache-8001)
    "segment:kcache-8001"  host: a supervisor's segment by name.
                           OPTIONS: group ("django"; the supervisor defines it), token,
                           load (False: a miss is a miss; True: a miss is loaded by the
                           group's getter through the host, and a key it does not know
                           is a miss). On a host with peers, a key this host does not hold
                           is asked of its owner (set sent it there): give Django a group
                           without a getter, and a miss stays a miss.

Every process of the host shares the entries: a value set by one gunicorn worker is read by
the next request in any other at once, from shared memory, with no network hop.

Values are pickled (highest protocol), except ints (not bools, not subclasses), which are
stored as their decimal digits, as memcached does, so that ``incr``/``decr`` is one step
under the segment's write lock: atomic across processes. A pickle always starts with byte
0x80, which decimal digits never do. A value some other client stored that is neither is
returned as bytes.

Keys are made and checked as Django's own backends do (KEY_PREFIX, VERSION, KEY_FUNCTION,
CacheKeyWarning); one longer than shmcache's 250-byte limit (or empty) is replaced by its
first 200 bytes and a 128-bit hash of the whole key, never refused.

Timeouts mean what they mean in Django: None = forever (host mode: the group's TTL), 0 or
less = expire at once (the key is removed), default TIMEOUT (300 s). A value larger than
max_item_size (or the group's budget) is not stored, as memcached does: ``set`` removes the
key's old value and returns, ``add`` returns False, ``set_many`` lists the key as failed.
MAX_ENTRIES and CULL_FREQUENCY are accepted and ignored: the segment is bounded by bytes
and evicts least recently used entries (CLOCK) when it is full. ``clear()`` empties the
group: in this host's segment, or on every host when the host has peers (a group flush).

``close()`` (which Django calls at the end of each request) does nothing: the process keeps
its mapping, and the segment is never removed by a backend. ``python -m shmcache.segments
--prune`` removes an embedded segment that no process maps any more.

The ``a*`` methods call the sync ones directly in embedded mode (each is a short
shared-memory operation; no thread hop); in host mode they go through the base class's
``sync_to_async``, since a set or delete on a host with peers, or a load, talks HTTP.
"""

import logging
import os
import pickle
import re
import threading
import time
from dataclasses import dataclass

import xxhash
from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.exceptions import ImproperlyConfigured

from .arena import MAGIC, MAX_KEY_BYTES, WRITE_LOCK_BYTE, Arena, Layout, segment_path
from .client import Client
from .errors import (ClientClosed, InvalidArgument, NotAnInteger, NotFound, SegmentIncompatible,
                     SegmentInUse, SegmentNotFound, UnknownGroup, ValueTooLarge)
from .group import Group
from .handles import connect, create
from .layout import HEADER
from .locks import LockFile
from .atomic_ops import decimal_value
from .units import parse_size
from .validate import MAX_SECONDS

log = logging.getLogger("shmcache")

__all__ = ["ShmCache", "close_connections"]

DEFAULT_MEMORY = "64MiB"
DEFAULT_MAX_ITEM_SIZE = "1MiB"
DEFAULT_GROUP = "django"
OPEN_ATTEMPTS = 50          # create-or-attach rounds before giving up (each is a race lost)
REBUILD_LOCK_WAIT = 2.0     # seconds to wait for an incompatible segment's lock
MAX_TTL = int(MAX_SECONDS) - 1   # the longest TTL shmcache takes (about 31 years): longer is "forever"
HASHED_KEY_HEAD = 200       # bytes of a too-long key kept in front of its hash
_PICKLE = 0x80              # first byte of every pickle of protocol 2 and later
# Django warns of keys memcached would refuse: longer than its limit (shmcache's too), or
# with these characters.
MEMCACHED_KEY_LIMIT = MAX_KEY_BYTES
_MEMCACHED_UNSAFE = re.compile(r"[\x00-\x20\x7f]").search
_IGNORED_OPTIONS = {"MAX_ENTRIES", "CULL_FREQUENCY"}
_EMBEDDED_OPTIONS = {"memory", "max_item_size", "group"}
_HOST_OPTIONS = {"group", "token", "load"}


# -- values and keys ------------------------------------------------------------------------

def encode(value):
    """bytes stored for ``value``: decimal digits for an int, else its pickle."""
    if type(value) is int:
        return b"%d" % value
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def decode(data):
    if data and data[0] == _PICKLE:
        return pickle.loads(data)
    try:
        return decimal_value(data)
    except NotAnInteger:
        return bytes(data)          # stored by another client: returned as it is


def shmcache_key(key):
    """A Django cache key as shmcache stores it: itself, or if it is longer than
    MAX_KEY_BYTES (or empty), its head and a 128-bit hash of the whole key."""
    if 0 < len(key) <= MAX_KEY_BYTES // 4:      # fits however it encodes: kept as text,
        return key                              # the reader's fastest path
    data = key.encode()
    if 0 < len(data) <= MAX_KEY_BYTES:
        return data
    head = data[:HASHED_KEY_HEAD].decode(errors="ignore").encode()   # whole characters
    return head + b"#" + xxhash.xxh3_128_hexdigest(data).encode()


# -- opening the segment, once per process ------------------------------------------------

_clients = {}                   # spec -> Client, shared by every ShmCache of the process
_clients_lock = threading.Lock()


def _shared_client(spec, stale=None):
    """The process's client for ``spec``; a new one if the current one is ``stale``."""
    with _clients_lock:
        client = _clients.get(spec)
        if client is None or client is stale:
            if client is not None:
                client.close()
            client = _clients[spec] = spec.open()
        return client


def close_connections():
    """Detach this process from every segment its ShmCache backends opened (the segments
    stay). For tests, or a process about to exec; the next use attaches again."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


@dataclass(frozen=True)
class _Embedded:
    """Where an embedded cache lives: a segment made by whichever process comes first."""
    name: str
    memory: int
    max_item_size: int
    group: str
    host = False

    def budget(self, layout):
        """The group's byte budget: every page of the segment (eviction by memory takes care
        of what headers and rounding cost)."""
        return layout.npages * layout.page_size

    def open(self):
        """Attach to the segment, or create it; race-free between processes (creation is
        one atomic link, SegmentInUse to all but one), repeated while racing."""
        planned = Layout.plan(self.memory, self.max_item_size)
        for _attempt in range(OPEN_ATTEMPTS):
            try:
                client = connect(name=self.name)
            except SegmentNotFound:
                try:
                    client = create(self.name, self.memory, max_item_size=self.max_item_size,
                                    groups=[Group(self.group, self.budget(planned))])
                except SegmentInUse:
                    continue                     # another process made it first: attach
                client._live_store().start_counting()   # in stats, as connect()'s are
                return client
            except SegmentIncompatible as exc:
                self._rebuild(exc)
                continue
            try:
                self._adopt(client)
            except SegmentNotFound:              # removed meanwhile: make it again
                client.close()
                continue
            except BaseException:
                client.close()
                raise
            return client
        raise ImproperlyConfigured(f"cache segment {self.name!r}: could neither attach to "
                                   f"nor create it in {OPEN_ATTEMPTS} attempts")

    def _adopt(self, client):
        store = client._live_store()
        if store.arena.get_u32(HEADER.owner_pid):
            raise ImproperlyConfigured(
                f"segment {self.name!r} belongs to a shmcache supervisor: to use it, set "
                f"LOCATION to 'segment:{self.name}' (host mode)")
        lay = store.arena.layout
        if (lay.total_size, lay.max_item_size) != (self.memory, self.max_item_size):
            log.warning("cache segment %s: attached with memory=%d, max_item_size=%d, not "
                        "the %d, %d configured (a segment is made once; remove it to resize)",
                        self.name, lay.total_size, lay.max_item_size, self.memory,
                        self.max_item_size)
        if self.group not in store.index.groups():
            client.define_group(self.group, self.budget(lay))

    def _rebuild(self, reason):
        """Replace a segment this version cannot use (another layout version, a size that
        does not match its header) by removing its name; the caller then creates a new one.
        Only one process removes it: each remover holds the old file's write-lock byte and
        removes the name only if it still points to that file. Files that are not shmcache
        segments are never touched."""
        path = segment_path(self.name)
        try:
            lock_file = LockFile(path)
        except FileNotFoundError:
            return
        except PermissionError:
            raise ImproperlyConfigured(f"cache segment {self.name!r}: {reason}") from None
        try:
            head = os.pread(lock_file.fd, HEADER.end("magic"), HEADER.magic)
            if len(head) < HEADER.end("magic") or int.from_bytes(head, "little") != MAGIC:
                # Not even a half-made shmcache segment: those are published with their
                # magic number already written (arena.Arena.publish).
                raise ImproperlyConfigured(
                    f"{path} exists and is not a shmcache segment: remove it, or choose "
                    f"another LOCATION") from None
            deadline = time.monotonic() + REBUILD_LOCK_WAIT
            while not lock_file.try_lock_byte(WRITE_LOCK_BYTE):
                if time.monotonic() > deadline:
                    return                       # a writer of that version is stuck: retry
                time.sleep(0.001)
            mine = os.fstat(lock_file.fd)
            try:
                named = os.stat(path)
            except FileNotFoundError:
                return
            # The name may already point to a new segment that another process made after
            # removing the incompatible one (we opened the name after it did): that one must
            # stay. Under its write lock, check that the file we hold is still unusable.
            if ((named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)
                    and not _usable(self.name, (mine.st_dev, mine.st_ino))):
                os.unlink(path)
                log.warning("cache segment %s: %s; removed it, a new one is made",
                            self.name, reason)
        finally:
            lock_file.close()


def _usable(name, identity):
    """True if segment ``name`` is the file ``identity`` and this version can attach to it."""
    try:
        arena = Arena.attach(name)
    except (SegmentIncompatible, SegmentNotFound):
        return False
    try:
        return arena.identity == identity
    finally:
        arena.close()


@dataclass(frozen=True)
class _Host:
    """A running supervisor's segment."""
    port: int | None
    name: str | None
    token: str | None
    host = True

    def open(self):
        return connect(self.port, name=self.name, token=self.token)


# -- the backend ----------------------------------------------------------------------------

class ShmCache(BaseCache):
    """Django's cache API on a shmcache segment; see the module's doc for LOCATION/OPTIONS."""
    pickle_protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, location, params):
        super().__init__(params)
        options = dict(params.get("OPTIONS") or {})
        for name in _IGNORED_OPTIONS:
            options.pop(name, None)
        if not location or not isinstance(location, str):
            raise ImproperlyConfigured("shmcache.django.ShmCache needs a LOCATION: a segment "
                                       "name, 'port:PORT' or 'segment:NAME'")
        scheme, _colon, rest = location.partition(":")
        try:
            if _colon and scheme in ("port", "segment"):
                self._check_options(options, _HOST_OPTIONS, location)
                if scheme == "segment":
                    segment_path(rest)              # InvalidArgument if the name is bad
                self.spec = _Host(int(rest) if scheme == "port" else None,
                                  rest if scheme == "segment" else None, options.get("token"))
                self._load = bool(options.get("load", False))
            else:
                self._check_options(options, _EMBEDDED_OPTIONS, location)
                segment_path(location)              # InvalidArgument if the name is bad
                self.spec = _Embedded(location,
                                      parse_size(options.get("memory", DEFAULT_MEMORY)),
                                      parse_size(options.get("max_item_size",
                                                             DEFAULT_MAX_ITEM_SIZE)),
                                      options.get("group", DEFAULT_GROUP))
                self._load = False
            self.group = Group(options.get("group", DEFAULT_GROUP), 1).name   # checks it
        except (InvalidArgument, ValueError) as exc:
            raise ImproperlyConfigured(f"cache {location!r}: {exc}") from None
        self._client = None
        self._reader = None                         # see _use
        self._direct = not self.spec.host

    @staticmethod
    def _check_options(options, known, location):
        unknown = sorted(set(options) - known)
        if unknown:
            raise ImproperlyConfigured(f"cache {location!r}: unknown OPTIONS {unknown}; "
                                       f"this mode knows {sorted(known | _IGNORED_OPTIONS)}")

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, operation, *args):
        """``operation(client, *args)`` on this process's client, made on first use. In
        embedded mode a segment that went away (removed by hand, rebuilt by another
        version) or that lacks our group is opened again, once; so is a client closed by
        ``close_connections``."""
        client = self._client
        if client is None:
            client = self._use(_shared_client(self.spec))
        try:
            return operation(client, *args)
        except ClientClosed:
            pass                                    # by close_connections(): attach again
        except (SegmentNotFound, UnknownGroup):
            if self.spec.host:
                raise
        client = self._use(_shared_client(self.spec, stale=client))
        return operation(client, *args)

    def _use(self, client):
        """Make ``client`` this cache's; in embedded mode ``get`` then calls its reader
        (which follows the segment, see Client.peek) without going through ``_run``."""
        self._client = client
        self._reader = client.peek if self._direct else None
        return client

    def _key(self, key, version):
        return shmcache_key(self.make_and_validate_key(key, version=version))

    def make_and_validate_key(self, key, version=None):
        """Django's, with the same warnings, but the character scan of ``validate_key`` is
        one regular-expression search: it is most of a hit's cost otherwise."""
        key = self.make_key(key, version=version)
        if len(key) > MEMCACHED_KEY_LIMIT or _MEMCACHED_UNSAFE(key):
            self.validate_key(key)
        return key

    def _expiry(self, timeout):
        """Seconds to keep a value: None (forever, or the group's TTL in host mode), or a
        positive number; 0 means "expire at once"."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        return min(timeout, MAX_TTL) if timeout > 0 else 0

    def _peek(self, client, key):
        """The stored bytes, or None. From this host's memory, unless misses load (OPTIONS
        load) or the host has peers: then the key's owner is asked, since what a set sent
        there is in its memory, not ours (give Django a group without a getter there, and
        a miss stays a miss)."""
        if not (self._load or self.spec.host and client.clustered):
            return client.peek(self.group, key)
        try:
            return client.get(self.group, key)
        except NotFound:
            return None

    # -- the API ----------------------------------------------------------------------------

    def _read(self, key):
        """The stored bytes of a made key, or None: ``_peek``, through the reader itself
        when ``_use`` set it (a hit is then one call into shared memory)."""
        reader = self._reader
        if reader is not None:
            try:
                return reader(self.group, key)
            except (ClientClosed, SegmentNotFound, UnknownGroup):
                pass
        return self._run(self._peek, key)

    def get(self, key, default=None, version=None):
        data = self._read(self._key(key, version))
        return default if data is None else decode(data)

    def get_many(self, keys, version=None):
        found = {}
        for key in keys:
            data = self._read(self._key(key, version))
            if data is not None:
                found[key] = decode(data)
        return found

    def has_key(self, key, version=None):
        return self._read(self._key(key, version)) is not None

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        self._set(self._key(key, version), encode(value), self._expiry(timeout))

    def _set(self, key, data, ttl):
        """True if stored; a value too large is not, and the key's old value goes."""
        if ttl == 0:
            self._run(self._delete, key)
            return True
        try:
            self._run(Client.set, self.group, key, data, ttl)
            return True
        except ValueTooLarge:
            self._run(self._delete, key)
            return False

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        ttl = self._expiry(timeout)
        return [key for key, value in data.items()
                if not self._set(self._key(key, version), encode(value), ttl)]

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key, data, ttl = self._key(key, version), encode(value), self._expiry(timeout)
        if ttl == 0:                          # stored and expired at once: only say if it could be
            return self._run(self._peek, key) is None
        try:
            return self._run(self._host_local, "add", key, data, ttl)
        except ValueTooLarge:
            return False

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key, ttl = self._key(key, version), self._expiry(timeout)
        if ttl == 0:
            return self._run(self._delete, key)
        return self._run(self._host_local, "touch", key, ttl)

    def incr(self, key, delta=1, version=None):
        made = self.make_and_validate_key(key, version=version)
        try:
            number = self._run(self._host_local, "incr", shmcache_key(made), delta)
        except NotAnInteger as exc:
            raise TypeError(f"cannot incr {made!r}: {exc}") from None
        if number is None:
            raise ValueError(f"Key '{made}' not found")
        return number

    def _host_local(self, client, what, key, *args):
        """Client.add/incr/touch: atomic on one host. A host with peers has no atomic form:
        there it is done as Django's base class does it, with a get and a set."""
        if not client.clustered:
            return getattr(client, what)(self.group, key, *args)
        data = self._peek(client, key)
        if what == "add":
            if data is not None:
                return False
            client.set(self.group, key, args[0], args[1])
            return True
        if data is None:
            return False if what == "touch" else None
        if what == "touch":
            client.set(self.group, key, data, args[0])
            return True
        number = decimal_value(data) + args[0]
        client.set(self.group, key, b"%d" % number)
        return number

    def delete(self, key, version=None):
        return self._run(self._delete, self._key(key, version))

    def _delete(self, client, key):
        return client.delete(self.group, key)

    def delete_many(self, keys, version=None):
        for key in keys:
            self.delete(key, version)

    def clear(self):
        self._run(Client.clear, self.group)

    def close(self, **kwargs):
        """Nothing to do: Django calls this after every request, and the process keeps its
        mapping of the segment for the next one (the segment is never removed here)."""


def _async_form(name):
    sync_name = name[1:]

    async def method(self, *args, **kwargs):
        sync = getattr(self, sync_name)
        if self._direct:
            return sync(*args, **kwargs)
        return await sync_to_async(sync, thread_sensitive=True)(*args, **kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = (f"``{sync_name}()``, called directly in embedded mode (a short "
                      f"shared-memory operation), in a thread in host mode.")
    return method


for _name in ("aadd", "aget", "aset", "atouch", "adelete", "aget_many", "aget_or_set",
              "ahas_key", "aincr", "adecr", "aset_many", "adelete_many", "aclear",
              "aincr_version", "adecr_version", "aclose"):
    setattr(ShmCache, _name, _async_form(_name))
del _name
