"""``python -m shmcache`` (the ``shmcache`` console script): its subcommands against a real host."""

import json
import os
import signal
import subprocess
import sys

import pytest

import shmcache
from conftest import REPO, Supervised, http_request

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "1"]


def run(*args, env=None):
    done = subprocess.run([sys.executable, "-m", "shmcache", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_version_and_help():
    assert run("--version")[:2] == (0, f"shmcache {shmcache.__version__}\n")
    code, out, _ = run("--help")
    assert code == 0
    for command in ("serve", "stats", "segments"):
        assert f"  {command} " in out
    assert run()[0] == 2                                        # no command
    code, _, err = run("launch")
    assert code == 2 and "unknown command 'launch'" in err


def test_serve_runs_a_host_and_stats_and_segments_read_it(tmp_path):
    host = Supervised(tmp_path, APP)
    host.env["PYTHONPATH"] += os.pathsep + REPO
    log = open(host.log_path, "ab")
    host._log = log
    host.proc = subprocess.Popen([sys.executable, "-m", "shmcache", "serve", *host.args],
                                 env=host.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        host.wait_ready()
        assert host.get("test", "cli")[:2] == (200, b"value-of-cli")
        code, out, err = run("stats", "--port", str(host.port), env=host.env)
        assert code == 0, err
        assert any(line.startswith("test ") for line in out.splitlines())
        code, out, err = run("segments", "--json", env=host.env)
        assert code == 0, err
        mine = next(info for info in json.loads(out) if info["name"] == host.name)
        assert mine["state"] == "serving" and mine["owner_pid"] == host.proc.pid
        host.proc.send_signal(signal.SIGTERM)
        assert host.proc.wait(timeout=60) == 0
        assert http_request_fails(host.port)
    finally:
        host.cleanup()


def http_request_fails(port):
    try:
        http_request(port, "GET", "/healthz", timeout=5)
    except OSError:
        return True
    return False


def test_serve_passes_bad_options_through():
    code, _, err = run("serve", "--memory", "lots")
    assert code == 2 and "memory" in err
