"""Safe access to one arena from any thread of any process: the write lock, journal steps,
crash repair, and key/value checks. Reads are lock-free closures (reader.py).

**The write lock** is an OFD lock on byte WRITE_LOCK_BYTE of the segment file. While holding
it a writer marks the header word WRITER_PID with its pid and clears it when done, so:

    writer A: lock, WRITER_PID = A, journal step(s) ... [SIGKILL]   (kernel drops A's lock)
    writer B: lock (granted), sees WRITER_PID = A != 0 -> A died holding the lock:
              undo A's open step, make A's odd stripes even, then carry on.

B finds the mark set only if a previous holder died; a live holder never lets another in.
A Python exception inside a step takes the same repair path at once, in the same process.

**Dead segments.** Whoever removes or replaces a segment's name first marks it retired
under the write lock (arena.retire). A store whose ``verify_identity`` is set (connect()
clients) reads that mark under the write lock before each step commits; if set, the step is
undone and SegmentNotFound raised, so no write into a removed or replaced segment is
reported as done. A name removed by hand (``rm``) is not marked, nor is a segment whose
owner died before a new one replaced it: clients notice those at their watcher's next
check (attachment.py). **Diverting**: ``divert(detour)`` sends this store's lock-free
readers to ``detour(group, key)`` instead of its memory (a client that moved to a new
segment, or was closed); the readers pay nothing for it (reader.py).
"""

import logging
import os
import struct
import time

from .arena import Arena, pid_alive
from .atomic_ops import ReadModifyWrite
from .batch import chunks
from .errors import InvalidArgument, SegmentNotFound, UnknownGroup, ValueTooLarge
from .journal import Journal, JournalFull
from .layout import HEADER, OWNER_LOCK_BYTE, WRITE_LOCK_BYTE
from .locks import LockFile
from .lru_index import Index, encode_key
from .metrics import Counters
from .reader import NOT_FOUND, make_reader, native_writer
from .slabs import STATE_HOT, STATE_LIVE, STATE_NEGATIVE, Slabs
from .units import parse_size
from .validate import check_ttl, check_value_size, encode_value  # noqa: F401 (check_ttl: its old home)

log = logging.getLogger("shmcache")
_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")
# HEADER.writer_pid and HEADER.tx_active side by side (layout.py): one read per write.
_WRITER_AND_TX = HEADER.struct("writer_pid", "tx_active")
_WRITER_PID, _RETIRED, _REPAIRS = HEADER.writer_pid, HEADER.retired, HEADER.repairs
# This process's pid for the WRITER_PID mark (os.getpid() is a system call); set anew in a
# forked child before any of its code runs.
_this_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _this_pid.__setitem__(0, os.getpid()))
WRITE_LOCK_SPINS = 16       # tries before a writer sleeps for the lock (locks.ByteLock)
BATCH_CHUNK = 64            # keys a batch writes per hold of the write lock


class Store(ReadModifyWrite):
    """One process's handle on an arena. Thread-safe; re-opens its lock descriptor after fork."""
    arena = None
    lock_file = None
    counters = None
    verify_identity = False     # refuse, under the write lock, writes into a retired segment
    detour = None               # (group, key) -> value: where diverted readers go instead

    def __init__(self, arena):
        self.arena = arena
        self.buf = arena.buf
        self.journal = Journal(arena)
        self.slabs = Slabs(arena, self.journal)
        self.index = Index(arena, self.journal, self.slabs)
        writer = native_writer(self.index, JournalFull)
        if writer is not None:
            index = self.index
            index.native_writer, index._native_rewrite = writer, writer.rewrite
            index._native_insert = writer.insert
        # This process's descriptor for byte locks, opened through the mapped descriptor
        # rather than the name: the name may point to a newer segment by now.
        self.lock_file = LockFile(f"/proc/self/fd/{arena.fd}")
        self._write_lock = self.lock_file.byte_lock(WRITE_LOCK_BYTE, spins=WRITE_LOCK_SPINS)
        # name -> id; ids never change once defined. The readers look a group up here
        # first: while the store is diverted it stays empty, so every read takes the detour.
        self._group_ids = {}
        self.counters = Counters(self)
        # get(group, key) -> bytes | None: lock-free, one closure (see reader.py);
        # get_with_expiry(group, key) -> (bytes, expiry Unix time | None, hot) | None, or
        # NOT_FOUND for a remembered not-found (a getter's KeyError, not_found_ttl).
        counts = self.counters.values
        resolve, locked = self._reader_group_id, self._locked_get
        self.get = make_reader(self.index, self._group_ids, resolve, locked, counts,
                               detour=self._take_detour)
        # The Get path's reads: a hit counts, a miss is left to whoever answers it (node.py):
        # get_leaving_miss is a client's get (its miss goes to a front, or its own getter),
        # get_with_expiry a worker's (Node.get).
        self.get_leaving_miss = make_reader(self.index, self._group_ids, resolve, locked,
                                            counts, detour=self._take_detour_leaving_miss,
                                            count_misses=False)
        self.get_with_expiry = make_reader(self.index, self._group_ids, resolve, locked, counts,
                                           with_expiry=True, detour=self._refuse_detour,
                                           negative=NOT_FOUND, count_misses=False)
        # The same, uncounted: a second look inside one get must not count as another get.
        self.recheck = make_reader(self.index, self._group_ids, resolve, locked,
                                   [0] * len(counts), with_expiry=True,
                                   detour=self._refuse_detour, negative=NOT_FOUND)
        # get_stale: as recheck, but an entry past its expiry and within its group's stale
        # window is found too (its expiry, in the past, says so); a remembered not-found is
        # absent to it. Uncounted: the caller looks after a plain read missed, and counts
        # what it serves (node.stale_or_miss).
        self.get_stale = make_reader(self.index, self._group_ids, resolve, self._locked_get_stale,
                                     [0] * len(counts), with_expiry=True,
                                     detour=self._refuse_detour, stale=True)

    @classmethod
    def create(cls, name, memory, max_item_size=1 << 20, max_groups=64, before_publish=None):
        """Create and format a new segment; the caller owns it (close, then unlink).
        ``before_publish(store)`` runs before the segment appears under its name: what it
        writes (groups, say) is there for the first process that attaches."""
        arena = Arena.create(name, parse_size(memory), parse_size(max_item_size), max_groups)
        store = None
        try:
            Slabs(arena, None).format()
            store = cls(arena)
            if before_publish is not None:
                before_publish(store)
            arena.publish()
            return store
        except BaseException:
            if store is not None:
                store.close()
            else:
                arena.close()
            arena.unlink()
            raise

    @classmethod
    def attach(cls, name):
        arena = Arena.attach(name)
        try:
            return cls(arena)
        except BaseException:
            arena.close()
            raise

    def close(self, keep_counts=True):
        """Detach. Idempotent; the segment stays. ``keep_counts=False``: do not fold this
        process's counters into the segment (it is a dead one)."""
        if self.counters is not None and self.buf is not None:
            self.counters.stop()
            if keep_counts:
                try:
                    self.counters.release()
                except SegmentNotFound:     # the segment died: its counts no longer matter
                    pass
        if self.lock_file is not None:
            self.lock_file.close()
            self.lock_file = None
        if self.arena is not None:
            self.arena.close()
        self.buf = None

    @property
    def closed(self):
        return self.buf is None

    # -- groups -----------------------------------------------------------------------------

    def group_id(self, name):
        gid = self._group_ids.get(name)
        if gid is None:
            gid = self.index.find_group(name) if isinstance(name, str) else None
            if gid is None:
                raise UnknownGroup(f"no group {name!r} in segment {self.arena.name!r}")
            self._remember_group(name, gid)
        return gid

    def _remember_group(self, name, gid):
        # No lock, and still no entry survives a divert() (GIL order, thread A here, B in
        # divert): if A stores after B's clear, A's re-check below sees B's detour (B set it
        # before clearing) and takes the entry out; if A's re-check ran before B set the
        # detour, A's store came before B's clear, which removes it.
        self._group_ids[name] = gid
        if self.detour is not None:
            self._group_ids.pop(name, None)

    # -- diverting the readers --------------------------------------------------------------

    def divert(self, detour):
        """From now on the lock-free readers return ``detour(group, key)`` (get) or raise
        SegmentNotFound (the with-expiry readers, which only workers use) instead of reading
        this segment. A read already past its group lookup finishes from the old memory."""
        self.detour = detour              # first: see _remember_group
        self._group_ids.clear()

    def undivert(self):
        """Read this segment again (the dict of group ids fills up again as groups are read)."""
        self.detour = None

    def _reader_group_id(self, name):
        """The readers' group lookup when a name is not in the dict: None = take the detour."""
        if self.detour is not None:
            return None
        gid = self.group_id(name)
        return None if self.detour is not None else gid

    def _take_detour(self, group, key):
        detour = self.detour
        if detour is None:                # undiverted meanwhile: read this segment after all
            return self.get(group, key)
        return detour(group, key)

    def _take_detour_leaving_miss(self, group, key):
        detour = self.detour              # (a diverted read goes where a peek goes)
        if detour is None:
            return self.get_leaving_miss(group, key)
        return detour(group, key)

    def _refuse_detour(self, group, key):
        raise SegmentNotFound(f"segment {self.arena.name!r} is no longer read by this process")

    def check_current(self):
        """SegmentNotFound unless this segment is still the live one of its name: not
        retired, the name points to our file, and the supervisor recorded as its owner (if
        any) still holds OWNER_LOCK_BYTE. A stat and a lock query, a few microseconds: the
        watcher's check (attachment.py), not the write path's."""
        arena = self.arena
        if _U32.unpack_from(self.buf, _RETIRED)[0] or not arena.is_named():
            raise self._removed()
        owner = arena.get_u32(HEADER.owner_pid)
        if owner and not (self.lock_file.is_locked_elsewhere(OWNER_LOCK_BYTE)
                          and pid_alive(owner)):
            raise SegmentNotFound(f"the supervisor that owned segment {arena.name!r} died; "
                                  f"waiting for a new one")

    def _removed(self):
        return SegmentNotFound(f"segment {self.arena.name!r} was removed or replaced "
                               f"(the cache restarted or stopped)")

    def define_group(self, name, cache_bytes, ttl=None, stale=None):
        """Create the group or change its budget/TTL/stale window (a smaller budget evicts at
        once). ``stale``: seconds past its expiry an entry may still be served while it is
        reloaded (None: not at all)."""
        if not isinstance(name, str) or not name or len(name.encode()) > 64:
            raise InvalidArgument(f"group name must be 1 to 64 bytes of text, not {name!r}")
        cache_bytes = parse_size(cache_bytes)
        ttl = check_ttl(ttl)
        stale = check_ttl(stale, "stale")
        gid = self.locked(self.index.define_group, name, cache_bytes, ttl, time.time(), stale)
        self._remember_group(name, gid)
        return gid

    # -- data -------------------------------------------------------------------------------

    def _locked_get(self, gid, key, with_expiry, negative):
        return self.locked(self.index.lookup_locked, gid, key, time.time(), with_expiry,
                           negative)

    def _locked_get_stale(self, gid, key, with_expiry, negative):
        return self.locked(self.index.lookup_locked, gid, key, time.time(), with_expiry,
                           negative, True)

    def count(self, group, kind, amount=1):
        """Add to one of this process's counters for ``group`` (metrics.KINDS)."""
        self.counters.add(self.group_id(group), kind, amount)

    def start_counting(self, role=0):
        """Publish this process's counters in the arena (role: 0 client, N worker N)."""
        self.counters.role = role
        self.counters.start()

    def set(self, group, key, value, ttl=None, expire_at=None, generation=None):
        """Store ``value`` for ``ttl`` seconds (default: the group's TTL), or until the Unix
        time ``expire_at``. ValueTooLarge if it exceeds the max item size or the group's whole
        budget (nothing changes then). ``generation``: store only if the group was not
        cleared since ``generation(group)`` read it (a loaded value); False if not stored."""
        gid = self.group_id(group)
        data = encode_key(key)
        value = encode_value(value)
        now = time.time()
        expire_at = self._expiry(gid, ttl, expire_at, now)
        return self.locked(self.index.store, gid, data, value, expire_at, now, STATE_LIVE,
                           None, generation)

    def generation(self, group):
        """The group's generation: it changes with every ``clear`` of the group. Read it
        before asking a getter (or a peer) for a value, and pass it to ``set`` (or
        ``remember_not_found``, ``set_hot``): a clear in between then keeps the answer out."""
        return self.index.generation(self.group_id(group))

    def remember_not_found(self, group, key, ttl, generation=None):
        """Remember for ``ttl`` seconds that ``key`` does not exist: the readers that
        workers use answer NOT_FOUND (peeks: None) until it expires or a set or delete of
        the key replaces or removes it. An empty item in STATE_NEGATIVE, evicted like any
        other. False if not stored (the group was cleared since ``generation``)."""
        gid = self.group_id(group)
        now = time.time()
        return self.locked(self.index.store, gid, encode_key(key), b"", now + check_ttl(ttl),
                           now, STATE_NEGATIVE, None, generation)

    def _expiry(self, gid, ttl, expire_at, now):
        """The Unix time an entry written now expires at (None: never): ``expire_at`` if
        given, else ``now + ttl``, else the group's TTL."""
        if expire_at is not None:
            return expire_at
        ttl = check_ttl(ttl) if ttl is not None else self.index.group_ttl(gid)
        return now + ttl if ttl else None

    def check_fits(self, group, key, value):
        """ValueTooLarge (or InvalidKey) if ``set`` would refuse this value; stores nothing."""
        self.check_fits_many(group, [(key, value)])

    def check_fits_many(self, group, items):
        """``check_fits`` of every (key, value) pair of ``items``; returns them encoded,
        as (key bytes, value bytes)."""
        pairs = [(encode_key(key), encode_value(value)) for key, value in items]
        lay = self.arena.layout
        info = self.index.groups().get(group)
        if info is None:
            raise UnknownGroup(f"no group {group!r} in segment {self.arena.name!r}")
        for data, value in pairs:
            check_value_size(len(value), lay.max_item_size)
            if len(data) + len(value) > info["cache_bytes"]:
                raise ValueTooLarge(f"key + value of {len(data) + len(value)} bytes exceed "
                                    f"the whole budget of group {group!r}")
        return pairs

    def version(self, group, key):
        """A version of the key's neighbourhood; see ``set_hot``."""
        return self.index.version(self.group_id(group), encode_key(key))

    def set_hot(self, group, key, value, expire_at, version, generation=None):
        """Keep a copy of a value another host owns, unless anything wrote near the key since
        ``version`` was read (a delete racing the fetch), or the group was cleared since
        ``generation`` (a flush racing it). True if stored. ValueTooLarge as set."""
        gid = self.group_id(group)
        return self.locked(self.index.store, gid, encode_key(key), encode_value(value),
                           expire_at, time.time(), STATE_HOT, version, generation)

    def drop_stale(self, group, key):
        """Remove the key if its entry is past its expiry (a stale one whose reload found
        the key gone), but not a fresh value stored meanwhile."""
        gid = self.group_id(group)
        self.locked(self._drop_stale_locked, gid, encode_key(key), time.time())

    def _drop_stale_locked(self, gid, data, now):
        if self.index.lookup_locked(gid, data, now) is None:
            self.index.remove(gid, data, now)

    def delete(self, group, key):
        """Remove the key; True if a live entry was there."""
        gid = self.group_id(group)
        return self.locked(self.index.remove, gid, encode_key(key), time.time())

    def set_many(self, group, items, ttl=None):
        """``set`` of every (key, value) pair of ``items``, BATCH_CHUNK keys per hold of the
        write lock (each key its own journal step, as a single set). Checks that every
        value fits before writing any: ValueTooLarge (or InvalidKey) and nothing changes."""
        gid = self.group_id(group)
        pairs = self.check_fits_many(group, items)
        now = time.time()
        expire_at = self._expiry(gid, ttl, None, now)
        store = self.index.store
        for chunk in chunks(pairs, BATCH_CHUNK):
            self.locked(self._each_step, chunk, lambda pair: store(gid, *pair, expire_at, now))

    def delete_many(self, group, keys):
        """``delete`` of every key, BATCH_CHUNK keys per hold of the write lock; for each
        key in order, True if a live entry was there."""
        gid = self.group_id(group)
        now = time.time()
        remove = self.index.remove
        found = []
        for chunk in chunks([encode_key(key) for key in keys], BATCH_CHUNK):
            found += self.locked(self._each_step, chunk, lambda data: remove(gid, data, now))
        return found

    def _each_step(self, items, operation):
        """Under the write lock: ``operation(item)`` for each item, one journal step each."""
        results = []
        for item in items:
            if results:
                self.journal.checkpoint()
            results.append(operation(item))
        return results

    def clear(self, group=None):
        """Remove every entry of one group, or of all groups; each group's generation
        moves on, so loads asked for before the clear store nothing after it."""
        gids = [self.group_id(group)] if group is not None else [
            info["id"] for info in self.index.groups().values()]
        for gid in gids:
            self.locked(self.index.clear, gid)

    # -- the write path ---------------------------------------------------------------------

    def locked(self, operation, *args):
        """Run ``operation(*args)`` as the only writer on the segment, inside a journal step;
        repairs first if the previous writer died. Returns what ``operation`` returns.
        With ``verify_identity``: SegmentNotFound, and nothing changed, if the segment was
        retired (its name removed or replaced) before the step could commit."""
        buf = self.buf
        if buf is None:
            raise ValueError("store is closed")
        lock, journal = self._write_lock, self.journal
        lock.acquire()
        try:
            writer, active = _WRITER_AND_TX.unpack_from(buf, _WRITER_PID)
            if writer or active:
                self._repair()
            _U32.pack_into(buf, _WRITER_PID, _this_pid[0])
            journal.begin()
            try:
                result = operation(*args)
                if self.verify_identity and _U32.unpack_from(buf, _RETIRED)[0]:
                    # Written, not committed, and the segment was retired meanwhile (the
                    # interleavings are in arena.retire): undo (below) and refuse.
                    raise self._removed()
                journal.commit()
                return result
            except BaseException:
                journal.undo()
                raise
            finally:
                self.index.end_write()
                _U32.pack_into(buf, _WRITER_PID, 0)
        finally:
            lock.release()

    def _repair(self):
        """The previous writer died inside a write section: roll back its open step."""
        buf = self.buf
        dead = _U32.unpack_from(buf, _WRITER_PID)[0]
        words = self.journal.undo()
        stripes = self.index.repair_stripes()
        _U64.pack_into(buf, _REPAIRS, _U64.unpack_from(buf, _REPAIRS)[0] + 1)
        _U32.pack_into(buf, _WRITER_PID, 0)
        log.warning("segment %s: writer pid %d died mid-write; restored %d words, "
                    "reopened %d stripes", self.arena.name, dead, words, stripes)

    def audit(self):
        """Check every shared structure for consistency (takes the write lock; O(items)).
        Repairs first if a writer died. CorruptSegment names the first inconsistency."""
        return self.locked(self.index.audit)

    # -- figures ----------------------------------------------------------------------------

    def stats(self):
        """Segment, groups and slab figures as a plain dict."""
        lay = self.arena.layout
        groups = self.index.groups()
        payload = sum(info["bytes"] for info in groups.values())
        return {
            "segment": self.arena.name,
            "memory": lay.total_size,
            "max_item_size": lay.max_item_size,
            "buckets": lay.nbuckets,
            "items": sum(info["items"] for info in groups.values()),
            "bytes": payload,
            "payload_share": payload / lay.total_size,
            "repairs": _U64.unpack_from(self.buf, _REPAIRS)[0],
            "groups": groups,
            "slabs": self.slabs.stats(),
        }
