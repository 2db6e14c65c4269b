"""The supervisor as a real process: demo group, worker replacement, boot errors, graceful
stop, warm and crash restarts, no orphans."""

import json
import os
import random
import signal
import struct
import threading
import time

import pytest

import shmcache
from conftest import wait_gone
from shmcache.arena import _OFFSET_CLEAN, segment_path

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "4"]


def wait_for_progress(counter, count, timeout=30):
    """Wait until ``counter[0]`` has grown by ``count`` (requests answered meanwhile)."""
    target = counter[0] + count
    deadline = time.monotonic() + timeout
    while counter[0] < target:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def test_demo_group_serves_the_readme_example(supervised):
    server = supervised(["--workers", "2"])
    assert server.get("scores", "Tom")[:2] == (200, b"630")
    assert server.get("scores", "Jack")[:2] == (200, b"589")
    assert server.get("scores", "Sam")[:2] == (200, b"567")
    assert server.get("scores", "Nobody")[0] == 404
    assert "built-in demo group 'scores'" in server.log()


def test_default_worker_count_and_one_port(supervised):
    server = supervised([])                              # --workers defaults to 4
    pids = server.wait_for_workers(4)
    seen = set()
    deadline = time.monotonic() + 30
    while seen != set(pids) and time.monotonic() < deadline:
        burst = []                                       # concurrent connections spread
        threads = [threading.Thread(target=lambda: burst.append(server.request("GET", "/stats")))
                   for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        seen |= {json.loads(body)["worker_pid"] for _status, body, _h in burst}
    assert seen == set(pids)                              # all accept on the one port


def test_sigterm_drains_in_flight_requests_and_exits_zero(supervised):
    server = supervised(APP, env={"KCACHE_TEST_DELAY": "2.0"})
    result = []
    thread = threading.Thread(target=lambda: result.append(server.get("test", "slow-drain")))
    thread.start()
    deadline = time.monotonic() + 30
    while not server.calls() and time.monotonic() < deadline:
        time.sleep(0.01)                                  # the request is being served
    workers = server.worker_pids()
    assert server.stop(signal.SIGTERM) == 0
    thread.join(30)
    assert result and result[0][:2] == (200, b"value-of-slow-drain")
    wait_gone(workers)
    assert "stopping gracefully" in server.log()


def test_clean_stop_leaves_a_warm_segment_and_restart_keeps_values(supervised, tmp_path):
    first = supervised([*APP, "--warm-restart"])
    first.request("PUT", "/cache/test/kept", body=b"still here")
    assert first.get("test", "loaded")[0] == 200
    assert first.stop(signal.SIGINT) == 0
    with open(segment_path(first.name), "rb") as segment:
        segment.seek(_OFFSET_CLEAN)
        assert struct.unpack("I", segment.read(4))[0] == 1        # marked clean
    assert f"kept segment {first.name}" in first.log()
    second = supervised([*APP, "--warm-restart"], port=first.port, name=first.name)
    assert "warm start" in second.log()
    assert second.get("test", "kept")[:2] == (200, b"still here")
    assert second.get("test", "loaded")[:2] == (200, b"value-of-loaded")
    assert len(second.calls()) == 1                       # served warm, not reloaded


def test_clean_stop_without_warm_restart_leaves_nothing(supervised):
    server = supervised(["--workers", "1"])
    assert server.stop() == 0
    assert not os.path.exists(segment_path(server.name))
    assert f"removed segment {server.name}" in server.log()


def test_supervisor_sigkill_leaves_no_workers_and_no_segment(supervised):
    first = supervised(APP)
    first.request("PUT", "/cache/test/lost", body=b"gone after a crash")
    workers = first.wait_for_workers(4)
    first.stop(signal.SIGKILL)
    wait_gone(workers, timeout=10)                        # no orphans
    assert not os.path.exists(segment_path(first.name))   # and no dead segment left behind
    second = supervised(APP, port=first.port, name=first.name)
    assert server_value(second, "lost") == b"value-of-lost"      # reloaded, not the old value


def test_crash_of_every_process_leaves_a_segment_that_the_next_start_discards(supervised):
    first = supervised(APP)
    first.request("PUT", "/cache/test/lost", body=b"gone after a crash")
    everyone = [first.proc.pid, *first.wait_for_workers(4)]
    for signum in (signal.SIGSTOP, signal.SIGKILL):       # freeze all, then kill: nobody
        for pid in everyone:                              # gets to clean up
            os.kill(pid, signum)
    first.proc.wait(30)
    wait_gone(everyone)
    assert os.path.exists(segment_path(first.name))
    second = supervised([*APP, "--warm-restart"], port=first.port, name=first.name)
    assert "did not stop cleanly" in second.log()
    assert server_value(second, "lost") == b"value-of-lost"


def server_value(server, key):
    status, body, _ = server.get("test", key)
    assert status == 200
    return body


def test_second_supervisor_on_a_live_segment_is_refused(supervised):
    first = supervised(APP)
    second = supervised(APP, name=first.name, wait=False)
    assert second.proc.wait(timeout=60) == 4
    assert "belongs to a running supervisor" in second.log()
    assert first.get("test", "x")[0] == 200


def test_worker_that_cannot_boot_stops_the_supervisor(supervised):
    server = supervised(["--app", "apps.counting:factory_failing_in_workers"], wait=False)
    assert server.proc.wait(timeout=60) == 3
    log = server.log()
    assert "this worker cannot boot" in log and "could not boot" in log
    assert log.count("started worker") <= 4               # no respawn loop
    assert not os.path.exists(segment_path(server.name))


@pytest.mark.parametrize("app, message", [
    ("no_such_module:groups", "cannot import 'no_such_module'"),
    ("apps.counting:nothing", "has no attribute 'nothing'"),
    ("apps.counting", "MODULE:ATTR"),
    ("apps.counting:DIRECTORY", "yielded str, expected shmcache.Group"),
    ("apps.counting:load", "load() missing 1 required positional argument"),
])
def test_bad_app_exits_with_a_clear_message(supervised, app, message):
    server = supervised(["--app", app], wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert message in server.log()


def test_bad_command_line(supervised):
    server = supervised(["--memory", "lots"], wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert "not a byte size" in server.log()


def test_worker_sigkill_under_load_is_replaced_without_wrong_answers(supervised, tmp_path):
    server = supervised(APP)
    cache = shmcache.connect(name=server.name)
    stop, problems, answered = threading.Event(), [], [0]

    def hammer(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            key = f"k{rng.randrange(300)}"
            try:
                if rng.random() < 0.5:
                    status, body, _ = server.get("test", key, timeout=20)
                else:
                    status, body = 200, cache.get("test", key)
            except (OSError, shmcache.PeerUnavailable):
                continue                            # its worker died mid-request: retry
            except Exception as exc:
                problems.append(repr(exc))
                continue
            if status != 200 or body != f"value-of-{key}".encode():
                problems.append((key, status, body[:80]))
            answered[0] += 1

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    killed = []
    rng = random.Random(1)
    for _ in range(6):
        wait_for_progress(answered, 5)                    # kill while requests flow
        victim = rng.choice(server.wait_for_workers(4, exclude=killed))
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    server.wait_for_workers(4, exclude=killed)            # every one replaced
    wait_for_progress(answered, 50, timeout=60)           # and serving
    stop.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a request hung"
    cache.close()
    assert not problems, problems[:5]
    assert server.log().count("replacing it") >= 6
