"""A gunicorn-style worker for tests/test_django.py: a process of its own that configures
Django with the embedded shmcache backend, then answers one JSON command per stdin line
with one JSON line (an error as {"error": "Type: message"}).

    python django_worker.py LOCATION

It prints "ready" once Django is set up; the segment is opened lazily, by the first command.
"""

import json
import sys
import time

import django
from django.conf import settings


def segment(cache):
    """(device, inode) of the segment this process uses: which file it is."""
    return cache._run(lambda client: list(client._live_store().arena.identity))


def incr_times(cache, key, times):
    for _ in range(times):
        cache.incr(key)
    return times


def freeze_in_incr(cache, key, pause_at):
    """incr ``key``, freezing (holding the write lock) at the journal's ``pause_at``-th
    write, for the test to SIGKILL this process there."""
    from shmcache import journal
    calls = [0]

    def pause_point(_what=None):
        calls[0] += 1
        if calls[0] == pause_at:
            print(json.dumps("paused"), flush=True)
            time.sleep(600)

    def pausing(original):
        def method(self, *args):
            pause_point()
            return original(self, *args)
        return method
    for name in ("w32", "w64", "w64x2", "checkpoint"):
        setattr(journal.Journal, name, pausing(getattr(journal.Journal, name)))
    # A rewrite or a new-key insertion may run in C (_native.Writer): it pauses at the
    # same points.
    writer = cache._run(lambda client: client._attachment.current.index.native_writer)
    if writer is not None:
        writer.pause = pause_point
    return cache.incr(key)


def repairs(cache):
    return cache._run(lambda client: client.stats()["repairs"])


COMMANDS = {
    "segment": segment,
    "set": lambda cache, key, value: cache.set(key, value, timeout=None),
    "get": lambda cache, key: cache.get(key),
    "add": lambda cache, key, value: cache.add(key, value, timeout=None),
    "incr": incr_times,
    "freeze_in_incr": freeze_in_incr,
    "repairs": repairs,
}


def main():
    settings.configure(CACHES={"default": {
        "BACKEND": "shmcache.django.ShmCache", "LOCATION": sys.argv[1],
        "OPTIONS": {"memory": "16MiB", "max_item_size": "64KiB"}}})
    django.setup()
    from django.core.cache import cache
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        command, *args = json.loads(line)
        try:
            result = COMMANDS[command](cache, *args)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
