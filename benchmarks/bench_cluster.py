"""Many hosts: remote vs local vs hot-copy hits, cluster throughput, and the ring at scale.

    python benchmarks/bench_cluster.py [--seconds 10] [--keys 2000]

1. Three supervisors (--workers 4 each) on loopback listing each other as peers. Latency of
   GET /cache/bench/<key> from a keep-alive client, p50 and p99 over --keys keys:
   local hit (asked on the owner), remote hit (asked on another host: one fetch from the
   owner, which has it cached), hot-copy hit (asked again on that host: --hot-fraction 1).
2. Requests/s of gets spread over the 3 hosts: one wrk per host at once, random keys
   (Python threads when wrk is missing), each key loaded once before (``warm``), so the run
   times hits, local and remote, not first loads.
3. A simulation of the ring at 1,000 hosts (no processes): balance and keys moved when a
   host joins or leaves, against the ideal 1/(N+1).
4. Against golang/groupcache, when Go and Debian's golang-github-golang-groupcache-dev are
   installed (apt-get install golang-go golang-github-golang-groupcache-dev): three Go nodes
   (go_groupcache_node/main.go, built offline from the Debian source) beside three shmcache
   hosts fetching from owners on the event loop, and three fetching on the thread pool (the
   path before: SHMCACHE_PEER_FETCH=pool). Hot copies off everywhere (--hot-fraction 0;
   the Go build gets its 1-in-10 hot copy switched off). Remote-hit p50/p99 and random-key
   throughput (keys warmed as in 2.), as ratios to Go's. --workers sets the workers of each
   shmcache host (default 4; the three hosts share this machine's cores). The throughput
   runs of the three clusters alternate, --rounds times (default 3), and each one's median
   counts, so that load coming and going on a shared machine falls on each alike.
"""

import argparse
import bisect
import collections
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from harness import free_port, start_supervisor, wait_http  # noqa: E402
from shmcache.ring import VNODES, Ring  # noqa: E402


GROUPCACHE_SOURCE = "/usr/share/gocode/src/github.com/golang"
GO_NODE = os.path.join(HERE, "go_groupcache_node", "main.go")


def start_cluster(count=3, workers=4, hot_fraction=1.0, env=None):
    ports = [free_port() for _ in range(count)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    procs = [start_supervisor("bench_app:groups", workers, port=port, env=env,
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


def latencies(ports, urls, keys, owner_of=None):
    """Samples of local, remote and second-ask hits; ``owner_of(key)`` is the owner's URL
    (shmcache's ring if not given)."""
    owner_of = owner_of or Ring(urls).owner_of
    connections = [http.client.HTTPConnection("127.0.0.1", port) for port in ports]
    by_owner = collections.defaultdict(list)
    for key in keys:
        by_owner[urls.index(owner_of(key))].append(key)
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


def warm(ports, keys, threads=8):
    """GET every key of the throughput runs once, spread over the hosts, so that the timed
    run measures hits (local and remote), not the first loads."""
    failures = []

    def run(first):
        connection = http.client.HTTPConnection("127.0.0.1", ports[first % len(ports)], timeout=60)
        try:
            for key in range(first + 1, keys + 1, threads):
                connection.request("GET", f"/cache/bench/spread-{key}")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append((key, response.status))
        finally:
            connection.close()

    workers = [threading.Thread(target=run, args=(first,)) for first in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise RuntimeError(f"warming failed for {len(failures)} keys, first {failures[0]}")


def build_go_node(workdir):
    """The Go node's binary, built in ``workdir`` from the Debian groupcache source with
    its random hot copies switched off (no network: GOPATH mode); or (None, reason)."""
    go = shutil.which("go")
    if not go:
        return None, "Go is not installed (apt-get install golang-go)"
    if not os.path.isdir(os.path.join(GROUPCACHE_SOURCE, "groupcache")):
        return None, "golang/groupcache is not installed (apt-get install golang-github-golang-groupcache-dev)"
    gopath = os.path.join(workdir, "gopath")
    shutil.copytree(GROUPCACHE_SOURCE, os.path.join(gopath, "src", "github.com", "golang"))
    source = os.path.join(gopath, "src", "github.com", "golang", "groupcache", "groupcache.go")
    with open(source) as file:
        text = file.read()
    hot = "if rand.Intn(10) == 0 {"
    if hot not in text:
        return None, "this groupcache version's hot copies cannot be switched off"
    with open(source, "w") as file:
        file.write(text.replace(hot, "if false && rand.Intn(10) == 0 {"))
    os.makedirs(os.path.join(gopath, "src", "gonode"))
    shutil.copy(GO_NODE, os.path.join(gopath, "src", "gonode", "main.go"))
    binary = os.path.join(workdir, "gonode")
    env = {**os.environ, "GOPATH": gopath, "GO111MODULE": "off", "GOFLAGS": "",
           "GOPROXY": "off", "GOCACHE": os.path.join(workdir, "gocache")}
    built = subprocess.run([go, "build", "-o", binary, "gonode"], env=env, cwd=workdir,
                           capture_output=True, text=True)
    if built.returncode:
        return None, f"go build failed: {built.stderr.strip()[-500:]}"
    return binary, None


def start_go_cluster(binary, count=3):
    ports = [free_port() for _ in range(count)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    procs = [subprocess.Popen([binary, "-port", str(port), "-self", url, "-peers", ",".join(urls)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for port, url in zip(ports, urls)]
    for port in ports:
        wait_http(port)
    return procs, ports, urls


def go_owner(urls, replicas=50):
    """groupcache's peer picker (consistenthash, crc32, 50 replicas): key -> owner URL."""
    points = sorted((zlib.crc32(f"{i}{url}".encode()), url) for url in urls for i in range(replicas))
    hashes = [point[0] for point in points]

    def owner_of(key):
        at = bisect.bisect_left(hashes, zlib.crc32(key.encode()))
        return points[at % len(points)][1]
    return owner_of


def go_counters(ports):
    """The Go nodes' PeerLoads and PeerErrors, summed."""
    totals = collections.Counter()
    for port in ports:
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("GET", "/stats")
        stats = json.loads(connection.getresponse().read())
        totals.update(PeerLoads=stats["PeerLoads"], PeerErrors=stats["PeerErrors"])
    return totals


def stop_all(procs):
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(60)


def versus_go(seconds, keys, workers=4, rounds=3):
    """Remote hits and throughput of Go, shmcache on the loop and on the pool; or a reason.
    The three clusters run side by side (idle when not measured) and their throughput runs
    alternate, ``rounds`` times: on a shared machine, load that comes and goes then falls on
    each alike; each one's median round counts."""
    workdir = tempfile.mkdtemp(prefix="bench-go-")
    try:
        binary, reason = build_go_node(workdir)
        if binary is None:
            return None, reason
        results = {}
        names = [f"cmp-{i}" for i in range(keys)]
        clusters = {}
        try:
            for label, start in (
                    ("golang/groupcache", lambda: start_go_cluster(binary)),
                    ("shmcache, loop fetch", lambda: start_cluster(workers=workers, hot_fraction=0)),
                    ("shmcache, pool fetch", lambda: start_cluster(
                        workers=workers, hot_fraction=0, env={"SHMCACHE_PEER_FETCH": "pool"}))):
                procs, ports, urls = clusters[label] = start()
                owner_of = go_owner(urls) if label.startswith("golang") else None
                lat = latencies(ports, urls, names, owner_of)
                # Hot copies are off: the second ask of each key is a remote hit too.
                results[label] = [lat["remote hit (via owner)"] + lat["hot-copy hit"], [], 0]
                if owner_of is not None:       # the Go nodes' remote hits came from owners
                    results["go counters"] = go_counters(ports)
                warm(ports, 20000)                                 # load every key once
            for _round in range(rounds):
                for label, (_procs, ports, _urls) in clusters.items():
                    rates, errors = throughput(ports, seconds, 20000)
                    if rates is None:
                        results[label][1] = None
                        continue
                    results[label][1].append(sum(rates))
                    results[label][2] += errors
        finally:
            for procs, _ports, _urls in clusters.values():
                stop_all(procs)
        return results, None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_versus_go(results, reason, seconds, keys, workers=4, rounds=3):
    if results is None:
        print(f"\nversus golang/groupcache: skipped: {reason}")
        return
    print(f"\nversus golang/groupcache, 3 nodes each (shmcache: {workers} workers each), hot copies "
          f"off, {keys} keys x 2 remote asks, wrk -t1 -c16 per host for {seconds} s over 20,000 "
          f"keys, every key loaded once before; req/s: the median of {rounds} alternating "
          f"rounds (each round's figures in brackets):")
    counters = results.pop("go counters")
    go_remote, go_rates, _ = results["golang/groupcache"]
    go_p50 = percentile(go_remote, 0.5)
    go_rate = statistics.median(go_rates) if go_rates else None
    pool_p50 = percentile(results["shmcache, pool fetch"][0], 0.5)
    pool_rates = results["shmcache, pool fetch"][1]
    print(f"{'':22} {'remote p50 ms':>13} {'p99 ms':>8} {'p50/Go':>7} {'req/s':>9} "
          f"{'req/s/Go':>8} {'p50/pool':>8} {'req/s/pool':>10} {'non-2xx':>7}")
    for label, (remote, rates, errors) in results.items():
        p50, p99 = percentile(remote, 0.5), percentile(remote, 0.99)
        rate = statistics.median(rates) if rates else None
        rate_text = f"{rate:9,.0f}" if rate else f"{'-':>9}"
        rate_go = f"{rate / go_rate:7.2f}x" if rate and go_rate else f"{'-':>8}"
        rate_pool = (f"{rate / statistics.median(pool_rates):9.2f}x" if rate and pool_rates
                     else f"{'-':>10}")
        each = "  [" + ", ".join(f"{r:,.0f}" for r in rates) + "]" if rates else ""
        print(f"{label:22} {p50:13.3f} {p99:8.3f} {p50 / go_p50:6.2f}x {rate_text} {rate_go} "
              f"{p50 / pool_p50:7.2f}x {rate_pool} {errors if rates else '-':>7}{each}")
    print(f"  (Go: {counters['PeerLoads']} peer loads for {len(go_remote)} remote asks, "
          f"{counters['PeerErrors']} peer errors; goal: shmcache on the loop p50 <= 1.0x Go's, "
          f"req/s >= 1.0x Go's)")


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
    parser.add_argument("--workers", type=int, default=4,
                        help="workers per shmcache host in the comparison with Go (4.)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating throughput rounds in the comparison with Go (4.)")
    parser.add_argument("--only-go", action="store_true",
                        help="run only the comparison with golang/groupcache (4.)")
    args = parser.parse_args()
    if args.only_go:
        print_versus_go(*versus_go(args.seconds, args.keys, args.workers, args.rounds),
                        args.seconds, args.keys, args.workers, args.rounds)
        return
    procs, ports, urls = start_cluster()
    try:
        lat = latencies(ports, urls, [f"lat-{i}" for i in range(args.keys)])
        warm(ports, 20000)
        rates, errors = throughput(ports, args.seconds, 20000)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    versus = versus_go(args.seconds, args.keys, args.workers, args.rounds)
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
    print_versus_go(*versus, args.seconds, args.keys, args.workers, args.rounds)
    print("\ntarget: remote hit p50 <= 0.5 ms")


if __name__ == "__main__":
    main()
