"""A test app whose getter leaves a trace of every call, so tests can count loads.

Environment: KCACHE_TEST_DIR (where calls.log and markers go), KCACHE_TEST_DELAY (seconds
that keys starting with "slow" take). Key prefixes choose behaviour:

    missing*   KeyError (not found)        fail*   RuntimeError (load error)
    slow*      sleeps KCACHE_TEST_DELAY     die*    the first call SIGKILLs its own process
    str*       returns str                  int*    returns an int (a bad getter)
    gate*      waits until KCACHE_TEST_DIR holds open-<key> (at most GATE_TIMEOUT seconds)
    *versioned*  the value ends in "@" and what KCACHE_TEST_DIR/version held when the call
                 began (as a getter that reads its database first, then takes its time)

Groups "remember" and "remember-brief" remember a KeyError (not_found_ttl) for 600 s and 1 s.

The groups "stale" and "stale_brief" (short ttls, a stale window) load with ``load_switchable``,
which markers in KCACHE_TEST_DIR steer per key (``switch(directory, key, ...)``): while
hold-<key> exists a load waits (at most GATE_TIMEOUT seconds); with failing-<key> it fails,
with gone-<key> it says "no such key"; it returns "<key>@<generation>", the generation being
the content of generation-<key> (default 1).
"""

import os
import signal
import time

from shmcache import Group

DIRECTORY = os.environ.get("KCACHE_TEST_DIR", "/tmp")
GATE_TIMEOUT = 60.0     # seconds a gate* key waits for its test to open it


def record(key):
    """One line per call: pid, host (KCACHE_TEST_HOST), key, tab-separated."""
    host = os.environ.get("KCACHE_TEST_HOST", "")
    with open(os.path.join(DIRECTORY, "calls.log"), "a") as log:
        log.write(f"{os.getpid()}\t{host}\t{key}\n")


def open_gate(directory, key):
    """Let the loads of the gate* key ``key`` finish (tests call this)."""
    open(os.path.join(directory, "open-" + key.replace("/", "_")), "w").close()


def wait_for_gate(key):
    marker = os.path.join(DIRECTORY, "open-" + key.replace("/", "_"))
    deadline = time.monotonic() + GATE_TIMEOUT
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)


def _marker(directory, kind, key):
    return os.path.join(directory, f"{kind}-" + key.replace("/", "_"))


def switch(directory, key, hold=None, failing=None, gone=None, generation=None):
    """Set (True) or clear (False) the markers steering ``load_switchable`` for ``key``;
    None leaves one as it is."""
    for kind, wanted in (("hold", hold), ("failing", failing), ("gone", gone)):
        path = _marker(directory, kind, key)
        if wanted:
            open(path, "w").close()
        elif wanted is not None and os.path.exists(path):
            os.unlink(path)
    if generation is not None:
        with open(_marker(directory, "generation", key), "w") as marker:
            marker.write(str(generation))


def load_switchable(key):
    record(key)
    deadline = time.monotonic() + GATE_TIMEOUT
    while os.path.exists(_marker(DIRECTORY, "hold", key)) and time.monotonic() < deadline:
        time.sleep(0.01)
    if os.path.exists(_marker(DIRECTORY, "failing", key)):
        raise RuntimeError(f"cannot load {key}")
    if os.path.exists(_marker(DIRECTORY, "gone", key)):
        raise KeyError(key)
    try:
        with open(_marker(DIRECTORY, "generation", key)) as marker:
            generation = marker.read().strip()
    except FileNotFoundError:
        generation = "1"
    return f"{key}@{generation}".encode()


def read_version():
    try:
        with open(os.path.join(DIRECTORY, "version")) as source:
            return source.read().strip()
    except FileNotFoundError:
        return "0"


def load(key):
    version = read_version() if "versioned" in key else None
    record(key)
    if "slow" in key:
        time.sleep(float(os.environ.get("KCACHE_TEST_DELAY", "0.5")))
    if key.startswith("gate"):
        wait_for_gate(key)
    if "die" in key:
        marker = os.path.join(DIRECTORY, "died-" + key.replace("/", "_"))
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            time.sleep(float(os.environ.get("KCACHE_TEST_DELAY", "0.5")))
            os.kill(os.getpid(), signal.SIGKILL)
        except FileExistsError:
            pass
    if "missing" in key:
        raise KeyError(key)
    if "fail" in key:
        raise RuntimeError(f"cannot load {key}")
    if "int" in key:
        return 42
    if "str" in key:
        return f"text:{key}"
    if version is not None:
        return f"value-of-{key}@{version}".encode()
    return f"value-of-{key}".encode()


groups = [
    Group("test", 4 << 20, load),
    Group("brief", 4 << 20, load, ttl=0.5),
    Group("stale", 4 << 20, load_switchable, ttl=0.5, stale=600),
    Group("stale_brief", 4 << 20, load_switchable, ttl=0.3, stale=3),
    Group("remember", 4 << 20, load, not_found_ttl=600),
    Group("remember-brief", 4 << 20, load, not_found_ttl=1),
]


def factory_failing_in_workers():
    """A callable --app: fine in the supervisor, raises in a worker (a boot error)."""
    if os.environ.get("SHMCACHE_WORKER"):
        raise RuntimeError("this worker cannot boot")
    return groups


def factory_slow_in_workers():
    """A callable --app whose worker boot takes a while, as one that opens a database pool
    would: worker N touches boot-N in KCACHE_TEST_DIR, then takes N * KCACHE_TEST_BOOT_DELAY
    seconds, so the workers finish booting one after another."""
    index = os.environ.get("SHMCACHE_WORKER")
    if index:
        open(os.path.join(DIRECTORY, f"boot-{index}"), "w").close()
        time.sleep(int(index) * float(os.environ.get("KCACHE_TEST_BOOT_DELAY", "0.3")))
    return groups


def load_broken(key):
    """A getter with bugs: a ValueError, and a NameError as a typo would raise."""
    record(key)
    if key.startswith("name"):
        return undefined_name  # noqa: F821 - the bug this getter has on purpose
    raise ValueError(f"database refused {key}")


broken = [Group("broken", 4 << 20, load_broken)]
