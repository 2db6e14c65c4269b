"""The segment itself: lifetime, permissions, header checks, space reservation, attaching
from unrelated processes."""

import os
import stat
import struct
import subprocess
import sys
import tempfile

import pytest

import shmcache
from shmcache.arena import LAYOUT_VERSION, MAGIC, Arena, Layout, segment_path
from shmcache.errors import (SegmentCreateError, SegmentIncompatible, SegmentInUse,
                             SegmentNotFound)

pytestmark = pytest.mark.integration


def test_create_attach_close_unlink(segment_name):
    arena = Arena.create(segment_name, "4MiB", max_item_size="64KiB")
    path = segment_path(segment_name)
    assert stat.S_IMODE(os.stat(arena.path).st_mode) == 0o600
    assert os.stat(arena.path).st_size == 4 << 20
    with pytest.raises(SegmentNotFound):
        Arena.attach(segment_name)                   # not under its name until published
    arena.publish()
    assert arena.path == path and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    other = Arena.attach(segment_name)
    assert other.layout == arena.layout
    assert other.epoch == arena.epoch and other.hash_seed == arena.hash_seed
    other.close()
    other.close()                                    # idempotent
    arena.close()
    assert os.path.exists(path)                      # close never destroys
    arena.unlink()
    arena.unlink()                                   # missing is fine
    assert not os.path.exists(path)


def test_create_refuses_existing_name(segment_name):
    with shmcache.create(segment_name, "4MiB", max_item_size="64KiB"):
        with pytest.raises(SegmentInUse):
            shmcache.create(segment_name, "4MiB", max_item_size="64KiB")


def test_attach_missing_segment():
    with pytest.raises(SegmentNotFound, match="no shared-memory segment"):
        shmcache.connect(name="kcache-test-does-not-exist")


@pytest.mark.parametrize("offset, value, message", [
    (0, 0x1234, "not a shmcache arena"),                    # magic
    (0, 0, "not initialised"),
    (8, LAYOUT_VERSION + 1, "layout version"),
    (24, 12345, "inconsistent header"),                     # page size
])
def test_attach_refuses_bad_header(segment_name, offset, value, message):
    with shmcache.create(segment_name, "4MiB", max_item_size="64KiB"):
        with open(segment_path(segment_name), "r+b") as segment:
            segment.seek(offset)
            segment.write(struct.pack("Q" if offset == 0 else "I", value))
        with pytest.raises(SegmentIncompatible, match=message):
            shmcache.connect(name=segment_name)


def test_orphaned_temporary_files_of_dead_creators_are_removed(segment_name, processes):
    dead = processes.python("pass")
    dead.wait(timeout=30)
    orphan = f"{segment_path(segment_name)}.creating-{dead.pid}"
    live = f"{segment_path(segment_name)}.creating-{os.getppid()}"
    for path in (orphan, live):
        open(path, "wb").close()
    try:
        with shmcache.create(segment_name, "4MiB", max_item_size="64KiB"):
            assert not os.path.exists(orphan)          # its creator is dead
            assert os.path.exists(live)                # its creator may still be at work
    finally:
        os.unlink(live)


def test_attach_refuses_tiny_file(segment_name):
    with open(segment_path(segment_name), "wb") as segment:
        segment.write(b"\0" * 100)
    with pytest.raises(SegmentIncompatible, match="too small"):
        shmcache.connect(name=segment_name)


@pytest.mark.parametrize("name", ["", "a/b", "../etc", "-x", "x" * 300, 5, "a.creating-12"])
def test_bad_segment_names(name):
    with pytest.raises(ValueError, match="bad segment name"):
        segment_path(name)


@pytest.mark.parametrize("memory, max_item, message", [
    (1 << 20, 1 << 20, "too small"),
    (64 << 30, 1 << 20, "at most"),
    (16 << 20, 0, "max item size"),
])
def test_layout_limits(memory, max_item, message):
    with pytest.raises(ValueError, match=message):
        Layout.plan(memory, max_item)


def test_layout_regions_are_ordered_and_aligned():
    lay = Layout.plan(64 << 20, 1 << 20)
    offsets = [lay.log_off, lay.groups_off, lay.classes_off, lay.stripes_off, lay.inflight_off,
               lay.counters_off, lay.peers_off, lay.pagemeta_off, lay.refbits_off, lay.buckets_off, lay.pages_off]
    assert offsets == sorted(offsets) and all(offset % 8 == 0 for offset in offsets)
    assert lay.pages_off % 4096 == 0
    assert lay.pages_off + lay.npages * lay.page_size <= lay.total_size
    assert lay.page_size >= (1 << 20) + 24 + 250


@pytest.fixture
def small_tmpfs(monkeypatch):
    """A 4 MiB tmpfs standing in for /dev/shm (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tempfile.mkdtemp(prefix="kcache-tmpfs-")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount_point],
                            capture_output=True, text=True)
    if result.returncode:
        os.rmdir(mount_point)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    monkeypatch.setenv("SHMCACHE_SHM_DIR", mount_point)
    yield mount_point
    subprocess.run(["umount", mount_point], check=True)
    os.rmdir(mount_point)


def test_full_tmpfs_fails_at_creation_with_clear_error(small_tmpfs):
    with pytest.raises(SegmentCreateError, match=r"cannot reserve 16\.0 MiB .* free"):
        shmcache.create("kcache-test-full", "16MiB", max_item_size="64KiB")
    assert os.listdir(small_tmpfs) == []           # nothing half-made left behind
    with shmcache.create("kcache-test-fits", "2MiB", max_item_size="64KiB") as cache:
        cache.define_group("g", 1 << 20)
        cache.set("g", "k", b"v")                  # every page really is backed
        assert cache.peek("g", "k") == b"v"


def test_unrelated_process_attaches_reads_writes_and_leaves_segment(make_cache, segment_name):
    cache = make_cache()
    cache.set("g", "Tom", b"630")
    code = (
        "import sys, shmcache\n"
        "c = shmcache.connect(name=sys.argv[1])\n"
        "assert c.peek('g', 'Tom') == b'630', c.peek('g', 'Tom')\n"
        "c.set('g', 'Jack', b'589')\n"
        "c.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, segment_name], check=True, timeout=60)
    assert os.path.exists(segment_path(segment_name))      # the child's exit unlinked nothing
    assert cache.peek("g", "Jack") == b"589"
    with shmcache.connect(name=segment_name) as again:
        assert again.peek("g", "Tom") == b"630"


def test_connect_by_port_uses_kcache_port_name():
    with pytest.raises(SegmentNotFound, match="kcache-1"):
        shmcache.connect(port=1)
    with pytest.raises(ValueError, match="exactly one"):
        shmcache.connect()


def test_magic_spells_kkache():
    assert struct.pack("<Q", MAGIC) == b"KKACHE01"
