"""Torture: HTTP clients and connect() processes keep reading, writing and deleting while
more than a hundred SIGKILLs hit workers and clients. No wrong value, no request hanging
past its timeout, every worker replaced, the arena sound, nothing left in /dev/shm."""

import multiprocessing
import os
import random
import signal
import threading
import time

import pytest

import shmcache
from shmcache.arena import segment_path

from valuecheck import check_value, make_value

# Each test runs with the C reader, then with the Python one.
pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("both_readers")]

APP = ["--app", "apps.counting:groups", "--workers", "4"]
KEYS = 200
KILLS = 110
REQUEST_TIMEOUT = 20


def acceptable(key, value):
    """A value some writer stored for ``key``, or what the getter loads for it."""
    if value == f"value-of-{key}".encode():
        return True
    try:
        check_value("test", key, value)
        return True
    except ValueError:
        return False


def client_process(name, ident, problems_path):
    rng = random.Random(ident)
    cache = shmcache.connect(name=name, timeout=REQUEST_TIMEOUT)
    seq = 0
    while True:
        seq += 1
        key = f"t{rng.randrange(KEYS)}"
        roll = rng.random()
        started = time.monotonic()
        try:
            if roll < 0.6:
                value = cache.get("test", key)
                if not acceptable(key, value):
                    report(problems_path, f"client {ident} read {value[:60]!r} for {key}")
            elif roll < 0.9:
                cache.set("test", key, make_value("test", key, ident, seq, rng.choice((10, 500))))
            else:
                cache.delete("test", key)
        except shmcache.PeerUnavailable:
            pass                          # the worker serving our miss was killed: fine
        if time.monotonic() - started > REQUEST_TIMEOUT + 5:
            report(problems_path, f"client {ident} waited {time.monotonic() - started:.1f}s")


def report(path, line):
    with open(path, "a") as problems:
        problems.write(line + "\n")


def http_worker(host, stop, stats, problems):
    rng = random.Random(threading.get_ident())
    seq = 0
    while not stop.is_set():
        seq += 1
        key = f"t{rng.randrange(KEYS)}"
        started = time.monotonic()
        try:
            if rng.random() < 0.7:
                status, body, _ = host.get("test", key, timeout=REQUEST_TIMEOUT)
                if status != 200 or not acceptable(key, body):
                    problems.append(f"GET {key}: {status} {body[:60]!r}")
            else:
                value = make_value("test", key, 999, seq, 50)
                status = host.request("PUT", f"/cache/test/{key}", body=value,
                                      timeout=REQUEST_TIMEOUT)[0]
                if status != 200:
                    problems.append(f"PUT {key}: {status}")
            stats["ok"] += 1
        except OSError:
            stats["dropped"] += 1         # its worker was killed mid-request
        if time.monotonic() - started > REQUEST_TIMEOUT + 5:
            problems.append(f"request took {time.monotonic() - started:.1f}s")


def test_a_hundred_sigkills_under_mixed_load(supervised, tmp_path):
    host = supervised(APP)
    problems_path = str(tmp_path / "problems.log")
    context = multiprocessing.get_context("fork")
    clients = [context.Process(target=client_process, args=(host.name, i, problems_path))
               for i in range(3)]
    for client in clients:
        client.start()
    stop, stats, problems = threading.Event(), {"ok": 0, "dropped": 0}, []
    threads = [threading.Thread(target=http_worker, args=(host, stop, stats, problems))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    rng = random.Random(2)
    killed_workers = []
    next_ident = 3
    try:
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.03, 0.15))
            if rng.random() < 0.5:
                victim = rng.choice(host.wait_for_workers(4, exclude=killed_workers))
                os.kill(victim, signal.SIGKILL)
                killed_workers.append(victim)
            else:
                slot = rng.randrange(len(clients))
                os.kill(clients[slot].pid, signal.SIGKILL)
                clients[slot].join(30)
                clients[slot] = context.Process(target=client_process,
                                                args=(host.name, next_ident, problems_path))
                clients[slot].start()
                next_ident += 1
        replaced = host.wait_for_workers(4, exclude=killed_workers)   # every one replaced
    finally:
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT + 10)
        for client in clients:
            client.kill()
            client.join(30)
    assert not any(thread.is_alive() for thread in threads), "an HTTP request hung"
    assert not problems, problems[:5]
    assert not os.path.exists(problems_path), open(problems_path).read()[:2000]
    assert stats["ok"] > 500, stats
    assert host.log().count("replacing it") >= len(killed_workers)
    assert len(killed_workers) >= 40 and len(replaced) == 4
    with shmcache.connect(name=host.name) as cache:
        cache._store.audit()
    assert host.stop() == 0
    assert not os.path.exists(segment_path(host.name))
