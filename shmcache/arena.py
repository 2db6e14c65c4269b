"""The shared-memory segment: create, attach, close, unlink; its header and region map.

A segment is a file in ``/dev/shm`` (POSIX shared memory, as ``multiprocessing.shared_memory``
makes them) mapped with ``mmap``. We open it with ``os.open`` rather than ``SharedMemory``:
in Python 3.11 ``SharedMemory`` registers every attach with the resource tracker, which
unlinks the segment when the attaching process exits.

Region map (offsets from the segment start; each region 8-byte aligned; native x86-64 order)::

    region      offset        bytes                        layout documented in
    header      0             HEADER_BYTES (4 KiB)         this module (below)
    journal     log_off       LOG_ENTRIES * 24             journal.py
    groups      groups_off    max_groups * 256             lru_index.py
    classes     classes_off   MAX_CLASSES * 32             slabs.py
    stripes     stripes_off   nstripes * 4                 lru_index.py (seqlock counters)
    inflight    inflight_off  INFLIGHT_SLOTS * 512         singleflight.py
    counters    counters_off  COUNTER_SLOTS * (64 + 128 * max_groups)   metrics.py
    peers       peers_off     PEER_SLOTS * 32              peers.py (peer health)
    page table  pagemeta_off  npages * 32                  slabs.py
    ref bits    refbits_off   page bytes / 256             lru_index.py (CLOCK reference bits)
    buckets     buckets_off   nbuckets * 4                 lru_index.py
    pages       pages_off     npages * page_size           slabs.py (chunks), lru_index.py (items)

Header::

    offset  type  field
    0       u64   magic (MAGIC); written last at creation, so a half-made segment is refused
    8       u32   layout version (LAYOUT_VERSION)
    12      u32   header bytes
    16      u64   total size
    24      u32   page size          28  u32  pages
    32      u32   buckets            36  u32  stripes
    40      u32   max item size      44  u32  max groups
    48      u32   creator pid        52  u32  (reserved)
    56      u64   epoch (random at creation, new at each warm restart)
    64      f64   creation time (Unix seconds)
    72      u64   hash seed (random at creation)
    512...        mutable words, one 8-byte slot each (the _OFFSET_* constants below)
    1024...       the front's TLS settings (_OFFSET_FRONT_TLS*, below; version 2 on)

Mutable words that the journal protects are marked (J): change them only through it.
"""

import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from .errors import (InvalidArgument, SegmentCreateError, SegmentIncompatible, SegmentInUse,
                     SegmentNotFound)
from .locks import LockFile
from .units import format_size, parse_size

MAGIC = 0x3130454843414B4B          # b"KKACHE01" read as little-endian u64
LAYOUT_VERSION = 2                   # 2: the front's TLS settings in the header
HEADER_BYTES = 4096
DEFAULT_SHM_DIR = "/dev/shm"

MAX_KEY_BYTES = 250                  # as memcached
ITEM_HEADER_BYTES = 24               # item header size; lru_index.py documents it
DEFAULT_MAX_ITEM_SIZE = 1 << 20      # 1 MiB of value
MAX_SEGMENT_BYTES = 32 << 30         # item refs are u32 counts of 8-byte units
DEFAULT_MAX_GROUPS = 64              # group ids are u8 in item headers
LOG_ENTRIES = 4096                   # journal capacity per committed step
LOG_ENTRY_BYTES = 24
GROUP_RECORD_BYTES = 256
MAX_CLASSES = 64
CLASS_RECORD_BYTES = 32
PAGE_RECORD_BYTES = 32
NSTRIPES = 4096                      # seqlock stripes (fewer when there are fewer buckets)
PAGE_BYTES_PER_BUCKET = 128          # one hash bucket per 128 bytes of pages
REFBIT_GRANULE = 32                  # one CLOCK bit per 32 bytes of pages (= smallest chunk)
INFLIGHT_SLOTS = 256                 # concurrent cold loads tracked host-wide
INFLIGHT_SLOT_BYTES = 512
COUNTER_SLOTS = 128                  # processes that keep per-process counters


def counter_slot_bytes(max_groups):
    """A counter slot: 64 bytes of header, then 16 u64 counters per group (metrics.py)."""
    return 64 + max_groups * 16 * 8


PEER_SLOTS = 1024                    # peers whose health the host's workers share
PEER_SLOT_BYTES = 32

_HEADER = struct.Struct("QIIQIIIIIIIIQdQ")
_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")

# Mutable header words. (J) = journaled.
_OFFSET_WRITER_PID = 512     # u32: pid holding the write lock, 0 when released cleanly
_OFFSET_TX_ACTIVE = 520      # u64: id of the journal step in progress, 0 = none
_OFFSET_TX_SEQ = 528         # u64: last journal step id handed out
_OFFSET_CLEAN = 536          # u32: 1 = the owner stopped cleanly (warm restart allowed)
_OFFSET_OWNER_PID = 544      # u32: pid of the supervisor that owns the segment
_OFFSET_REPAIRS = 552        # u64: journal repairs after a writer died
_OFFSET_CLASS_COUNT = 560    # u32 (J): slab classes defined
_OFFSET_CLASS_VERSION = 564  # u32 (J): bumped when a class is added
_OFFSET_FREE_PAGE = 568      # u32 (J): head of the free page list (page + 1), 0 = none
_OFFSET_FREE_PAGES = 572     # u32 (J): pages on that list
_OFFSET_VICTIM_CURSOR = 576  # u32 (J): next page to consider when a page must be reassigned
_OFFSET_GROUP_LIMIT = 580    # u32 (J): 1 + highest group id defined
_OFFSET_PAGE_MOVES = 584     # u64: pages reassigned between slab classes
_OFFSET_OWNER_START = 592    # f64: when the owner started (for stats)
_OFFSET_FRONT_PORT = 600     # u32: TCP port of the owner's HTTP front (0 = none)
_OFFSET_FRONT_HOST = 608     # 64s: host it listens on (UTF-8, NUL-padded)
_OFFSET_PEER_COUNT = 672     # u32: peers in the owner's ring (>1: writes are cluster-wide)
_OFFSET_RETIRED = 680        # u32: 1 = its name is being removed or replaced (``retire``)
_OFFSET_FRONT_TLS = 1024     # u32: 1 = the front speaks HTTPS (TLS)
_OFFSET_FRONT_TLS_NAME = 1032  # 256s: the name its certificate is verified for (UTF-8, NUL-padded)
_OFFSET_FRONT_TLS_CA = 1288  # 2048s: CA file the owner verifies peers with; empty: the system's
_TLS_NAME_BYTES, _TLS_CA_BYTES = 256, 2048
_OFFSET_LOCK_BYTE = 0        # lock byte ranges are lock names, not data (locks.py)

# Lock bytes of the segment file (names, not data; locks.py).
WRITE_LOCK_BYTE = 0          # the write lock (store.py)
OWNER_LOCK_BYTE = 1          # held by the owning supervisor for as long as it runs

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def _round_up(n, to):
    return -(-n // to) * to


def shm_dir():
    """Where segments live: /dev/shm, or $SHMCACHE_SHM_DIR (another tmpfs, for tests)."""
    return os.environ.get("SHMCACHE_SHM_DIR", DEFAULT_SHM_DIR)


def segment_path(name):
    if not isinstance(name, str) or not _NAME.fullmatch(name) or _CREATING in name:
        raise InvalidArgument(f"bad segment name {name!r}: use letters, digits, '.', '_' and '-'")
    return os.path.join(shm_dir(), name)


class Front(NamedTuple):
    """Where a segment's owner serves HTTP, as ``connect()`` clients reach it."""
    host: str
    port: int
    tls: bool = False       # HTTPS: verify its certificate for ``tls_name`` against ``tls_ca``
    tls_name: str = ""      # the host name of the owner's --self URL
    tls_ca: str = ""        # the owner's --tls-ca (absolute); "" for the system's CA store


@dataclass(frozen=True)
class Layout:
    """Sizes and region offsets of one segment; derived from the sizes alone."""
    total_size: int
    page_size: int
    npages: int
    nbuckets: int
    nstripes: int
    max_item_size: int
    max_groups: int
    log_off: int
    groups_off: int
    classes_off: int
    stripes_off: int
    inflight_off: int
    counters_off: int
    peers_off: int
    pagemeta_off: int
    refbits_off: int
    buckets_off: int
    pages_off: int

    @classmethod
    def plan(cls, total_size, max_item_size=DEFAULT_MAX_ITEM_SIZE, max_groups=DEFAULT_MAX_GROUPS,
             npages=None):
        """Fit the largest number of pages into ``total_size``; ValueError if fewer than 2 fit."""
        if not 1 <= max_groups <= 255:
            raise InvalidArgument("max_groups must be 1..255 (group ids are one byte)")
        if not 1 <= max_item_size <= 64 << 20:
            raise InvalidArgument("max item size must be between 1 byte and 64 MiB")
        if total_size > MAX_SEGMENT_BYTES:
            raise InvalidArgument(f"memory must be at most {format_size(MAX_SEGMENT_BYTES)}")
        page_size = _round_up(max_item_size + ITEM_HEADER_BYTES + MAX_KEY_BYTES, 4096)
        page_size = max(page_size, 64 << 10)
        offset = HEADER_BYTES
        log_off, offset = offset, offset + LOG_ENTRIES * LOG_ENTRY_BYTES
        groups_off, offset = offset, offset + max_groups * GROUP_RECORD_BYTES
        classes_off, offset = offset, offset + MAX_CLASSES * CLASS_RECORD_BYTES
        stripes_off, offset = offset, offset + NSTRIPES * 4
        inflight_off, offset = offset, offset + INFLIGHT_SLOTS * INFLIGHT_SLOT_BYTES
        counters_off, offset = offset, offset + COUNTER_SLOTS * counter_slot_bytes(max_groups)
        peers_off, offset = offset, offset + PEER_SLOTS * PEER_SLOT_BYTES
        fixed = offset
        if npages is None:
            per_page = (page_size + PAGE_RECORD_BYTES + page_size // (8 * REFBIT_GRANULE)
                        + 4 * page_size // PAGE_BYTES_PER_BUCKET)
            npages = max(0, (total_size - fixed - 3 * 4096) // per_page)
        while npages >= 2:
            pagemeta_off = fixed
            refbits_off = _round_up(pagemeta_off + npages * PAGE_RECORD_BYTES, 8)
            nbuckets = npages * page_size // PAGE_BYTES_PER_BUCKET
            buckets_off = _round_up(refbits_off + npages * page_size // (8 * REFBIT_GRANULE), 8)
            pages_off = _round_up(buckets_off + 4 * nbuckets, 4096)
            if pages_off + npages * page_size <= total_size:
                return cls(total_size, page_size, npages, nbuckets, min(NSTRIPES, nbuckets),
                           max_item_size, max_groups, log_off, groups_off, classes_off,
                           stripes_off, inflight_off, counters_off, peers_off, pagemeta_off,
                           refbits_off, buckets_off, pages_off)
            npages -= 1
        raise InvalidArgument(
            f"memory {format_size(total_size)} is too small for a max item size of "
            f"{format_size(max_item_size)}: it must hold at least 2 pages of {format_size(page_size)}"
            f" plus {format_size(fixed)} of tables")


class Arena:
    """One mapped segment. ``close()`` detaches (idempotent); ``unlink()`` removes the name."""
    buf = None           # the mmap; None once closed
    fd = -1
    layout = None
    name = path = None
    identity = None      # (st_dev, st_ino) of the mapped file: which segment this is

    def __init__(self, name, path, fd, buf, layout):
        self.name, self.path, self.fd, self.buf, self.layout = name, path, fd, buf, layout
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)

    # -- lifetime ---------------------------------------------------------------------------

    @classmethod
    def create(cls, name, memory, max_item_size=DEFAULT_MAX_ITEM_SIZE,
               max_groups=DEFAULT_MAX_GROUPS):
        """Create, size and map a new segment (mode 0600), header filled but not published.

        It is made under a temporary name; the caller formats the regions it owns, may lock
        it, then calls ``publish()``, which links it under ``name`` in one step. So no process
        ever finds a half-made segment under the real name. Raises SegmentInUse if the name
        exists and SegmentCreateError if /dev/shm cannot hold it.
        """
        final = segment_path(name)
        layout = Layout.plan(parse_size(memory), parse_size(max_item_size), max_groups)
        if os.path.exists(final):
            raise SegmentInUse(f"shared-memory segment {name!r} already exists")
        _remove_orphans(name)
        path = f"{final}{_CREATING}{os.getpid()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SegmentCreateError(f"cannot create {path}: {exc.strerror}") from None
        arena = None
        try:
            os.fchmod(fd, 0o600)              # whatever the umask: only this user may attach
            try:
                # tmpfs reserves nothing on ftruncate; without this a full /dev/shm shows up
                # later as SIGBUS on first touch of a page.
                os.posix_fallocate(fd, 0, layout.total_size)
            except OSError as exc:
                free = _free_bytes(path)
                raise SegmentCreateError(
                    f"cannot reserve {format_size(layout.total_size)} for segment {name!r} in "
                    f"{os.path.dirname(path)} ({exc.strerror}; {format_size(free)} free). "
                    f"Ask for less --memory or free shared memory.") from None
            buf = mmap.mmap(fd, layout.total_size)
            arena = cls(name, path, fd, buf, layout)
            arena._write_header(os.urandom(8), os.urandom(8))
            return arena
        except BaseException:
            if arena is not None:
                arena.close()
            else:
                os.close(fd)
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, name):
        """Map an existing published segment; SegmentNotFound / SegmentIncompatible otherwise."""
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentNotFound(f"no shared-memory segment {name!r} ({path}); "
                                  f"is the supervisor running?") from None
        except PermissionError:
            raise SegmentIncompatible(f"segment {name!r} belongs to another user") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise SegmentIncompatible(f"segment {name!r} is too small to be a shmcache arena")
            buf = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        arena = cls(name, path, fd, buf, None)
        try:
            arena.layout = arena._read_header(size)
        except BaseException:
            arena.close()
            raise
        return arena

    def publish(self):
        """Write the magic number, then link the segment under its real name (atomically:
        SegmentInUse if that name appeared meanwhile, and the temporary file is removed)."""
        _U64.pack_into(self.buf, 0, MAGIC)
        final = segment_path(self.name)
        if self.path == final:
            return
        try:
            os.link(self.path, final)
        except FileExistsError:
            raise SegmentInUse(f"shared-memory segment {self.name!r} already exists") from None
        finally:
            os.unlink(self.path)
        self.path = final

    def close(self):
        """Detach this process's mapping. Idempotent. The segment stays."""
        buf, self.buf = self.buf, None
        if buf is not None:
            buf.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def unlink(self):
        """Remove the segment's name; mappings stay valid until closed. Missing is fine."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- header -----------------------------------------------------------------------------

    def _write_header(self, epoch, seed):
        lay = self.layout
        _HEADER.pack_into(self.buf, 0, 0, LAYOUT_VERSION, HEADER_BYTES, lay.total_size,
                          lay.page_size, lay.npages, lay.nbuckets, lay.nstripes,
                          lay.max_item_size, lay.max_groups, os.getpid(), 0,
                          int.from_bytes(epoch, "little"), time.time(),
                          int.from_bytes(seed, "little"))

    def _read_header(self, size):
        (magic, version, header_bytes, total, page_size, npages, nbuckets, nstripes,
         max_item, max_groups, _pid, _r, _epoch, _created, _seed) = _HEADER.unpack_from(self.buf, 0)
        if magic == 0:
            raise SegmentIncompatible(f"segment {self.name!r} is not initialised "
                                      f"(still being created, or its creator died)")
        if magic != MAGIC:
            raise SegmentIncompatible(f"segment {self.name!r} is not a shmcache arena "
                                      f"(magic {magic:#x})")
        if version != LAYOUT_VERSION:
            raise SegmentIncompatible(f"segment {self.name!r} has layout version {version}; "
                                      f"this shmcache reads version {LAYOUT_VERSION}")
        try:
            layout = Layout.plan(total, max_item, max_groups, npages=npages)
        except ValueError:
            layout = None
        if (layout is None or header_bytes != HEADER_BYTES or total != size
                or layout.page_size != page_size or layout.nbuckets != nbuckets
                or layout.nstripes != nstripes):
            raise SegmentIncompatible(f"segment {self.name!r} has an inconsistent header")
        return layout

    @property
    def epoch(self):
        return _HEADER.unpack_from(self.buf, 0)[12]

    @property
    def hash_seed(self):
        return _HEADER.unpack_from(self.buf, 0)[14]

    @property
    def created(self):
        return _HEADER.unpack_from(self.buf, 0)[13]

    def new_epoch(self):
        """A new owner takes the segment over (warm restart): readers can tell."""
        struct.pack_into("Q", self.buf, 56, int.from_bytes(os.urandom(8), "little"))

    def is_named(self):
        """True if the segment's name still points to this mapping's file. A name never
        comes back to a file once removed or replaced, so False is final."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def set_front(self, host, port, tls=False, tls_name="", tls_ca=""):
        """Record where the owner's HTTP front listens, for ``connect()`` clients, and
        whether it speaks TLS: then the name and CA file a client verifies it with
        (ValueError if either is too long for its field). The port last: it says "a front"."""
        name, ca = tls_name.encode(), tls_ca.encode()
        if len(name) > _TLS_NAME_BYTES or len(ca) > _TLS_CA_BYTES:
            raise ValueError(f"the TLS name ({len(name)} bytes, at most {_TLS_NAME_BYTES}) or "
                             f"the CA path ({len(ca)} bytes, at most {_TLS_CA_BYTES}) is too long")
        _put_text(self.buf, _OFFSET_FRONT_TLS_NAME, _TLS_NAME_BYTES, name)
        _put_text(self.buf, _OFFSET_FRONT_TLS_CA, _TLS_CA_BYTES, ca)
        _U32.pack_into(self.buf, _OFFSET_FRONT_TLS, 1 if tls else 0)
        _put_text(self.buf, _OFFSET_FRONT_HOST, 64, host.encode()[:64])
        _U32.pack_into(self.buf, _OFFSET_FRONT_PORT, port)

    def front(self):
        """The owner's ``Front``, or None if it has none."""
        port = _U32.unpack_from(self.buf, _OFFSET_FRONT_PORT)[0]
        if not port:
            return None
        host = _get_text(self.buf, _OFFSET_FRONT_HOST, 64)
        if not _U32.unpack_from(self.buf, _OFFSET_FRONT_TLS)[0]:
            return Front(host, port)
        return Front(host, port, True, _get_text(self.buf, _OFFSET_FRONT_TLS_NAME, _TLS_NAME_BYTES),
                     _get_text(self.buf, _OFFSET_FRONT_TLS_CA, _TLS_CA_BYTES))

    def get_u32(self, offset):
        return _U32.unpack_from(self.buf, offset)[0]

    def set_u32(self, offset, value):
        _U32.pack_into(self.buf, offset, value)

    def get_u64(self, offset):
        return _U64.unpack_from(self.buf, offset)[0]

    def set_u64(self, offset, value):
        _U64.pack_into(self.buf, offset, value)


def _put_text(buf, offset, size, encoded):
    buf[offset:offset + size] = encoded.ljust(size, b"\0")


def _get_text(buf, offset, size):
    return bytes(buf[offset:offset + size]).rstrip(b"\0").decode(errors="replace")


@dataclass(frozen=True)
class SegmentState:
    """What a segment name points to at one moment (``probe``)."""
    identity: tuple      # (st_dev, st_ino): compare with Arena.identity
    epoch: int           # renewed by each warm restart (Arena.new_epoch)
    owner_pid: int       # the supervisor owning it; 0: none (create(), or a clean stop)
    owner_locked: bool   # someone holds OWNER_LOCK_BYTE (the owner, or a supervisor taking over)
    retired: bool = False  # marked by ``retire``: its name is going away

    @property
    def usable(self):
        """Neither retired, orphaned nor half-made: an owner recorded in it must still hold
        it. A segment whose owner died is never adopted again (the next supervisor starts
        clean)."""
        return not self.retired and (
            self.owner_pid == 0 or (self.owner_locked and pid_alive(self.owner_pid)))


def pid_alive(pid):
    """True if process ``pid`` exists. An owner recorded in a segment whose process is gone
    died, even while a new supervisor holds the owner lock deciding what to do with it."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:               # another user's process: it exists
        return True


def probe(name):
    """The state of segment ``name`` without mapping it (an open, a read, a lock query:
    a few microseconds); None if there is no published shmcache segment of that name."""
    try:
        lock_file = LockFile(segment_path(name))
    except FileNotFoundError:
        return None
    try:
        fd = lock_file.fd
        header = os.pread(fd, _OFFSET_RETIRED + 4, 0)
        if len(header) < _OFFSET_RETIRED + 4 or _U64.unpack_from(header, 0)[0] != MAGIC:
            return None
        st = os.fstat(fd)
        return SegmentState((st.st_dev, st.st_ino), _HEADER.unpack_from(header, 0)[12],
                            _U32.unpack_from(header, _OFFSET_OWNER_PID)[0],
                            lock_file.is_locked_elsewhere(OWNER_LOCK_BYTE),
                            _U32.unpack_from(header, _OFFSET_RETIRED)[0] != 0)
    finally:
        lock_file.close()


RETIRE_LOCK_WAIT = 2.0    # seconds ``retire`` waits for the write lock before marking anyway


def retire(path):
    """Mark the segment file at ``path`` retired, under its write lock: from then on no
    write commits in it (Store.locked undoes and refuses them), and attached clients leave
    it at their next check. Whoever removes or replaces a segment's name calls this first
    (with ``/proc/self/fd/N`` for a file it has open), so that, between a writer W and the
    retirer R, on the write lock:

        R marks before W takes the lock -> W sees the mark, undoes its step, raises.
        W commits before R takes the lock -> W's write was made while the segment was
          live; it is dropped with the segment like any write made just before a stop.

    Through a descriptor of its own (an OFD lock that excludes every other holder, this
    process's threads included). If a writer holds the lock longer than RETIRE_LOCK_WAIT
    (stopped by a signal), the mark is made anyway and False returned: that one write may
    still commit into the retired segment. A file that is no published segment is left
    untouched."""
    lock_file = LockFile(path)
    try:
        head = os.pread(lock_file.fd, 8, 0)
        if len(head) < 8 or _U64.unpack_from(head, 0)[0] != MAGIC:
            return False
        deadline = time.monotonic() + RETIRE_LOCK_WAIT
        locked = lock_file.try_lock_byte(WRITE_LOCK_BYTE)
        while not locked and time.monotonic() < deadline:
            time.sleep(0.001)             # writers hold the lock for microseconds
            locked = lock_file.try_lock_byte(WRITE_LOCK_BYTE)
        os.pwrite(lock_file.fd, _U32.pack(1), _OFFSET_RETIRED)
        return locked
    finally:
        lock_file.close()                 # releases the lock


_CREATING = ".creating-"


def _remove_orphans(name):
    """Remove temporary files of creators of ``name`` that died before publishing."""
    prefix = name + _CREATING
    try:
        entries = os.listdir(shm_dir())
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix) and entry[len(prefix):].isdigit():
            pid = int(entry[len(prefix):])
            try:
                os.kill(pid, 0)
                continue                  # its creator is still at work
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            try:
                os.unlink(os.path.join(shm_dir(), entry))
            except FileNotFoundError:
                pass


def _free_bytes(path):
    try:
        st = os.statvfs(os.path.dirname(path))
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0
