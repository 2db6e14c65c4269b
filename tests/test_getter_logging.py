"""A failing getter leaves its traceback in the host's log, rate-limited per group, and the
client gets a short answer."""

import re
import threading
import time

import pytest

import shmcache

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:broken", "--workers", "1"]


def wait_for_log(server, text, timeout=30):
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()}"
        time.sleep(0.05)


@pytest.mark.parametrize("key, error", [("value-1", "ValueError: database refused value-1"),
                                        ("name-1", "NameError: name 'undefined_name'")])
def test_getter_failure_is_logged_with_its_traceback(supervised, key, error):
    server = supervised(APP)
    status, body, _ = server.get("broken", key)
    assert status == 500
    assert error.split(":")[0] in body.decode()
    assert b"Traceback" not in body and len(body) < 400                 # short for the client
    wait_for_log(server, error)
    log = server.log()
    assert re.search(r"ERROR group broken: getter failed for key '" + key + "'", log)
    assert "Traceback (most recent call last)" in log
    assert "load_broken" in log                                           # the getter's frame


def test_many_failures_log_a_bounded_number_of_tracebacks(supervised):
    server = supervised(APP)
    threads = [threading.Thread(target=lambda i=i: [server.get("broken", f"flood-{i}-{j}")
                                                    for j in range(10)]) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(server.calls()) == 40                                      # every one failed
    wait_for_log(server, "logging no more until the window ends")
    assert server.log().count("Traceback (most recent call last)") == 5


def test_embedded_getter_failure_is_logged_too(caplog, segment_name):
    def getter(key):
        raise ValueError("no database here")
    with shmcache.create(segment_name, "8MiB",
                         groups=[shmcache.Group("g", 1 << 20, getter)]) as cache:
        with caplog.at_level("ERROR", logger="shmcache"):
            with pytest.raises(shmcache.LoadError, match="ValueError: no database here"):
                cache.get("g", "k")
    assert any(record.exc_info and "no database here" in str(record.exc_info[1])
               for record in caplog.records)
