"""``connect()`` and ``create()``: the two ways to get a ``Client``. ``connect`` attaches
to the segment of a supervisor (by its port, or a segment by name); ``create`` makes a
segment without one (embedding, tests), with its groups defined before it appears under
its name.
"""

import os
from collections.abc import Iterable, Mapping

from .client import DEFAULT_TIMEOUT, Client
from .errors import InvalidArgument
from .group import Group
from .store import Store


def segment_name(port=None, name=None):
    """The segment of the supervisor on ``port`` (``kcache-<port>``), or ``name`` as given."""
    if (port is None) == (name is None):
        raise InvalidArgument("give exactly one of port= or name=")
    return name if name is not None else f"kcache-{int(port)}"




def connect(port: int | None = None, *, name: str | None = None,
            timeout: float = DEFAULT_TIMEOUT, token: str | None = None,
            tls_ca: str | None = None, tls_server_name: str | None = None) -> Client:
    """Attach to the segment of the supervisor on ``port`` (``kcache-<port>``), or to the
    segment ``name``. Hits are read from shared memory; misses go to the host's front, which
    loads them once for the host. ``timeout``: seconds to wait for the front's answer.
    ``token`` (default $SHMCACHE_TOKEN) is sent to the front when it has one.
    A front with TLS is reached over HTTPS and its certificate verified for
    ``tls_server_name`` (default: the host name of the supervisor's --self URL) against
    the PEM CA bundle ``tls_ca`` (default: the supervisor's --tls-ca, else the system's
    CA store); both are ignored for a plain HTTP front.
    SegmentNotFound if there is no such segment, SegmentIncompatible if it is not one this
    version reads."""
    store = Store.attach(segment_name(port, name))
    store.start_counting()
    return Client(store, timeout=timeout, token=token or os.environ.get("SHMCACHE_TOKEN"),
                  tls_ca=tls_ca, tls_server_name=tls_server_name)


def create(name: str, memory: int | str = "64MiB", *,
           groups: "Iterable[Group] | Mapping[str, int | str] | None" = None,
           max_item_size: int | str = "1MiB", max_groups: int = 64) -> Client:
    """Create a segment without a supervisor (embedding, tests); the caller owns it.

    ``groups``: the groups to define before the segment appears under ``name``, as
    ``Group`` objects or as ``{name: byte budget}``. A ``Group`` with a getter is loaded by
    this client on a miss, once for every process of the host (the arena's in-flight
    table), as a supervisor's workers do; without a getter a miss is NotFound. More groups
    can be added later with ``Client.define_group``.

    ``with create(...) as cache:`` closes and removes the segment at the end; otherwise call
    ``close()`` and ``unlink()``. InvalidArgument (a ValueError) for a malformed or too
    small ``memory`` or ``max_item_size``; SegmentInUse if ``name`` exists;
    SegmentCreateError if /dev/shm cannot hold it."""
    if groups is None:
        wanted = []
    elif isinstance(groups, Mapping):
        wanted = [Group(group, budget) for group, budget in groups.items()]
    else:
        wanted = list(groups)
        for group in wanted:
            if not isinstance(group, Group):
                raise InvalidArgument(f"groups must be shmcache.Group objects or a mapping of "
                                      f"name to byte budget, not {type(group).__name__}")
    names = [group.name for group in wanted]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"groups named twice: {twice}")

    def define(store):
        for group in wanted:
            store.define_group(group.name, group.cache_bytes, group.ttl, group.stale)
    client = Client(Store.create(name, memory, max_item_size, max_groups, before_publish=define),
                    owner=True)
    client._groups.update((group.name, group) for group in wanted)
    return client
