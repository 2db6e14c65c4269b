"""The arena's bytes: every record of a segment, declared once.

Every other module reads and writes the arena through the names declared here and says
nothing about bytes itself (tests/test_layout.py holds them to it). A record is a ``Record``
of ``Field``s: ``GROUP.budget`` is the offset of the budget field in a group record,
``GROUP.fields["budget"]`` its declaration (offset, struct code, size, what it holds), and
``GROUP.struct("budget", "defined")`` a ``struct.Struct`` reading the fields from budget to
defined in one call, checked at import to put each at its declared offset. Changing a
record is then one diff here, with LAYOUT_VERSION.

All numbers are native x86-64: little-endian, struct's native formats, natural alignment.
u32/u64 are unsigned, f64 an IEEE double; "64s" is 64 bytes of text, UTF-8, NUL-padded.
(J) marks words that change only through the journal (journal.py).

Region map (offsets from the segment start, computed by ``Layout.plan``; each region
8-byte aligned)::

    region      offset        bytes                              records
    header      0             HEADER_BYTES (4 KiB)               HEADER
    journal     log_off       LOG_ENTRIES * 24                   LOG_ENTRY
    groups      groups_off    max_groups * 256                   GROUP, by group id
    classes     classes_off   MAX_CLASSES * 32                   SLAB_CLASS, by class id
    stripes     stripes_off   nstripes * 4                       u32 seqlock counters
    inflight    inflight_off  INFLIGHT_SLOTS * 512               INFLIGHT
    counters    counters_off  COUNTER_SLOTS * counter_slot_bytes(max_groups)  COUNTER_SLOT
    peers       peers_off     PEER_SLOTS * 32                    PEER
    page table  pagemeta_off  npages * 32                        PAGE, by page number
    ref bits    refbits_off   page bytes / 256                   one CLOCK bit per 32 bytes
    buckets     buckets_off   nbuckets * 4                       u32 item refs (chain heads)
    pages       pages_off     npages * page_size                 chunks holding ITEMs

An item *ref* is its chunk's offset // 8 (0 = none): u32 refs reach 32 GiB.

Lock bytes of the segment file are names, not data (locks.py): see LOCK_BYTES.
"""

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .errors import InvalidArgument
from .units import format_size

MAGIC = 0x3130454843414B4B          # b"KKACHE01" read as little-endian u64
LAYOUT_VERSION = 2                   # 2: the front's TLS settings in the header


class Field(NamedTuple):
    """One field of a record: where it is, its struct code, what it holds."""
    name: str
    offset: int
    code: str               # native struct code: I u32, Q u64, d f64, B u8, H u16, Ns bytes
    doc: str

    @property
    def size(self):
        return struct.calcsize(self.code)

    @property
    def end(self):
        return self.offset + self.size


class Record:
    """A record's fields by name. ``RECORD.<field>`` is the field's offset in the record;
    ``nbytes`` its size; ``fields`` the declarations, in offset order."""

    def __init__(self, label, nbytes, *fields):
        self.label, self.nbytes = label, nbytes
        self.fields = {}
        end = 0
        for field in fields:
            if field.name in self.fields or hasattr(self, field.name):
                raise AssertionError(f"layout: {label}.{field.name} declared twice")
            if field.offset < end or field.end > nbytes or field.offset % _align(field.code):
                raise AssertionError(f"layout: {label}.{field.name} at {field.offset} overlaps, "
                                     f"is misaligned or leaves the record ({nbytes} bytes)")
            self.fields[field.name] = field
            setattr(self, field.name, field.offset)
            end = field.end

    def __repr__(self):
        return f"<record {self.label}: {self.nbytes} bytes, {len(self.fields)} fields>"

    def end(self, name):
        """The offset just past field ``name``."""
        return self.fields[name].end

    def struct(self, first, last=None):
        """A Struct reading fields ``first`` .. ``last`` (declaration order) in one call, from
        the offset of ``first``; gaps between them become pad bytes. Checked: native
        alignment must put every field exactly where it is declared."""
        names = list(self.fields)
        chosen = [self.fields[n] for n in names[names.index(first):names.index(last or first) + 1]]
        base = at = chosen[0].offset
        codes = []
        for field in chosen:
            pad = f"{field.offset - at}x" if field.offset > at else ""
            prefix = "".join(codes) + pad
            if struct.calcsize(prefix + field.code) - field.size != field.offset - base:
                raise AssertionError(f"layout: {self.label}.{field.name} is not where a "
                                     f"native format reads it")
            codes.append(pad + field.code)
            at = field.end
        compiled = struct.Struct("".join(codes))
        if compiled.size != chosen[-1].end - chosen[0].offset:
            raise AssertionError(f"layout: {self.label} format {compiled.format!r} is not "
                                 f"as long as its fields")
        return compiled

    def pair(self, low, high):
        """Offset of the aligned u64 made of u32 fields ``low`` and ``high`` (written as one
        journaled word: ``low + (high << 32)``). Checked: they are adjacent and aligned."""
        lo, hi = self.fields[low], self.fields[high]
        if not (lo.code == hi.code == "I" and hi.offset == lo.offset + 4 and not lo.offset % 8):
            raise AssertionError(f"layout: {self.label}.{low}/{high} are not one aligned u64")
        return lo.offset


def _align(code):
    return struct.calcsize(code.lstrip("0123456789")) if not code.endswith(("s", "x")) else 1


F = Field

# -- the segment header ---------------------------------------------------------------------

HEADER_BYTES = 4096
TLS_NAME_BYTES, TLS_CA_BYTES, FRONT_HOST_BYTES = 256, 2048, 64

HEADER = Record(
    "header", HEADER_BYTES,
    # Fixed at creation (written by Arena.create; the magic last, by Arena.publish).
    F("magic", 0, "Q", "MAGIC; written last at creation, so a half-made segment is refused"),
    F("version", 8, "I", "LAYOUT_VERSION"),
    F("header_bytes", 12, "I", "HEADER_BYTES"),
    F("total_size", 16, "Q", "segment bytes"),
    F("page_size", 24, "I", "bytes per slab page"),
    F("npages", 28, "I", "slab pages"),
    F("nbuckets", 32, "I", "hash buckets"),
    F("nstripes", 36, "I", "seqlock stripes"),
    F("max_item_size", 40, "I", "largest value, bytes"),
    F("max_groups", 44, "I", "group records"),
    F("creator_pid", 48, "I", "pid of the process that created the segment"),
    F("reserved", 52, "I", "(reserved)"),
    F("epoch", 56, "Q", "random at creation, new at each warm restart (Arena.new_epoch)"),
    F("created", 64, "d", "creation time, Unix seconds"),
    F("hash_seed", 72, "Q", "random at creation"),
    # Mutable words, one 8-byte slot each from 512.
    F("writer_pid", 512, "I", "pid holding the write lock, 0 when released cleanly"),
    F("tx_active", 520, "Q", "id of the journal step in progress, 0 = none"),
    F("tx_seq", 528, "Q", "last journal step id handed out"),
    F("clean", 536, "I", "1 = the owner stopped cleanly (warm restart allowed)"),
    F("owner_pid", 544, "I", "pid of the supervisor that owns the segment"),
    F("repairs", 552, "Q", "journal repairs after a writer died"),
    F("class_count", 560, "I", "(J) slab classes defined"),
    F("class_version", 564, "I", "(J) bumped when a class is added"),
    F("free_page", 568, "I", "(J) head of the free page list (page + 1), 0 = none"),
    F("free_pages", 572, "I", "(J) pages on that list"),
    F("victim_cursor", 576, "I", "(J) next page to consider when one must be reassigned"),
    F("group_limit", 580, "I", "(J) 1 + highest group id defined"),
    F("page_moves", 584, "Q", "pages reassigned between slab classes"),
    F("owner_start", 592, "d", "when the owner started (Unix seconds, for stats)"),
    F("front_port", 600, "I", "TCP port of the owner's HTTP front (0 = none); written last"),
    F("front_host", 608, f"{FRONT_HOST_BYTES}s", "host the front listens on"),
    F("peer_count", 672, "I", "peers in the owner's ring (>1: writes are cluster-wide)"),
    F("retired", 680, "I", "1 = its name is being removed or replaced (arena.retire)"),
    # The front's TLS settings (layout version 2 on).
    F("front_tls", 1024, "I", "1 = the front speaks HTTPS"),
    F("front_tls_name", 1032, f"{TLS_NAME_BYTES}s", "name its certificate is verified for"),
    F("front_tls_ca", 1288, f"{TLS_CA_BYTES}s", "CA file the owner verifies peers with; "
                                                  "empty: the system's"),
)

# -- the journal ----------------------------------------------------------------------------

LOG_ENTRIES = 4096                   # journal capacity per committed step
LOG_ENTRY = Record(
    "journal entry", 24,
    F("word", 0, "Q", "offset of the 8-byte word written (aligned down)"),
    F("old", 8, "Q", "the word's contents before the write"),
    F("step", 16, "Q", "step id; the entry counts only if this equals HEADER.tx_active. "
                       "Written last: a writer killed mid-entry leaves a stale id"),
)
LOG_ENTRY_BYTES = LOG_ENTRY.nbytes

# -- groups ---------------------------------------------------------------------------------

DEFAULT_MAX_GROUPS = 64              # group ids are u8 in item headers
GROUP_NAME_BYTES = 64
GROUP = Record(
    "group", 256,                    # at groups_off + 256 * group id
    F("name", 0, f"{GROUP_NAME_BYTES}s", "group name"),
    F("budget", 64, "Q", "cache bytes (key + value bytes, as groupcache counts)"),
    F("ttl", 72, "d", "default TTL in seconds (0 = none)"),
    F("bytes", 80, "Q", "(J) bytes held"),
    F("items", 88, "Q", "(J) items held"),
    F("hand", 96, "I", "(J) CLOCK hand: ref of the oldest item; 0 = empty"),
    F("defined", 100, "I", "(J) 1 = defined"),
    F("evictions", 104, "Q", "statistics, not journaled"),
    F("expirations", 112, "Q", "statistics, not journaled"),
    F("sets", 120, "Q", "statistics, not journaled"),
    F("deletes", 128, "Q", "statistics, not journaled"),
    F("stale", 136, "d", "(J) stale window in seconds (0 = none): how long past its expiry "
                         "an item may still be served stale while it is reloaded"),
    F("generation", 144, "Q", "(J) bumped by every clear (flush) of the group"),
)
GROUP_RECORD_BYTES = GROUP.nbytes

# -- items ----------------------------------------------------------------------------------

MAX_KEY_BYTES = 250                  # as memcached
ITEM = Record(
    "item header", 24,               # at the start of its slab chunk; key, then value follow
    # Bytes 0..7 are word 0: one journaled u64 when a chunk changes hands. In a free chunk
    # ``chain`` is the next free slot + 1 and ``state`` is STATE_FREE (slabs.py).
    F("chain", 0, "I", "hash chain: next item ref (free chunk: next free slot + 1)"),
    F("state", 4, "B", "slabs.STATE_*: FREE, LIVE, WRITING, HOT, NEGATIVE"),
    F("klen", 5, "B", "key length"),
    F("gid", 6, "B", "group id"),
    F("frac", 7, "B", "expiry, fraction of a second in 1/256"),
    F("seconds", 8, "I", "expiry, Unix seconds (0 = never)"),
    F("vlen", 12, "I", "value length"),
    F("prev", 16, "I", "ring: previous item ref (older side)"),
    F("next", 20, "I", "ring: next item ref (newer side)"),
)
ITEM_HEADER_BYTES = ITEM.nbytes
ITEM_WORD0 = ITEM.chain              # the u64 of chain .. frac

# -- slabs ----------------------------------------------------------------------------------

MAX_CLASSES = 64
SLAB_CLASS = Record(
    "slab class", 32,                # at classes_off + 32 * class id
    F("chunk_size", 0, "I", "bytes, multiple of 8"),
    F("partial", 4, "I", "partial list head: page + 1 of a page of this class with a free "
                         "chunk (0 = none)"),
    F("pages", 8, "I", "pages held"),
    F("reserved", 12, "I", "(reserved)"),
    F("vote_size", 16, "I", "vote: candidate chunk size (not journaled: only a hint)"),
    F("vote_lead", 20, "I", "vote: candidate's lead"),
)
CLASS_RECORD_BYTES = SLAB_CLASS.nbytes

PAGE = Record(
    "page", 32,                      # at pagemeta_off + 32 * page
    F("class_id", 0, "I", "class id + 1 (0 = the page is free)"),
    F("carve", 4, "I", "carve mark: slots below it have been handed out at least once"),
    F("used", 8, "I", "chunks in use (one u64 with free_head: a chunk taken or given back "
                      "is one journaled write)"),
    F("free_head", 12, "I", "free chunk list head: slot + 1 (0 = none); the list threads "
                            "through the chunks"),
    F("prev", 16, "I", "previous page + 1 on the class's partial list"),
    F("next", 20, "I", "next page + 1 on the partial list, or on the free-page list"),
    F("chunk_size", 24, "I", "the class's chunk size (one read away from a chunk)"),
    F("slots", 28, "I", "slots in the page"),
)
PAGE_RECORD_BYTES = PAGE.nbytes

# -- the index's arrays ---------------------------------------------------------------------

STRIPE_BYTES = 4                     # u32 seqlock counter per stripe
BUCKET_BYTES = 4                     # u32 item ref per bucket
NSTRIPES = 4096                      # seqlock stripes (fewer when there are fewer buckets)
PAGE_BYTES_PER_BUCKET = 128          # one hash bucket per 128 bytes of pages
REFBIT_GRANULE = 32                  # one CLOCK bit per 32 bytes of pages (= smallest chunk)

# -- singleflight ---------------------------------------------------------------------------

INFLIGHT_SLOTS = 256                 # concurrent cold loads tracked host-wide
INFLIGHT_ERROR_BYTES = 224
INFLIGHT = Record(
    "in-flight slot", 512,           # at inflight_off + 512 * slot
    F("state", 0, "I", "FREE, LOADING, DONE_OK, DONE_NOT_FOUND, DONE_ERROR (singleflight.py)"),
    F("pid", 4, "I", "loader pid"),
    F("ticket", 8, "Q", "unique per claim; waiters check it"),
    F("changed", 16, "d", "time of the last change (Unix s): old finished slots are reused"),
    F("waiters", 24, "I", "waiters still to read the result"),
    F("gid", 28, "B", "group id"),
    F("klen", 29, "B", "key length"),
    F("elen", 30, "H", "error message length"),
    F("key", 32, f"{MAX_KEY_BYTES}s", "the key"),
    F("generation", 284, "I", "the group's generation when the load was claimed (low 32 "
                              "bits)"),
    F("error", 288, f"{INFLIGHT_ERROR_BYTES}s", "error message, UTF-8"),
)
INFLIGHT_SLOT_BYTES = INFLIGHT.nbytes

# -- counters -------------------------------------------------------------------------------

COUNTER_SLOTS = 128                  # processes that keep per-process counters
COUNTERS_PER_GROUP = 16              # u64 counters reserved per group in a slot
COUNTER_SLOT = Record(
    "counter slot", 64 + COUNTERS_PER_GROUP * 8,   # as long as for one group: see below
    F("pid", 0, "I", "pid owning the slot (0 = free); slot 0 holds the counts of gone "
                     "processes and is never claimed"),
    F("role", 4, "I", "0 = connect() client, N = worker N"),
    F("claimed", 8, "d", "when it was claimed"),
    F("counts", 64, f"{COUNTERS_PER_GROUP * 8}s", "u64 counters[group id][COUNTERS_PER_GROUP]"
                                                  ", group-major, repeated for every group"),
)


def counter_slot_bytes(max_groups):
    """A counter slot's bytes: its header, then COUNTERS_PER_GROUP u64s per group."""
    return COUNTER_SLOT.counts + max_groups * COUNTER_SLOT.fields["counts"].size


# -- peer health ----------------------------------------------------------------------------

PEER_SLOTS = 1024                    # peers whose health the host's workers share
PEER = Record(
    "peer health slot", 32,          # at peers_off + 32 * slot; open addressing by URL hash
    F("url_hash", 0, "Q", "xxh3_64 of the peer URL (0 = empty slot)"),
    F("suspect_until", 8, "d", "Unix s: requests skip the peer before then"),
    F("failures", 16, "I", "consecutive failures (backoff doubles with each)"),
    F("last_failure", 24, "d", "time of the last failure"),
)
PEER_SLOT_BYTES = PEER.nbytes

# -- lock bytes -----------------------------------------------------------------------------
# Byte ranges of the segment file locked with OFD locks (locks.py): names, not data.

WRITE_LOCK_BYTE = 0                  # the write lock (store.py)
OWNER_LOCK_BYTE = 1                  # held by the owning supervisor while it runs
INFLIGHT_LOCK_BASE = 4096            # in-flight slot i: held by its loader (singleflight.py)
LOCK_BYTES = {"write": range(WRITE_LOCK_BYTE, WRITE_LOCK_BYTE + 1),
              "owner": range(OWNER_LOCK_BYTE, OWNER_LOCK_BYTE + 1),
              "inflight": range(INFLIGHT_LOCK_BASE, INFLIGHT_LOCK_BASE + INFLIGHT_SLOTS)}

RECORDS = (HEADER, LOG_ENTRY, GROUP, ITEM, SLAB_CLASS, PAGE, INFLIGHT, COUNTER_SLOT, PEER)

# -- the region map -------------------------------------------------------------------------

DEFAULT_MAX_ITEM_SIZE = 1 << 20      # 1 MiB of value
MAX_SEGMENT_BYTES = 32 << 30         # item refs are u32 counts of 8-byte units


def _round_up(n, to):
    return -(-n // to) * to


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
        stripes_off, offset = offset, offset + NSTRIPES * STRIPE_BYTES
        inflight_off, offset = offset, offset + INFLIGHT_SLOTS * INFLIGHT_SLOT_BYTES
        counters_off, offset = offset, offset + COUNTER_SLOTS * counter_slot_bytes(max_groups)
        peers_off, offset = offset, offset + PEER_SLOTS * PEER_SLOT_BYTES
        fixed = offset
        if npages is None:
            per_page = (page_size + PAGE_RECORD_BYTES + page_size // (8 * REFBIT_GRANULE)
                        + BUCKET_BYTES * page_size // PAGE_BYTES_PER_BUCKET)
            npages = max(0, (total_size - fixed - 3 * 4096) // per_page)
        while npages >= 2:
            pagemeta_off = fixed
            refbits_off = _round_up(pagemeta_off + npages * PAGE_RECORD_BYTES, 8)
            nbuckets = npages * page_size // PAGE_BYTES_PER_BUCKET
            buckets_off = _round_up(refbits_off + npages * page_size // (8 * REFBIT_GRANULE), 8)
            pages_off = _round_up(buckets_off + BUCKET_BYTES * nbuckets, 4096)
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
