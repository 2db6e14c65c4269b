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

Class record (CLASS_RECORD_BYTES, at ``classes_off + 32 * class_id``)::

    0   u32  chunk size (bytes, multiple of 8)
    4   u32  partial list head: page + 1 of a page of this class with a free chunk (0 = none)
    8   u32  pages held
    12  u32  (reserved)
    16  u32  vote: candidate chunk size        (not journaled: only a hint)
    20  u32  vote: candidate's lead

Page record (PAGE_RECORD_BYTES, at ``pagemeta_off + 32 * page``)::

    0   u32  class id + 1 (0 = the page is free)
    4   u32  carve mark: slots below it have been handed out at least once
    8   u32  chunks in use                       \ one word: a chunk taken from or given back
    12  u32  free chunk list head: slot + 1      / to the free list is one journaled write
             (0 = none); the list threads through the chunks
    16  u32  previous page + 1 on the class's partial list
    20  u32  next page + 1 on the partial list, or on the free-page list
    24  u32  chunk size (the class's, so that a chunk's size is one read away)
    28  u32  slots in the page

Every page with a chunk to hand out is on its class's partial list; a page that fills up
stays there until ``alloc`` meets it at the head (so a full page that gives a chunk back and
takes it again, the steady state of a full cache, costs no list writes).

Chunk word 0 (u64) is shared with item headers (lru_index.py): in a free chunk the low u32 is
the next free slot + 1 and byte 4, the state, is STATE_FREE; items set one of HOLDING_ITEM.
"""

import bisect
import struct

from .arena import (CLASS_RECORD_BYTES, MAX_CLASSES, PAGE_RECORD_BYTES,
                    _OFFSET_CLASS_COUNT, _OFFSET_CLASS_VERSION, _OFFSET_FREE_PAGE,
                    _OFFSET_FREE_PAGES, _OFFSET_PAGE_MOVES, _OFFSET_VICTIM_CURSOR)
from .errors import CorruptSegment

GROWTH_FACTOR = 1.25
MIN_CHUNK = 32                  # = REFBIT_GRANULE: every chunk start gets its own CLOCK bit
VOTES_FOR_NEW_CLASS = 32
VICTIM_CANDIDATES = 16        # pages looked at when one must be emptied for another class
STATE_FREE = 0
STATE_LIVE = 1
STATE_WRITING = 2             # a value being overwritten in place (lru_index.py)
STATE_HOT = 3                 # a live copy of a value another host owns (odd = readable)
STATE_NEGATIVE = 5            # "the getter said: no such key", remembered (no value bytes)
HOLDING_ITEM = (STATE_LIVE, STATE_WRITING, STATE_HOT, STATE_NEGATIVE)

_CLASS = struct.Struct("IIIIII")
_PAGE = struct.Struct("IIIIIIII")
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
            _CLASS.pack_into(buf, self.classes_off + class_id * CLASS_RECORD_BYTES,
                             size, 0, 0, 0, 0, 0)
        _U32.pack_into(buf, _OFFSET_CLASS_COUNT, len(sizes))
        _U32.pack_into(buf, _OFFSET_CLASS_VERSION, 1)
        for page in range(self.npages):
            nxt = page + 2 if page + 1 < self.npages else 0
            _PAGE.pack_into(buf, self.pagemeta_off + page * PAGE_RECORD_BYTES,
                            0, 0, 0, 0, 0, nxt, 0, 0)
        _U32.pack_into(buf, _OFFSET_FREE_PAGE, 1)
        _U32.pack_into(buf, _OFFSET_FREE_PAGES, self.npages)

    # -- classes ----------------------------------------------------------------------------

    def _sorted_sizes(self):
        version = _U32.unpack_from(self.buf, _OFFSET_CLASS_VERSION)[0]
        if version != self._sizes_version:
            count = _U32.unpack_from(self.buf, _OFFSET_CLASS_COUNT)[0]
            self._sizes = sorted(
                (_U32.unpack_from(self.buf, self.classes_off + c * CLASS_RECORD_BYTES)[0], c)
                for c in range(count))
            self._size_keys = [size for size, _class_id in self._sizes]
            self._sizes_version = version
        return self._sizes

    def class_for(self, need):
        """The class to hold an item of ``need`` bytes (header included); None if none can."""
        need = -(-need // 8) * 8
        sizes = self._sorted_sizes()
        index = bisect.bisect_left(self._size_keys, need)
        if index == len(sizes):
            return None
        size, class_id = sizes[index]
        if size - need > size >> 4:
            return self._vote(class_id, need)
        return class_id

    def _vote(self, class_id, need):
        """Record that ``need`` fits badly in ``class_id``; maybe make it a class of its own."""
        buf = self.buf
        record = self.classes_off + class_id * CLASS_RECORD_BYTES
        candidate, lead = struct.unpack_from("II", buf, record + 16)
        if candidate == need:
            lead += 1
        elif lead == 0:
            candidate, lead = need, 1
        else:
            lead -= 1
        struct.pack_into("II", buf, record + 16, candidate, lead)   # a hint: not journaled
        count = _U32.unpack_from(buf, _OFFSET_CLASS_COUNT)[0]
        if (lead >= VOTES_FOR_NEW_CLASS and count < MAX_CLASSES
                and _U32.unpack_from(buf, _OFFSET_FREE_PAGES)[0] > 0):
            struct.pack_into("II", buf, record + 16, 0, 0)
            journal = self.journal
            new_record = self.classes_off + count * CLASS_RECORD_BYTES
            journal.w64(new_record, need)                # chunk size, empty partial list
            journal.w64(new_record + 8, 0)               # no pages, no chunks
            journal.w64(new_record + 16, 0)
            journal.w32(_OFFSET_CLASS_COUNT, count + 1)
            journal.w32(_OFFSET_CLASS_VERSION,
                        _U32.unpack_from(buf, _OFFSET_CLASS_VERSION)[0] + 1)
            return count
        return class_id

    def chunk_size(self, class_id):
        return _U32.unpack_from(self.buf, self.classes_off + class_id * CLASS_RECORD_BYTES)[0]

    def class_of(self, offset):
        """Class id of the page holding ``offset`` (which must be inside a page in use)."""
        page = (offset - self.pages_off) // self.page_size
        return _U32.unpack_from(self.buf, self.pagemeta_off + page * PAGE_RECORD_BYTES)[0] - 1

    # -- chunks -----------------------------------------------------------------------------

    def alloc(self, class_id):
        """Offset of a chunk of ``class_id``, or 0 if neither the class nor the free list has one."""
        buf, journal = self.buf, self.journal
        class_rec = self.classes_off + class_id * CLASS_RECORD_BYTES
        head = _U32.unpack_from(buf, class_rec + 4)[0]
        while head:
            page_rec = self.pagemeta_off + (head - 1) * PAGE_RECORD_BYTES
            _cls, carve, used, free_head, _prev, _next, size, slots = _PAGE.unpack_from(buf, page_rec)
            if free_head or carve < slots:
                break
            self._unlink_partial(class_rec, page_rec)        # full: off the list
            head = _next
        else:
            head = self._take_free_page(class_id)
            if not head:
                return 0
            page_rec = self.pagemeta_off + (head - 1) * PAGE_RECORD_BYTES
            _cls, carve, used, free_head, _prev, _next, size, slots = _PAGE.unpack_from(buf, page_rec)
        page = head - 1
        base = self.pages_off + page * self.page_size
        if free_head:
            offset = base + (free_head - 1) * size
            journal.w64(page_rec + 8, used + 1 + _U32.unpack_from(buf, offset)[0] * _PAIR)
        else:
            offset = base + carve * size
            # class + carve mark, then in use + free head (empty): two adjacent words
            journal.w64x2(page_rec, _cls + (carve + 1) * _PAIR, used + 1)
        return offset

    def free(self, offset):
        """Give a chunk back. Word 0 becomes the free-list link with state STATE_FREE."""
        buf, journal = self.buf, self.journal
        page = (offset - self.pages_off) // self.page_size
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        class_id1, _carve, used, free_head, prev, nxt, size, _slots = _PAGE.unpack_from(
            buf, page_rec)
        class_rec = self.classes_off + (class_id1 - 1) * CLASS_RECORD_BYTES
        listed = prev or nxt or _U32.unpack_from(buf, class_rec + 4)[0] == page + 1
        slot = (offset - self.pages_off - page * self.page_size) // size
        journal.w64(offset, free_head)                   # link + STATE_FREE (byte 4 = 0)
        journal.w64(page_rec + 8, used - 1 + (slot + 1) * _PAIR)
        if used == 1:
            if listed:
                self._unlink_partial(class_rec, page_rec)
            self._release_page(class_rec, page, page_rec)
        elif not listed:
            self._push_partial(class_rec, page, page_rec)

    # -- pages ------------------------------------------------------------------------------

    def _take_free_page(self, class_id):
        buf, journal = self.buf, self.journal
        head = _U32.unpack_from(buf, _OFFSET_FREE_PAGE)[0]
        if not head:
            return 0
        page = head - 1
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        journal.w32(_OFFSET_FREE_PAGE, _U32.unpack_from(buf, page_rec + 20)[0])
        journal.w32(_OFFSET_FREE_PAGES, _U32.unpack_from(buf, _OFFSET_FREE_PAGES)[0] - 1)
        class_rec = self.classes_off + class_id * CLASS_RECORD_BYTES
        size = _U32.unpack_from(buf, class_rec)[0]
        journal.w64(page_rec, class_id + 1)              # class, nothing carved
        journal.w64(page_rec + 8, 0)                     # nothing in use, no free list
        journal.w64(page_rec + 16, 0)                    # unlinked
        journal.w64(page_rec + 24, size + (self.page_size // size) * _PAIR)
        journal.w32(class_rec + 8, _U32.unpack_from(buf, class_rec + 8)[0] + 1)
        self._push_partial(class_rec, page, page_rec)
        return head

    def _release_page(self, class_rec, page, page_rec):
        buf, journal = self.buf, self.journal
        journal.w32(class_rec + 8, _U32.unpack_from(buf, class_rec + 8)[0] - 1)
        journal.w64(page_rec, 0)                         # free
        journal.w64(page_rec + 16, _U32.unpack_from(buf, _OFFSET_FREE_PAGE)[0] * _PAIR)
        journal.w32(_OFFSET_FREE_PAGE, page + 1)
        journal.w32(_OFFSET_FREE_PAGES, _U32.unpack_from(buf, _OFFSET_FREE_PAGES)[0] + 1)

    def _push_partial(self, class_rec, page, page_rec):
        buf, journal = self.buf, self.journal
        head = _U32.unpack_from(buf, class_rec + 4)[0]
        journal.w64(page_rec + 16, head * _PAIR)         # prev = none, next = old head
        if head:
            journal.w32(self.pagemeta_off + (head - 1) * PAGE_RECORD_BYTES + 16, page + 1)
        journal.w32(class_rec + 4, page + 1)

    def _unlink_partial(self, class_rec, page_rec):
        buf, journal = self.buf, self.journal
        prev, nxt = struct.unpack_from("II", buf, page_rec + 16)
        if prev:
            journal.w32(self.pagemeta_off + (prev - 1) * PAGE_RECORD_BYTES + 20, nxt)
        else:
            journal.w32(class_rec + 4, nxt)
        if nxt:
            journal.w32(self.pagemeta_off + (nxt - 1) * PAGE_RECORD_BYTES + 16, prev)
        journal.w64(page_rec + 16, 0)

    def free_pages(self):
        return _U32.unpack_from(self.buf, _OFFSET_FREE_PAGES)[0]

    def has_pages(self, class_id):
        return _U32.unpack_from(self.buf, self.classes_off + class_id * CLASS_RECORD_BYTES + 8)[0] > 0

    def victim_page(self, class_id):
        """A page in use to empty for ``class_id``: of the next VICTIM_CANDIDATES pages of other
        classes after a round-robin cursor, the one with the fewest chunks in use; a page of
        ``class_id`` itself only if no other class holds any. None if no page is in use."""
        buf, journal = self.buf, self.journal
        cursor = _U32.unpack_from(buf, _OFFSET_VICTIM_CURSOR)[0]
        best = fallback = None
        seen = 0
        for step in range(self.npages):
            page = (cursor + step) % self.npages
            owner, _carve, used = struct.unpack_from("III", buf, self.pagemeta_off + page * PAGE_RECORD_BYTES)
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
            journal.w32(_OFFSET_VICTIM_CURSOR, (page + 1) % self.npages)
            _U64.pack_into(buf, _OFFSET_PAGE_MOVES, _U64.unpack_from(buf, _OFFSET_PAGE_MOVES)[0] + 1)
        return page

    def live_chunks(self, page):
        """Offsets of the chunks of ``page`` that hold items (read under the write lock)."""
        buf = self.buf
        page_rec = self.pagemeta_off + page * PAGE_RECORD_BYTES
        _cls, carve, _used, _free, _p, _n, size, _slots = _PAGE.unpack_from(buf, page_rec)
        base = self.pages_off + page * self.page_size
        return [base + slot * size for slot in range(carve)
                if buf[base + slot * size + 4] in HOLDING_ITEM]

    # -- figures ----------------------------------------------------------------------------

    def stats(self):
        """Per-class chunk size, pages and chunks in use; free pages; page moves."""
        buf = self.buf
        used = [0] * MAX_CLASSES
        for page in range(self.npages):
            owner, _carve, in_use = struct.unpack_from("III", buf, self.pagemeta_off + page * PAGE_RECORD_BYTES)
            if owner:
                used[owner - 1] += in_use
        classes = []
        for size, class_id in self._sorted_sizes():
            pages = _CLASS.unpack_from(buf, self.classes_off + class_id * CLASS_RECORD_BYTES)[2]
            if pages:
                classes.append({"chunk_size": size, "pages": pages, "chunks_used": used[class_id],
                                "chunks_per_page": self.page_size // size})
        return {"page_size": self.page_size, "pages": self.npages,
                "free_pages": self.free_pages(), "classes": classes,
                "class_count": len(self._sorted_sizes()),
                "page_moves": _U64.unpack_from(buf, _OFFSET_PAGE_MOVES)[0]}

    # -- consistency ------------------------------------------------------------------------

    def audit(self):
        """Check the page table, free lists and partial lists against the chunks; returns the
        set of chunk offsets holding items. CorruptSegment on the first inconsistency."""
        buf = self.buf
        items = set()
        free_pages = 0
        for page in range(self.npages):
            owner, carve, used, free_head, _prev, _next, size, slots = _PAGE.unpack_from(
                buf, self.pagemeta_off + page * PAGE_RECORD_BYTES)
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
                if buf[offset + 4] != STATE_FREE:
                    raise CorruptSegment("free chunk state", page, link)
                link = _U32.unpack_from(buf, offset)[0]
            held = [base + slot * size for slot in range(carve) if slot not in free]
            for offset in held:
                if buf[offset + 4] not in HOLDING_ITEM:
                    raise CorruptSegment("held chunk state", page, offset)
            if len(held) != used:
                raise CorruptSegment("page used", page, len(held), used)
            items.update(held)
        listed = 0
        link = _U32.unpack_from(buf, _OFFSET_FREE_PAGE)[0]
        while link:
            listed += 1
            if listed > self.npages:
                raise CorruptSegment("free page list loops")
            link = _U32.unpack_from(buf, self.pagemeta_off + (link - 1) * PAGE_RECORD_BYTES + 20)[0]
        if not (listed == free_pages == self.free_pages()):
            raise CorruptSegment("free pages", listed, free_pages, self.free_pages())
        return items
