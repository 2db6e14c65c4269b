"""The HTTP front against nginx, and the cost of the cold-key path, in one run.

    python benchmarks/bench_http.py [--seconds 10] [--connections 32] [--workers 4]

1. Hit throughput of ``GET /_kcache/bench/hot`` and ``GET /cache/bench/hot`` (100 B value)
   on a supervisor with --workers 4, side by side with nginx serving a 100 B static file,
   all under the same load: wrk with 32 keep-alive connections (Debian: wrk, nginx). Without
   wrk a Python load generator is used instead; without nginx that column is skipped.
2. Cold-key path: median time of ``connect().get`` on keys never seen (miss -> local front ->
   host-wide singleflight -> getter -> store -> answer) minus the median time of calling the
   same getter directly.
"""

import argparse
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
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import shmcache  # noqa: E402
from bench_app import VALUE_SIZE, load  # noqa: E402
from harness import free_port, wait_http  # noqa: E402


def start_supervisor(workers):
    return harness.start_supervisor("bench_app:groups", workers=workers)


def start_nginx(tmp):
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not binary:
        return None, None, "nginx is not installed (apt-get install nginx)"
    port = free_port()
    html = os.path.join(tmp, "html")
    os.makedirs(html)
    with open(os.path.join(html, "value"), "wb") as value:
        value.write(load("hot"))
    config = os.path.join(tmp, "nginx.conf")
    with open(config, "w") as out:
        out.write(f"""worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{port};
    root {html};
    location / {{ default_type application/octet-stream; }}
  }}
}}
""")
    os.chmod(tmp, 0o755)             # nginx workers run as an unprivileged user
    proc = subprocess.Popen([binary, "-c", config, "-p", tmp])
    try:
        wait_http(port, "/value")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port, None


def run_wrk(url, seconds, connections, headers=()):
    extra = [arg for header in headers for arg in ("-H", header)]
    output = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                             *extra, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(\w+)", output)
    p99 = re.search(r"99%\s+([\d.]+)(\w+)", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return rate, _ms(p50), _ms(p99), int(errors.group(1)) if errors else 0


def _ms(match):
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_python_load(url, seconds, connections, context=None):
    """Fallback load generator: one thread per keep-alive connection (an https:// URL is
    reached with the SSLContext ``context``)."""
    host_port, path = url.split("://", 1)[1].split("/", 1)
    host, port = host_port.split(":")
    counts, latencies, stop = [0] * connections, [], time.monotonic() + seconds

    def one(index):
        connection = harness.connect_http(host, int(port), context=context)
        while time.monotonic() < stop:
            begin = time.perf_counter()
            connection.request("GET", "/" + path)
            connection.getresponse().read()
            latencies.append(time.perf_counter() - begin)
            counts[index] += 1
    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return (sum(counts) / seconds, latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000, 0)


def cold_path(name, count=2000):
    """Median µs of connect().get on new keys, and of the getter called directly."""
    cache = shmcache.connect(name=name)
    direct, through = [], []
    run = uuid.uuid4().hex[:6]
    for i in range(count):
        key = f"cold-{run}-{i}"
        begin = time.perf_counter()
        load(key)
        direct.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        value = cache.get("bench", key)
        through.append(time.perf_counter() - begin)
        assert len(value) == VALUE_SIZE
    cache.close()
    return statistics.median(direct) * 1e6, statistics.median(through) * 1e6, \
        sorted(through)[int(count * 0.99)] * 1e6


def load_options(doc):
    """The options of a benchmark under load (--seconds, --connections, --workers) and
    whether wrk generates it (else Python threads, which says so)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        print("# wrk is not installed (apt-get install wrk): using the Python load generator")
    return args, use_wrk


def main():
    args, use_wrk = load_options(__doc__)
    load_generator = run_wrk if use_wrk else run_python_load
    tmp = tempfile.mkdtemp(prefix="kcache-bench-")
    supervisor, port, name = start_supervisor(args.workers)
    nginx = None
    rows = []
    try:
        wait_http(port, "/cache/bench/hot")            # loads it once: every request after hits
        nginx, nginx_port, missing = start_nginx(tmp)
        if missing:
            print(f"# {missing}: nginx column skipped")
        targets = [("shmcache /_kcache/", f"http://127.0.0.1:{port}/_kcache/bench/hot"),
                   ("shmcache /cache/", f"http://127.0.0.1:{port}/cache/bench/hot")]
        if nginx:
            targets.append(("nginx static", f"http://127.0.0.1:{nginx_port}/value"))
        for label, url in targets:
            rows.append((label, *load_generator(url, args.seconds, args.connections)))
        direct, through, through_p99 = cold_path(name)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)
        if nginx:
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    tool = "wrk -t2" if use_wrk else "python threads"
    print(f"\nHTTP hits, {VALUE_SIZE} B values, {args.connections} keep-alive connections "
          f"({tool}), {args.seconds} s each, shmcache --workers {args.workers}:")
    print(f"{'server':20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'vs nginx':>9}")
    nginx_rate = rows[-1][1] if nginx else None
    for label, rate, p50, p99, errors in rows:
        ratio = f"{rate / nginx_rate:.2f}x" if nginx_rate else "-"
        print(f"{label:20} {rate:10,.0f} {p50:8.3f} {p99:8.3f} {errors:8d} {ratio:>9}")
    print(f"\ncold-key path (2000 new keys, one at a time):"
          f"\n  getter called directly      median {direct:8.1f} us"
          f"\n  connect().get (miss, load)  median {through:8.1f} us   p99 {through_p99:8.1f} us"
          f"\n  added by shmcache           median {(through - direct) / 1000:8.3f} ms")
    print("\ntargets: hit throughput >= 0.5x nginx; cold-key added latency <= 1 ms (median)")


if __name__ == "__main__":
    main()
