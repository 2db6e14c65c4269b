"""``python -m shmcache.stats --port 8001``: a host's figures as a table a person can read.

It asks the host's front for /stats (so it works from anywhere the port is reachable);
``--watch`` redraws every ``--interval`` seconds with per-second rates.
"""

import argparse
import http.client
import json
import os
import sys
import time

from .units import format_size


def fetch(host, port, token=None, timeout=10):
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request("GET", "/stats", headers=headers)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"/stats answered {response.status}: {body.decode(errors='replace').strip()}")
    return json.loads(body)


def table(stats, previous=None, elapsed=None):
    """The figures as lines of text; with ``previous``, get and load rates per second."""
    lines = [f"segment {stats['segment']}: {format_size(stats['memory'])}, {stats['items']:,} items, "
             f"{format_size(stats['bytes'])} of keys and values ({stats['payload_share']:.1%}), "
             f"{len(stats['workers'])} workers, {stats['clients']} clients, "
             f"{stats['repairs']} repairs"]
    head = (f"{'group':16} {'items':>9} {'bytes':>10} {'budget':>10} {'gets':>10} {'hit %':>6} "
            f"{'hot':>7} {'loads':>8} {'local':>8} {'errors':>7} {'peer':>8} {'evicted':>8}")
    if previous:
        head += f" {'gets/s':>9}"
    lines += ["", head]
    for name, info in sorted(stats["groups"].items()):
        gets = info["gets"]
        hit = f"{100 * info['hits'] / gets:.1f}" if gets else "-"
        row = (f"{name[:16]:16} {info['items']:9,} {format_size(info['bytes']):>10} "
               f"{format_size(info['cache_bytes']):>10} {gets:10,} {hit:>6} {info['hot_hits']:7,} "
               f"{info['loads']:8,} {info['local_loads']:8,} "
               f"{info['local_load_errors'] + info['peer_errors']:7,} {info['peer_loads']:8,} "
               f"{info['evictions']:8,}")
        if previous and name in previous["groups"] and elapsed:
            row += f" {(gets - previous['groups'][name]['gets']) / elapsed:9,.0f}"
        lines.append(row)
    lines += ["", f"{'worker':>6} {'pid':>8} {'rss':>10} {'cpu s':>8}"]
    for worker in stats["workers"]:
        lines.append(f"{worker['worker']:6} {worker['pid']:8} {format_size(worker['rss_bytes']):>10} "
                     f"{worker['cpu_seconds']:8.1f}")
    if stats["peers"]:
        lines += ["", f"peers of {stats['self']}:"]
        for url, info in sorted(stats["peers"].items()):
            state = f"suspect ({info['failures']} failures)" if info["suspect"] else "up"
            lines.append(f"  {url:40} {state}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m shmcache.stats", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default=os.environ.get("SHMCACHE_TOKEN"),
                        help="bearer token, if the host wants one for reads ($SHMCACHE_TOKEN)")
    parser.add_argument("--watch", action="store_true", help="redraw until interrupted")
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    previous, then = None, None
    try:
        while True:
            try:
                stats = fetch(args.host, args.port, args.token)
            except (OSError, RuntimeError, ValueError) as exc:
                print(f"cannot read stats from {args.host}:{args.port}: {exc}", file=sys.stderr)
                return 1
            now = time.monotonic()
            lines = table(stats, previous, now - then if then else None)
            if args.watch:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S"), end="\n")
            print("\n".join(lines), flush=True)
            if not args.watch:
                return 0
            previous, then = stats, now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
