"""``python -m shmcache.segments``: listing and removing the host's segments, against real
supervisors, real SIGKILLs and real mappings."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, SEGMENT_PREFIX, wait_gone
from shmcache.arena import segment_path, shm_dir
from shmcache.errors import SegmentNotFound
from shmcache.store import Store

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]


def segments(*args):
    """(exit code, stdout, stderr) of ``python -m shmcache.segments args...``."""
    done = subprocess.run([sys.executable, "-m", "shmcache.segments", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": REPO})
    return done.returncode, done.stdout, done.stderr


def listed():
    code, out, err = segments("--json")
    assert code == 0, err
    return {info["name"]: info for info in json.loads(out)}


def kill_everyone(server):
    """SIGKILL a supervisor and its workers at once (frozen first: nobody cleans up)."""
    everyone = [server.proc.pid, *server.wait_for_workers(2)]
    for signum in (signal.SIGSTOP, signal.SIGKILL):
        for pid in everyone:
            os.kill(pid, signum)
    server.proc.wait(30)
    wait_gone(everyone)
    return everyone


def test_prune_removes_the_segment_of_a_killed_supervisor_and_keeps_a_serving_one(supervised):
    dead = supervised(APP)
    dead.request("PUT", "/cache/test/a", body=b"1")
    dead_pid = dead.proc.pid
    kill_everyone(dead)
    orphan = Store.attach(dead.name)           # a client left attached to the dead segment
    orphan.verify_identity = True
    orphan.set("test", "b", b"accepted while the name stands")
    live = supervised(APP)
    stranger = os.path.join(shm_dir(), f"{SEGMENT_PREFIX}not-a-segment-{os.getpid()}")
    with open(stranger, "wb") as other:
        other.write(b"x" * 8192)
    try:
        found = listed()
        assert found[dead.name]["state"] == "dead"
        assert found[dead.name]["owner_pid"] == dead_pid
        assert found[dead.name]["items"] == 2
        assert found[dead.name]["size"] == 32 << 20
        assert found[live.name]["state"] == "serving"
        assert found[live.name]["owner_pid"] == live.proc.pid
        assert set(found[live.name]["mapped_by"]) >= {live.proc.pid, *live.worker_pids()}
        assert os.path.basename(stranger) not in found

        code, out, _ = segments()
        line = next(line for line in out.splitlines() if line.startswith(dead.name))
        assert "dead" in line and f"{dead_pid} (dead)" in line

        code, out, err = segments("--prune")
        assert code == 0, err
        assert f"removed segment {dead.name}" in out
        assert not os.path.exists(segment_path(dead.name))
        with pytest.raises(SegmentNotFound, match="removed or replaced"):
            orphan.set("test", "c", b"refused: the prune retired it")
        assert os.path.exists(segment_path(live.name))
        assert os.path.exists(stranger)
        with open(stranger, "rb") as other:
            assert other.read() == b"x" * 8192        # not a segment: never written to
        assert live.get("test", "still")[:2] == (200, b"value-of-still")
    finally:
        orphan.close()
        os.unlink(stranger)


def test_remove_refuses_a_serving_segment_unless_forced(supervised):
    live = supervised(APP)
    code, _, err = segments("--remove", live.name)
    assert code == 1
    assert f"supervisor pid {live.proc.pid} serves it" in err
    assert os.path.exists(segment_path(live.name))
    code, out, _ = segments("--remove", live.name, "--force")
    assert code == 0 and f"removed segment {live.name}" in out
    assert not os.path.exists(segment_path(live.name))
    assert live.get("test", "x")[0] == 200          # the host goes on with its mapping


def test_remove_of_an_unknown_name_is_an_error():
    code, _, err = segments("--remove", f"{SEGMENT_PREFIX}no-such-{os.getpid()}")
    assert code == 1 and "no shmcache segment" in err


def test_embedded_segment_is_pruned_only_once_no_process_maps_it(segment_name, processes):
    code = ("import shmcache, sys\n"
            "c = shmcache.create(sys.argv[1], '8MiB')\n"
            "c.define_group('g', 1 << 20)\n"
            "c.set('g', 'k', b'v')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    creator = processes.python(code, segment_name, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": REPO})
    assert creator.stdout.readline().strip() == b"ready"
    info = listed()[segment_name]
    assert info["state"] == "embedded" and info["creator_pid"] == creator.pid
    assert info["mapped_by"] == [creator.pid]
    assert segments("--prune")[0] == 0
    assert os.path.exists(segment_path(segment_name))          # in use: kept
    creator.kill()
    creator.wait(30)
    code, out, _ = segments("--prune")
    assert f"removed segment {segment_name}" in out
    assert not os.path.exists(segment_path(segment_name))


def test_kept_segment_is_pruned_only_with_kept(supervised):
    server = supervised([*APP, "--warm-restart"])
    assert server.stop() == 0
    assert listed()[server.name]["state"] == "kept"
    assert listed()[server.name]["clean"] is True
    segments("--prune")
    assert os.path.exists(segment_path(server.name))
    code, out, _ = segments("--prune", "--kept")
    assert f"removed segment {server.name}" in out
    assert not os.path.exists(segment_path(server.name))


def test_help_and_bad_combinations():
    code, out, _ = segments("--help")
    assert code == 0
    for option in ("--json", "--remove", "--prune", "--kept", "--force"):
        assert option in out
    assert segments("--kept")[0] == 2
    assert segments("--force")[0] == 2
