"""Soak: minutes of mixed traffic with random worker kills; memory must stay flat.

    python benchmarks/soak.py --minutes 30 [--kill-every 20]

A supervisor with --workers 4, two connect() client processes and four HTTP client threads
run random get/set/delete on 5,000 keys (values verified on every read) while a random
worker is SIGKILLed every --kill-every seconds. Prints operations per second, errors and
wrong values (the target is 0), and the resident memory of every process at the start and
at the end (flat is the target).
"""

import argparse
import http.client
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import zlib

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import shmcache  # noqa: E402
from bench_app import soak_load  # noqa: E402
from harness import start_supervisor  # noqa: E402

KEYS = 5000


def make_value(key, writer, seq):
    body = f"{key}|{writer}|{seq}|".encode() + b"p" * (seq % 300)
    return body + zlib.crc32(body).to_bytes(4, "little")


def good(key, value):
    if value == soak_load(key):
        return True
    body, crc = value[:-4], value[-4:]
    return zlib.crc32(body).to_bytes(4, "little") == crc and body.split(b"|", 1)[0] == key.encode()


def client_process(name, ident, deadline, results):
    rng = random.Random(ident)
    cache = shmcache.connect(name=name)
    counts = {"get": 0, "set": 0, "delete": 0, "errors": 0, "wrong": 0}
    seq = 0
    while time.time() < deadline:
        seq += 1
        key = f"k{rng.randrange(KEYS)}"
        roll = rng.random()
        try:
            if roll < 0.7:
                if not good(key, cache.get("soak", key)):
                    counts["wrong"] += 1
                counts["get"] += 1
            elif roll < 0.9:
                cache.set("soak", key, make_value(key, ident, seq))
                counts["set"] += 1
            else:
                cache.delete("soak", key)
                counts["delete"] += 1
        except shmcache.ShmcacheError:
            counts["errors"] += 1
    results.put((os.getpid(), counts))
    cache.close()


def http_thread(port, deadline, counts, lock):
    rng = random.Random(threading.get_ident())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    local = {"get": 0, "set": 0, "delete": 0, "errors": 0, "wrong": 0}
    seq = 0
    while time.time() < deadline:
        seq += 1
        key = f"k{rng.randrange(KEYS)}"
        roll = rng.random()
        try:
            if roll < 0.7:
                connection.request("GET", f"/cache/soak/{key}")
                response = connection.getresponse()
                body = response.read()
                if response.status != 200 or not good(key, body):
                    local["wrong"] += 1
                local["get"] += 1
            elif roll < 0.9:
                connection.request("PUT", f"/cache/soak/{key}", body=make_value(key, 900, seq))
                response = connection.getresponse()
                response.read()
                local["set" if response.status == 200 else "errors"] += 1
            else:
                connection.request("DELETE", f"/cache/soak/{key}")
                connection.getresponse().read()
                local["delete"] += 1
        except (OSError, http.client.HTTPException):
            local["errors"] += 1            # its worker was killed: reconnect
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    with lock:
        for name, count in local.items():
            counts[name] += count


def rss(pid):
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--kill-every", type=float, default=20)
    args = parser.parse_args()
    supervisor, port, name = start_supervisor("bench_app:soak_groups")
    start = time.time()
    deadline = start + args.minutes * 60
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    clients = [context.Process(target=client_process, args=(name, i, deadline, results))
               for i in range(2)]
    for client in clients:
        client.start()
    counts, lock = {"get": 0, "set": 0, "delete": 0, "errors": 0, "wrong": 0}, threading.Lock()
    threads = [threading.Thread(target=http_thread, args=(port, deadline, counts, lock))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(5)                                      # warmed up: take the first readings
    workers_at_start = {child.pid: rss(child.pid) for child in psutil.Process(supervisor.pid).children()}
    clients_at_start = {client.pid: rss(client.pid) for client in clients}
    supervisor_at_start, me_at_start = rss(supervisor.pid), rss(os.getpid())
    kills, next_kill = 0, time.time() + args.kill_every
    rng = random.Random(1)
    while time.time() < deadline - 5:
        time.sleep(1)
        if time.time() >= next_kill and time.time() < deadline - 10:
            children = psutil.Process(supervisor.pid).children()
            if children:
                os.kill(rng.choice(children).pid, signal.SIGKILL)
                kills += 1
            next_kill = time.time() + args.kill_every
    # The last readings, while everyone is still at work (no kill in the last 10 s).
    workers_at_end = {child.pid: rss(child.pid) for child in psutil.Process(supervisor.pid).children()}
    clients_at_end = {client.pid: rss(client.pid) for client in clients}
    supervisor_at_end, me_at_end = rss(supervisor.pid), rss(os.getpid())
    for thread in threads:
        thread.join(120)
    for _ in clients:
        pid, client_counts = results.get(timeout=120)
        for key, count in client_counts.items():
            counts[key] += count
    for client in clients:
        client.join(60)
    supervisor.send_signal(signal.SIGTERM)
    code = supervisor.wait(120)
    elapsed = time.time() - start
    leaked = os.path.exists(f"/dev/shm/{name}")

    mib = 1 << 20
    ops = counts["get"] + counts["set"] + counts["delete"]
    print(f"\nsoak: {elapsed / 60:.1f} minutes, 4 workers, 2 connect() clients, 4 HTTP threads, "
          f"{kills} worker kills")
    print(f"  operations: {ops:,} ({ops / elapsed:,.0f}/s): get {counts['get']:,}, "
          f"set {counts['set']:,}, delete {counts['delete']:,}")
    print(f"  wrong values: {counts['wrong']}   errors (requests cut by a kill): {counts['errors']}")
    print(f"  supervisor exit code {code}; segment left behind: {leaked}")
    print("\nresident memory, MiB (start -> end):")
    print(f"  supervisor      {supervisor_at_start / mib:7.1f} -> {supervisor_at_end / mib:7.1f}")
    print(f"  load generator  {me_at_start / mib:7.1f} -> {me_at_end / mib:7.1f}")
    for pid, start_rss in clients_at_start.items():
        print(f"  client {pid:<8} {start_rss / mib:7.1f} -> {clients_at_end[pid] / mib:7.1f}")
    survivors = set(workers_at_start) & set(workers_at_end)
    for pid in sorted(workers_at_start):
        end = f"{workers_at_end[pid] / mib:7.1f}" if pid in survivors else " killed"
        print(f"  worker {pid:<8} {workers_at_start[pid] / mib:7.1f} -> {end}")
    for pid in sorted(set(workers_at_end) - survivors):
        print(f"  worker {pid:<8} (replacement)  -> {workers_at_end[pid] / mib:7.1f}")


if __name__ == "__main__":
    main()
