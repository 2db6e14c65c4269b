"""Run one write operation on a segment and freeze inside it, holding the write lock, at the
N-th journaled write (or the N-th journal checkpoint), so that a test can SIGKILL it there.

    python crash_child.py SEGMENT OPERATION PAUSE_AT

Prints "paused <what>" when frozen, or "completed" if the operation needed fewer writes.
"""

import sys
import time

import shmcache
from shmcache import journal

from valuecheck import make_value

OPERATIONS = {
    "insert": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 100)),
    "insert_carve": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 100)),
    "insert_free": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 100)),
    "rewrite": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 100)),
    "resize": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 3000)),
    "evict": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 100)),
    "delete": lambda c: c.delete("g", "target"),
    "pressure": lambda c: c.set("g", "target", make_value("g", "target", 9, 2, 6000)),
    "clear": lambda c: c.clear("g"),
}


def main():
    name, operation, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = shmcache.connect(name=name)
    calls = [0]

    def pause_point(what):
        calls[0] += 1
        if calls[0] == pause_at:
            print(f"paused {what}", flush=True)
            time.sleep(600)

    def pausing(method_name):
        original = getattr(journal.Journal, method_name)

        def method(self, *args):
            pause_point(method_name)
            return original(self, *args)
        return method

    for method_name in ("w32", "w64", "w64x2", "checkpoint"):
        setattr(journal.Journal, method_name, pausing(method_name))
    writer = cache._attachment.current.index.native_writer
    if writer is not None:        # the C rewrite and insertion pause at the same points
        writer.pause = lambda what: pause_point(f"{what} in C")
    OPERATIONS[operation](cache)
    print("completed", flush=True)


if __name__ == "__main__":
    main()
