"""Host-wide singleflight through a real supervisor with 4 workers: one getter call per cold
key on the host, whatever mix of HTTP requests and connect() clients asks for it."""

import http.client
import multiprocessing
import os
import threading
import time
from urllib.parse import quote


import pytest

import shmcache
from shmcache.singleflight import Flights

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "4"]


def http_get_many(port, path, count, start, results):
    """``count`` threads, each its own connection, all released by ``start`` at once."""
    def one():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait(60)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            results.append((response.status, response.read()))
        except Exception as exc:          # recorded, then asserted on
            results.append(("error", repr(exc)))
        finally:
            connection.close()
    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def client_process(name, group, key, threads, go_file, ready, results):
    cache = shmcache.connect(name=name)
    outcomes = []
    lock = threading.Lock()
    waiting = threading.Barrier(threads + 1)

    def one():
        waiting.wait(60)
        while not os.path.exists(go_file):       # released together, across processes
            time.sleep(0.001)
        try:
            value = cache.get(group, key)
            outcome = (200, value)
        except shmcache.NotFound:
            outcome = (404, b"")
        except shmcache.LoadError as exc:
            outcome = (500, str(exc).encode())
        with lock:
            outcomes.append(outcome)
    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    waiting.wait(60)
    ready.put(os.getpid())
    for worker in workers:
        worker.join(120)
    results.put(outcomes)


def storm(server, tmp_path, key, http_count=100, client_procs=2, client_threads=50):
    """Fire HTTP and connect() gets for one key at once; return every outcome."""
    go_file = str(tmp_path / f"go-{key}")
    context = multiprocessing.get_context("fork")
    queue, ready = context.Queue(), context.Queue()
    procs = [context.Process(target=client_process,
                             args=(server.name, "test", key, client_threads, go_file, ready,
                                   queue))
             for _ in range(client_procs)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)       # every client thread is at its start line
    start, results = threading.Event(), []
    threads = http_get_many(server.port, f"/cache/test/{quote(key, safe='')}", http_count,
                            start, results)
    open(go_file, "w").close()
    start.set()
    for thread in threads:
        thread.join(120)
    for _ in procs:
        results.extend(queue.get(timeout=120))
    for proc in procs:
        proc.join(30)
    assert len(results) == http_count + client_procs * client_threads
    return results


def test_200_concurrent_gets_of_a_cold_key_call_the_getter_once(supervised, tmp_path):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "1.0"})
    results = storm(server, tmp_path, "slow-cold")
    assert set(results) == {(200, b"value-of-slow-cold")}
    assert [key for _pid, key in server.calls()] == ["slow-cold"]
    assert server.get("test", "slow-cold")[:2] == (200, b"value-of-slow-cold")   # now a hit
    assert len(server.calls()) == 1


def test_getter_error_reaches_every_waiter_and_the_next_get_retries(supervised, tmp_path):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "1.0"})
    results = storm(server, tmp_path, "slow-fail", http_count=40, client_threads=20)
    assert {status for status, _body in results} == {500}
    assert all(b"cannot load slow-fail" in body for _status, body in results)
    assert len(server.calls()) == 1
    status, body, _ = server.get("test", "slow-fail")           # nothing was cached
    assert status == 500 and len(server.calls()) == 2


def test_not_found_reaches_every_waiter_as_404(supervised, tmp_path):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "1.0"})
    results = storm(server, tmp_path, "slow-missing", http_count=40, client_threads=20)
    assert {status for status, _body in results} == {404}
    assert len(server.calls()) == 1


def test_loader_killed_mid_load_waiters_take_over(supervised, tmp_path):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "1.0"})
    before = server.wait_for_workers(4)
    results = storm(server, tmp_path, "die-once", http_count=40, client_threads=20)
    # The first loader killed its own worker mid-load (dropping that worker's own HTTP
    # connections); every request that reached another worker or a client was answered.
    ok = [r for r in results if r == (200, b"value-of-die-once")]
    assert len(ok) >= 40
    assert all(r == (200, b"value-of-die-once") or r[0] == "error" for r in results)
    calls = server.calls()
    assert [key for _pid, key in calls] == ["die-once", "die-once"]
    assert calls[0][0] != calls[1][0]                       # taken over by another process
    server.wait_for_workers(4, exclude=[int(calls[0][0])])   # and the dead worker replaced
    assert int(calls[0][0]) in before


def test_a_slow_load_does_not_delay_other_keys(supervised):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "15.0"})
    slow_done = threading.Event()

    def slow():
        server.get("test", "slow-blocker", timeout=60)
        slow_done.set()
    threading.Thread(target=slow).start()
    deadline = time.monotonic() + 30
    while not server.calls() and time.monotonic() < deadline:
        time.sleep(0.01)                                # the slow load has started
    for i in range(20):                                 # many other keys, every worker
        assert server.get("test", f"quick-{i}")[:2] == (200, f"value-of-quick-{i}".encode())
    assert not slow_done.is_set()                       # all answered while it still loads
    slow_done.wait(60)


def test_group_ttl_expires_loaded_values(supervised):
    server = supervised(APP)
    assert server.get("brief", "k")[:2] == (200, b"value-of-k")
    assert server.get("brief", "k")[0] == 200 and len(server.calls()) == 1
    deadline = time.monotonic() + 30                    # the ttl is 0.5 s: then it reloads
    while len(server.calls()) < 2 and time.monotonic() < deadline:
        assert server.get("brief", "k")[:2] == (200, b"value-of-k")
        time.sleep(0.05)
    assert len(server.calls()) == 2


def test_bad_getter_results(supervised):
    server = supervised(APP)
    assert server.get("test", "int-value")[0] == 500
    assert server.get("test", "str-value")[:2] == (200, b"text:str-value")


def test_in_process_flights_share_one_future():
    from concurrent.futures import Future
    flights, made = Flights(), []

    def submit():
        made.append(Future())
        return made[-1]
    first, second = flights.run("k", submit), flights.run("k", submit)
    assert first is second and len(made) == 1 and len(flights) == 1
    first.set_result(b"v")
    assert len(flights) == 0
    assert flights.run("k", submit) is not first       # done: the next call starts anew
