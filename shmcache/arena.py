"""The shared-memory segment: create, attach, close, unlink; its header.

A segment is a file in ``/dev/shm`` (POSIX shared memory, as ``multiprocessing.shared_memory``
makes them) mapped with ``mmap``. We open it with ``os.open`` rather than ``SharedMemory``:
in Python 3.11 ``SharedMemory`` registers every attach with the resource tracker, which
unlinks the segment when the attaching process exits.

The bytes of the header, the region map and every record in it are declared in layout.py;
this module maps the segment and reads and writes its header through those names.

Header words that the journal protects are marked (J) there: change them only through it.
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
from .layout import (  # noqa: F401 (re-exported: the constants' old home)
    CLASS_RECORD_BYTES, COUNTER_SLOTS, DEFAULT_MAX_GROUPS, DEFAULT_MAX_ITEM_SIZE,
    FRONT_HOST_BYTES, GROUP_RECORD_BYTES, HEADER, HEADER_BYTES, INFLIGHT_SLOT_BYTES,
    INFLIGHT_SLOTS, ITEM_HEADER_BYTES, LAYOUT_VERSION, LOG_ENTRIES, LOG_ENTRY_BYTES, MAGIC,
    MAX_CLASSES, MAX_KEY_BYTES, MAX_SEGMENT_BYTES, NSTRIPES, OWNER_LOCK_BYTE,
    PAGE_BYTES_PER_BUCKET, PAGE_RECORD_BYTES, PEER_SLOT_BYTES, PEER_SLOTS, REFBIT_GRANULE,
    TLS_CA_BYTES, TLS_NAME_BYTES, WRITE_LOCK_BYTE, Layout, counter_slot_bytes)
from .locks import LockFile
from .units import format_size, parse_size

DEFAULT_SHM_DIR = "/dev/shm"

_HEADER = HEADER.struct("magic", "hash_seed")       # the fixed fields, read at attach
_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")
_F64 = struct.Struct("d")

# Header words under the names they had before layout.py, for tests that read them.
# The package itself uses HEADER.<field> (tests/test_layout.py).
_OFFSET_WRITER_PID = HEADER.writer_pid
_OFFSET_TX_ACTIVE = HEADER.tx_active
_OFFSET_CLEAN = HEADER.clean
_OFFSET_OWNER_PID = HEADER.owner_pid

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


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
        _U64.pack_into(self.buf, HEADER.magic, MAGIC)
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
        _HEADER.pack_into(self.buf, HEADER.magic, 0, LAYOUT_VERSION, HEADER_BYTES, lay.total_size,
                          lay.page_size, lay.npages, lay.nbuckets, lay.nstripes,
                          lay.max_item_size, lay.max_groups, os.getpid(), 0,
                          int.from_bytes(epoch, "little"), time.time(),
                          int.from_bytes(seed, "little"))

    def _read_header(self, size):
        (magic, version, header_bytes, total, page_size, npages, nbuckets, nstripes,
         max_item, max_groups, _pid, _r, _epoch, _created, _seed) = _HEADER.unpack_from(self.buf, HEADER.magic)
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
        return _U64.unpack_from(self.buf, HEADER.epoch)[0]

    @property
    def hash_seed(self):
        return _U64.unpack_from(self.buf, HEADER.hash_seed)[0]

    @property
    def created(self):
        return _F64.unpack_from(self.buf, HEADER.created)[0]

    def new_epoch(self):
        """A new owner takes the segment over (warm restart): readers can tell."""
        _U64.pack_into(self.buf, HEADER.epoch, int.from_bytes(os.urandom(8), "little"))

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
        if len(name) > TLS_NAME_BYTES or len(ca) > TLS_CA_BYTES:
            raise ValueError(f"the TLS name ({len(name)} bytes, at most {TLS_NAME_BYTES}) or "
                             f"the CA path ({len(ca)} bytes, at most {TLS_CA_BYTES}) is too long")
        _put_text(self.buf, HEADER.front_tls_name, TLS_NAME_BYTES, name)
        _put_text(self.buf, HEADER.front_tls_ca, TLS_CA_BYTES, ca)
        _U32.pack_into(self.buf, HEADER.front_tls, 1 if tls else 0)
        _put_text(self.buf, HEADER.front_host, FRONT_HOST_BYTES,
                  host.encode()[:FRONT_HOST_BYTES])
        _U32.pack_into(self.buf, HEADER.front_port, port)

    def front(self):
        """The owner's ``Front``, or None if it has none."""
        port = _U32.unpack_from(self.buf, HEADER.front_port)[0]
        if not port:
            return None
        host = _get_text(self.buf, HEADER.front_host, FRONT_HOST_BYTES)
        if not _U32.unpack_from(self.buf, HEADER.front_tls)[0]:
            return Front(host, port)
        return Front(host, port, True, _get_text(self.buf, HEADER.front_tls_name, TLS_NAME_BYTES),
                     _get_text(self.buf, HEADER.front_tls_ca, TLS_CA_BYTES))

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
        header = os.pread(fd, HEADER.end("retired"), HEADER.magic)
        if (len(header) < HEADER.end("retired")
                or _U64.unpack_from(header, HEADER.magic)[0] != MAGIC):
            return None
        st = os.fstat(fd)
        return SegmentState((st.st_dev, st.st_ino), _U64.unpack_from(header, HEADER.epoch)[0],
                            _U32.unpack_from(header, HEADER.owner_pid)[0],
                            lock_file.is_locked_elsewhere(OWNER_LOCK_BYTE),
                            _U32.unpack_from(header, HEADER.retired)[0] != 0)
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
        head = os.pread(lock_file.fd, HEADER.end("magic"), HEADER.magic)
        if len(head) < HEADER.end("magic") or _U64.unpack_from(head, HEADER.magic)[0] != MAGIC:
            return False
        deadline = time.monotonic() + RETIRE_LOCK_WAIT
        locked = lock_file.try_lock_byte(WRITE_LOCK_BYTE)
        while not locked and time.monotonic() < deadline:
            time.sleep(0.001)             # writers hold the lock for microseconds
            locked = lock_file.try_lock_byte(WRITE_LOCK_BYTE)
        os.pwrite(lock_file.fd, _U32.pack(1), HEADER.retired)
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
        suffix = entry[len(prefix):]
        if entry.startswith(prefix) and suffix.isascii() and suffix.isdigit():
            pid = int(suffix)
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
