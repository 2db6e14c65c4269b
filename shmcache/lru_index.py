"""Hash index, per-group CLOCK rings, byte budgets and TTL, all inside the arena.

**Stale window.** An item whose expiry has passed is absent to ``lookup_locked`` and to the
plain readers, but for the group's stale window past its expiry it is still *stale*: the
stale-aware readers (``lookup_locked(stale=True)``, reader.py's ``stale=True``) return it,
and the CLOCK hand passes it as a live item rather than taking it first as a dead one.

Readers take no lock. Writers hold the write lock (store.py) and change structures only
through the journal (journal.py); this module takes no lock itself.

**Seqlock.** Buckets are grouped into stripes (bucket % nstripes), each with a u32 counter.
A writer makes the counter of every stripe whose chains it will change odd before the first
change, and even again when its whole write section ends; readers (reader.py) validate
their copies against it.

**CLOCK, not exact LRU.** A hit must not write shared lists, so it sets a reference bit
(one bit per 32 bytes of pages, outside the chunks, so a late write after the chunk changed
hands sets a stray bit and corrupts nothing). Each group's items form a circular list with a
hand at the oldest; new items go just behind the hand. To evict, the hand looks at its item:
read since the hand last passed it -> clear the bit and move on; else evict it. The test
suite checks that the hit ratio stays within one point of exact LRU on a Zipf trace.

The item header (ITEM, at the start of its slab chunk, then key bytes, then value bytes),
the group record (GROUP, by group id; its stale window and generation words included) and
the bucket and stripe arrays are declared in layout.py. An item *ref* is its chunk's
offset // 8 (0 = none).
"""

import struct

import xxhash

from .errors import InvalidArgument, ValueTooLarge
from .index_audit import audit, group_figures, groups_by_share
from .layout import (BUCKET_BYTES, GROUP, GROUP_RECORD_BYTES, HEADER, ITEM, ITEM_HEADER_BYTES,
                     ITEM_WORD0, LOG_ENTRY, REFBIT_GRANULE, STRIPE_BYTES)
from .validate import check_value_size, encode_key  # noqa: F401 (encode_key: its old home)
from .slabs import STATE_HOT, STATE_LIVE, STATE_NEGATIVE, STATE_WRITING

_HEAD = ITEM.struct("chain", "vlen")   # chain, state, key len, group, frac, expiry s, value len
_TAIL = ITEM.struct("seconds", "next")  # expiry s, value len, ring prev, ring next
_RING = ITEM.struct("prev", "next")
_GROUP = GROUP.struct("name", "defined")
_COUNTS = GROUP.struct("bytes", "items")
_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")
_F64 = struct.Struct("d")

# Field offsets (layout.py), as names of this module.
_G_NAME, _G_BUDGET, _G_TTL = GROUP.name, GROUP.budget, GROUP.ttl
_G_BYTES, _G_ITEMS, _G_HAND, _G_DEFINED = GROUP.bytes, GROUP.items, GROUP.hand, GROUP.defined
_G_EVICTIONS, _G_EXPIRATIONS = GROUP.evictions, GROUP.expirations
_G_SETS, _G_DELETES = GROUP.sets, GROUP.deletes
_G_STALE, _G_GENERATION = GROUP.stale, GROUP.generation
_I_CHAIN, _I_STATE, _I_KLEN, _I_GID = ITEM.chain, ITEM.state, ITEM.klen, ITEM.gid
_I_FRAC, _I_EXPIRY, _I_VLEN = ITEM.frac, ITEM.seconds, ITEM.vlen
_I_PREV, _I_NEXT = ITEM.prev, ITEM.next
_GROUP_LIMIT = HEADER.group_limit
# Word 0 of an item (chain .. frac) is written as one u64: chain | state << 32 | klen << 40 ...
if [ITEM.state, ITEM.klen, ITEM.gid, ITEM.frac, ITEM.end("frac")] != [4, 5, 6, 7, 8] \
        or ITEM_WORD0 != ITEM.chain:
    raise AssertionError("lru_index: item word 0 is not chain, state, key len, group, frac")
_KEEP_LINK_KEY_GROUP = ~(0xFF << 32 | 0xFF << 56)   # word 0 without state and expiry fraction

MAX_SECOND_CHANCES = 4096   # hand steps past referenced items per eviction (bounds a set's work)
ROOM_EVICTIONS = 64         # evictions per group when a full class needs a chunk
_FRACTION = 1.0 / 256


def expiry_fields(expire_at):
    """(seconds, 1/256 fraction) for an absolute Unix time, rounded down; (0, 0) for none."""
    if not expire_at:
        return 0, 0
    seconds = int(expire_at)
    if seconds >= 0xFFFFFFFF:
        return 0xFFFFFFFF, 0
    return max(seconds, 1), int((expire_at - seconds) * 256)


class Index:
    """The index over one arena. Lock-free readers: ``reader.make_reader(index, ...)``.
    Writers (lock held, journal step open): ``store``, ``remove``, ``clear``,
    ``define_group``, then ``end_write`` once."""

    def __init__(self, arena, journal, slabs):
        lay = arena.layout
        self.buf = arena.buf
        self.journal = journal
        self.slabs = slabs
        self.nbuckets = lay.nbuckets
        self.nstripes = lay.nstripes
        self.buckets_off = lay.buckets_off
        self.stripes_off = lay.stripes_off
        self.refbits_off = lay.refbits_off
        self.pages_off = lay.pages_off
        self.pages_end = lay.pages_off + lay.npages * lay.page_size
        self.groups_off = lay.groups_off
        self.max_groups = lay.max_groups
        self.max_item_size = lay.max_item_size
        seed = arena.hash_seed
        self.seeds = [(seed + gid * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
                      for gid in range(lay.max_groups)]
        self._marked = []                    # stripe counters this write section made odd
        self.native_writer = None            # the C twins of _rewrite and of store's insertion
        self._native_rewrite = None          # its rewrite method
        self._native_insert = None           # its new-key insertion (the common case)

    # -- readers ------------------------------------------------------------------------------
    # The lock-free read path is reader.make_reader; this is its fallback under the lock.

    def lookup_locked(self, gid, key, now, with_expiry=False, negative=None, stale=False):
        """The reader's lookup for the write-lock holder: no seqlock, no walk limit. A
        remembered not-found (STATE_NEGATIVE) answers ``negative`` (None: absent).
        ``stale``: an item past its expiry but within its group's stale window is found too."""
        _link, offset = self._find(self.buckets_off + self._bucket(gid, key) * BUCKET_BYTES,
                                   gid, key)
        gone = self._dead if stale else self._expired
        if not offset or gone(offset, now) or not self.buf[offset + _I_STATE] & 1:
            return None
        _ref, _s, klen, _g, frac, seconds, vlen = _HEAD.unpack_from(self.buf, offset + _I_CHAIN)
        self._set_ref(offset)
        if _s == STATE_NEGATIVE:
            return negative
        start = offset + ITEM_HEADER_BYTES + klen
        value = self.buf[start:start + vlen]
        if with_expiry:
            return value, (seconds + frac * _FRACTION if seconds else None), _s == STATE_HOT
        return value

    # -- write sections ---------------------------------------------------------------------

    def _bucket(self, gid, key):
        return xxhash.xxh3_64_intdigest(key, self.seeds[gid]) % self.nbuckets

    def _mark(self, bucket):
        """Make the bucket's stripe odd for the rest of this write section."""
        seq_off = self.stripes_off + (bucket % self.nstripes) * STRIPE_BYTES
        if seq_off not in self._marked:
            seq = _U32.unpack_from(self.buf, seq_off)[0]
            _U32.pack_into(self.buf, seq_off, seq | 1)     # even after any repair: now odd
            self._marked.append(seq_off)
        return self.buckets_off + bucket * BUCKET_BYTES

    def end_write(self):
        """Make every stripe this section marked even again. Call after the last commit."""
        buf = self.buf
        for seq_off in self._marked:
            _U32.pack_into(buf, seq_off, (_U32.unpack_from(buf, seq_off)[0] + 1) & 0xFFFFFFFE)
        self._marked.clear()

    def repair_stripes(self):
        """After a writer died: make every odd stripe even (its step was already undone)."""
        self._marked.clear()
        buf = self.buf
        counters = struct.unpack_from(f"{self.nstripes}I", buf, self.stripes_off)
        fixed = 0
        for index, seq in enumerate(counters):
            if seq & 1:
                _U32.pack_into(buf, self.stripes_off + index * STRIPE_BYTES, (seq + 1) & 0xFFFFFFFF)
                fixed += 1
        return fixed

    # -- writers ----------------------------------------------------------------------------

    def store(self, gid, key, value, expire_at, now, state=STATE_LIVE, unless_changed=None,
              generation=None):
        """Insert or replace ``key``; evicts by budget and by memory. ValueTooLarge if it can
        never fit (the old value, if any, is left in place). ``state`` STATE_HOT marks a copy
        of another host's value, STATE_NEGATIVE (with an empty value) a remembered
        not-found. ``unless_changed``: a stripe version from ``version()``; if anything
        wrote to the key's stripe since, store nothing and return False. ``generation``:
        the group's ``generation()`` when the value was asked for; if the group was cleared
        since, store nothing and return False."""
        buf, journal = self.buf, self.journal
        group = self.groups_off + gid * GROUP_RECORD_BYTES
        klen, vlen = len(key), len(value)
        size = klen + vlen
        if vlen > self.max_item_size:           # the check, inline: a set pays no call
            check_value_size(vlen, self.max_item_size)
        budget = _U64.unpack_from(buf, group + _G_BUDGET)[0]
        if size > budget:
            raise ValueTooLarge(f"key + value of {size} bytes exceed the whole budget of "
                                f"group {self.group_name(gid)!r}")
        bucket = xxhash.xxh3_64_intdigest(key, self.seeds[gid]) % self.nbuckets
        if unless_changed is not None and self._stripe_seq(bucket) != unless_changed:
            return False
        if generation is not None and _U64.unpack_from(buf, group + _G_GENERATION)[0] != generation:
            return False
        seq_off = self.stripes_off + (bucket % self.nstripes) * STRIPE_BYTES   # _mark, inline
        if seq_off not in self._marked:
            _U32.pack_into(buf, seq_off, _U32.unpack_from(buf, seq_off)[0] | 1)
            self._marked.append(seq_off)
        bucket_off = self.buckets_off + bucket * BUCKET_BYTES
        link, old = self._find(bucket_off, gid, key)
        if old:
            if _U32.unpack_from(buf, old + _I_VLEN)[0] == vlen:
                self._rewrite(old, value, expire_at, state)
                return True
            self._unlink(old, link)
            # Commit the removal before the chunk can be handed out again: the new item's
            # key and value are written unjournaled, which is only sound in a chunk that was
            # already free when the step began (every eviction commits the same way).
            journal.checkpoint()
        seconds, frac = expiry_fields(expire_at) if expire_at else (0, 0)
        if self._native_insert is not None:    # in C unless an eviction, class or page is due
            pos = self._native_insert(gid, bucket_off, key, value, seconds, state | frac << 24,
                                      journal.pos, journal.step)
            if pos is not None:                # else declined, nothing written: as below
                journal.pos = pos
                return True
        if _U64.unpack_from(buf, group + _G_BYTES)[0] + size > budget:
            self._evict_for_budget(gid, size, now)
        class_id = self.slabs.class_for(ITEM_HEADER_BYTES + size)   # only what a new chunk needs
        offset = self.slabs.alloc(class_id) or self._make_room(class_id, gid, now)
        ref = offset >> 3
        # The chunk is not reachable yet: only word 0 (free-list link and state) is journaled.
        journal.w64(offset + ITEM_WORD0, _U32.unpack_from(buf, bucket_off)[0]
                    | (state | klen << 8 | gid << 16 | frac << 24) << 32)
        start = offset + ITEM_HEADER_BYTES
        buf[start:start + klen] = key
        buf[start + klen:start + size] = value
        bit = (offset - self.pages_off) // REFBIT_GRANULE
        byte_off = self.refbits_off + (bit >> 3)
        buf[byte_off] &= ~(1 << (bit & 7)) & 0xFF
        hand = _U32.unpack_from(buf, group + _G_HAND)[0]       # into the ring, behind the hand
        if hand:
            newest = _U32.unpack_from(buf, (hand << 3) + _I_PREV)[0]
            _TAIL.pack_into(buf, offset + _I_EXPIRY, seconds, vlen, newest, hand)
            journal.w32((newest << 3) + _I_NEXT, ref)
            journal.w32((hand << 3) + _I_PREV, ref)
        else:
            _TAIL.pack_into(buf, offset + _I_EXPIRY, seconds, vlen, ref, ref)
            journal.w32(group + _G_HAND, ref)
        journal.w32(bucket_off, ref)                                # published
        nbytes, items = _COUNTS.unpack_from(buf, group + _G_BYTES)
        journal.w64x2(group + _G_BYTES, nbytes + size, items + 1)
        self._bump(group + _G_SETS)
        return True

    def generation(self, gid):
        """How many times the group was cleared (a lock-free read of one aligned word)."""
        return _U64.unpack_from(self.buf, self.groups_off + gid * GROUP_RECORD_BYTES
                                + _G_GENERATION)[0]

    def version(self, gid, key):
        """The key's stripe version: pass it to ``store(unless_changed=...)`` to store only if
        nothing touched the stripe in between (a delete of the key always does)."""
        return self._stripe_seq(self._bucket(gid, key)) | 1

    def _stripe_seq(self, bucket):
        return _U32.unpack_from(
            self.buf, self.stripes_off + (bucket % self.nstripes) * STRIPE_BYTES)[0] | 1

    def _rewrite(self, offset, value, expire_at, state=STATE_LIVE):
        """Overwrite a same-length value in place (an update counts as a reference).

        Value bytes are not journaled, so the item is first marked STATE_WRITING in a step of
        its own. A writer killed while copying leaves a WRITING item: readers treat it as
        absent, and writers overwrite or evict it like any other (its lengths never changed,
        so the byte counts stay right). Readers meanwhile see the stripe odd and retry."""
        buf, journal = self.buf, self.journal
        seconds, frac = expiry_fields(expire_at) if expire_at else (0, 0)
        native = self._native_rewrite
        if native is not None:
            journal.step = native(offset, value, seconds, state | frac << 24, journal.pos,
                                  journal.step)
            journal.pos = journal.start + LOG_ENTRY.nbytes
            return
        word = _U64.unpack_from(buf, offset + ITEM_WORD0)[0] & _KEEP_LINK_KEY_GROUP
        journal.w64(offset + ITEM_WORD0, word | STATE_WRITING << 32)
        journal.checkpoint()
        start = offset + ITEM_HEADER_BYTES + buf[offset + _I_KLEN]
        buf[start:start + len(value)] = value
        _U32.pack_into(buf, offset + _I_EXPIRY, seconds)
        journal.w64(offset + ITEM_WORD0, word | (state | frac << 24) << 32)
        bit = (offset - self.pages_off) // REFBIT_GRANULE            # an update is a reference
        buf[self.refbits_off + (bit >> 3)] |= 1 << (bit & 7)
        sets = self.groups_off + buf[offset + _I_GID] * GROUP_RECORD_BYTES + _G_SETS
        _U64.pack_into(buf, sets, _U64.unpack_from(buf, sets)[0] + 1)

    def remove(self, gid, key, now):
        """Delete ``key``; True if it was there (expired entries count as absent)."""
        # Marks the stripe even when the key is absent: a hot copy fetched before this delete
        # then sees the stripe changed and is not stored (see ``version``).
        link, offset = self._find(self._mark(self._bucket(gid, key)), gid, key)
        if not offset:
            return False
        expired = self._expired(offset, now)
        negative = self.buf[offset + _I_STATE] == STATE_NEGATIVE     # not a value: not "deleted"
        self._unlink(offset, link)
        group = self.groups_off + gid * GROUP_RECORD_BYTES
        self._bump(group + (_G_EXPIRATIONS if expired else _G_DELETES))
        return not expired and not negative

    def clear(self, gid):
        """Remove every item of the group (checkpointing the journal per item), after
        bumping the group's generation: a load that read the generation before this clear
        then stores nothing (``store(generation=...)``), so no value asked for before the
        clear lands after it."""
        group = self.groups_off + gid * GROUP_RECORD_BYTES
        self.journal.w64(group + _G_GENERATION,
                         (_U64.unpack_from(self.buf, group + _G_GENERATION)[0] + 1) & (2 ** 64 - 1))
        while True:
            hand = _U32.unpack_from(self.buf, group + _G_HAND)[0]
            if not hand:
                return
            self._drop(hand << 3)
            self.journal.checkpoint()

    # -- groups -----------------------------------------------------------------------------

    def define_group(self, name, cache_bytes, ttl, now, stale=None):
        """Create the group, or update its budget, TTL and stale window (shrinking evicts).
        Returns its id."""
        buf, journal = self.buf, self.journal
        encoded = name.encode()
        gid = self.find_group(name)
        if gid is None:
            for gid in range(self.max_groups):
                record = self.groups_off + gid * GROUP_RECORD_BYTES
                if not _U32.unpack_from(buf, record + _G_DEFINED)[0]:
                    break
            else:
                raise InvalidArgument(f"the segment holds at most {self.max_groups} groups")
            group = self.groups_off + gid * GROUP_RECORD_BYTES
            buf[group:group + GROUP_RECORD_BYTES] = bytes(GROUP_RECORD_BYTES)
            buf[group + _G_NAME:group + _G_NAME + len(encoded)] = encoded
        group = self.groups_off + gid * GROUP_RECORD_BYTES
        journal.w64(group + _G_BUDGET, cache_bytes)
        journal.w64(group + _G_TTL, _U64.unpack_from(struct.pack("d", ttl or 0.0))[0])
        journal.w64(group + _G_STALE, _U64.unpack_from(struct.pack("d", stale or 0.0))[0])
        journal.w32(group + _G_DEFINED, 1)
        if gid >= _U32.unpack_from(buf, _GROUP_LIMIT)[0]:
            journal.w32(_GROUP_LIMIT, gid + 1)
        self._evict_for_budget(gid, 0, now)
        return gid

    def find_group(self, name):
        """Group id of ``name``, or None."""
        buf = self.buf
        encoded = name.encode()
        for gid in range(_U32.unpack_from(buf, _GROUP_LIMIT)[0]):
            record = _GROUP.unpack_from(buf, self.groups_off + gid * GROUP_RECORD_BYTES + _G_NAME)
            if record[6] and record[0].rstrip(b"\0") == encoded:
                return gid
        return None

    def group_name(self, gid):
        record = self.groups_off + gid * GROUP_RECORD_BYTES
        return _GROUP.unpack_from(self.buf, record + _G_NAME)[0].rstrip(b"\0").decode()

    def group_ttl(self, gid):
        record = self.groups_off + gid * GROUP_RECORD_BYTES
        return _F64.unpack_from(self.buf, record + _G_TTL)[0] or None

    def group_stale(self, gid):
        """The group's stale window in seconds (0.0: none)."""
        return _F64.unpack_from(self.buf, self.groups_off + gid * GROUP_RECORD_BYTES + _G_STALE)[0]

    def groups(self):
        """{name: stats dict} of every defined group (index_audit.py)."""
        return group_figures(self)

    # -- consistency ------------------------------------------------------------------------

    def audit(self):
        """Check chains, rings, byte counts and budgets against the slab chunks (write lock
        held, no step open). CorruptSegment on the first inconsistency; else a summary
        (index_audit.py)."""
        return audit(self)

    # -- internals (write lock held) --------------------------------------------------------

    def _find(self, link, gid, key):
        """Walk the chain from bucket offset ``link``: (offset of the u32 that links to the
        item, item offset), or (.., 0) if absent."""
        buf = self.buf
        ref = _U32.unpack_from(buf, link)[0]
        klen = len(key)
        while ref:
            offset = ref << 3
            nxt, _s, item_klen, item_gid, _f, _sec, _v = _HEAD.unpack_from(buf, offset + _I_CHAIN)
            start = offset + ITEM_HEADER_BYTES
            if item_klen == klen and item_gid == gid and buf[start:start + klen] == key:
                return link, offset
            link, ref = offset, nxt
        return link, 0

    def _expired(self, offset, now):
        seconds = _U32.unpack_from(self.buf, offset + _I_EXPIRY)[0]
        return bool(seconds) and seconds + self.buf[offset + _I_FRAC] * _FRACTION <= now

    def _dead(self, offset, now):
        """Expired, and past its group's stale window too: of no use to anyone."""
        seconds = _U32.unpack_from(self.buf, offset + _I_EXPIRY)[0]
        return bool(seconds) and (seconds + self.buf[offset + _I_FRAC] * _FRACTION
                                  + self.group_stale(self.buf[offset + _I_GID]) <= now)

    def _unlink(self, offset, link):
        """Take a found item out of its chain and ring, uncount it, free its chunk."""
        buf, journal = self.buf, self.journal
        _nxt, _s, klen, gid, _f, _sec, vlen = _HEAD.unpack_from(buf, offset + _I_CHAIN)
        journal.w32(link, _nxt)
        group = self.groups_off + gid * GROUP_RECORD_BYTES
        self._ring_remove(group, offset)
        nbytes, items = _COUNTS.unpack_from(buf, group + _G_BYTES)
        journal.w64x2(group + _G_BYTES, nbytes - klen - vlen, items - 1)
        self.slabs.free(offset)

    def _drop(self, offset):
        """Unlink an item reached from its ring rather than its chain."""
        buf = self.buf
        klen, gid = buf[offset + _I_KLEN], buf[offset + _I_GID]
        key = buf[offset + ITEM_HEADER_BYTES:offset + ITEM_HEADER_BYTES + klen]
        link, found = self._find(self._mark(self._bucket(gid, key)), gid, key)
        if found != offset:
            raise AssertionError(f"ring item at {offset} is missing from its hash chain")
        self._unlink(offset, link)

    def _evict(self, offset, now):
        """Drop an item to make room; count it as an eviction or an expiration."""
        group = self.groups_off + self.buf[offset + _I_GID] * GROUP_RECORD_BYTES
        self._bump(group + (_G_EXPIRATIONS if self._expired(offset, now) else _G_EVICTIONS))
        self._drop(offset)
        self.journal.checkpoint()

    def _clock_victim(self, group, now):
        """Offset of the item the group's hand stops at, or 0 if the group is empty. The hand
        passes (and clears) referenced items, at most MAX_SECOND_CHANCES of them."""
        buf, journal = self.buf, self.journal
        offset = _U32.unpack_from(buf, group + _G_HAND)[0] << 3
        for chance in range(1, MAX_SECOND_CHANCES + 1):
            if not offset or not self._take_ref(offset) or self._dead(offset, now):
                break
            nxt = _U32.unpack_from(buf, offset + _I_NEXT)[0]
            journal.w32(group + _G_HAND, nxt)
            if not chance % 256:
                journal.checkpoint()                    # each hand step stands on its own
            offset = nxt << 3
        return offset

    def _evict_for_budget(self, gid, size, now):
        """Run the group's CLOCK hand until ``size`` more bytes fit in its budget."""
        buf = self.buf
        group = self.groups_off + gid * GROUP_RECORD_BYTES
        budget = _U64.unpack_from(buf, group + _G_BUDGET)[0]
        while _U64.unpack_from(buf, group + _G_BYTES)[0] + size > budget:
            offset = self._clock_victim(group, now)
            if not offset:
                raise AssertionError(f"group {gid} counts bytes but holds no items")
            self._evict(offset, now)

    def _make_room(self, class_id, gid, now):
        """A chunk of ``class_id`` when the arena is full.

        If the class holds pages, groups give up items in CLOCK order, the group furthest over
        its budget share first, until a chunk of the class frees (at most ROOM_EVICTIONS per
        group). Items of other sizes may go first: that is the order their groups' CLOCK says,
        and a page they empty goes back to the free list for any class. Otherwise (a size
        seen for the first time, or nothing freed) a whole page is emptied and handed over.
        """
        slabs = self.slabs
        if slabs.has_pages(class_id):
            for group in groups_by_share(self, gid):
                for _eviction in range(ROOM_EVICTIONS):
                    offset = self._clock_victim(group, now)
                    if not offset:
                        break
                    self._evict(offset, now)
                    chunk = slabs.alloc(class_id)
                    if chunk:
                        return chunk
        for _attempt in range(slabs.npages):
            page = slabs.victim_page(class_id)
            if page is None:
                break
            for offset in slabs.live_chunks(page):
                self._evict(offset, now)
            chunk = slabs.alloc(class_id)
            if chunk:
                return chunk
        raise AssertionError("no page could be emptied for a new item")

    def _ring_remove(self, group, offset):
        buf, journal = self.buf, self.journal
        ref = offset >> 3
        prev, nxt = _RING.unpack_from(buf, offset + _I_PREV)
        if nxt == ref:                                  # the only item
            journal.w32(group + _G_HAND, 0)
            return
        journal.w32((prev << 3) + _I_NEXT, nxt)
        journal.w32((nxt << 3) + _I_PREV, prev)
        if _U32.unpack_from(buf, group + _G_HAND)[0] == ref:
            journal.w32(group + _G_HAND, nxt)

    def _refbit(self, offset):
        bit = (offset - self.pages_off) // REFBIT_GRANULE
        return self.refbits_off + (bit >> 3), 1 << (bit & 7)

    def _set_ref(self, offset):
        byte_off, mask = self._refbit(offset)
        self.buf[byte_off] |= mask

    def _take_ref(self, offset):
        """Was the item read since the hand last passed? Clears the bit."""
        byte_off, mask = self._refbit(offset)
        byte = self.buf[byte_off]
        if byte & mask:
            self.buf[byte_off] = byte & ~mask & 0xFF
            return True
        return False

    def _bump(self, offset):
        _U64.pack_into(self.buf, offset, _U64.unpack_from(self.buf, offset)[0] + 1)
