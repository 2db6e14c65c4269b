"""Batches against loops of single calls, in one run.

    python benchmarks/bench_batch.py [--keys 100] [--rounds 20]

Writes on a segment of this process (create()): set_many and delete_many of 1,000 keys of
100 B against a loop of set / delete. Reads through a supervisor (2 workers, the bench app):
get_many of --keys keys against a loop of get, for hits (shared memory only) and for cold
keys (every one a miss: one batch request against one request per key). Best of --rounds.
"""

import argparse
import os
import signal
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import shmcache  # noqa: E402
from harness import start_supervisor  # noqa: E402


def best(rounds, setup, run):
    """The shortest of ``rounds`` runs of ``run(setup())``, in seconds."""
    times = []
    for _ in range(rounds):
        state = setup()
        started = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - started)
    return min(times)


def writes(rounds):
    name = f"kcache-bench-{uuid.uuid4().hex[:8]}"
    with shmcache.create(name, "64MiB", groups={"g": "32MiB"}) as cache:
        items = {f"key-{i}": os.urandom(100) for i in range(1000)}

        def fresh():
            cache.clear("g")

        def filled():
            cache.clear("g")
            cache.set_many("g", items)
        def set_each(_state):
            for key, value in items.items():
                cache.set("g", key, value)
        rows = [
            ("set, new keys", best(rounds, fresh, set_each),
             best(rounds, fresh, lambda _: cache.set_many("g", items))),
            ("set, same keys", best(rounds, filled, set_each),
             best(rounds, filled, lambda _: cache.set_many("g", items))),
            ("delete", best(rounds, filled, lambda _: [cache.delete("g", k) for k in items]),
             best(rounds, filled, lambda _: cache.delete_many("g", items))),
        ]
    print(f"{'1,000 keys of 100 B':24} {'loop µs/key':>12} {'batch µs/key':>13} {'ratio':>6}")
    for label, loop, batch in rows:
        print(f"{label:24} {loop * 1e3:12.2f} {batch * 1e3:13.2f} {loop / batch:6.1f}")


def reads(keys, rounds):
    proc, port, name = start_supervisor("bench_app:groups", workers=2)
    try:
        with shmcache.connect(name=name) as cache:
            hot = [f"hot-{i}" for i in range(keys)]
            cache.get_many("bench", hot)
            counter = iter(range(1 << 30))

            def cold():
                round_ = next(counter)
                return [f"cold-{round_}-{i}" for i in range(keys)]
            rows = [
                ("hits", best(rounds, lambda: hot, lambda ks: [cache.get("bench", k) for k in ks]),
                 best(rounds, lambda: hot, lambda ks: cache.get_many("bench", ks))),
                ("misses", best(rounds, cold, lambda ks: [cache.get("bench", k) for k in ks]),
                 best(rounds, cold, lambda ks: cache.get_many("bench", ks))),
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(f"{f'{keys} keys':24} {'gets ms':>12} {'get_many ms':>13} {'ratio':>6}")
    for label, loop, batch in rows:
        print(f"{label:24} {loop * 1e3:12.2f} {batch * 1e3:13.2f} {loop / batch:6.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    writes(args.rounds)
    reads(args.keys, args.rounds)


if __name__ == "__main__":
    main()
