"""/metrics (parsed by prometheus_client's parser), /stats, and python -m shmcache.stats:
the figures are summed over every process of the host and move as requests are made."""

import json
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import shmcache

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]


def scrape(host):
    status, body, headers = host.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def wait_for(host, check, timeout=15):
    """Scrape until ``check(samples)`` holds (counters reach /metrics within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(host)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_group_counters_move_with_requests_from_every_process(supervised):
    host = supervised(APP)
    for key in ("a", "b", "a", "a", "missing-1", "fail-1"):
        host.get("test", key)
    with shmcache.connect(name=host.name) as cache:
        for _ in range(5):
            assert cache.get("test", "a") == b"value-of-a"       # hits in the client process
        assert cache.peek("test", "never") is None
    host.request("PUT", "/cache/test/put", body=b"x")
    host.request("DELETE", "/cache/test/put")

    def settled(samples):            # the second worker may still be booting at first
        workers = [name for (name, _labels) in samples if name == "kcache_worker_rss_bytes"]
        return value(samples, "kcache_gets_total", group="test") >= 12 and len(workers) == 2
    samples = wait_for(host, settled)
    get = lambda name: value(samples, name, group="test")           # noqa: E731
    assert get("kcache_gets_total") == 12                         # 6 HTTP + 5 client + 1 peek
    assert get("kcache_cache_hits_total") == 7                    # a, a over HTTP; a x5 client
    assert get("kcache_loads_total") == 4                         # a, b, missing-1, fail-1
    assert get("kcache_local_loads_total") == 3                   # a, b, and the not-found
    assert get("kcache_local_load_errors_total") == 1
    assert get("kcache_items") == 2 and get("kcache_bytes") == len("avalue-of-abvalue-of-b")
    assert get("kcache_sets_total") >= 3 and get("kcache_deletes_total") == 1
    assert get("kcache_cache_bytes") == 4 << 20
    workers = [s for (name, labels), s in samples.items() if name == "kcache_worker_rss_bytes"]
    assert len(workers) == 2 and all(rss > 1 << 20 for rss in workers)
    assert value(samples, "kcache_workers") == 2
    cpu = [s for (name, _l), s in samples.items() if name == "kcache_worker_cpu_seconds_total"]
    assert len(cpu) == 2


def test_peer_counters_hot_hits_and_peer_health(cluster):
    a, b = cluster(2, APP + ["--hot-fraction", "1.0", "--peer-timeout", "1"])
    from shmcache.ring import Ring
    ring = Ring([a.url, b.url])
    keys = [k for k in (f"p{i}" for i in range(200)) if ring.owner_of(k) == b.url][:5]
    for key in keys:
        a.get("test", key)          # fetched from B, kept hot on A
        a.get("test", key)          # a hot-copy hit on A
    samples = wait_for(a, lambda s: value(s, "kcache_hot_cache_hits_total", group="test") >= 5
                       and value(s, "kcache_peer_loads_total", group="test") >= 5)
    assert value(samples, "kcache_peer_loads_total", group="test") == 5
    assert value(samples, "kcache_hot_cache_hits_total", group="test") == 5
    assert value(samples, "kcache_peer_up", peer=b.url) == 1
    b_samples = wait_for(b, lambda s: value(s, "kcache_server_requests_total", group="test") >= 5)
    assert value(b_samples, "kcache_server_requests_total", group="test") == 5
    b.stop()
    a.get("test", next(k for k in (f"q{i}" for i in range(200)) if ring.owner_of(k) == b.url))
    # Peer health is shared at once; the error counter reaches /metrics at the next flush.
    samples = wait_for(a, lambda s: value(s, "kcache_peer_errors_total", group="test") >= 1
                       and value(s, "kcache_peer_up", peer=b.url) == 0, timeout=60)
    assert value(samples, "kcache_peer_up", peer=b.url) == 0
    assert value(samples, "kcache_peer_failures", peer=b.url) >= 1
    assert value(samples, "kcache_peer_errors_total", group="test") >= 1


def test_stats_json_and_the_stats_command(supervised):
    host = supervised(APP)
    host.get("test", "x")
    host.get("test", "x")
    deadline = time.monotonic() + 30
    while True:
        stats = json.loads(host.request("GET", "/stats")[1])
        if ((stats["groups"]["test"]["gets"] >= 2 and len(stats["workers"]) == 2)   # both booted
                or time.monotonic() > deadline):
            break
        time.sleep(0.1)
    group = stats["groups"]["test"]
    assert (group["gets"], group["hits"], group["items"]) == (2, 1, 1)
    assert len(stats["workers"]) == 2 and stats["segment"] == host.name
    output = subprocess.run([sys.executable, "-m", "shmcache.stats", "--port", str(host.port)],
                            capture_output=True, text=True, timeout=60, env=host.env)
    assert output.returncode == 0, output.stderr
    assert "group" in output.stdout and "test" in output.stdout and "hit %" in output.stdout
    row = next(line for line in output.stdout.splitlines() if line.startswith("test "))
    assert " 50.0 " in row
    watch = subprocess.Popen([sys.executable, "-m", "shmcache.stats", "--port", str(host.port),
                              "--watch", "--interval", "0.2"], stdout=subprocess.PIPE, text=True,
                             env=host.env)
    frames = 0
    deadline = time.monotonic() + 30
    while frames < 2 and time.monotonic() < deadline:
        if "gets/s" in watch.stdout.readline():        # rates appear from the second frame
            frames += 1
    watch.kill()
    watch.wait(10)
    assert frames == 2
    failed = subprocess.run([sys.executable, "-m", "shmcache.stats", "--port", "1"],
                            capture_output=True, text=True, timeout=60, env=host.env)
    assert failed.returncode == 1 and "cannot read stats" in failed.stderr


def test_access_log_is_off_by_default_and_on_with_the_flag(supervised):
    quiet = supervised(APP)
    quiet.get("test", "logged")
    loud = supervised(APP + ["--access-log"])
    loud.get("test", "logged")
    deadline = time.monotonic() + 15
    while "GET /cache/test/logged 200" not in loud.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GET /cache/test/logged 200" in loud.log()
    assert "/cache/test/logged" not in quiet.log()
    while loud.log().count("serving") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = loud.log()
    assert log.count("serving") == 2 and log.count("started worker") == 2   # a line per start
