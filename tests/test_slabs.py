"""Slab classes, pages on demand, page release, adaptive classes, victim pages."""

import pytest

from shmcache.arena import Arena
from shmcache.journal import Journal
from shmcache.slabs import (MIN_CHUNK, STATE_LIVE, VOTES_FOR_NEW_CLASS, Slabs,
                            default_chunk_sizes)

pytestmark = pytest.mark.unit


@pytest.fixture
def slabs(segment_name):
    arena = Arena.create(segment_name, "4MiB", max_item_size="64KiB")
    journal = Journal(arena)
    slabs = Slabs(arena, journal)
    slabs.format()
    journal.begin()
    yield slabs
    journal.commit()
    arena.close()
    arena.unlink()


def take(slabs, class_id):
    offset = slabs.alloc(class_id)
    slabs.buf[offset + 4] = STATE_LIVE           # what the index does with a new chunk
    return offset


@pytest.mark.parametrize("page_size", [64 << 10, 1 << 20, (1 << 20) + 4096])
def test_default_classes_grow_by_about_a_quarter(page_size):
    sizes = default_chunk_sizes(page_size)
    assert sizes[0] == MIN_CHUNK and sizes[-1] == page_size
    assert all(size % 8 == 0 for size in sizes)
    ratios = [b / a for a, b in zip(sizes[4:-1], sizes[5:-1])]
    assert all(1.2 <= ratio <= 1.3 for ratio in ratios), ratios


def test_pages_are_handed_to_classes_on_demand_and_released_when_empty(slabs):
    total = slabs.free_pages()
    small, large = slabs.class_for(100), slabs.class_for(5000)
    assert slabs.chunk_size(small) >= 100 and slabs.chunk_size(large) >= 5000
    per_page = slabs.page_size // slabs.chunk_size(small)
    chunks = [take(slabs, small) for _ in range(per_page + 1)]
    assert len(set(chunks)) == len(chunks)
    assert slabs.free_pages() == total - 2        # the class took a second page when full
    big = take(slabs, large)
    assert slabs.free_pages() == total - 3
    slabs.free(big)
    assert slabs.free_pages() == total - 2        # an empty page goes back at once
    for offset in chunks[:-1]:
        slabs.free(offset)
    assert slabs.free_pages() == total - 1
    again = take(slabs, small)                    # from the page still in use
    assert slabs.free_pages() == total - 1
    slabs.free(chunks[-1])
    assert take(slabs, small) == chunks[-1]       # a freed chunk is handed out first
    assert slabs.audit() == {again, chunks[-1]}


def test_repeated_bad_fit_gets_a_class_of_its_own(slabs):
    need = 136                                   # falls between default classes
    first = slabs.class_for(need)
    assert slabs.chunk_size(first) - need > slabs.chunk_size(first) // 16
    chosen = [slabs.class_for(need) for _ in range(VOTES_FOR_NEW_CLASS + 1)]
    assert slabs.chunk_size(chosen[-1]) == need
    assert slabs.class_for(need - 4) == chosen[-1]      # rounds up to the same 8-byte size


def test_victim_page_prefers_other_classes_with_fewest_chunks(slabs):
    small, medium, large = slabs.class_for(40), slabs.class_for(2000), slabs.class_for(5000)
    for _ in range(10):
        take(slabs, small)
    take(slabs, medium)
    take(slabs, large)
    victim = slabs.victim_page(large)
    assert slabs.class_of(slabs.pages_off + victim * slabs.page_size) == medium
    assert len(slabs.live_chunks(victim)) == 1
