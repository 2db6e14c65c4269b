"""``@cache.memoize(group, ttl=None)``: a function's results cached in the host's arena,
with one call per arguments across every process of the host.

**The key** of a call is ``<module>.<qualname>:<hash>``: the function's qualified name,
then the XXH3-128 hash (hex) of a canonical encoding of its arguments, bound to the
function's signature with defaults applied, so ``f(1)``, ``f(x=1)`` and ``f(1, y=2)`` (with
``y=2`` the default) are one call. The encoding depends on values only (never on ``id``,
``hash()`` or ``repr`` of arbitrary objects), so a key is the same in every process and
after a restart, whatever PYTHONHASHSEED. Arguments may be None, bool, int, float, complex,
str, bytes (or bytearray), tuple, list, dict, set (or frozenset), Enum members, Decimal,
Fraction, UUID, datetime/date/time/timedelta and pathlib paths, nested; values of different
types are different calls (``f(1)`` and ``f(1.0)`` each run). Anything else is a TypeError
naming the argument: pass ``key=`` a function of the same arguments that returns such a
value (``key=lambda user: user.id``). A name over 160 bytes is shortened with a hash.

**Results** are serialized with pickle (``serializer=`` takes any object with ``dumps`` and
``loads``, e.g. the json module) and stored with ``ttl`` seconds (None: the group's TTL).
A result too large for the group is returned but not cached.

**One call per arguments**, in two layers, as the front does for gets (singleflight.py):
threads of one process (or tasks of one event loop) share one call in flight; that call
meets the other processes of the host in the arena's in-flight table, so one process runs
the function and the others wait for its result, whether or not a supervisor runs.

**Exceptions** are not cached. Callers in the process that ran the function get the
exception it raised; callers waiting in other processes get a LoadError naming its type and
message. The next call runs the function again.

The cache is the host's: on a host with peers, results are kept by the host that computed
them, and ``f.invalidate(*args)`` deletes the entry on every host.
"""

import asyncio
import contextlib
import datetime
import decimal
import enum
import fractions
import functools
import inspect
import pathlib
import pickle
import threading
import types
import uuid
import weakref
from concurrent.futures import Future

import xxhash

from .errors import InvalidArgument, LoadError, ValueTooLarge
from .lru_index import encode_key
from .store import check_ttl

MAX_NAME_BYTES = 160        # of the key's name part; 160 + ":" + 32 hex digits < 250


class PickleSerializer:
    """The default: pickle at its highest protocol."""

    @staticmethod
    def dumps(value):
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    loads = staticmethod(pickle.loads)


# -- keys ------------------------------------------------------------------------------------

def _encode(value, out):
    """Append a canonical, type-tagged encoding of ``value`` to the list ``out``."""
    kind = type(value)
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif isinstance(value, enum.Enum):          # before int and str: IntEnum, StrEnum
        out.append(b"e%s.%s:" % (kind.__module__.encode(), kind.__qualname__.encode()))
        _encode(value.value, out)
    elif isinstance(value, int):
        out.append(b"i%d;" % value)
    elif isinstance(value, float):
        out.append(b"f" + value.hex().encode() + b";")
    elif isinstance(value, complex):
        out.append(b"c" + value.real.hex().encode() + b"," + value.imag.hex().encode() + b";")
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(data))
        out.append(data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out.append(b"b%d:" % len(data))
        out.append(data)
    elif isinstance(value, (tuple, list)):
        out.append(b"(" if isinstance(value, tuple) else b"[")
        for item in value:
            _encode(item, out)
        out.append(b")")
    elif isinstance(value, dict):
        items = sorted((_encoded(k), _encoded(v)) for k, v in value.items())
        out.append(b"{%d:" % len(items))
        for k, v in items:
            out.append(k)
            out.append(v)
        out.append(b"}")
    elif isinstance(value, (set, frozenset)):
        items = sorted(_encoded(item) for item in value)
        out.append(b"<%d:" % len(items))
        out.extend(items)
        out.append(b">")
    else:
        text = _scalar_text(value)
        if text is None:
            raise TypeError(f"cannot build a cache key from a {kind.__module__}."
                            f"{kind.__qualname__} value")
        out.append(b"x%s.%s:" % (kind.__module__.encode(), kind.__qualname__.encode()))
        _encode(text, out)


def _scalar_text(value):
    """Text that identifies a value of one of the other supported types, else None."""
    if isinstance(value, (decimal.Decimal, fractions.Fraction, uuid.UUID, pathlib.PurePath)):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return f"{value.days},{value.seconds},{value.microseconds}"
    return None


def _encoded(value):
    out = []
    _encode(value, out)
    return b"".join(out)


def function_name(func):
    """``<module>.<qualname>``, shortened with a hash past MAX_NAME_BYTES."""
    name = f"{func.__module__}.{func.__qualname__}"
    if len(name.encode()) > MAX_NAME_BYTES:
        tail = xxhash.xxh3_64_hexdigest(name.encode())
        name = name.encode()[:MAX_NAME_BYTES - 17].decode(errors="ignore") + "~" + tail
    return name


# -- the decorated function ------------------------------------------------------------------

class _Memoized:
    """What ``memoize`` puts in place of the function: call it as the function."""

    def __init__(self, client, func, group, ttl, serializer, key):
        functools.update_wrapper(self, func)
        self._client = client
        self._func = func
        self._group = group
        self._ttl = ttl
        self._serializer = serializer
        self._key_function = key
        self._name = function_name(func)
        self._signature = inspect.signature(key if key is not None else func)

    def __get__(self, instance, owner=None):
        """Decorating a method binds like a function does."""
        return self if instance is None else types.MethodType(self, instance)

    def key(self, *args, **kwargs) -> str:
        """The cache key of a call with these arguments (see the module's doc)."""
        if self._key_function is not None:
            values = ("key", self._key_function(*args, **kwargs))
        else:
            try:
                bound = self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self._name}(): {exc}") from None
            bound.apply_defaults()
            values = tuple(bound.arguments.items())
        try:
            encoded = _encoded(values)
        except TypeError as exc:
            raise TypeError(f"{self._name}(): {exc}; pass memoize(..., key=...) a function of "
                            f"the same arguments that returns a value it can encode") from None
        return f"{self._name}:{xxhash.xxh3_128_hexdigest(encoded)}"

    def invalidate(self, *args, **kwargs) -> bool:
        """Drop the cached result of a call with these arguments (on every host of a
        cluster); True if it was cached here."""
        return self._client.delete(self._group, self.key(*args, **kwargs))

    def _cached(self, key):
        """The cached result, or _MISS."""
        data = self._client.peek(self._group, key)
        return _MISS if data is None else self._serializer.loads(data)

    @contextlib.contextmanager
    def _running(self, ran):
        """Around the function's run: an exception it raises is noted in ``ran`` and goes
        on as a LoadError naming it (what the other processes' waiters get)."""
        try:
            yield
        except Exception as exc:
            ran.append((False, exc))
            raise self._failed(exc) from exc

    def _store_result(self, store, key, result, ran, generation):
        """Note ``result`` in ``ran``, serialize and cache it unless the group was cleared
        since ``generation`` was read, before the call (its result may predate the clear:
        see Group.load_into); the bytes, for the other processes' waiters."""
        ran.append((True, result))
        data = self._serializer.dumps(result)
        if isinstance(data, str):
            data = data.encode()
        try:
            store.set(self._group, key, data, ttl=self._ttl, generation=generation)
        except ValueTooLarge:
            pass                                  # answered, not cached
        return data

    def _failed(self, exc):
        return LoadError(f"{self._name} raised {type(exc).__name__}: {exc}")

    def _flight(self, key):
        """(store, HostFlights, group id, encoded key) for a load of ``key``."""
        store = self._client._live_store()
        return (store, self._client._host_flights(store), store.group_id(self._group),
                encode_key(key))


class SyncMemoized(_Memoized):

    def __init__(self, *args):
        super().__init__(*args)
        self._lock = threading.Lock()             # guards _in_flight
        self._in_flight = {}                      # key -> Future of this process's call

    def __call__(self, *args, **kwargs):
        key = self.key(*args, **kwargs)
        result = self._cached(key)
        if result is not _MISS:
            return result
        with self._lock:
            future = self._in_flight.get(key)
            ours = future is None
            if ours:
                future = self._in_flight[key] = Future()
                future.joined = 0                 # threads waiting for it, for figures
            else:
                future.joined += 1
        if not ours:
            return future.result()                # the result, or the exception, of ours
        try:
            result = self._load(key, args, kwargs)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del self._in_flight[key]

    def _load(self, key, args, kwargs):
        store, flights, gid, data_key = self._flight(key)
        ran = []                # [(True, result)] or [(False, exception)] if it ran here

        def load_and_store():
            generation = store.generation(self._group)
            with self._running(ran):
                result = self._func(*args, **kwargs)
            return self._store_result(store, key, result, ran, generation)
        try:
            data = flights.load(gid, data_key, load_and_store)
        except LoadError:
            if not ran:
                raise
        return _outcome(ran) if ran else self._serializer.loads(data)


class AsyncMemoized(_Memoized):

    def __init__(self, *args):
        super().__init__(*args)
        self._lock = threading.Lock()             # guards _in_flight (loops of other threads)
        self._in_flight = weakref.WeakKeyDictionary()   # loop -> {key: Task}

    async def __call__(self, *args, **kwargs):
        key = self.key(*args, **kwargs)
        result = self._cached(key)
        if result is not _MISS:
            return result
        loop = asyncio.get_running_loop()
        with self._lock:
            tasks = self._in_flight.setdefault(loop, {})
        task = tasks.get(key)
        if task is None:
            task = tasks[key] = loop.create_task(self._load(key, args, kwargs))
            task.add_done_callback(functools.partial(_forget, tasks, key))
        # A waiter that is cancelled stops waiting; the call goes on for the others.
        return await asyncio.shield(task)

    async def _load(self, key, args, kwargs):
        store, flights, gid, data_key = self._flight(key)
        ran = []

        async def load_and_store():
            generation = store.generation(self._group)
            with self._running(ran):
                result = await self._func(*args, **kwargs)
            return self._store_result(store, key, result, ran, generation)
        try:
            data = await flights.aload(gid, data_key, load_and_store)
        except LoadError:
            if not ran:
                raise
        return _outcome(ran) if ran else self._serializer.loads(data)


def _outcome(ran):
    """What the function returned here, or the exception it raised, raised again."""
    returned, outcome = ran[0]
    if not returned:
        raise outcome
    return outcome


def _forget(tasks, key, task):
    if tasks.get(key) is task:
        del tasks[key]
    if not task.cancelled():
        task.exception()                          # retrieved, even if every waiter left


_MISS = object()


def memoize(client, group, ttl=None, *, serializer=None, key=None):
    """The decorator behind ``Client.memoize``."""
    ttl = check_ttl(ttl)
    if not isinstance(group, str) or not group:
        raise InvalidArgument(f"group must be a group's name, not {group!r}")
    serializer = serializer if serializer is not None else PickleSerializer
    if not (callable(getattr(serializer, "dumps", None))
            and callable(getattr(serializer, "loads", None))):
        raise InvalidArgument("serializer must have dumps(value) and loads(bytes)")
    if key is not None and not callable(key):
        raise InvalidArgument("key must be a function of the memoized function's arguments")

    def decorate(func):
        if not callable(func):
            raise InvalidArgument(f"memoize decorates a function, not {func!r}")
        kind = AsyncMemoized if inspect.iscoroutinefunction(func) else SyncMemoized
        return kind(client, func, group, ttl, serializer, key)
    return decorate
