"""A supervisor's life: stop signals at any moment of boot, warm restart opt-in, what a stop
does with the segment, and a busy port."""

import os
import re
import signal
import socket
import struct
import time

import psutil
import pytest

from conftest import free_port, http_request
from shmcache.arena import _OFFSET_CLEAN, segment_path

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]
SLOW_BOOT = ["--app", "apps.counting:factory_slow_in_workers", "--workers", "4",
             "--graceful-timeout", "120"]


def wait_until(condition, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def started_workers(server):
    return [int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", server.log())]


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def healthz(server):
    try:
        return http_request(server.port, "GET", "/healthz", timeout=5)[0] == 200
    except OSError:
        return False


# Each moment is a condition on the booting host; SIGTERM is sent as soon as it holds.
BOOT_MOMENTS = {
    "listening": lambda server, tmp: "listening on" in server.log(),
    "first worker forked": lambda server, tmp: "started worker 1" in server.log(),
    "worker 1 inside its app": lambda server, tmp: (tmp / "boot-1").exists(),
    "worker 3 forked": lambda server, tmp: "started worker 3" in server.log(),
    "worker 4 inside its app": lambda server, tmp: (tmp / "boot-4").exists(),
    "first /healthz answer": lambda server, tmp: healthz(server),
    "two workers serving": lambda server, tmp: server.log().count(" serving") >= 2,
    "every worker serving": lambda server, tmp: server.log().count(" serving") >= 4,
}


@pytest.mark.parametrize("moment", list(BOOT_MOMENTS))
def test_sigterm_at_any_moment_of_boot_stops_everything(supervised, tmp_path, moment):
    server = supervised(SLOW_BOOT, env={"KCACHE_TEST_BOOT_DELAY": "0.3"}, wait=False)
    wait_until(lambda: BOOT_MOMENTS[moment](server, tmp_path) or server.proc.poll() is not None,
               what=moment)
    server.proc.send_signal(signal.SIGTERM)
    # A hang waits out --graceful-timeout (120 s): the wait below fails long before that.
    assert server.proc.wait(timeout=45) == 0, server.log()
    log = server.log()
    assert "stopping gracefully" in log
    assert "did not stop in time" not in log
    for pid in started_workers(server):
        wait_until(lambda: not alive(pid), timeout=10, what=f"worker {pid} to exit")
    assert not os.path.exists(segment_path(server.name))


def test_stop_signal_during_boot_is_not_lost_by_repeated_restarts(supervised, tmp_path):
    """Many short lives in a row: each start is stopped as soon as a worker answers."""
    for _round in range(5):
        server = supervised(SLOW_BOOT, env={"KCACHE_TEST_BOOT_DELAY": "0.1"}, wait=False)
        wait_until(lambda: healthz(server) or server.proc.poll() is not None, what="/healthz")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=45) == 0, server.log()
        for pid in started_workers(server):
            wait_until(lambda: not alive(pid), timeout=10, what=f"worker {pid} to exit")


def clean_mark(name):
    with open(segment_path(name), "rb") as segment:
        segment.seek(_OFFSET_CLEAN)
        return struct.unpack("I", segment.read(4))[0]


def test_clean_stop_removes_the_segment_by_default(supervised):
    server = supervised(APP)
    assert os.path.exists(segment_path(server.name))
    assert server.stop(signal.SIGINT) == 0
    assert not os.path.exists(segment_path(server.name))
    assert f"removed segment {server.name}" in server.log()


def test_warm_restart_keeps_the_segment_and_the_next_start_reattaches(supervised):
    first = supervised([*APP, "--warm-restart"])
    assert first.request("PUT", "/cache/test/kept", body=b"kept value")[0] == 200
    assert first.stop() == 0
    assert re.search(rf"kept segment {first.name} \(32\.0 MiB, 1 items\) for a warm restart",
                     first.log())
    assert clean_mark(first.name) == 1
    second = supervised([*APP, "--warm-restart"], port=first.port, name=first.name)
    assert "warm start: re-attached segment" in second.log()
    assert second.get("test", "kept")[:2] == (200, b"kept value")
    assert second.stop() == 0


def test_kept_segment_is_discarded_by_a_start_without_warm_restart(supervised):
    first = supervised([*APP, "--warm-restart"])
    first.request("PUT", "/cache/test/kept", body=b"old value")
    assert first.stop() == 0
    second = supervised(APP, port=first.port, name=first.name)
    assert "clean start: discarding the segment" in second.log()
    assert "no --warm-restart" in second.log()
    assert second.get("test", "kept")[:2] == (200, b"value-of-kept")


@pytest.mark.parametrize("change, reason", [
    (["--memory", "48MiB"], "--memory asks for 48.0 MiB"),
    (["--max-item-size", "128KiB"], "--max-item-size asks for 128.0 KiB"),
])
def test_refused_warm_start_says_why(supervised, change, reason):
    first = supervised([*APP, "--warm-restart"])
    first.request("PUT", "/cache/test/kept", body=b"old value")
    assert first.stop() == 0
    second = supervised([*APP, "--warm-restart", *change], port=first.port, name=first.name)
    assert reason in second.log()
    assert second.get("test", "kept")[:2] == (200, b"value-of-kept")


def test_busy_port_is_reported_at_once(supervised):
    port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        server = supervised(APP, port=port, wait=False)
        assert server.proc.wait(timeout=30) == 4
        log = server.log()
        assert f"port {port} is busy" in log
        assert f"pid {os.getpid()}" in log                   # names who holds it
        assert "retrying" not in log                          # a live holder: no retry
        assert not os.path.exists(segment_path(server.name))
    finally:
        holder.close()


def test_unlink_on_stop_is_accepted_with_a_warning(supervised):
    server = supervised([*APP, "--unlink-on-stop"])
    assert "--unlink-on-stop is deprecated" in server.log()
    assert server.stop() == 0
    assert not os.path.exists(segment_path(server.name))
