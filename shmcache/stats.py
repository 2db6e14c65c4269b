"""``python -m shmcache.stats --port 8001``: a host's figures as a table a person can read.

It asks the host's front for /stats (so it works from anywhere the port is reachable);
``--watch`` redraws every ``--interval`` seconds with per-second rates. Groups the host no
longer serves (kept in a warm segment with no budget) are left out.
"""

import argparse
import http.client
import json
import math
import os
import sys
import time

from .tls import NamedHTTPSConnection, TlsFilesError, client_context
from .units import format_size


def fetch(host, port, token=None, timeout=10, tls=None):
    """The host's /stats; over HTTPS with ``tls`` = (SSLContext, name to verify)."""
    if tls is None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        connection = NamedHTTPSConnection(host, port, server_name=tls[1], context=tls[0],
                                          timeout=timeout)
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


def hit_percent(hits, gets):
    """Hits as a percentage with one decimal, rounded down: 99.97 % shows as 99.9, so 100.0
    means every get hit. "-" when there were no gets."""
    if not gets:
        return "-"
    return f"{math.floor(1000 * hits / gets) / 10:.1f}"


def table(stats, previous=None, elapsed=None):
    """The figures as lines of text; with ``previous``, get and load rates per second."""
    lines = [f"segment {stats['segment']}: {format_size(stats['memory'])}, {stats['items']:,} items, "
             f"{format_size(stats['bytes'])} of keys and values ({stats['payload_share']:.1%}), "
             f"{len(stats['workers'])} workers, {stats['clients']} clients, "
             f"{stats['repairs']} repairs"]
    head = (f"{'group':16} {'items':>9} {'bytes':>10} {'budget':>10} {'gets':>10} {'hit %':>6} "
            f"{'hot':>7} {'stale':>7} {'neg':>7} {'loads':>8} {'deduped':>8} {'getter':>8} "
            f"{'errors':>7} {'peer':>8} {'evicted':>8}")
    if previous:
        head += f" {'gets/s':>9}"
    lines += ["", head]
    for name, info in sorted(stats["groups"].items()):
        if not info["cache_bytes"] and not info["items"]:
            continue                                  # no longer served (budget 0, emptied)
        gets = info["gets"]
        getter_calls = info["local_loads"] + info["local_load_errors"]
        row = (f"{name[:16]:16} {info['items']:9,} {format_size(info['bytes']):>10} "
               f"{format_size(info['cache_bytes']):>10} {gets:10,} "
               f"{hit_percent(info['hits'], gets):>6} {info['hot_hits']:7,} "
               f"{info.get('stale_hits', 0):7,} {info.get('negative_hits', 0):7,} "
               f"{info['loads']:8,} {info['loads_deduped']:8,} {getter_calls:8,} "
               f"{info['local_load_errors'] + info['peer_errors'] + info.get('refresh_errors', 0):7,} "
               f"{info['peer_loads']:8,} {info['evictions']:8,}")
        if previous and name in previous["groups"] and elapsed:
            row += f" {(gets - previous['groups'][name]['gets']) / elapsed:9,.0f}"
        lines.append(row)
    lines += ["", "stale: hits past the ttl, within the stale window; neg: gets answered by a "
                  "remembered not-found;", "loads: gets that missed; deduped: loads left after "
                  "singleflight; getter: getter calls on this host; peer: values fetched from "
                  "their owner; errors: failed loads, peer fetches and stale refreshes"]
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
    parser = argparse.ArgumentParser(
        prog="python -m shmcache.stats",
        description="Print a shmcache host's figures as a table: per group its items, bytes, "
                    "budget, gets, hit percentage, hot-copy hits, loads, loads left after "
                    "singleflight, getter calls, errors, peer fetches and evictions; per "
                    "worker its pid, memory and CPU; the health of each peer. The figures "
                    "come from the host's GET /stats.",
        epilog="Exit status: 0 printed; 1 the host could not be read.")
    parser.add_argument("--port", type=int, default=8001,
                        help="port of the host's HTTP front (default 8001)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address of the host's HTTP front (default 127.0.0.1)")
    parser.add_argument("--token", default=os.environ.get("SHMCACHE_TOKEN"),
                        help="bearer token, if the host wants one for reads "
                             "(default $SHMCACHE_TOKEN)")
    parser.add_argument("--watch", action="store_true",
                        help="redraw every --interval seconds, with gets per second, until "
                             "interrupted")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between redraws with --watch (default 2)")
    parser.add_argument("--https", action="store_true",
                        help="the front speaks HTTPS (its supervisor has --tls-cert)")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="verify the front's certificate against this PEM CA bundle "
                             "(implies --https; default: the system's CA store)")
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the front's certificate is verified for (implies "
                             "--https; default --host)")
    args = parser.parse_args(argv)
    tls = None
    if args.https or args.tls_ca or args.tls_server_name:
        try:
            tls = client_context(args.tls_ca), args.tls_server_name or args.host
        except TlsFilesError as exc:
            parser.error(str(exc))
    previous, then = None, None
    try:
        while True:
            try:
                stats = fetch(args.host, args.port, args.token, tls=tls)
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
