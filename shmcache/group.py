"""Groups: a named keyspace with a loader (the getter), a byte budget and a TTL; and where a
supervisor gets its groups from (``--app``, ``--origin``, or the built-in demo)."""

import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from .errors import InvalidArgument, LoadError, NotFound, ValueTooLarge
from .units import parse_size
from .validate import GROUP_NAME_RULE, is_group_name, is_seconds
from .validate import GROUP_NAME  # noqa: F401 (its old home)

DEFAULT_CACHE_BYTES = 64 << 20
DEMO_SCORES = {"Tom": b"630", "Jack": b"589", "Sam": b"567"}

log = logging.getLogger("shmcache")


class Group:
    """A cache namespace, as in groupcache.

    ``getter(key: str) -> bytes | str`` loads a missing key; it raises KeyError when the key
    does not exist. ``cache_bytes`` bounds key + value bytes held for the group on each host.
    ``ttl`` (seconds) bounds how long a loaded or set value is served; None = until evicted.
    ``stale`` (seconds; None or 0 = off) serves a value for that much longer past its ttl
    while one load per host reloads it in the background (stale-while-revalidate); if the
    reload fails, the old value is served on until the window ends (stale-if-error). It
    applies to entries that expire: those of a group with a ``ttl``, or set with one.
    ``not_found_ttl`` (seconds; None = off) remembers a getter's KeyError that long, for
    every process of the host: gets of the key answer not-found without calling the
    getter until then, or until a set or delete of the key.
    """

    def __init__(self, name: str, cache_bytes: int | str = DEFAULT_CACHE_BYTES,
                 getter: Callable[[str], bytes | str] | None = None,
                 ttl: float | None = None, stale: float | None = None,
                 not_found_ttl: float | None = None) -> None:
        if not is_group_name(name):
            raise InvalidArgument(f"bad group name {name!r}: {GROUP_NAME_RULE}")
        if getter is not None and not callable(getter):
            raise TypeError(f"getter of group {name!r} is not callable")
        self.name = name
        self.cache_bytes = parse_size(cache_bytes)
        self.getter = getter
        for option, seconds in (("ttl", ttl), ("not_found_ttl", not_found_ttl)):
            if seconds is not None and not is_seconds(seconds):
                raise InvalidArgument(f"{option} of group {name!r} must be positive seconds "
                                      f"or None")
        self.ttl = ttl
        if stale is not None and not is_seconds(stale, zero=True):
            raise InvalidArgument(f"stale of group {name!r} must be seconds (0 or None: off)")
        self.stale = stale or None
        self.not_found_ttl = not_found_ttl
        self._failures = FailureLog(name)

    def __repr__(self):
        return (f"Group({self.name!r}, cache_bytes={self.cache_bytes}, ttl={self.ttl}, "
                f"stale={self.stale}, not_found_ttl={self.not_found_ttl})")

    def load_into(self, store, key: str) -> bytes:
        """Call the getter (``load``) and keep its answer in ``store``: the value, with the
        group's TTL, or, with ``not_found_ttl``, the fact that the key does not exist. Returns
        the value or raises as ``load``. A value too large for the store is returned, not kept.

        The group's generation is read before the getter runs and the answer is kept only
        if it is unchanged: a clear (a flush) of the group while the getter ran means the
        answer may predate the clear, and it must not outlive it::

            loader: g = generation ... getter runs ........ lock: generation == g? store
            flush:              lock: generation += 1, drop every entry; unlock; answer

        The loader's lock step comes after the flush's: generation != g, nothing stored.
        A getter that starts after the flush's lock step reads the new generation, and
        its answer is one asked for after the flush began."""
        generation = store.generation(self.name)
        try:
            value = self.load(key)
        except NotFound:
            if self.not_found_ttl:
                store.remember_not_found(self.name, key, self.not_found_ttl, generation)
            raise
        try:
            store.set(self.name, key, value, generation=generation)   # the group's TTL
        except ValueTooLarge as exc:
            log.info("not caching %s/%s: %s", self.name, key[:100], exc)
        return value

    def load(self, key: str) -> bytes:
        """Call the getter: bytes, or NotFound (KeyError) / LoadError (anything else)."""
        if self.getter is None:
            raise NotFound(f"group {self.name!r} has no getter; {key!r} is not cached")
        try:
            value = self.getter(key)
        except KeyError:
            raise NotFound(f"{self.name}/{key} does not exist") from None
        except Exception as exc:
            self._failures.report(key, exc)
            raise LoadError(f"getter of {self.name!r} failed for {key!r}: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        self._failures.report(key, None, f"returned {type(value).__name__}, expected bytes or str")
        raise LoadError(f"getter of {self.name!r} returned {type(value).__name__} for {key!r}; "
                        f"expected bytes or str")


class FailureLog:
    """Logs a group's getter failures at ERROR, with their tracebacks, at most BURST per
    WINDOW seconds in each process; the failures beyond are counted and summed up in one line
    when the window ends, so a broken database cannot flood the log. Thread-safe."""
    BURST = 5
    WINDOW = 60.0

    def __init__(self, group):
        self.group = group
        self._lock = threading.Lock()   # guards the three fields below
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def report(self, key, exc, problem=None):
        """Log (or count) one failure: ``exc`` raised by the getter, or ``problem`` described."""
        now = time.monotonic()
        with self._lock:
            suppressed = 0
            if now - self._window_start >= self.WINDOW:
                suppressed, self._suppressed = self._suppressed, 0
                self._window_start, self._logged = now, 0
            if self._logged >= self.BURST:
                self._suppressed += 1
                return
            self._logged += 1
            last = self._logged == self.BURST
        if suppressed:
            log.error("group %s: %d more getter failures were not logged in the last %.0f s",
                      self.group, suppressed, self.WINDOW)
        if exc is None:
            log.error("group %s: getter for key %r %s", self.group, key[:200], problem)
        else:
            log.error("group %s: getter failed for key %r", self.group, key[:200],
                      exc_info=(type(exc), exc, exc.__traceback__))
        if last:
            log.error("group %s: %d getter failures within %.0f s; logging no more until the "
                      "window ends", self.group, self.BURST, self.WINDOW)


def demo_groups():
    """The built-in demo: group ``scores`` with Tom, Jack and Sam."""
    def load_score(key):
        return DEMO_SCORES[key]
    return [Group("scores", DEFAULT_CACHE_BYTES, load_score)]


class OriginGetter:
    """Loads ``<origin>/<key>`` over HTTP. One requests.Session per process, made on first use
    (sessions are not fork-safe). 404 -> KeyError; any other failure -> an exception."""

    def __init__(self, url, connect_timeout=2.0, read_timeout=10.0):
        self.url = url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self._session = None
        self._pid = None

    def __call__(self, key):
        import requests
        if self._pid != os.getpid():
            self._session, self._pid = requests.Session(), os.getpid()
        url = f"{self.url}/{quote(key, safe='/')}"
        response = self._session.get(url, timeout=self.timeout)
        if response.status_code == 404:
            raise KeyError(key)
        if response.status_code != 200:
            raise RuntimeError(f"origin answered {response.status_code} for {url}")
        return response.content


def origin_group(url, cache_bytes=DEFAULT_CACHE_BYTES, ttl=None):
    if not url.startswith(("http://", "https://")):
        raise InvalidArgument(f"--origin must be an http:// or https:// URL, not {url!r}")
    return Group("origin", cache_bytes, OriginGetter(url), ttl)


class AppError(Exception):
    """The --app groups could not be loaded; the message says why."""


def load_app(spec):
    """Groups from ``MODULE:ATTR``: an iterable of Group, or a callable returning one."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise AppError(f"--app must look like MODULE:ATTR, not {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())          # like gunicorn: apps next to where you run
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise AppError(f"cannot import {module_name!r} for --app {spec}: "
                       f"{type(exc).__name__}: {exc}") from exc
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise AppError(f"module {module_name!r} has no attribute {attr!r}") from None
    try:
        groups = list(target() if callable(target) else target)
    except Exception as exc:
        raise AppError(f"--app {spec} failed: {type(exc).__name__}: {exc}") from exc
    return check_groups(groups, f"--app {spec}")


def check_groups(groups, source):
    names = set()
    for group in groups:
        if not isinstance(group, Group):
            raise AppError(f"{source} yielded {type(group).__name__}, expected shmcache.Group")
        if group.name in names:
            raise AppError(f"{source} defines group {group.name!r} twice")
        names.add(group.name)
    if not groups:
        raise AppError(f"{source} defines no groups")
    return groups
