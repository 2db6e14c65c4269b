r"""Slab allocator in the arena: pages handed to size classes on demand, chunks carved from pages.

Memcached's scheme: chunk sizes grow by GROWTH_FACTOR (1.25) from MIN_CHUNK up to the page
size; a page (sized to hold the largest item) belongs to one class and is cut into equal
chunks. Two additions:

* A page whose chunks are all free goes back to the free-page list at once, so memory left
  by one size drifts to whichever class needs it next.
* Adaptive classes. Fixed-size values are common (one kind of object per group) and a 1.25
  grid can waste up to a fifth of every chunk on them. When most items placed in a class would
  fit a chunk at least 1/16 smaller, a Boyer-Moore majority vote finds that size, and once it
  has VOTES_FOR_NEW_CLASS more votes than all others (and free pages remain) it becomes a
  class of its own, up to MAX_CLASSES classes. Older items stay where they are.

Pure data structure: no locks. Every method must be called by the holder of the write lock,
inside a journal step; structural writes go through the journal.

The class record (SLAB_CLASS, one per class id) and the page record (PAGE, one per page) are
declared in layout.py, with the header words this module keeps (class count and version,
the free page list, the victim cursor, page moves).

Every page with a chunk to hand out is on its class's partial list; a page that fills up
stays there until ``alloc`` meets it at the head (so a full page that gives a chunk back and
takes it again, the steady state of a full cache, costs no list writes).

Chunk word 0 (u64) is shared with item headers (layout.ITEM): in a free chunk ITEM.chain is
the next free slot + 1 and ITEM.state is STATE_FREE; items set one of HOLDING_ITEM.
"""

import bisect
import struct

from .errors import CorruptSegment
from .layout import (CLASS_RECORD_BYTES, HEADER, ITEM, MAX_CLASSES, PAGE, PAGE_RECORD_BYTES,
                     SLAB_CLASS)

GROWTH_FACTOR = 1.25
MIN_CHUNK = 32                  # = REFBIT_GRANULE: every chunk start gets its own CLOCK bit
VOTES_FOR_NEW_CLASS = 32
CHUNK_ALIGN = 8               # chunk sizes and the sizes items ask for are multiples of it
FIT_SHIFT = 4                 # a chunk more than size >> FIT_SHIFT too big fits badly: vote
VICTIM_CANDIDATES = 16        # pages looked at when one must be emptied for another class
STATE_FREE = 0
STATE_LIVE = 1
STATE_WRITING = 2             # a value being overwritten in place (lru_index.py)
STATE_HOT = 3                 # a live copy of a value another host owns (odd = readable)
STATE_NEGATIVE = 5            # "the getter said: no such key", remembered (no value bytes)
HOLDING_ITEM = (STATE_LIVE, STATE_WRITING, STATE_HOT, STATE_NEGATIVE)

_CLASS = SLAB_CLASS.struct("chunk_size", "vote_lead")
_VOTE = SLAB_CLASS.struct("vote_size", "vote_lead")
_PAGE = PAGE.struct("class_id", "slots")
_PAGE_USE = PAGE.struct("class_id", "used")        # owner, carve mark, chunks in use
_LINKS = PAGE.struct("prev", "next")
# Header words (layout.HEADER) and record fields, as names of this module.
_CLASS_COUNT, _CLASS_VERSION = HEADER.class_count, HEADER.class_version
_FREE_PAGE, _FREE_PAGES = HEADER.free_page, HEADER.free_pages
_VICTIM_CURSOR, _PAGE_MOVES = HEADER.victim_cursor, HEADER.page_moves
_C_SIZE, _C_PARTIAL, _C_PAGES = SLAB_CLASS.chunk_size, SLAB_CLASS.partial, SLAB_CLASS.pages
_P_CLASS, _P_PREV, _P_NEXT = PAGE.class_id, PAGE.prev, PAGE.next
# u64 words written whole: low u32 + (high u32 << 32).
_C_SIZE_PARTIAL = SLAB_CLASS.pair("chunk_size", "partial")
_C_PAGES_RESERVED = SLAB_CLASS.pair("pages", "reserved")
_C_VOTE = SLAB_CLASS.pair("vote_size", "vote_lead")
_P_CLASS_CARVE = PAGE.pair("class_id", "carve")
_P_USED_FREE = PAGE.pair("used", "free_head")
_P_LINKS = PAGE.pair("prev", "next")
_P_SIZE_SLOTS = PAGE.pair("chunk_size", "slots")
_LINK, _STATE = ITEM.chain, ITEM.state    # a chunk's word 0, free or holding an item
_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")
_PAIR = 1 << 32


def default_chunk_sizes(page_size, factor=GROWTH_FACTOR):
    """MIN_CHUNK, then x factor (rounded up to 8, at least +8) up to the page size."""
    sizes, size = [], MIN_CHUNK
    while size < page_size:
        sizes.append(size)
        size = max(size + 8, -(-int(size * factor) // 8) * 8)
    sizes.append(page_size)
    if len(sizes) > MAX_CLASSES:
        raise ValueError(f"growth factor {factor} makes more than {MAX_CLASSES} classes")
    return sizes


class Slabs:
    """Allocator over the arena's pages. See the module docstring for the contract."""

    def __init__(self, arena, journal):
        lay = arena.layout
        self.buf = arena.buf
        self.journal = journal
        self.page_size = lay.page_size
        self.npages = lay.npages
        self.pages_off = lay.pages_off
        self.pages_end = lay.pages_off + lay.npages * lay.page_size
        self.pagemeta_off = lay.pagemeta_off
        self.classes_off = lay.classes_off
        self._sizes_version = -1
        self._sizes = []               # sorted (chunk size, class id), cached per class version
        self._size_keys = []           # the chunk sizes alone, for bisect

    # -- creation ---------------------------------------------------------------------------

    def format(self):
        """Initialise a zeroed arena: default classes, every page on the free list (unjournaled)."""
        buf = self.buf
        sizes = default_chunk_sizes(self.page_size)
        for class_id, size in enumerate(sizes):
            _CLASS.pack_into(buf, self.classes_off + class_id * CLASS_RECORD_BYTES + _C_SIZE,
                             size, 0, 0, 0, 0, 0)
        _U32.pack_into(buf, _CLASS_COUNT, len(sizes))
        _U32.pack_into(buf, _CLASS_VERSION, 1)
        for page in range(self.npages):
            nxt = page + 2 if page + 1 < self.npages else 0
            _PAGE.pack_into(buf, self.pagemeta_off + page * PAGE_RECORD_BYTES + _P_CLASS,
                            0, 0, 0, 0, 0, nxt, 0, 0)
        _U32.pack_into(buf, _FREE_PAGE, 1)
        _U32.pack_into(buf, _FREE_PAGES, self.npages)

    # -- classes ----------------------------------------------------------------------------

    def _sorted_sizes(self):
        version = _U32.unpack_from(self.buf, _CLASS_VERSION)[0]
        if version != self._sizes_version:
            count = _U32.unpack_from(self.buf, _CLASS_COUNT)[0]
            self._sizes = sorted(
                (_U32.unpack_from(self.buf, self.classes_off + c * CLASS_RECORD_BYTES
                                  + _C_SIZE)[0], c)
                for c in range(count))
            self._size_keys = [size for size, _class_id in self._sizes]
            self._sizes_version = version
        return self._sizes

    def class_for(self, need):
        """The class to hold an item of ``need`` bytes (header included); None if none can."""
        need = -(-need // CHUNK_ALIGN) * CHUNK_ALIGN
        sizes = self._sorted_sizes()
        index = bisect.bisect_left(self._size_keys, need)
        if index == len(sizes):
            return None
        size, class_id = sizes[index]
        if size - need > size >> FIT_SHIFT:
            return self._vote(class_id, need)
        return class_id

    def _vote(self, class_id, need):
        """Record that ``need`` fits badly in ``class_id``; maybe make it a class of its own."""
        buf = self.buf
        record = self.classes_off + class_id * CLASS_RECORD_BYTES
        candidate, lead = _VOTE.unpack_from(buf, record + _C_VOTE)
        if candidate == need:
            lead += 1
        elif lead == 0:
            candidate, lead = need, 1
        else:
            lead -= 1
        _VOTE.pack_into(buf, record + _C_VOTE, candidate, lead)   # a hint: not journaled
        count = _U32.unpack_from(buf, _CLASS_COUNT)[0]
        if (lead >= VOTES_FOR_NEW_CLASS and count < MAX_CLASSES
                and _U32.unpack_from(buf, _FREE_PAGES)[0] > 0):
            _VOTE.pack_into(buf, record + _C_VOTE, 0, 0)
            journal = self.journal
            new_record = self.classes_off + count * CLASS_RECORD_BYTES
            journal.w64(new_record + _C_SIZE_PARTIAL, need)   # chunk size, empty partial list
            journal.w64(new_record + _C_PAGES_RESERVED, 0)               # no pages, no chunks
            journal.w64(new_record + _C_VOTE, 0)
            journal.w32(_CLASS_COUNT, count + 1)
            journal.w32(_CLASS_VERSION,
                        _U32.unpack_from(buf, _CLASS_VERSION)[0] + 1)
            return count
        return class_id

    def chunk_size(self, class_id):
        record = self.classes_off + class_id * CLASS_RECORD_BYTES
        return _U32.unpack_from(self.buf, record + _C_SIZE)[0]

    def class_of(self, offset):
        """Class id of the page holding ``offset`` (which must be inside a page in use)."""
        page = (offset - self.pages_off) // self.page_size
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        return _U32.unpack_from(self.buf, page_rec + _P_CLASS)[0] - 1

    # -- chunks -----------------------------------------------------------------------------

    def alloc(self, class_id):
        """Offset of a chunk of ``class_id``, or 0 if neither the class nor the free list has one."""
        buf, journal = self.buf, self.journal
        class_rec = self.classes_off + class_id * CLASS_RECORD_BYTES
        head = _U32.unpack_from(buf, class_rec + _C_PARTIAL)[0]
        while head:
            page_rec = self.pagemeta_off + (head - 1) * PAGE_RECORD_BYTES
            _cls, carve, used, free_head, _prev, _next, size, slots = _PAGE.unpack_from(
                buf, page_rec + _P_CLASS)
            if free_head or carve < slots:
                break
            self._unlink_partial(class_rec, page_rec)        # full: off the list
            head = _next
        else:
            head = self._take_free_page(class_id)
            if not head:
                return 0
            page_rec = self.pagemeta_off + (head - 1) * PAGE_RECORD_BYTES
            _cls, carve, used, free_head, _prev, _next, size, slots = _PAGE.unpack_from(
                buf, page_rec + _P_CLASS)
        page = head - 1
        base = self.pages_off + page * self.page_size
        if free_head:
            offset = base + (free_head - 1) * size
            journal.w64(page_rec + _P_USED_FREE,
                        used + 1 + _U32.unpack_from(buf, offset + _LINK)[0] * _PAIR)
        else:
            offset = base + carve * size
            # class + carve mark, then in use + free head (empty): two adjacent words
            journal.w64x2(page_rec + _P_CLASS_CARVE, _cls + (carve + 1) * _PAIR, used + 1)
        return offset

    def free(self, offset):
        """Give a chunk back. Word 0 becomes the free-list link with state STATE_FREE."""
        buf, journal = self.buf, self.journal
        page = (offset - self.pages_off) // self.page_size
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        class_id1, _carve, used, free_head, prev, nxt, size, _slots = _PAGE.unpack_from(
            buf, page_rec + _P_CLASS)
        class_rec = self.classes_off + (class_id1 - 1) * CLASS_RECORD_BYTES
        listed = prev or nxt or _U32.unpack_from(buf, class_rec + _C_PARTIAL)[0] == page + 1
        slot = (offset - self.pages_off - page * self.page_size) // size
        journal.w64(offset, free_head)                   # link + STATE_FREE (byte 4 = 0)
        journal.w64(page_rec + _P_USED_FREE, used - 1 + (slot + 1) * _PAIR)
        if used == 1:
            if listed:
                self._unlink_partial(class_rec, page_rec)
            self._release_page(class_rec, page, page_rec)
        elif not listed:
            self._push_partial(class_rec, page, page_rec)

    # -- pages ------------------------------------------------------------------------------

    def _take_free_page(self, class_id):
        buf, journal = self.buf, self.journal
        head = _U32.unpack_from(buf, _FREE_PAGE)[0]
        if not head:
            return 0
        page = head - 1
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        journal.w32(_FREE_PAGE, _U32.unpack_from(buf, page_rec + _P_NEXT)[0])
        journal.w32(_FREE_PAGES, _U32.unpack_from(buf, _FREE_PAGES)[0] - 1)
        class_rec = self.classes_off + class_id * CLASS_RECORD_BYTES
        size = _U32.unpack_from(buf, class_rec + _C_SIZE)[0]
        journal.w64(page_rec + _P_CLASS_CARVE, class_id + 1)  # class, nothing carved
        journal.w64(page_rec + _P_USED_FREE, 0)                     # nothing in use, no free list
        journal.w64(page_rec + _P_LINKS, 0)                    # unlinked
        journal.w64(page_rec + _P_SIZE_SLOTS, size + (self.page_size // size) * _PAIR)
        journal.w32(class_rec + _C_PAGES, _U32.unpack_from(buf, class_rec + _C_PAGES)[0] + 1)
        self._push_partial(class_rec, page, page_rec)
        return head

    def _release_page(self, class_rec, page, page_rec):
        buf, journal = self.buf, self.journal
        journal.w32(class_rec + _C_PAGES, _U32.unpack_from(buf, class_rec + _C_PAGES)[0] - 1)
        journal.w64(page_rec + _P_CLASS_CARVE, 0)                         # free
        journal.w64(page_rec + _P_LINKS, _U32.unpack_from(buf, _FREE_PAGE)[0] * _PAIR)
        journal.w32(_FREE_PAGE, page + 1)
        journal.w32(_FREE_PAGES, _U32.unpack_from(buf, _FREE_PAGES)[0] + 1)

    def _push_partial(self, class_rec, page, page_rec):
        buf, journal = self.buf, self.journal
        head = _U32.unpack_from(buf, class_rec + _C_PARTIAL)[0]
        journal.w64(page_rec + _P_LINKS, head * _PAIR)         # prev = none, next = old head
        if head:
            journal.w32(self.pagemeta_off + (head - 1) * PAGE_RECORD_BYTES + _P_PREV, page + 1)
        journal.w32(class_rec + _C_PARTIAL, page + 1)

    def _unlink_partial(self, class_rec, page_rec):
        buf, journal = self.buf, self.journal
        prev, nxt = _LINKS.unpack_from(buf, page_rec + _P_PREV)
        if prev:
            journal.w32(self.pagemeta_off + (prev - 1) * PAGE_RECORD_BYTES + _P_NEXT, nxt)
        else:
            journal.w32(class_rec + _C_PARTIAL, nxt)
        if nxt:
            journal.w32(self.pagemeta_off + (nxt - 1) * PAGE_RECORD_BYTES + _P_PREV, prev)
        journal.w64(page_rec + _P_LINKS, 0)

    def free_pages(self):
        return _U32.unpack_from(self.buf, _FREE_PAGES)[0]

    def has_pages(self, class_id):
        record = self.classes_off + class_id * CLASS_RECORD_BYTES
        return _U32.unpack_from(self.buf, record + _C_PAGES)[0] > 0

    def victim_page(self, class_id):
        """A page in use to empty for ``class_id``: of the next VICTIM_CANDIDATES pages of other
        classes after a round-robin cursor, the one with the fewest chunks in use; a page of
        ``class_id`` itself only if no other class holds any. None if no page is in use."""
        buf, journal = self.buf, self.journal
        cursor = _U32.unpack_from(buf, _VICTIM_CURSOR)[0]
        best = fallback = None
        seen = 0
        for step in range(self.npages):
            page = (cursor + step) % self.npages
            owner, _carve, used = _PAGE_USE.unpack_from(
                buf, self.pagemeta_off + page * PAGE_RECORD_BYTES + _P_CLASS)
            if not owner:
                continue
            if owner == class_id + 1:
                fallback = page if fallback is None else fallback
                continue
            if best is None or used < best[0]:
                best = (used, page)
            seen += 1
            if seen >= VICTIM_CANDIDATES:
                break
        page = best[1] if best else fallback
        if page is not None:
            journal.w32(_VICTIM_CURSOR, (page + 1) % self.npages)
            _U64.pack_into(buf, _PAGE_MOVES, _U64.unpack_from(buf, _PAGE_MOVES)[0] + 1)
        return page

    def live_chunks(self, page):
        """Offsets of the chunks of ``page`` that hold items (read under the write lock)."""
        buf = self.buf
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        _cls, carve, _used, _free, _p, _n, size, _slots = _PAGE.unpack_from(
            buf, page_rec + _P_CLASS)
        base = self.pages_off + page * self.page_size
        return [base + slot * size for slot in range(carve)
                if buf[base + slot * size + _STATE] in HOLDING_ITEM]

    # -- figures ----------------------------------------------------------------------------

    def stats(self):
        """Per-class chunk size, pages and chunks in use; free pages; page moves."""
        buf = self.buf
        used = [0] * MAX_CLASSES
        for page in range(self.npages):
            owner, _carve, in_use = _PAGE_USE.unpack_from(
                buf, self.pagemeta_off + page * PAGE_RECORD_BYTES + _P_CLASS)
            if owner:
                used[owner - 1] += in_use
        classes = []
        for size, class_id in self._sorted_sizes():
            record = self.classes_off + class_id * CLASS_RECORD_BYTES
            pages = _U32.unpack_from(buf, record + _C_PAGES)[0]
            if pages:
                classes.append({"chunk_size": size, "pages": pages, "chunks_used": used[class_id],
                                "chunks_per_page": self.page_size // size})
        return {"page_size": self.page_size, "pages": self.npages,
                "free_pages": self.free_pages(), "classes": classes,
                "class_count": len(self._sorted_sizes()),
                "page_moves": _U64.unpack_from(buf, _PAGE_MOVES)[0]}

    # -- consistency ------------------------------------------------------------------------

    def audit(self):
        """Check the page table, free lists and partial lists against the chunks; returns the
        set of chunk offsets holding items. CorruptSegment on the first inconsistency."""
        buf = self.buf
        items = set()
        free_pages = 0
        for page in range(self.npages):
            owner, carve, used, free_head, _prev, _next, size, slots = _PAGE.unpack_from(
                buf, self.pagemeta_off + page * PAGE_RECORD_BYTES + _P_CLASS)
            if not owner:
                free_pages += 1
                continue
            if not (size == self.chunk_size(owner - 1) and slots == self.page_size // size):
                raise CorruptSegment("page geometry", page)
            if not (carve <= slots and used <= carve):
                raise CorruptSegment("page counts", page, carve, used)
            base = self.pages_off + page * self.page_size
            free = set()
            link = free_head
            while link:
                if not (0 < link <= carve and link - 1 not in free):
                    raise CorruptSegment("free list", page, link)
                free.add(link - 1)
                offset = base + (link - 1) * size
                if buf[offset + _STATE] != STATE_FREE:
                    raise CorruptSegment("free chunk state", page, link)
                link = _U32.unpack_from(buf, offset + _LINK)[0]
            held = [base + slot * size for slot in range(carve) if slot not in free]
            for offset in held:
                if buf[offset + _STATE] not in HOLDING_ITEM:
                    raise CorruptSegment("held chunk state", page, offset)
            if len(held) != used:
                raise CorruptSegment("page used", page, len(held), used)
            items.update(held)
        listed = 0
        link = _U32.unpack_from(buf, _FREE_PAGE)[0]
        while link:
            listed += 1
            if listed > self.npages:
                raise CorruptSegment("free page list loops")
            link = _U32.unpack_from(
                buf, self.pagemeta_off + (link - 1) * PAGE_RECORD_BYTES + _P_NEXT)[0]
        if not (listed == free_pages == self.free_pages()):
            raise CorruptSegment("free pages", listed, free_pages, self.free_pages())
        return items
