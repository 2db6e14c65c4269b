"""Counters shared by every process of a host, and the figures built from them.

Each process counts in a plain Python list (an increment costs about 20 ns, so the hit path
can afford it) and copies the list into its own slot in the arena: about once a second from
a daemon thread, and on demand (``flush``), at exit, and before anyone reads the totals in
that process. ``totals`` adds up every slot. A slot whose process died is folded into slot 0
(the retired counts) when it is reused, so totals only grow.

A counter slot (COUNTER_SLOT, ``layout.counter_slot_bytes(max_groups)`` bytes: a pid, a role,
then COUNTERS_PER_GROUP u64 counters per group) is declared in layout.py.
Slot 0 is never claimed; it holds the counts of processes that are gone.
"""

import atexit
import logging
import os
import threading
import time
import weakref
from array import array

from .layout import COUNTER_SLOT, COUNTER_SLOTS, COUNTERS_PER_GROUP, counter_slot_bytes

log = logging.getLogger("shmcache")

# Per group. groupcache's Stats, plus what a shared-memory cache adds.
KINDS = ("hits", "misses", "hot_hits", "loads", "loads_deduped", "local_loads",
         "local_load_errors", "peer_loads", "peer_errors", "server_requests",
         "stale_hits", "refresh_errors", "negative_hits")
HITS, MISSES, HOT_HITS, LOADS, LOADS_DEDUPED, LOCAL_LOADS, LOCAL_LOAD_ERRORS, \
    PEER_LOADS, PEER_ERRORS, SERVER_REQUESTS, STALE_HITS, REFRESH_ERRORS, \
    NEGATIVE_HITS = range(len(KINDS))
PER_GROUP = COUNTERS_PER_GROUP       # counters reserved per group in a slot
FLUSH_INTERVAL = 1.0                 # seconds
_HEADER = COUNTER_SLOT.struct("pid", "claimed")
_PID = COUNTER_SLOT.struct("pid")
_HEADER_OFF, _PID_OFF, _COUNTS_OFF = COUNTER_SLOT.pid, COUNTER_SLOT.pid, COUNTER_SLOT.counts
_live = weakref.WeakSet()
if len(KINDS) > PER_GROUP or COUNTER_SLOT.fields["counts"].size != PER_GROUP * 8:
    raise AssertionError("metrics: counters out of step with layout.COUNTER_SLOT")


class Counters:
    """This process's counters for one arena. ``values[gid * PER_GROUP + kind]`` is the
    count; anyone may increment it (a lost increment under a thread race is tolerated)."""

    def __init__(self, store, role=0):
        self.store = store
        self.role = role
        self.base = store.arena.layout.counters_off
        self.size = store.arena.layout.max_groups * PER_GROUP
        self.slot_bytes = counter_slot_bytes(store.arena.layout.max_groups)
        self.values = [0] * self.size
        self._slot = None                # claimed on first flush
        self._pid = os.getpid()
        self._thread = None
        self._stop = threading.Event()
        _live.add(self)

    def add(self, gid, kind, count=1):
        self.values[gid * PER_GROUP + kind] += count

    # -- slots --------------------------------------------------------------------------------

    def flush(self):
        """Copy the counts into this process's slot (claiming one the first time)."""
        store = self.store
        if store.closed:
            return
        if self._slot is None:
            self._slot = store.locked(self._claim)
            if self._slot is None:
                return                   # every slot taken by live processes: counts stay local
        offset = self.base + self._slot * self.slot_bytes + _COUNTS_OFF
        store.buf[offset:offset + self.size * 8] = array("Q", self.values).tobytes()

    def _claim(self):
        """A free slot, or one whose process died (its counts go to slot 0). Write lock held."""
        buf, now = self.store.buf, time.time()
        for slot in range(1, COUNTER_SLOTS):
            offset = self.base + slot * self.slot_bytes
            pid = _PID.unpack_from(buf, offset + _PID_OFF)[0]
            if pid and _alive(pid):
                continue
            if pid:
                self._retire(offset)
            buf[offset + _COUNTS_OFF:offset + _COUNTS_OFF + self.size * 8] = bytes(self.size * 8)
            _HEADER.pack_into(buf, offset + _HEADER_OFF, os.getpid(), self.role, now)
            return slot
        log.warning("all %d counter slots are taken: this process's counts stay local",
                    COUNTER_SLOTS - 1)
        return None

    def _retire(self, offset):
        buf, size = self.store.buf, self.size
        dead = array("Q", buf[offset + _COUNTS_OFF:offset + _COUNTS_OFF + size * 8])
        retired_off = self.base + _COUNTS_OFF
        retired = array("Q", buf[retired_off:retired_off + size * 8])
        for index, count in enumerate(dead):
            if count:
                retired[index] += count
        buf[retired_off:retired_off + size * 8] = retired.tobytes()

    def release(self):
        """At a clean exit: fold our counts into the retired slot and free ours."""
        if self.store.closed or self._pid != os.getpid():
            return
        if self._slot is None and not any(self.values):
            return
        self.flush()
        if self._slot is None:
            return
        offset = self.base + self._slot * self.slot_bytes

        def give_back():
            if _PID.unpack_from(self.store.buf, offset + _PID_OFF)[0] == os.getpid():
                self._retire(offset)
                _PID.pack_into(self.store.buf, offset + _PID_OFF, 0)
        self.store.locked(give_back)
        self._slot = None

    # -- the flusher --------------------------------------------------------------------------

    def start(self):
        """Flush about once a second from a daemon thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.flush()                      # claim a slot now: the process shows up at once
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shmcache-counters", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except (ValueError, OSError):     # the store was closed under us: stop quietly
                return

    def stop(self):
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    def _after_fork_in_child(self):
        # The parent's counts are the parent's; this process starts from zero in a slot of
        # its own, and the flusher thread did not survive the fork.
        self.values[:] = [0] * self.size
        self._slot = None
        self._pid = os.getpid()
        self._thread = None


def totals(store, max_groups=None):
    """{gid: {kind: total}} over every slot, retired counts included."""
    lay = store.arena.layout
    groups = max_groups or lay.max_groups
    size = groups * PER_GROUP
    slot_bytes = counter_slot_bytes(lay.max_groups)
    sums = [0] * size
    buf = store.buf
    for slot in range(COUNTER_SLOTS):
        offset = lay.counters_off + slot * slot_bytes
        if slot and not _PID.unpack_from(buf, offset + _PID_OFF)[0]:
            continue
        counts = array("Q", buf[offset + _COUNTS_OFF:offset + _COUNTS_OFF + size * 8])
        for index, count in enumerate(counts):
            if count:
                sums[index] += count
    return {gid: {kind: sums[gid * PER_GROUP + index] for index, kind in enumerate(KINDS)}
            for gid in range(groups)}


def host_stats(store):
    """``store.stats()`` with every group's counters summed over the host's processes (this
    process's flushed first) and ``gets`` = hits + misses + negative hits."""
    store.counters.flush()
    stats = store.stats()
    counted = totals(store)
    for info in stats["groups"].values():
        counts = counted[info["id"]]
        info.update(counts)
        info["gets"] = counts["hits"] + counts["misses"] + counts["negative_hits"]
    return stats


def processes(store):
    """[(pid, role)] of the slots in use by live processes."""
    lay = store.arena.layout
    found = []
    for slot in range(1, COUNTER_SLOTS):
        offset = lay.counters_off + slot * counter_slot_bytes(lay.max_groups)
        pid, role, _claimed = _HEADER.unpack_from(store.buf, offset + _HEADER_OFF)
        if pid and _alive(pid):
            found.append((pid, role))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _flush_all_at_exit():
    for counters in list(_live):
        try:
            counters.stop()
            counters.release()
        except (ValueError, OSError):     # a store closed or unmapped by now: nothing to keep
            pass


def _after_fork():
    for counters in list(_live):
        counters._after_fork_in_child()


atexit.register(_flush_all_at_exit)
os.register_at_fork(after_in_child=_after_fork)


# -- Prometheus text format ------------------------------------------------------------------

# (stats key, metric name, type, help) for each group's figures.
GROUP_METRICS = (
    ("gets", "kcache_gets_total", "counter",
     "Gets of the group on this host: shared-memory lookups by any of its processes."),
    ("hits", "kcache_cache_hits_total", "counter", "Gets answered from this host's arena."),
    ("hot_hits", "kcache_hot_cache_hits_total", "counter",
     "Gets answered from a hot copy of a value another host owns."),
    ("loads", "kcache_loads_total", "counter", "Gets that missed and went on to load."),
    ("loads_deduped", "kcache_loads_deduped_total", "counter",
     "Loads left after each process's singleflight."),
    ("local_loads", "kcache_local_loads_total", "counter",
     "Getter calls on this host that answered (a value or not-found)."),
    ("local_load_errors", "kcache_local_load_errors_total", "counter",
     "Getter calls on this host that failed."),
    ("peer_loads", "kcache_peer_loads_total", "counter", "Values fetched from their owner."),
    ("peer_errors", "kcache_peer_errors_total", "counter",
     "Fetches from an owner that failed (then loaded here)."),
    ("server_requests", "kcache_server_requests_total", "counter",
     "Gets that came from peers over the peer route."),
    ("stale_hits", "kcache_stale_hits_total", "counter",
     "Gets answered with a value past its ttl, within the group's stale window, while it "
     "was reloaded in the background (counted among the hits)."),
    ("refresh_errors", "kcache_refresh_errors_total", "counter",
     "Background reloads of stale values that failed (the stale value is served on)."),
    ("negative_hits", "kcache_negative_hits_total", "counter",
     "Gets answered not-found from a remembered not-found (not_found_ttl), no getter called."),
    ("evictions", "kcache_evictions_total", "counter", "Entries evicted for room."),
    ("expirations", "kcache_expirations_total", "counter", "Entries dropped after their TTL."),
    ("sets", "kcache_sets_total", "counter", "Values stored."),
    ("deletes", "kcache_deletes_total", "counter", "Entries deleted."),
    ("bytes", "kcache_bytes", "gauge", "Key and value bytes held."),
    ("items", "kcache_items", "gauge", "Entries held."),
    ("cache_bytes", "kcache_cache_bytes", "gauge", "The group's byte budget."),
)


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats):
    """The figures of ``Node.stats()`` in the Prometheus text exposition format (0.0.4)."""
    lines = []

    def family(name, kind, text, samples):
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
            lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")

    groups = stats["groups"]
    for key, name, kind, text in GROUP_METRICS:
        family(name, kind, text, [({"group": group}, info[key]) for group, info in sorted(groups.items())])
    family("kcache_worker_rss_bytes", "gauge", "Resident memory of each worker process.",
           [({"worker": w["worker"], "pid": w["pid"]}, w["rss_bytes"]) for w in stats["workers"]])
    family("kcache_worker_cpu_seconds_total", "counter", "CPU time of each worker process.",
           [({"worker": w["worker"], "pid": w["pid"]}, round(w["cpu_seconds"], 3))
            for w in stats["workers"]])
    family("kcache_workers", "gauge", "Worker processes running.", [({}, len(stats["workers"]))])
    family("kcache_clients", "gauge", "connect() client processes attached.",
           [({}, stats["clients"])])
    family("kcache_peer_up", "gauge", "1 if the peer is used, 0 while it is suspect.",
           [({"peer": url}, 0 if info["suspect"] else 1) for url, info in sorted(stats["peers"].items())])
    family("kcache_peer_failures", "gauge", "Consecutive failures of the peer.",
           [({"peer": url}, info["failures"]) for url, info in sorted(stats["peers"].items())])
    family("kcache_segment_bytes", "gauge", "Size of the shared-memory arena.",
           [({}, stats["memory"])])
    family("kcache_segment_payload_ratio", "gauge",
           "Key and value bytes held as a share of the arena.", [({}, round(stats["payload_share"], 6))])
    family("kcache_repairs_total", "counter", "Writes rolled back after their writer died.",
           [({}, stats["repairs"])])
    family("kcache_page_moves_total", "counter", "Slab pages handed from one size class to another.",
           [({}, stats["slabs"]["page_moves"])])
    return "\n".join(lines) + "\n"
