"""Undo journal: lets the next writer roll back a step that a killed writer left half-done.

Every change to a shared structure (hash chains, queues, free lists, page table, byte
counts) goes through ``Journal.w32``/``w64``, which first records the old contents of the
8-byte word it touches, then writes. A *step* is a run of writes that together take the
structures from one consistent state to another; ``commit()`` ends it. If the writer dies
(or raises) inside a step, ``undo()`` restores the recorded words newest first, and the
structures are back in the state of the last commit. Writes into chunks that no structure
reaches yet (a fresh item's key and value) need no record, provided the chunk was already
free when the step began: a step that frees a chunk commits before anything can reuse it,
or an undo would bring back the old item over the new one's bytes.

Only the holder of the write lock uses the journal, so it needs no lock of its own.

The words it keeps in the header (HEADER.tx_active, the step in progress; HEADER.tx_seq,
the last id handed out) and its log entries (LOG_ENTRY) are declared in layout.py.

Entries are written with native struct formats, one aligned 8-byte store per field, step id
last: a writer killed mid-entry leaves an entry whose id is stale, which ends the log. Ids
never repeat, so entries of older steps never count.
"""

import struct

from .layout import HEADER, LOG_ENTRIES, LOG_ENTRY, LOG_ENTRY_BYTES

_ENTRY = LOG_ENTRY.struct("word", "step")
_ENTRY2 = struct.Struct(_ENTRY.format * 2)       # two entries, one after the other
_U64X2 = struct.Struct("QQ")                     # two adjacent words of anywhere
_TX_ACTIVE, _TX_SEQ = HEADER.tx_active, HEADER.tx_seq
_FIRST_WORD = HEADER.end("tx_seq")     # undo never restores a word below: not structures
if not (_ENTRY.size == _ENTRY2.size // 2 == LOG_ENTRY_BYTES):
    raise AssertionError("journal: entry format out of step with layout.py")
_U32 = struct.Struct("I")
_U64 = struct.Struct("Q")


class JournalFull(RuntimeError):
    """A step wrote more words than the log holds: a bug (steps are bounded by design)."""


class Journal:
    """The writer's handle on the log. Not safe for concurrent use: callers hold the write lock."""

    def __init__(self, arena):
        self.buf = arena.buf
        self.start = arena.layout.log_off
        self.end = self.start + LOG_ENTRIES * LOG_ENTRY_BYTES
        self.pos = self.start
        self.step = 0

    def begin(self):
        """Start a step. The previous one must have been committed or undone."""
        buf = self.buf
        step = _U64.unpack_from(buf, _TX_SEQ)[0] + 1
        _U64.pack_into(buf, _TX_SEQ, step)
        self.pos = self.start
        self.step = step
        _U64.pack_into(buf, _TX_ACTIVE, step)

    def commit(self):
        """End the step: its writes stand. One aligned store, so a kill leaves it done or not."""
        _U64.pack_into(self.buf, _TX_ACTIVE, 0)
        self.step = 0

    def checkpoint(self):
        """Commit and begin again: bounds the log during long operations (evicting a page).

        One aligned store commits this step and opens the next: ``HEADER.tx_active`` goes
        from this step's id straight to a new one that no log entry carries yet, so a kill on
        either side of it leaves this step's writes standing. ``HEADER.tx_seq`` follows; a
        kill between the two stores leaves the new id active with no entries (nothing to
        undo) and not yet handed out, so the next step may take it again."""
        buf = self.buf
        step = _U64.unpack_from(buf, _TX_SEQ)[0] + 1
        _U64.pack_into(buf, _TX_ACTIVE, step)
        _U64.pack_into(buf, _TX_SEQ, step)
        self.pos = self.start
        self.step = step

    def w32(self, offset, value):
        """Journaled store of a u32."""
        pos = self.pos
        if pos >= self.end:
            raise JournalFull(f"journal step exceeded {LOG_ENTRIES} writes")
        buf = self.buf
        word = offset & ~7
        _ENTRY.pack_into(buf, pos, word, _U64.unpack_from(buf, word)[0], self.step)
        self.pos = pos + LOG_ENTRY_BYTES
        _U32.pack_into(buf, offset, value)

    def w64(self, offset, value):
        """Journaled store of an aligned u64."""
        pos = self.pos
        if pos >= self.end:
            raise JournalFull(f"journal step exceeded {LOG_ENTRIES} writes")
        buf = self.buf
        _ENTRY.pack_into(buf, pos, offset, _U64.unpack_from(buf, offset)[0], self.step)
        self.pos = pos + LOG_ENTRY_BYTES
        _U64.pack_into(buf, offset, value)

    def w64x2(self, offset, first, second):
        """Journaled store of two adjacent aligned u64s (one record call, one write call)."""
        pos = self.pos
        if pos + LOG_ENTRY_BYTES >= self.end:
            raise JournalFull(f"journal step exceeded {LOG_ENTRIES} writes")
        buf = self.buf
        old_first, old_second = _U64X2.unpack_from(buf, offset)
        step = self.step
        _ENTRY2.pack_into(buf, pos, offset, old_first, step, offset + _U64.size, old_second, step)
        self.pos = pos + 2 * LOG_ENTRY_BYTES
        _U64X2.pack_into(buf, offset, first, second)

    def undo(self):
        """Roll back the active step, if any, from what the log says. Returns words restored."""
        return undo(self.buf, self.start)


def undo(buf, log_off):
    """Restore the words recorded by the active step, newest first; mark no step active.

    Works from shared memory alone, so any process can repair another's step. Entries that
    point outside the tables (impossible unless memory was scribbled on) are skipped.
    """
    step = _U64.unpack_from(buf, _TX_ACTIVE)[0]
    if not step:
        return 0
    entries = []
    for index in range(LOG_ENTRIES):
        word, old, entry_step = _ENTRY.unpack_from(buf, log_off + index * LOG_ENTRY_BYTES)
        if entry_step != step:
            break
        entries.append((word, old))
    for word, old in reversed(entries):
        if _FIRST_WORD <= word <= len(buf) - 8 and not word & 7:
            _U64.pack_into(buf, word, old)
    _U64.pack_into(buf, _TX_ACTIVE, 0)
    return len(entries)
