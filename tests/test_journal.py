"""The undo journal: a step's writes are rolled back from shared memory alone."""

import struct

import pytest

from shmcache.arena import LOG_ENTRY_BYTES, _OFFSET_TX_ACTIVE, Arena
from shmcache.journal import Journal, JournalFull, undo

pytestmark = pytest.mark.unit


@pytest.fixture
def arena(segment_name):
    arena = Arena.create(segment_name, "4MiB", max_item_size="64KiB")
    yield arena
    arena.close()
    arena.unlink()


def words(arena, *offsets):
    return [struct.unpack_from("Q", arena.buf, offset)[0] for offset in offsets]


def test_undo_restores_every_word_newest_first(arena):
    base = arena.layout.pages_off
    struct.pack_into("QQQ", arena.buf, base, 1, 2, 3)
    journal = Journal(arena)
    journal.begin()
    journal.w32(base, 10)
    journal.w32(base + 4, 11)            # same word twice: undo must restore the first value
    journal.w64(base + 8, 20)
    journal.w64x2(base + 8, 21, 30)
    assert words(arena, base, base + 8, base + 16) == [10 | 11 << 32, 21, 30]
    assert journal.undo() == 5
    assert words(arena, base, base + 8, base + 16) == [1, 2, 3]
    assert words(arena, _OFFSET_TX_ACTIVE) == [0]
    assert undo(arena.buf, arena.layout.log_off) == 0         # nothing active any more


def test_committed_step_is_not_undone_and_stale_entries_do_not_count(arena):
    base = arena.layout.pages_off
    journal = Journal(arena)
    journal.begin()
    journal.w64(base, 7)
    journal.w64(base + 8, 8)
    journal.commit()
    journal.begin()                        # new step: the two old entries have an old id
    journal.w64(base + 16, 9)
    assert journal.undo() == 1
    assert words(arena, base, base + 8, base + 16) == [7, 8, 0]


def test_entry_torn_before_its_step_id_is_ignored(arena):
    base = arena.layout.pages_off
    journal = Journal(arena)
    journal.begin()
    journal.w64(base, 5)
    # A writer killed while writing entry 2: offset and old value written, step id not.
    struct.pack_into("QQ", arena.buf, arena.layout.log_off + LOG_ENTRY_BYTES, base + 8, 99)
    struct.pack_into("Q", arena.buf, base + 8, 42)
    assert journal.undo() == 1
    assert words(arena, base, base + 8) == [0, 42]


def test_overlong_step_raises(arena):
    journal = Journal(arena)
    journal.begin()
    with pytest.raises(JournalFull):
        for _ in range(100000):
            journal.w32(arena.layout.pages_off, 1)
    journal.undo()
