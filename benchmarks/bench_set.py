"""What a set costs, this tree against another checkout of the project, in one run.

    python benchmarks/bench_set.py [--before DIR] [--rounds 5] [--keys 5000]

Each measurement runs in a fresh interpreter that imports shmcache from the tree named, so
the two trees alternate round by round on the same machine under the same load; the best
round of each counts. One process: CPU microseconds per ``client.set(group, key, 100 B)``
(process time, so a busy machine's preemptions do not count), on keys that exist (a
same-size rewrite) and on new keys. Two processes: aggregate sets per second (wall clock;
they share one write lock), as a ratio to one process. Without ``--before`` only this tree.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


def cpu_per_set(mode, keys, reps=5):
    """Best CPU µs per set over ``reps`` passes of ``keys`` sets in this process."""
    import shmcache
    name = f"kcache-bench-{uuid.uuid4().hex[:8]}"
    owner = shmcache.create(name, "256MiB")
    try:
        owner.define_group("bench", 200 << 20)
        client = shmcache.connect(name=name)
        value, set_ = os.urandom(100), client.set
        names = [f"key:{i:08d}" for i in range(keys)]
        for key in names:
            set_("bench", key, value)
        best = float("inf")
        for rep in range(reps):
            batch = names if mode == "existing" else [f"{key}-{rep}" for key in names]
            begin = time.process_time()
            for key in batch:
                set_("bench", key, value)
            best = min(best, (time.process_time() - begin) / len(batch))
        client.close()
        return best * 1e6
    finally:
        owner.close()
        owner.unlink()


def throughput(procs, keys, seconds=1.0):
    """Aggregate sets per second of ``procs`` processes rewriting their own keys."""
    import multiprocessing
    import shmcache
    name = f"kcache-bench-{uuid.uuid4().hex[:8]}"
    owner = shmcache.create(name, "256MiB")
    try:
        owner.define_group("bench", 200 << 20)
        context = multiprocessing.get_context("fork")
        barrier, results = context.Barrier(procs), context.Queue()

        def loop(index):
            client = shmcache.connect(name=name)
            value = os.urandom(100)
            mine = [f"key:{i:08d}" for i in range(index, keys, procs)]
            for key in mine:
                client.set("bench", key, value)
            barrier.wait()
            count, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < seconds:
                for key in mine[:500]:
                    client.set("bench", key, value)
                count += 500
            results.put(count / (time.perf_counter() - begin))

        workers = [context.Process(target=loop, args=(i,)) for i in range(procs)]
        for worker in workers:
            worker.start()
        total = sum(results.get(timeout=120) for _ in workers)
        for worker in workers:
            worker.join()
        return total
    finally:
        owner.close()
        owner.unlink()


def child(args):
    """One measurement, in a fresh interpreter; prints its figure as JSON."""
    if args.measure in ("existing", "new"):
        print(json.dumps(cpu_per_set(args.measure, args.keys)))
    else:
        print(json.dumps(throughput(int(args.measure), args.keys)))


def run(tree, measure, keys):
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", measure,
                          "--keys", str(keys)], env=env, cwd=tree, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="another checkout to compare with (say, a "
                                         "git worktree of the base commit)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child(args)
        return
    trees = {"this": TREE}
    if args.before:
        trees = {"before": os.path.abspath(args.before), "after": TREE}
    measures = ("existing", "new", "1", "2")
    best = {}
    for _round in range(args.rounds):
        for measure in measures:
            for label, tree in trees.items():
                figure = run(tree, measure, args.keys)
                better = min if measure in ("existing", "new") else max
                best[label, measure] = better(best.get((label, measure), figure), figure)
    print(f"best of {args.rounds} alternating rounds, 100 B values")
    for label in trees:
        one, two = best[label, "1"], best[label, "2"]
        print(f"  {label:6}  set, existing key {best[label, 'existing']:5.2f} us CPU   "
              f"new key {best[label, 'new']:5.2f} us CPU   1 process {one:8,.0f}/s   "
              f"2 processes {two:8,.0f}/s ({two / one:.2f}x)")
    if args.before:
        for measure, what in (("existing", "existing key"), ("new", "new key")):
            print(f"  {what}: {best['before', measure] / best['after', measure]:.2f}x cheaper")
        print(f"  1-process throughput: {best['after', '1'] / best['before', '1']:.2f}x, "
              f"2-process: {best['after', '2'] / best['before', '2']:.2f}x")


if __name__ == "__main__":
    main()
