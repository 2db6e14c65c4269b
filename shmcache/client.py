"""``connect()``: a co-located process's handle on a host's cache."""

from .store import Store


def segment_name(port=None, name=None):
    """The segment of the supervisor on ``port`` (``kcache-<port>``), or ``name`` as given."""
    if (port is None) == (name is None):
        raise ValueError("give exactly one of port= or name=")
    return name if name is not None else f"kcache-{int(port)}"


class Client:
    """Reads hits straight from shared memory; writes take the segment's write lock.

    ``close()`` detaches (idempotent). A client made by ``create()`` owns the segment and
    also unlinks it when used as a context manager.
    """
    _store = None
    owner = False

    def __init__(self, store, owner=False):
        self._store = store
        self.owner = owner
        self.peek = store.get          # the hit path: one call, no wrapper


    @property
    def name(self):
        return self._store.arena.name

    def peek(self, group, key):
        """The cached value, or None; never loads. (Replaced per instance by the store's get.)"""
        return self._store.get(group, key)

    def set(self, group, key, value, ttl=None):
        self._store.set(group, key, value, ttl)

    def delete(self, group, key):
        return self._store.delete(group, key)

    def clear(self, group=None):
        self._store.clear(group)

    def define_group(self, name, cache_bytes, ttl=None):
        self._store.define_group(name, cache_bytes, ttl)

    def stats(self):
        return self._store.stats()

    def close(self):
        if self._store is not None:
            self._store.close()

    def unlink(self):
        """Remove the segment's name (owners only; mappings stay valid until closed)."""
        self._store.arena.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self.owner:
            self.unlink()


def connect(port=None, *, name=None):
    """Attach to the segment of the supervisor on ``port`` (or the segment ``name``)."""
    return Client(Store.attach(segment_name(port, name)))


def create(name, memory="64MiB", *, max_item_size="1MiB", max_groups=64):
    """Create a segment without a supervisor (tests, embedding). The caller owns it:
    ``with create(...) as cache:`` unlinks it at the end."""
    return Client(Store.create(name, memory, max_item_size, max_groups), owner=True)
