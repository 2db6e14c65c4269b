"""python -m shmcache.stats: its help, its percentages, and which groups it shows."""

import json
import subprocess
import sys
import threading
import time

import pytest

from shmcache.stats import hit_percent

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]


@pytest.mark.parametrize("hits, gets, shown", [
    (9997, 10000, "99.9"), (1, 1, "100.0"), (0, 5, "0.0"), (1, 3, "33.3"), (2, 3, "66.6"),
    (19999, 20000, "99.9"), (0, 0, "-"),
])
def test_hit_percent_is_never_rounded_up(hits, gets, shown):
    assert hit_percent(hits, gets) == shown


def stats_command(host, *args):
    return subprocess.run([sys.executable, "-m", "shmcache.stats", "--port", str(host.port), *args],
                          capture_output=True, text=True, timeout=60, env=host.env)


def test_help_is_plain_text_and_describes_every_option(supervised):
    done = subprocess.run([sys.executable, "-m", "shmcache.stats", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "``" not in done.stdout
    options = done.stdout[done.stdout.index("options:"):]
    for option in ("--port", "--host", "--token", "--watch", "--interval"):
        line = next(line for line in options.splitlines() if line.strip().startswith(option))
        described = line.split(option, 1)[1].strip().split(None, 1)
        assert len(described) == 2 or options.count(option) > 1, f"{option} has no description"


def wait_stats(host, check, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        stats = json.loads(host.request("GET", "/stats")[1])
        if check(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def table_row(output, group):
    """{column: cell} of ``group``'s row in the stats table, read from the right (sizes
    such as "4.0 MiB" hold a space)."""
    assert output.returncode == 0, output.stderr
    lines = output.stdout.splitlines()
    columns = next(line for line in lines if line.startswith("group ")).split()
    cells = next(line for line in lines if line.startswith(f"{group} ")).split()
    return dict(zip(reversed(columns), reversed(cells)))


def test_getter_calls_and_deduplicated_loads_are_separate_columns(supervised):
    host = supervised(APP, env={"KCACHE_TEST_DELAY": "1.0"})
    threads = [threading.Thread(target=host.get, args=("test", "slow-shared")) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stats = wait_stats(host, lambda s: s["groups"]["test"]["gets"] >= 6      # flushed once
                       and s["groups"]["test"]["local_loads"] >= 1)           # a second
    group = stats["groups"]["test"]
    assert group["local_loads"] == 1 and len(host.calls()) == 1      # one getter call
    assert group["loads"] >= 2                                       # several gets loaded
    output = stats_command(host)
    right = table_row(output, "test")
    assert right["getter"] == "1"
    assert right["loads"] == f"{group['loads']:,}"
    assert right["deduped"] == f"{group['loads_deduped']:,}"
    assert "getter: getter calls on this host" in output.stdout


def test_groups_no_longer_served_are_left_out(supervised):
    first = supervised([*APP, "--warm-restart"])
    assert first.get("test", "x")[0] == 200
    assert first.stop() == 0
    second = supervised(["--origin", "http://127.0.0.1:9", "--workers", "1", "--warm-restart"],
                        port=first.port, name=first.name)
    assert "warm start" in second.log()
    stats = json.loads(second.request("GET", "/stats")[1])
    assert stats["groups"]["test"]["cache_bytes"] == 0                # still in the segment
    output = stats_command(second)
    assert output.returncode == 0, output.stderr
    names = [line.split()[0] for line in output.stdout.splitlines() if line.strip()]
    assert "origin" in names
    assert "test" not in names and "brief" not in names


def test_negative_hits_have_their_column(supervised):
    host = supervised(APP)
    for _ in range(4):
        assert host.get("remember", "missing-key")[0] == 404     # one getter call, 3 remembered
    stats = wait_stats(host, lambda s: s["groups"]["remember"]["gets"] >= 4)
    assert stats["groups"]["remember"]["negative_hits"] == 3
    right = table_row(stats_command(host), "remember")
    assert right["neg"] == "3" and right["stale"] == "0" and right["getter"] == "1"
