"""Many hosts: remote vs local vs hot-copy hits, cluster throughput, and the ring at scale.

    python benchmarks/bench_cluster.py [--seconds 10] [--keys 2000]

1. Three supervisors (--workers 4 each) on loopback listing each other as peers. Latency of
   GET /cache/bench/<key> from a keep-alive client, p50 and p99 over --keys keys:
   local hit (asked on the owner), remote hit (asked on another host: one fetch from the
   owner, which has it cached), hot-copy hit (asked again on that host: --hot-fraction 1).
2. Requests/s of gets spread over the 3 hosts: one wrk per host at once, random keys
   (Python threads when wrk is missing).
3. A simulation of the ring at 1,000 hosts (no processes): balance and keys moved when a
   host joins or leaves, against the ideal 1/(N+1).
"""

import argparse
import collections
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from harness import free_port, start_supervisor  # noqa: E402
from shmcache.ring import VNODES, Ring  # noqa: E402


def start_cluster(count=3, workers=4, hot_fraction=1.0):
    ports = [free_port() for _ in range(count)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    procs = [start_supervisor("bench_app:groups", workers, port=port,
                              extra=["--peers", ",".join(urls), "--hot-fraction", str(hot_fraction)])[0]
             for port in ports]
    return procs, ports, urls


def timed_gets(connection, paths):
    samples = []
    for path in paths:
        begin = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        samples.append(time.perf_counter() - begin)
        assert response.status == 200, (path, response.status)
    return samples


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


def latencies(ports, urls, keys):
    ring = Ring(urls)
    connections = [http.client.HTTPConnection("127.0.0.1", port) for port in ports]
    by_owner = collections.defaultdict(list)
    for key in keys:
        by_owner[urls.index(ring.owner_of(key))].append(key)
    local, remote, hot = [], [], []
    for owner, owned in by_owner.items():
        other = (owner + 1) % len(ports)
        paths = [f"/cache/bench/{key}" for key in owned]
        timed_gets(connections[owner], paths)                      # load once, on the owner
        local += timed_gets(connections[owner], paths)              # local hits
        remote += timed_gets(connections[other], paths)             # fetched from the owner
        hot += timed_gets(connections[other], paths)                # now a hot copy there
    return {"local hit (owner)": local, "remote hit (via owner)": remote,
            "hot-copy hit": hot}


def throughput(ports, seconds, keys):
    if not shutil.which("wrk"):
        return None, "wrk is not installed: skipped (apt-get install wrk)"
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f"""
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/cache/bench/spread-" .. math.random(1, {keys}))
end
""")
    script.close()
    try:
        runs = [subprocess.Popen(["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", script.name,
                                  f"http://127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
                for port in ports]
        outputs = [run.communicate()[0] for run in runs]
    finally:
        os.unlink(script.name)
    rates = [float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) for out in outputs]
    errors = sum(int(m.group(1)) for out in outputs
                 for m in [re.search(r"Non-2xx or 3xx responses: (\d+)", out)] if m)
    return rates, errors


def ring_simulation(hosts=1000, keys=1_000_000):
    urls = [f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8001" for i in range(hosts)]
    names = [f"key:{i}".encode() for i in range(keys)]
    begin = time.perf_counter()
    ring = Ring(urls)
    build = time.perf_counter() - begin
    owners = [ring.owner_of(key) for key in names]
    load = collections.Counter(owners)
    joined = Ring(urls + ["http://10.99.99.99:8001"])
    moved_join = sum(a != joined.owner_of(k) for a, k in zip(owners, names))
    left = Ring(urls[1:])
    moved_leave = sum(a != left.owner_of(k) for a, k in zip(owners, names))
    mean = keys / hosts
    return {"build_s": build, "max_over_mean": max(load.values()) / mean,
            "min_over_mean": min(load.values()) / mean,
            "join_moved": moved_join / keys, "leave_moved": moved_leave / keys,
            "ideal_join": 1 / (hosts + 1), "ideal_leave": 1 / hosts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--keys", type=int, default=2000)
    args = parser.parse_args()
    procs, ports, urls = start_cluster()
    try:
        lat = latencies(ports, urls, [f"lat-{i}" for i in range(args.keys)])
        rates, errors = throughput(ports, args.seconds, 20000)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    sim = ring_simulation()

    print(f"\nhits on loopback, 3 hosts x 4 workers, {args.keys} keys, 100 B values, "
          f"one keep-alive client:")
    print(f"{'':26} {'p50 ms':>8} {'p99 ms':>8}  vs local p50")
    base = percentile(lat["local hit (owner)"], 0.5)
    for label, samples in lat.items():
        p50 = percentile(samples, 0.5)
        print(f"{label:26} {p50:8.3f} {percentile(samples, 0.99):8.3f}  {p50 / base:6.2f}x")
    if rates is None:
        print(f"\nthroughput: {errors}")
    else:
        print(f"\ngets spread over 3 hosts (wrk -t1 -c16 each, {args.seconds} s, 20,000 keys, "
              f"hot copies on): {sum(rates):,.0f} req/s in all "
              f"({', '.join(f'{r:,.0f}' for r in rates)}); non-2xx: {errors}")
    print(f"\nring at 1,000 hosts ({VNODES} virtual nodes each, 1M keys, built in "
          f"{sim['build_s']:.1f} s): max/mean {sim['max_over_mean']:.3f}, "
          f"min/mean {sim['min_over_mean']:.3f}")
    print(f"  a host joins: {sim['join_moved']:.4%} of keys move (ideal {sim['ideal_join']:.4%}, "
          f"ratio {sim['join_moved'] / sim['ideal_join']:.2f})")
    print(f"  a host leaves: {sim['leave_moved']:.4%} of keys move (ideal {sim['ideal_leave']:.4%}, "
          f"ratio {sim['leave_moved'] / sim['ideal_leave']:.2f})")
    print("\ntarget: remote hit p50 <= 0.5 ms")


if __name__ == "__main__":
    main()
