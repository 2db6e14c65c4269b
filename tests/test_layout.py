"""layout.py: the records of the arena fit and do not overlap, and no other module of the
package writes an arena offset as a bare number.

The scan reads the source (ast), it imports nothing. It looks at the *offset* argument of
the calls that address the arena or a copy of its header: ``pack_into`` / ``unpack_from``
(a Struct's, or ``struct.``'s with the format first), the journal's ``w32`` / ``w64`` /
``w64x2``, the arena's ``get_u32`` / ``set_u32`` / ``get_u64`` / ``set_u64``, ``os.pread`` /
``os.pwrite``; and at the index or slice bounds of ``buf[...]``, ``header[...]``,
``head[...]`` subscripts. In those it flags

* a non-zero integer literal as the whole offset (``unpack_from(buf, 56)``), and
* an integer literal added to or subtracted from anything at the top of the offset
  expression (``page_rec + 20``, ``offset + 4``, ``BYTES * n + 16``).

It does not flag literals inside a product or any other operation: ``(page - 1) *
PAGE_RECORD_BYTES`` turns a stored ``page + 1`` link back into a number, ``bucket * 4`` is
a stride (the pure-Python reader's strides are checked against layout.py at its import),
and values written (``journal.w32(..., page + 1)``) are not offsets at all. Offset 0 is
allowed: it is the start of a buffer, not a field. Nor does it follow an offset through a
variable: a field offset computed on one line and used on the next would pass, so keep
offsets in the call, as the modules do.

Also flagged: importing a ``_OFFSET_*`` name (the header words are ``layout.HEADER``'s
fields; arena.py keeps those names only for tests that read them).
"""

import ast
import re
from pathlib import Path

import pytest

import shmcache
from shmcache import layout

pytestmark = pytest.mark.unit

ROOT = Path(shmcache.__file__).resolve().parent

OFFSET_ARG = {                      # call name -> index of the offset argument
    "pack_into": 1, "unpack_from": 1, "w32": 0, "w64": 0, "w64x2": 0,
    "get_u32": 0, "set_u32": 0, "get_u64": 0, "set_u64": 0, "pread": 2, "pwrite": 2,
}
BUFFERS = re.compile(r"(\w+\.)*(buf|header|head)$")


# -- the records ----------------------------------------------------------------------------

@pytest.mark.parametrize("record", layout.RECORDS, ids=lambda r: r.label)
def test_fields_fit_and_do_not_overlap(record):
    end = 0
    for field in record.fields.values():
        assert field.offset >= end, f"{record.label}.{field.name} overlaps the field before"
        assert field.end <= record.nbytes, f"{record.label}.{field.name} leaves the record"
        assert getattr(record, field.name) == field.offset
        end = field.end


def test_record_sizes_are_as_the_region_map_says():
    assert (layout.HEADER.nbytes, layout.LOG_ENTRY.nbytes, layout.GROUP.nbytes,
            layout.ITEM.nbytes, layout.SLAB_CLASS.nbytes, layout.PAGE.nbytes,
            layout.INFLIGHT.nbytes, layout.PEER.nbytes) == (4096, 24, 256, 24, 32, 32, 512, 32)
    assert layout.counter_slot_bytes(64) == 64 + 64 * 16 * 8
    assert layout.INFLIGHT.key + layout.MAX_KEY_BYTES <= layout.INFLIGHT.generation


def test_the_on_disk_layout_is_version_2():
    """The byte offsets every segment of layout version 2 was made with."""
    h, g, i = layout.HEADER, layout.GROUP, layout.ITEM
    assert layout.LAYOUT_VERSION == 2 and layout.MAGIC == 0x3130454843414B4B
    assert (h.epoch, h.writer_pid, h.tx_active, h.tx_seq, h.clean, h.owner_pid, h.retired,
            h.peer_count, h.front_tls, h.front_tls_name, h.front_tls_ca) == (
        56, 512, 520, 528, 536, 544, 680, 672, 1024, 1032, 1288)
    assert (g.budget, g.bytes, g.hand, g.evictions, g.stale, g.generation) == (
        64, 80, 96, 104, 136, 144)
    assert (i.state, i.klen, i.gid, i.frac, i.seconds, i.vlen, i.prev, i.next) == (
        4, 5, 6, 7, 8, 12, 16, 20)
    assert layout.HEADER.struct("magic", "hash_seed").format == "QIIQIIIIIIIIQdQ"
    assert layout.HEADER.struct("writer_pid", "tx_active").format == "I4xQ"


def test_a_struct_reads_its_fields_where_declared():
    group_tail = layout.GROUP.struct("budget", "defined")
    assert group_tail.format == "QdQQII" and group_tail.size == layout.GROUP.end("defined") - 64
    with pytest.raises(AssertionError):                  # u32 then u64 with no pad declared
        layout.Record("bad", 16, layout.Field("a", 0, "I", ""), layout.Field("b", 4, "Q", ""))
    with pytest.raises(AssertionError):
        layout.Record("overlap", 16, layout.Field("a", 0, "Q", ""),
                      layout.Field("b", 4, "I", ""))
    with pytest.raises(AssertionError):
        layout.PAGE.pair("carve", "used")                # not one aligned u64


def test_lock_bytes_are_distinct():
    taken = set()
    for name, byte_range in layout.LOCK_BYTES.items():
        assert not taken & set(byte_range), name
        taken |= set(byte_range)


# -- the scan -------------------------------------------------------------------------------

def _literal(node):
    return isinstance(node, ast.Constant) and type(node.value) is int


def _bare_terms(node):
    """Integer literals added or subtracted at the top of an offset expression."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        return [term for side in (node.left, node.right) for term in _bare_terms(side)]
    return [node] if _literal(node) and node.value else []


def _call_offset(node):
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in OFFSET_ARG:
        return None
    index = OFFSET_ARG[name]
    if (name in ("pack_into", "unpack_from") and isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name) and func.value.id == "struct"):
        index += 1                                       # struct.pack_into(fmt, buf, offset)
    return node.args[index] if len(node.args) > index else None


def bare_offsets(source, filename="<source>"):
    """[(line number, line)] of every bare arena offset in ``source`` (rules: module doc)."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        offsets = []
        if isinstance(node, ast.Call):
            offset = _call_offset(node)
            if offset is not None:
                offsets.append(offset)
        elif isinstance(node, ast.Subscript) and BUFFERS.fullmatch(ast.unparse(node.value)):
            index = node.slice
            offsets.extend([index.lower, index.upper] if isinstance(index, ast.Slice)
                           else [index])
        elif isinstance(node, ast.ImportFrom) and any(
                alias.name.startswith("_OFFSET_") for alias in node.names):
            found.append((node.lineno, lines[node.lineno - 1].strip()))
        for offset in filter(None, offsets):
            if _bare_terms(offset):
                found.append((offset.lineno, lines[offset.lineno - 1].strip()))
    return sorted(set(found))


def test_the_scan_flags_bare_offsets_and_only_those():
    flagged = bare_offsets(
        "x = _U32.unpack_from(buf, page_rec + 20)[0]\n"
        "struct.pack_into('Q', self.buf, 56, 1)\n"
        "journal.w32(class_rec + 4, page + 1)\n"
        "v = buf[offset + 4]\n"
        "w = buf[start:start + 8 + n]\n"
        "from .arena import _OFFSET_CLEAN\n"
        "journal.w64(BYTES * n + 16, 0)\n")
    assert [line for line, _text in flagged] == [1, 2, 3, 4, 5, 6, 7]
    assert bare_offsets(
        "journal.w32(_FREE_PAGE, page + 1)\n"
        "_U32.unpack_from(buf, self.pagemeta_off + (link - 1) * PAGE_RECORD_BYTES + _P_NEXT)\n"
        "seq_off = stripes_off + (bucket % nstripes) * 4\n"
        "_U64.pack_into(buf, HEADER.magic, MAGIC)\n"
        "head = os.pread(fd, 8, 0)\n"
        "inbuf[end + 4:]\n"
        "x = buf[byte_off]\n") == []


def test_no_module_but_layout_writes_an_arena_offset_as_a_number():
    problems = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name in ("layout.py", "kcachepb_pb2.py"):
            continue
        for line, text in bare_offsets(path.read_text(), str(path)):
            problems.append(f"{path.name}:{line}: {text}")
    assert not problems, ("arena offsets written as numbers (declare the field in "
                          "layout.py and use its name):\n" + "\n".join(problems))


def test_the_c_reader_gets_its_offsets_from_layout():
    from types import SimpleNamespace

    from shmcache import reader
    index = SimpleNamespace(nbuckets=8, nstripes=8, stripes_off=0, buckets_off=0, refbits_off=0,
                            pages_off=4096, pages_end=8192, max_item_size=100, groups_off=1000)
    got = reader.native_layout(index)
    item = layout.ITEM
    assert (got["o_chain"], got["o_state"], got["o_klen"], got["o_gid"], got["o_frac"],
            got["o_seconds"], got["o_vlen"]) == (item.chain, item.state, item.klen, item.gid,
                                                 item.frac, item.seconds, item.vlen)
    assert got["stale_off"] == 1000 + layout.GROUP.stale
    assert (got["group_record_bytes"], got["item_header_bytes"], got["max_key_bytes"],
            got["refbit_granule"], got["per_group"]) == (
        layout.GROUP.nbytes, layout.ITEM.nbytes, layout.MAX_KEY_BYTES, layout.REFBIT_GRANULE,
        layout.COUNTERS_PER_GROUP)


def test_the_c_writer_gets_its_offsets_from_layout():
    from types import SimpleNamespace

    from shmcache import reader, slabs
    journal = SimpleNamespace(start=8192, end=8192 + layout.LOG_ENTRIES * layout.LOG_ENTRY_BYTES)
    pages = SimpleNamespace(classes_off=2048, pagemeta_off=3072, page_size=65536, npages=9)
    index = SimpleNamespace(journal=journal, slabs=pages, groups_off=1000, refbits_off=500,
                            pages_off=1 << 20, max_groups=64)
    got = reader.native_writer_layout(index)
    item, group, page, slab_class = layout.ITEM, layout.GROUP, layout.PAGE, layout.SLAB_CLASS
    entry, header = layout.LOG_ENTRY, layout.HEADER
    assert got == {
        "log_start": 8192, "log_end": journal.end, "entry_bytes": entry.nbytes,
        "e_word": entry.word, "e_old": entry.old, "e_step": entry.step,
        "tx_active": header.tx_active, "tx_seq": header.tx_seq,
        "item_header_bytes": item.nbytes, "o_word0": layout.ITEM_WORD0, "o_klen": item.klen,
        "o_gid": item.gid, "o_expiry": item.seconds, "groups_off": 1000,
        "group_record_bytes": group.nbytes, "g_sets": group.sets, "refbits_off": 500,
        "pages_off": 1 << 20, "refbit_granule": layout.REFBIT_GRANULE,
        "state_writing": slabs.STATE_WRITING, "keep_mask": got["keep_mask"],
        "classes_off": 2048, "class_record_bytes": slab_class.nbytes,
        "c_partial": slab_class.partial, "max_classes": layout.MAX_CLASSES,
        "c_chunk_size": slab_class.chunk_size, "c_vote_size": slab_class.vote_size,
        "c_vote_lead": slab_class.vote_lead, "h_class_count": header.class_count,
        "h_free_pages": header.free_pages, "chunk_align": slabs.CHUNK_ALIGN,
        "fit_shift": slabs.FIT_SHIFT, "votes_for_new_class": slabs.VOTES_FOR_NEW_CLASS,
        "g_budget": group.budget, "pagemeta_off": 3072, "page_record_bytes": page.nbytes,
        "page_size": 65536, "npages": 9, "p_class": page.class_id, "p_carve": page.carve,
        "p_used": page.used, "p_free_head": page.free_head, "p_chunk_size": page.chunk_size,
        "p_slots": page.slots, "p_class_carve": page.class_id, "p_used_free": page.used,
        "o_chain": item.chain, "o_state": item.state, "o_vlen": item.vlen, "o_prev": item.prev,
        "o_next": item.next, "g_hand": group.hand, "g_bytes": group.bytes,
        "g_items": group.items, "max_groups": 64,
    }
    # word 0 without state and expiry fraction: every byte but those two kept
    kept = [got["keep_mask"] >> 8 * i & 0xFF for i in range(8)]
    assert [i for i in range(8) if not kept[i]] == [item.state, item.frac]
