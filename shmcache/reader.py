"""The lock-free read path: ``get(group, key)`` straight from shared memory.

A reader reads its stripe's seqlock counter (it must be even), walks the bucket's chain,
copies the value out, then reads the counter again: equal means no writer touched that
stripe meanwhile, so the copy is what a single moment held. Every offset it follows is
bounds-checked and every walk bounded, so a torn read can neither crash nor hang; it only
fails validation, and the reader tries again, or after READ_ATTEMPTS reads under the write
lock (which also repairs a writer that died holding the stripe). This relies on x86-64
keeping stores in order, and on struct's native formats doing aligned 4- and 8-byte copies.

Why a chunk freed and reused under a reader is still caught: the reader found the item
through its stripe's chain after reading the counter; the item cannot be freed before it is
unlinked, and unlinking happens with that stripe odd (lru_index.py), so the counter has
moved by the time the reader checks it.

Diverting costs a hit nothing: the group lookup every read starts with is a dict that the
store empties when it diverts its readers (store.py), and only the branch taken when a name
is not in the dict asks whether to take the detour.

A *stale-aware* reader (``stale=True``; only workers and a client loading its own misses use
one, and only after a plain read missed) also returns an item past its expiry while it is
within its group's stale window (lru_index.py); it looks the window up only once an item is
found expired, so a fresh hit costs what it costs in any reader.

A hit sets the item's CLOCK reference bit (outside the chunk, so a write that comes late,
after the chunk changed hands, only sets a stray bit) and counts in the process's list
(metrics.py). The readers are the one exception to "node.py counts the Get path": a hit
is counted where it is read, since a wrapper would cost as much as the hit. A reader made
with ``count_misses=False`` leaves a miss to its caller, who counts it once it knows the
get missed (node.py): it adds the miss to MISS_LEFT, a counter no figure reads. Layouts:
layout.py.

**Two readers, one behaviour.** ``make_reader`` builds the C reader of ``_native.c`` (built
when the package is installed, if a compiler is there) and falls back to the pure-Python
closure ``make_python_reader`` when that module cannot be imported or the environment sets
SHMCACHE_PURE_PYTHON=1; it says which, once per process, in the log. Both take the same
steps in the same order and answer, count and fall back alike (tests/test_native.py holds
them to it); the C one takes every layout constant from here, and hashes with the same
xxhash function object.
"""

import logging
import os
import sys
import time

import xxhash

from .errors import InvalidKey
from .layout import (BUCKET_BYTES, CLASS_RECORD_BYTES, GROUP, GROUP_RECORD_BYTES, HEADER, ITEM,
                     ITEM_HEADER_BYTES, ITEM_WORD0, LOG_ENTRY, MAX_CLASSES, MAX_KEY_BYTES, PAGE,
                     PAGE_RECORD_BYTES, REFBIT_GRANULE, SLAB_CLASS, STRIPE_BYTES)
from .lru_index import _F64, _FRACTION, _HEAD, _KEEP_LINK_KEY_GROUP, _U32, encode_key
from .metrics import HITS, HOT_HITS, KINDS, MISSES, NEGATIVE_HITS, PER_GROUP
from .slabs import (CHUNK_ALIGN, FIT_SHIFT, STATE_LIVE, STATE_NEGATIVE, STATE_WRITING,
                    VOTES_FOR_NEW_CLASS)

# The pure-Python hit path spells these as literals, for speed, and _native.c the stripe
# and bucket sizes: held to layout.py here.
# counts[gid << 4 | kind]; bit = off >> 5; stripe and bucket offsets * 4; _HEAD from offset.
if not (PER_GROUP == 16 and len(KINDS) < PER_GROUP and REFBIT_GRANULE == 32
        and STRIPE_BYTES == BUCKET_BYTES == 4
        and ITEM.chain == 0 and _HEAD.format == ITEM.struct("chain", "vlen").format):
    raise AssertionError("reader: a layout constant changed; the literals here did not")

READ_ATTEMPTS = 32          # seqlock retries before a reader takes the lock
MISS_LEFT = PER_GROUP - 1   # where a reader that leaves its misses uncounted adds them
MAX_CHAIN = 64              # hops a lock-free reader walks before it asks for the lock


class _NotFound:
    """What a reader built with ``negative=NOT_FOUND`` answers for a remembered not-found."""

    def __repr__(self):
        return "NOT_FOUND"


NOT_FOUND = _NotFound()

log = logging.getLogger("shmcache")
try:
    from . import _native
except ImportError as exc:           # not built (no compiler at install time)
    _native, _native_missing = None, exc
else:
    _native_missing = None
_said = False                        # the log line saying which reader this process uses


def _xxh3_library():
    """The file of the xxhash package's extension module: the C reader takes its
    XXH3_64bits_withSeed from there (and checks it against xxh3_64_intdigest first)."""
    module = sys.modules.get(getattr(xxhash.xxh3_64_intdigest, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    return path if path and path.endswith(".so") else None


XXH3_LIBRARY = _xxh3_library()


def native_wanted():
    """True if the C reader is built and not turned off by SHMCACHE_PURE_PYTHON."""
    return _native is not None and os.environ.get("SHMCACHE_PURE_PYTHON", "") in ("", "0")


def native_writer(index, journal_full):
    """The C twin of ``index``'s in-place rewrite and of the common case of its new-key
    insertion (``_native.Writer``: the same stores as ``Index._rewrite`` and as
    ``Index.store`` with ``Slabs.alloc``, in the same order) when the C reader is used too,
    else None: one switch (SHMCACHE_PURE_PYTHON) picks C or Python for all of them.
    ``journal_full``: the exception a step too long for the log raises (journal.JournalFull)."""
    if not native_wanted():
        return None
    return _native.Writer(index.buf, native_writer_layout(index), journal_full)


def native_writer_layout(index):
    """The constants the C writer works with, all from their one definition."""
    journal, slabs = index.journal, index.slabs
    return {
        "log_start": journal.start, "log_end": journal.end, "entry_bytes": LOG_ENTRY.nbytes,
        "e_word": LOG_ENTRY.word, "e_old": LOG_ENTRY.old, "e_step": LOG_ENTRY.step,
        "tx_active": HEADER.tx_active, "tx_seq": HEADER.tx_seq,
        "item_header_bytes": ITEM_HEADER_BYTES, "o_word0": ITEM_WORD0, "o_klen": ITEM.klen,
        "o_gid": ITEM.gid, "o_expiry": ITEM.seconds, "groups_off": index.groups_off,
        "group_record_bytes": GROUP_RECORD_BYTES, "g_sets": GROUP.sets,
        "refbits_off": index.refbits_off, "pages_off": index.pages_off,
        "refbit_granule": REFBIT_GRANULE, "state_writing": STATE_WRITING,
        "keep_mask": _KEEP_LINK_KEY_GROUP & 0xFFFFFFFFFFFFFFFF,
        # the new-key insertion: slab classes and pages (slabs.py), the ring and the counts
        "classes_off": slabs.classes_off, "class_record_bytes": CLASS_RECORD_BYTES,
        "c_partial": SLAB_CLASS.partial, "max_classes": MAX_CLASSES,
        "c_chunk_size": SLAB_CLASS.chunk_size, "c_vote_size": SLAB_CLASS.vote_size,
        "c_vote_lead": SLAB_CLASS.vote_lead, "h_class_count": HEADER.class_count,
        "h_free_pages": HEADER.free_pages, "chunk_align": CHUNK_ALIGN, "fit_shift": FIT_SHIFT,
        "votes_for_new_class": VOTES_FOR_NEW_CLASS, "g_budget": GROUP.budget,
        "pagemeta_off": slabs.pagemeta_off, "page_record_bytes": PAGE_RECORD_BYTES,
        "page_size": slabs.page_size, "npages": slabs.npages,
        "p_class": PAGE.class_id, "p_carve": PAGE.carve, "p_used": PAGE.used,
        "p_free_head": PAGE.free_head, "p_chunk_size": PAGE.chunk_size, "p_slots": PAGE.slots,
        "p_class_carve": PAGE.pair("class_id", "carve"),
        "p_used_free": PAGE.pair("used", "free_head"),
        "o_chain": ITEM.chain, "o_state": ITEM.state, "o_vlen": ITEM.vlen,
        "o_prev": ITEM.prev, "o_next": ITEM.next,
        "g_hand": GROUP.hand, "g_bytes": GROUP.bytes, "g_items": GROUP.items,
        "max_groups": index.max_groups,
    }


def make_reader(index, group_ids, resolve_group, locked_lookup, counts, with_expiry=False,
                detour=None, stale=False, negative=None, native=None, count_misses=True):
    """The lock-free ``get(group, key)``: the C reader if ``native`` (default:
    ``native_wanted()``), else ``make_python_reader``'s closure; same arguments, same
    behaviour."""
    global _said
    if native is None:
        native = native_wanted()
        if not _said:
            _said = True
            if native:
                log.debug("lock-free reads in C (shmcache._native)")
            else:
                log.info("lock-free reads in pure Python (%s)",
                         "SHMCACHE_PURE_PYTHON is set" if _native is not None else
                         f"the C reader is not built: {_native_missing}")
    if not native:
        return make_python_reader(index, group_ids, resolve_group, locked_lookup, counts,
                                  with_expiry, detour, stale, negative, count_misses)
    miss_kind = MISSES if count_misses else MISS_LEFT
    if _native is None:
        raise ImportError(f"the C reader is not built: {_native_missing}")
    return _native.Reader(
        index.buf, group_ids, index.seeds, resolve_group, locked_lookup, counts, detour,
        negative, encode_key, InvalidKey, xxhash.xxh3_64_intdigest,
        {**native_layout(index), "misses": miss_kind,
         "negative_kind": miss_kind if negative is None else NEGATIVE_HITS},
        with_expiry, stale, XXH3_LIBRARY)


def native_layout(index):
    """The constants the C reader works with, all from their one definition."""
    return {
        "nbuckets": index.nbuckets, "nstripes": index.nstripes,
        "stripes_off": index.stripes_off, "buckets_off": index.buckets_off,
        "refbits_off": index.refbits_off, "low": index.pages_off,
        "high": index.pages_end - ITEM_HEADER_BYTES, "pages_end": index.pages_end,
        "max_item": index.max_item_size, "stale_off": index.groups_off + GROUP.stale,
        "group_record_bytes": GROUP_RECORD_BYTES, "item_header_bytes": ITEM_HEADER_BYTES,
        "max_key_bytes": MAX_KEY_BYTES, "refbit_granule": REFBIT_GRANULE,
        "per_group": PER_GROUP, "read_attempts": READ_ATTEMPTS, "max_chain": MAX_CHAIN,
        "state_live": STATE_LIVE, "state_negative": STATE_NEGATIVE,
        "hits": HITS, "misses": MISSES, "hot_hits": HOT_HITS,
        "o_chain": ITEM.chain, "o_state": ITEM.state, "o_klen": ITEM.klen, "o_gid": ITEM.gid,
        "o_frac": ITEM.frac, "o_seconds": ITEM.seconds, "o_vlen": ITEM.vlen,
    }


def make_python_reader(index, group_ids, resolve_group, locked_lookup, counts, with_expiry=False,
                       detour=None, stale=False, negative=None, count_misses=True):
    """Build the lock-free ``get(group, key) -> bytes | None`` as one closure (the hit path
    costs about a microsecond of Python, so every constant is a local and there is no
    inner call). ``group_ids`` maps names to ids; ``resolve_group(name)`` fills it, raises,
    or returns None: then the read is ``detour(group, key)``'s answer and touches no shared
    memory. ``locked_lookup(gid, key)`` reads under the write lock when no consistent
    lock-free read is possible (a writer busy or dead on the key's stripe, or a chain
    longer than MAX_CHAIN). ``counts`` is the process's counter list (metrics.py): hits,
    misses and hot-copy hits are counted there. ``with_expiry``: return (value, expiry
    Unix time or None, whether it is a hot copy) instead of the value. ``stale``: an item
    past its expiry but within its group's stale window is returned too (its expiry tells),
    and ``locked_lookup`` must then find such items as well.

    A remembered not-found (an item in STATE_NEGATIVE, odd like the readable states, so
    the walk finds it as it finds a value) is told apart only after a hit is validated,
    by the one comparison a hit already made to count hot copies: a plain hit pays
    nothing for it. It answers ``negative``, counted as a negative hit; with the default
    None it is an ordinary miss (a peek: whoever loads the key next finds it).
    ``count_misses=False``: a miss is added to MISS_LEFT instead, left to the caller."""
    miss_kind = MISSES if count_misses else MISS_LEFT
    negative_kind = miss_kind if negative is None else NEGATIVE_HITS
    buf, seeds, nbuckets, nstripes = index.buf, index.seeds, index.nbuckets, index.nstripes
    stripes_off, buckets_off, refbits_off = index.stripes_off, index.buckets_off, index.refbits_off
    low = index.pages_off
    high = index.pages_end - ITEM_HEADER_BYTES
    pages_end, max_item = index.pages_end, index.max_item_size
    unpack_u32, unpack_head, unpack_f64 = _U32.unpack_from, _HEAD.unpack_from, _F64.unpack_from
    stale_off = index.groups_off + GROUP.stale
    digest, sched_yield, now = xxhash.xxh3_64_intdigest, os.sched_yield, time.time
    find_group = group_ids.get

    def get(group, key):
        """The cached value of ``key`` in ``group``, or None (absent or expired)."""
        gid = find_group(group)
        if gid is None:
            gid = resolve_group(group)
            if gid is None:
                return detour(group, key)
        key = key.encode() if key.__class__ is str else encode_key(key)
        klen = len(key)
        if not 0 < klen <= MAX_KEY_BYTES:
            raise InvalidKey(f"key must be 1 to {MAX_KEY_BYTES} bytes, got {klen}")
        bucket = digest(key, seeds[gid]) % nbuckets
        seq_off = stripes_off + (bucket % nstripes) * 4
        bucket_off = buckets_off + bucket * 4
        attempts = READ_ATTEMPTS
        while attempts:
            attempts -= 1
            seq = unpack_u32(buf, seq_off)[0]
            if seq & 1:
                sched_yield()
                continue
            ref = unpack_u32(buf, bucket_off)[0]
            found = hops = 0
            while ref:
                offset = ref << 3
                if offset < low or offset > high or hops == MAX_CHAIN:
                    break                           # torn, or long: the checks below decide
                ref, state, item_klen, item_gid, frac, seconds, vlen = unpack_head(buf, offset)
                if item_klen == klen and item_gid == gid and state & 1:   # LIVE or HOT
                    start = offset + ITEM_HEADER_BYTES
                    if buf[start:start + klen] == key:
                        start += klen
                        if vlen <= max_item and start + vlen <= pages_end:
                            value = buf[start:start + vlen]
                            found = offset
                        break
                hops += 1
            if unpack_u32(buf, seq_off)[0] != seq:
                continue
            if not found:
                if hops == MAX_CHAIN:
                    break
                counts[gid << 4 | miss_kind] += 1
                return None
            if seconds and seconds + frac * _FRACTION <= now():
                if not stale or (seconds + frac * _FRACTION
                                 + unpack_f64(buf, stale_off + gid * GROUP_RECORD_BYTES)[0] <= now()):
                    counts[gid << 4 | miss_kind] += 1
                    return None
            bit = (found - low) >> 5                # REFBIT_GRANULE = 32 (checked at import)
            byte_off = refbits_off + (bit >> 3)
            mask = 1 << (bit & 7)
            if not buf[byte_off] & mask:            # write only when it changes: hot
                buf[byte_off] |= mask               # items stay read-only cache lines
            if state != STATE_LIVE:
                if state == STATE_NEGATIVE:
                    counts[gid << 4 | negative_kind] += 1
                    return negative
                counts[gid << 4 | HOT_HITS] += 1
            counts[gid << 4 | HITS] += 1
            if with_expiry:
                return value, (seconds + frac * _FRACTION if seconds else None), state != STATE_LIVE
            return value
        found = locked_lookup(gid, key, with_expiry, negative)
        counts[gid << 4 | (miss_kind if found is None else
                           negative_kind if found is negative else HITS)] += 1
        return found
    return get
