"""audit() reports a corrupt segment with CorruptSegment, a real exception that ``python -O``
does not strip; no check in the package relies on ``assert``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import shmcache
from shmcache import CorruptSegment, ShmcacheError
from shmcache.arena import GROUP_RECORD_BYTES
from shmcache.lru_index import _G_ITEMS
from shmcache.slabs import STATE_FREE

from test_slabs import slabs, take  # noqa: F401  (the slabs fixture)

# a python -O child process checks that -O keeps the checks
pytestmark = pytest.mark.integration


def test_corrupt_segment_is_a_shmcache_error():
    assert issubclass(CorruptSegment, ShmcacheError)
    assert not issubclass(CorruptSegment, AssertionError)
    assert "CorruptSegment" in shmcache.__all__


def test_audit_of_a_sound_segment_returns_its_summary(make_cache):
    cache = make_cache()
    for i in range(50):
        cache.set("g", f"k{i}", f"v{i}")
    assert cache._store.audit() == {"items": 50}


def test_audit_names_a_group_whose_item_count_is_wrong(make_cache):
    cache = make_cache()
    for i in range(5):
        cache.set("g", f"k{i}", f"v{i}")
    store = cache._store
    gid = store.group_id("g")
    store.arena.set_u64(store.index.groups_off + gid * GROUP_RECORD_BYTES + _G_ITEMS, 7)
    with pytest.raises(CorruptSegment) as raised:
        store.audit()
    assert raised.value.args[:2] == ("counts", gid)


def test_slab_audit_names_a_held_chunk_marked_free(slabs):  # noqa: F811
    held = take(slabs, slabs.class_for(100))
    slabs.buf[held + 4] = STATE_FREE
    with pytest.raises(CorruptSegment) as raised:
        slabs.audit()
    assert raised.value.args[0] == "held chunk state"


def test_audit_raises_under_python_dash_o(segment_name):
    """The checks are not ``assert`` statements: -O leaves them in."""
    script = f"""
import shmcache
from shmcache.arena import GROUP_RECORD_BYTES
from shmcache.lru_index import _G_ITEMS
assert False, "not run under -O"
with shmcache.create({segment_name!r}, "16MiB", max_item_size="64KiB") as cache:
    cache.define_group("g", 1 << 20)
    cache.set("g", "k", b"v")
    store = cache._store
    gid = store.group_id("g")
    store.arena.set_u64(store.index.groups_off + gid * GROUP_RECORD_BYTES + _G_ITEMS, 2)
    try:
        store.audit()
    except shmcache.CorruptSegment as exc:
        print("CorruptSegment", exc.args[0])
    else:
        print("audit passed")
    cache.unlink()
"""
    done = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "CorruptSegment counts"


def test_the_package_has_no_assert_statement():
    """``python -O`` strips ``assert``: a check the package relies on must be a real raise."""
    root = Path(shmcache.__file__).resolve().parent
    found = [f"{path.name}:{node.lineno}" for path in sorted(root.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if isinstance(node, ast.Assert)]
    assert not found, f"assert statements: {', '.join(found)}"
