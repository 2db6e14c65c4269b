"""Reading the index whole: the consistency audit, every group's figures, and the groups
ranked by their share of their budgets (lru_index.py holds the index; layout.py its bytes)."""

import struct

from .errors import CorruptSegment
from .layout import BUCKET_BYTES, GROUP, GROUP_RECORD_BYTES, HEADER, ITEM, ITEM_HEADER_BYTES

_GROUP = GROUP.struct("name", "defined")
_GROUP_TAIL = GROUP.struct("budget", "defined")
_GROUP_STATS = GROUP.struct("evictions", "deletes")
_RING = ITEM.struct("prev", "next")
_U32 = struct.Struct("I")
_F64 = struct.Struct("d")
_G_NAME, _G_BUDGET, _G_EVICTIONS, _G_STALE = GROUP.name, GROUP.budget, GROUP.evictions, GROUP.stale
_I_CHAIN, _I_KLEN, _I_GID = ITEM.chain, ITEM.klen, ITEM.gid
_I_VLEN, _I_PREV = ITEM.vlen, ITEM.prev
_GROUP_LIMIT = HEADER.group_limit


def group_figures(index):
    """{name: stats dict} of every defined group."""
    result = {}
    for gid in range(_U32.unpack_from(index.buf, _GROUP_LIMIT)[0]):
        record = index.groups_off + gid * GROUP_RECORD_BYTES
        name, budget, ttl, nbytes, items, _hand, defined = _GROUP.unpack_from(
            index.buf, record + _G_NAME)
        if not defined:
            continue
        evictions, expirations, sets, deletes = _GROUP_STATS.unpack_from(
            index.buf, record + _G_EVICTIONS)
        result[name.rstrip(b"\0").decode()] = {
            "id": gid, "cache_bytes": budget, "ttl": ttl or None,
            "stale": _F64.unpack_from(index.buf, record + _G_STALE)[0] or None, "bytes": nbytes,
            "items": items, "evictions": evictions, "expirations": expirations,
            "sets": sets, "deletes": deletes}
    return result


def groups_by_share(index, gid):
    """Group record offsets holding items, largest bytes/budget first, ``gid`` last of equals."""
    buf = index.buf
    ranked = []
    for other in range(_U32.unpack_from(buf, _GROUP_LIMIT)[0]):
        record = index.groups_off + other * GROUP_RECORD_BYTES
        budget, _ttl, nbytes, items, _hand, defined = _GROUP_TAIL.unpack_from(
            buf, record + _G_BUDGET)
        if defined and items:
            ranked.append((-nbytes / budget if budget else 0.0, other == gid, record))
    ranked.sort()
    return [record for _share, _mine, record in ranked]


def audit(index):
    """Check chains, rings, byte counts and budgets against the slab chunks (write lock
    held, no step open). CorruptSegment on the first inconsistency; else a summary."""
    buf = index.buf
    chunks = index.slabs.audit()
    chained = set()
    for bucket in range(index.nbuckets):
        ref = _U32.unpack_from(buf, index.buckets_off + bucket * BUCKET_BYTES)[0]
        while ref:
            offset = ref << 3
            if not (offset in chunks and offset not in chained):
                raise CorruptSegment("chain", bucket, offset)
            chained.add(offset)
            klen, gid = buf[offset + _I_KLEN], buf[offset + _I_GID]
            key = buf[offset + ITEM_HEADER_BYTES:offset + ITEM_HEADER_BYTES + klen]
            if index._bucket(gid, key) != bucket:
                raise CorruptSegment("bucket", offset)
            ref = _U32.unpack_from(buf, offset + _I_CHAIN)[0]
    if chained != chunks:
        raise CorruptSegment("unchained items", len(chunks - chained))
    ringed = 0
    for gid in range(_U32.unpack_from(buf, _GROUP_LIMIT)[0]):
        group = index.groups_off + gid * GROUP_RECORD_BYTES
        budget, _ttl, nbytes, items, hand, defined = _GROUP_TAIL.unpack_from(buf, group + _G_BUDGET)
        count = total = 0
        ref = hand
        while ref and (count == 0 or ref != hand):
            offset = ref << 3
            if not (offset in chunks and buf[offset + _I_GID] == gid):
                raise CorruptSegment("ring", gid, offset)
            prev, nxt = _RING.unpack_from(buf, offset + _I_PREV)
            if _U32.unpack_from(buf, (nxt << 3) + _I_PREV)[0] != ref:
                raise CorruptSegment("ring link", offset)
            count += 1
            total += buf[offset + _I_KLEN] + _U32.unpack_from(buf, offset + _I_VLEN)[0]
            if count > len(chunks):
                raise CorruptSegment("ring loops", gid)
            ref = nxt
        if (count, total) != (items, nbytes):
            raise CorruptSegment("counts", gid, count, items, total, nbytes)
        if defined and nbytes > budget:
            raise CorruptSegment("budget", gid, nbytes, budget)
        ringed += count
    if ringed != len(chunks):
        raise CorruptSegment("items outside rings", len(chunks) - ringed)
    odd = [i for i, seq in enumerate(struct.unpack_from(f"{index.nstripes}I", buf,
                                                        index.stripes_off)) if seq & 1]
    if odd and not index._marked:
        raise CorruptSegment("odd stripes", odd[:5])
    return {"items": len(chunks)}
