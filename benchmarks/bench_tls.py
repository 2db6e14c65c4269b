"""HTTPS hits against HTTP hits, same supervisor configuration, same client, one run.

    python benchmarks/bench_tls.py [--seconds 10] [--connections 32] [--workers 4]

Two supervisors with the same options (--workers, --memory, bench_app), one of them with
--tls-cert/--tls-key (an ECDSA P-256 certificate made for the run by a CA made for the run),
take turns serving ``GET /cache/bench/hot`` (100 B value) to the same load generator: wrk
with keep-alive connections (Debian: wrk), else Python threads. Printed: req/s, p50 and p99
of each, and HTTPS / HTTP as a ratio. With wrk, the same again with a new connection (a TCP
connect, and for HTTPS a full handshake) for every request: the price of not keeping
connections alive.
"""

import os
import shutil
import signal
import ssl
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from bench_app import VALUE_SIZE  # noqa: E402
from bench_http import load_options, run_python_load, run_wrk  # noqa: E402
from tlscerts import make_ca, make_server_cert  # noqa: E402


def main():
    args, use_wrk = load_options(__doc__)          # without wrk: keep-alive only
    tmp = tempfile.mkdtemp(prefix="kcache-bench-tls-")
    ca = make_ca(tmp)
    cert, key = make_server_cert(tmp, ca)
    context = ssl.create_default_context(cafile=ca[0])
    common = dict(workers=args.workers, memory="64MiB")
    servers, rows = [], []
    try:
        plain = harness.start_supervisor("bench_app:groups", **common)
        servers.append(plain[0])
        tls = harness.start_supervisor("bench_app:groups", **common, context=context,
                                       extra=["--tls-cert", cert, "--tls-key", key,
                                              "--tls-ca", ca[0]])
        servers.append(tls[0])
        targets = [("HTTP", f"http://127.0.0.1:{plain[1]}/cache/bench/hot", None),
                   ("HTTPS", f"https://127.0.0.1:{tls[1]}/cache/bench/hot", context)]
        for _label, url, ctx in targets:
            harness.wait_http(int(url.rsplit(":", 1)[1].split("/")[0]), "/cache/bench/hot",
                              context=ctx)                     # loaded once: hits from now on
        modes = [("keep-alive", ())]
        if use_wrk:
            modes.append(("new connection each", ("Connection: close",)))
        for mode, headers in modes:
            for label, url, ctx in targets:
                if use_wrk:
                    result = run_wrk(url, args.seconds, args.connections, headers)
                else:
                    result = run_python_load(url, args.seconds, args.connections, ctx)
                rows.append((mode, label, *result))
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)

    tool = "wrk -t2" if use_wrk else "python threads"
    print(f"\nhits of /cache/bench/hot, {VALUE_SIZE} B values, {args.connections} connections "
          f"({tool}), {args.seconds} s each, shmcache --workers {args.workers}, "
          f"{ssl.OPENSSL_VERSION}:")
    print(f"{'connections':20} {'front':6} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'non-2xx':>8} {'HTTPS/HTTP':>11}")
    http_rate = {}
    for mode, label, rate, p50, p99, errors in rows:
        if label == "HTTP":
            http_rate[mode] = rate
        ratio = f"{rate / http_rate[mode]:.2f}x" if label == "HTTPS" else ""
        print(f"{mode:20} {label:6} {rate:10,.0f} {p50:8.3f} {p99:8.3f} {errors:8d} {ratio:>11}")


if __name__ == "__main__":
    main()
