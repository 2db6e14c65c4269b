"""Singleflight: one load per key, however many callers, across every process of the host.

Two layers:

* ``Flights`` (in-process): the first thread to miss a key runs the load; later threads of
  the same process get the same ``concurrent.futures.Future``.
* ``HostFlights`` (cross-process): that one thread per process then meets the other
  processes in the in-flight table in the arena. The first to claim a slot for the key loads;
  the others wait. The loader holds an OFD lock on the slot's lock byte for as long as it
  loads, so the kernel tells waiters when it is done *or dead*.

The table is open-addressed: a key's slots are the PROBE slots from its hash. Every slot
change happens under the arena's write lock (``Store.locked``), so claim, join and finish are
each atomic with respect to each other. The interleavings that matter:

  claim vs claim   A and B miss K. A takes the write lock, finds no LOADING slot for K,
                   takes slot S's lock byte, writes LOADING, unlocks. B takes the write lock
                   after, finds S LOADING for K, joins (waiters += 1). One load.
  store vs claim   A stores K's value, then marks S done. B, claiming later, re-reads the
                   cache under the write lock first, so it sees the value, not a free slot
                   (or the remembered not-found A stored instead: B answers NotFound).
  finish vs join   A marks S done under the write lock; a joiner after that finds no LOADING
                   slot and claims afresh (a new load: "the next get retries" after an error).
  loader dies      the kernel drops A's byte lock; waiter W's poll takes it, sees S still
                   LOADING with the ticket it joined: A died. W rewrites S's pid (under the
                   write lock) and loads, still holding the byte, so the other waiters keep
                   waiting, now for W.

A waiter must never poll a byte its own process holds (OFD locks do not exclude their own
open file description): ``_held`` lists the slots this process is loading.

The in-flight slot (INFLIGHT, one per slot) and the slots' lock bytes (INFLIGHT_LOCK_BASE)
are declared in layout.py.

A flush of the group moves its generation on (lru_index.py); a slot keeps the low 32 bits
of the generation its load was claimed in. A load claimed before the flush stores nothing
(group.py), and a claim after it does not join that load: it claims a slot of its own, so
gets after a flush neither wait for a load from before it nor share its answer.
"""

import asyncio
import contextlib
import logging
import os
import threading
import time

import xxhash

from .errors import LoadError, LoadTimeout, NotFound
from .layout import (INFLIGHT, INFLIGHT_ERROR_BYTES, INFLIGHT_LOCK_BASE,
                     INFLIGHT_SLOT_BYTES, INFLIGHT_SLOTS)
from .reader import NOT_FOUND

log = logging.getLogger("shmcache")

FREE, LOADING, DONE_OK, DONE_NOT_FOUND, DONE_ERROR = range(5)
PROBE = 16                        # slots a key may use
STALE_AFTER = 60.0                # seconds after which a finished slot is reused regardless
POLL_MIN, POLL_MAX = 0.0005, 0.01  # waiter poll interval, seconds

_SLOT = INFLIGHT.struct("state", "elen")
_CLAIM = INFLIGHT.struct("state", "waiters")      # a take-over rewrites these at once
_STATE = INFLIGHT.struct("state")
_GENERATION = INFLIGHT.struct("generation")
_WAITERS = INFLIGHT.struct("waiters")
_ELEN = INFLIGHT.struct("elen")
_CHANGED = INFLIGHT.struct("changed")
_KEY_OFF, _GENERATION_OFF = INFLIGHT.key, INFLIGHT.generation
_ERROR_OFF, _ERROR_MAX = INFLIGHT.error, INFLIGHT_ERROR_BYTES
_STATE_OFF, _WAITERS_OFF = INFLIGHT.state, INFLIGHT.waiters
_ELEN_OFF, _CHANGED_OFF = INFLIGHT.elen, INFLIGHT.changed


class Flights:
    """In-process singleflight: ``run(key, fn)`` returns a Future shared by concurrent callers."""

    def __init__(self):
        self._lock = threading.Lock()       # guards _flights
        self._flights = {}

    def run(self, key, submit):
        """The Future for ``key``; ``submit()`` starts a new one only if none is in flight."""
        with self._lock:
            future = self._flights.get(key)
            if future is not None:
                return future
            future = submit()
            self._flights[key] = future
        future.add_done_callback(lambda _f: self._forget(key, future))
        return future

    def _forget(self, key, future):
        with self._lock:
            if self._flights.get(key) is future:
                del self._flights[key]

    def __len__(self):
        return len(self._flights)


class HostFlights:
    """The cross-process layer over the arena's in-flight table."""

    def __init__(self, store, load_timeout=30.0):
        self.store = store
        self.buf = store.buf
        self.base = store.arena.layout.inflight_off
        self.load_timeout = load_timeout
        self._held = set()                  # slots this process is loading; guarded by _guard
        self._guard = threading.Lock()
        self._tickets = 0                   # claims made by this process

    def load(self, gid, key, loader):
        """Value for ``key`` (bytes) in group ``gid``: from the cache if someone just stored it,
        from another process's load, or from ``loader()`` run here. ``loader`` stores what it
        loads before returning. NotFound / LoadError from whichever process loaded."""
        for _attempt in range(3):
            action, slot, ticket, value = self.store.locked(self._claim_or_join, gid, key)
            if action == "hit":
                return value
            if action == "not_found":
                raise _remembered(key)
            if action == "untracked":            # table full: load without host-wide dedup
                return loader()
            if action == "wait":
                outcome = self._wait(slot, ticket, gid, key)
                if outcome is _RETRY:
                    continue
                if outcome is _LOAD_HERE:       # the shared result is already gone
                    return loader()
                if outcome is not _TAKE_OVER:
                    return outcome
            with self._loading(slot, ticket):
                return loader()
        return loader()

    def load_unless_loading(self, gid, key, loader):
        """``load``, for a caller that need not wait for the value (a background refresh):
        if a load of ``key`` is in flight on the host already, leave it to that one and
        return None. (A load claimed just after the look is joined, as ``load`` joins.)"""
        if self.waiting(gid, key) is not None:
            return None
        return self.load(gid, key, loader)

    async def aload(self, gid, key, loader):
        """``load`` for a coroutine: ``await loader()`` loads, and waiting for another
        process's load polls on the running loop (asyncio.sleep), never blocking it. The
        claim and the collect are short write-lock steps, as in ``load``. Whoever calls this
        must not have two loads of one key in flight in one process (the caller's own
        in-process singleflight sees to that): a process never waits for its own slot."""
        for _attempt in range(3):
            action, slot, ticket, value = self.store.locked(self._claim_or_join, gid, key)
            if action == "hit":
                return value
            if action == "not_found":
                raise _remembered(key)
            if action == "untracked":
                return await loader()
            if action == "wait":
                outcome = await self._await(slot, ticket, gid, key)
                if outcome is _RETRY:
                    continue
                if outcome is _LOAD_HERE:
                    return await loader()
                if outcome is not _TAKE_OVER:
                    return outcome
            with self._loading(slot, ticket):
                return await loader()
        return await loader()

    def waiting(self, gid, key):
        """How many processes wait for the load of ``key`` in flight now; None if no load of
        it is in flight. A lock-free look, for figures and tests."""
        loading = self._loading_slot(gid, key, self._slots(gid, key), self._generation(gid))
        return None if loading is None else loading[3]

    # -- loading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _loading(self, slot, ticket):
        """Around our load of ``slot`` (we hold its byte lock, and it is in ``_held``):
        publish how the load ended for the waiters, then let go of the byte."""
        state, message = DONE_ERROR, "load did not finish"
        try:
            yield
            state, message = DONE_OK, ""
        except NotFound as exc:
            state, message = DONE_NOT_FOUND, str(exc)
            raise
        except LoadError as exc:
            message = str(exc)
            raise
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            raise
        except BaseException as exc:           # cancelled, interrupted
            message = f"load did not finish ({type(exc).__name__})"
            raise
        finally:
            self._release(slot, ticket, state, message)

    def _release(self, slot, ticket, state, message):
        try:
            self.store.locked(self._finish, slot, ticket, state, message)
        finally:
            with self._guard:
                self._held.discard(slot)
            self.store.lock_file.unlock_byte(INFLIGHT_LOCK_BASE + slot)

    def _wait(self, slot, ticket, gid, key):
        """Poll the slot's byte lock until the loader finishes or dies. Returns the value,
        raises its error, or returns _TAKE_OVER (the loader died: we hold the byte and load),
        _LOAD_HERE (the value was stored and is gone again) or _RETRY (slot reused)."""
        deadline = time.monotonic() + self.load_timeout
        delay = POLL_MIN
        while True:
            outcome = self._poll(slot, ticket, gid, key, deadline)
            if outcome is not _PENDING:
                return outcome
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    async def _await(self, slot, ticket, gid, key):
        """``_wait`` on the running loop."""
        deadline = time.monotonic() + self.load_timeout
        delay = POLL_MIN
        while True:
            outcome = self._poll(slot, ticket, gid, key, deadline)
            if outcome is not _PENDING:
                return outcome
            try:
                await asyncio.sleep(delay)
            except BaseException:               # cancelled: no longer a waiter
                self.store.locked(self._leave, slot, ticket)
                raise
            delay = min(delay * 2, POLL_MAX)

    def _poll(self, slot, ticket, gid, key, deadline):
        """One look at the slot: _PENDING while the loader is still at it, else what
        ``_wait`` returns. LoadTimeout (and no longer a waiter) past ``deadline``."""
        lock_file = self.store.lock_file
        byte = INFLIGHT_LOCK_BASE + slot
        with self._guard:
            ours = slot in self._held           # never the case by design; see module doc
        if not ours and lock_file.try_lock_byte(byte):
            try:
                outcome = self.store.locked(self._collect, slot, ticket)
            except BaseException:
                lock_file.unlock_byte(byte)
                raise
            if outcome is _TAKE_OVER:
                return outcome                   # keep the byte: we are the loader now
            lock_file.unlock_byte(byte)
            if outcome is _RETRY:
                return outcome
            state, message = outcome
            if state == DONE_OK:
                value = self.store.locked(self.store.index.lookup_locked, gid, key, time.time())
                return _LOAD_HERE if value is None else value
            if state == DONE_NOT_FOUND:
                raise NotFound(message)
            raise LoadError(message)
        if time.monotonic() > deadline:
            self.store.locked(self._leave, slot, ticket)
            raise LoadTimeout(f"timed out after {self.load_timeout:.0f}s waiting for "
                              f"another process to load {key!r}")
        return _PENDING

    # -- table operations (write lock held) --------------------------------------------------

    def _slots(self, gid, key):
        start = xxhash.xxh3_64_intdigest(key, gid) % INFLIGHT_SLOTS
        return [(start + step) % INFLIGHT_SLOTS for step in range(PROBE)]

    def _claim_or_join(self, gid, key):
        value = self.store.index.lookup_locked(gid, key, time.time(), negative=NOT_FOUND)
        if value is NOT_FOUND:                   # remembered: the getter said no such key
            return "not_found", None, None, None
        if value is not None:
            return "hit", None, None, value
        buf, now = self.buf, time.time()
        slots = self._slots(gid, key)
        generation = self._generation(gid)
        loading = self._loading_slot(gid, key, slots, generation)   # loading it already?
        if loading is not None:
            slot, offset, ticket, waiters = loading
            _WAITERS.pack_into(buf, offset + _WAITERS_OFF, waiters + 1)
            return "wait", slot, ticket, None
        for slot in slots:                       # no: claim one
            offset = self.base + slot * INFLIGHT_SLOT_BYTES
            state, _pid, _t, changed, waiters, _g, _k, _e = _SLOT.unpack_from(buf, offset + _STATE_OFF)
            if self._claimable(slot, state, waiters, changed, now):
                with self._guard:               # before the write lock goes: no other thread
                    self._held.add(slot)         # of ours may take this slot for its own
                ticket = self._next_ticket()
                buf[offset + _KEY_OFF:offset + _KEY_OFF + len(key)] = key
                _GENERATION.pack_into(buf, offset + _GENERATION_OFF, generation)
                _SLOT.pack_into(buf, offset + _STATE_OFF, FREE, os.getpid(), ticket, now, 0, gid, len(key), 0)
                _STATE.pack_into(buf, offset + _STATE_OFF, LOADING)      # last: now others can join
                return "load", slot, ticket, None
        log.warning("in-flight table full around %r: loading without host-wide dedup", key)
        return "untracked", None, None, None

    def _loading_slot(self, gid, key, slots, generation):
        """(slot, offset, ticket, waiters) of the load of ``key`` in flight since the
        group's ``generation`` began, or None."""
        buf = self.buf
        for slot in slots:
            offset = self.base + slot * INFLIGHT_SLOT_BYTES
            state, _pid, ticket, _c, waiters, slot_gid, klen, _e = _SLOT.unpack_from(buf, offset + _STATE_OFF)
            if (state == LOADING and slot_gid == gid and klen == len(key)
                    and buf[offset + _KEY_OFF:offset + _KEY_OFF + klen] == key
                    and _GENERATION.unpack_from(buf, offset + _GENERATION_OFF)[0] == generation):
                return slot, offset, ticket, waiters
        return None

    def _generation(self, gid):
        return self.store.index.generation(gid) & 0xFFFFFFFF

    def _claimable(self, slot, state, waiters, changed, now):
        """May ``slot`` be claimed? If so we now hold its byte lock.

        A finished slot whose waiters have not all read the result is kept (for STALE_AFTER at
        most: a waiter may have died). A LOADING slot whose byte lock is free has a dead
        loader; with waiters, they are about to take over, so it is kept as well."""
        if state != FREE and waiters and now - changed < STALE_AFTER:
            return False
        with self._guard:
            if slot in self._held:
                return False
        return self.store.lock_file.try_lock_byte(INFLIGHT_LOCK_BASE + slot)

    def _next_ticket(self):
        self._tickets += 1                       # write lock held: no race
        return (os.getpid() << 32 | self._tickets) & 0xFFFFFFFFFFFFFFFF

    def _finish(self, slot, ticket, state, message):
        buf = self.buf
        offset = self.base + slot * INFLIGHT_SLOT_BYTES
        current, _pid, slot_ticket, _c, waiters, _g, _k, _e = _SLOT.unpack_from(buf, offset + _STATE_OFF)
        if slot_ticket != ticket or current != LOADING:
            return
        encoded = message.encode()[:_ERROR_MAX]
        buf[offset + _ERROR_OFF:offset + _ERROR_OFF + len(encoded)] = encoded
        _ELEN.pack_into(buf, offset + _ELEN_OFF, len(encoded))
        _CHANGED.pack_into(buf, offset + _CHANGED_OFF, time.time())
        _STATE.pack_into(buf, offset + _STATE_OFF, state if waiters else FREE)

    def _collect(self, slot, ticket):
        """A waiter holding the byte lock reads the outcome (and stops counting as a waiter),
        or finds the loader dead and takes the load over."""
        buf = self.buf
        offset = self.base + slot * INFLIGHT_SLOT_BYTES
        state, _pid, slot_ticket, _c, waiters, _g, _k, elen = _SLOT.unpack_from(buf, offset + _STATE_OFF)
        if slot_ticket != ticket:
            return _RETRY
        waiters = max(0, waiters - 1)
        if state == LOADING:
            log.warning("loader pid %d of %r died; pid %d takes over", _pid,
                        bytes(buf[offset + _KEY_OFF:offset + _KEY_OFF + _k]), os.getpid())
            _CLAIM.pack_into(buf, offset + _STATE_OFF, LOADING, os.getpid(), ticket, time.time(),
                             waiters)
            with self._guard:
                self._held.add(slot)
            return _TAKE_OVER
        message = bytes(buf[offset + _ERROR_OFF:offset + _ERROR_OFF + elen]).decode(errors="replace")
        _WAITERS.pack_into(buf, offset + _WAITERS_OFF, waiters)
        if not waiters:
            _STATE.pack_into(buf, offset + _STATE_OFF, FREE)
        return state, message

    def _leave(self, slot, ticket):
        offset = self.base + slot * INFLIGHT_SLOT_BYTES
        state, _pid, slot_ticket, _c, waiters, _g, _k, _e = _SLOT.unpack_from(self.buf, offset + _STATE_OFF)
        if slot_ticket == ticket and waiters:
            _WAITERS.pack_into(self.buf, offset + _WAITERS_OFF, waiters - 1)


_TAKE_OVER, _LOAD_HERE, _RETRY, _PENDING = object(), object(), object(), object()  # _poll's


def _remembered(key):
    return NotFound(f"{bytes(key).decode(errors='replace')[:100]} does not exist "
                    f"(remembered not-found)")

