"""OFD byte locks: exclusion across unrelated processes, release on SIGKILL, fork safety,
thread exclusion."""

import os
import signal
import threading

import pytest

from shmcache.locks import LockFile

pytestmark = pytest.mark.integration

HOLD_LOCK = (
    "import sys, time\n"
    "from shmcache.locks import LockFile\n"
    "f = LockFile(sys.argv[1])\n"
    "f.byte_lock(int(sys.argv[2])).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)
TRY_LOCK = (
    "import sys\n"
    "from shmcache.locks import LockFile\n"
    "sys.exit(0 if LockFile(sys.argv[1]).try_lock_byte(int(sys.argv[2])) else 3)\n"
)


@pytest.fixture
def lock_path(tmp_path):
    path = tmp_path / "locks"
    path.write_bytes(b"\0" * 64)
    return str(path)


def run_python(processes, code, *args):
    proc = processes.python(code, *args)
    return proc.wait(timeout=60)


def test_lock_excludes_unrelated_process_and_only_that_byte(lock_path, processes):
    mine = LockFile(lock_path)
    lock = mine.byte_lock(5)
    lock.acquire()
    assert run_python(processes, TRY_LOCK, lock_path, 5) == 3
    assert run_python(processes, TRY_LOCK, lock_path, 6) == 0      # other bytes are free
    assert mine.is_locked_elsewhere(5) is False                   # we hold it ourselves
    lock.release()
    assert run_python(processes, TRY_LOCK, lock_path, 5) == 0
    mine.close()


def test_sigkilled_holder_releases_lock(lock_path, processes):
    holder = processes.python(HOLD_LOCK, lock_path, 1, stdout=-1, text=True)
    assert holder.stdout.readline().strip() == "locked"
    mine = LockFile(lock_path)
    assert mine.is_locked_elsewhere(1)
    assert not mine.try_lock_byte(1)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    lock = mine.byte_lock(1)
    lock.acquire()                      # would block forever if the kill left the lock held
    lock.release()
    mine.close()


def test_forked_child_does_not_share_parents_lock(lock_path):
    mine = LockFile(lock_path)
    lock = mine.byte_lock(2)
    lock.acquire()
    pid = os.fork()
    if pid == 0:                        # child: an inherited descriptor would "own" the lock
        code = 3 if not mine.try_lock_byte(2) else 0
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    lock.release()
    mine.close()


def test_threads_of_one_process_exclude_each_other(lock_path):
    lock = LockFile(lock_path).byte_lock(3)
    inside = []
    overlaps = []

    def work():
        for _ in range(2000):
            with lock:
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not overlaps


@pytest.mark.parametrize("spins", [0, 16])
def test_processes_exclude_each_other_spinning_or_not(lock_path, spins):
    """Two processes increment a counter in the file under one lock, many times: with
    ``spins`` a waiter tries without sleeping first. A lost update means both held it."""
    rounds, children = 3000, []
    for _child in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                lock = LockFile(lock_path).byte_lock(7, spins=spins)
                fd = os.open(lock_path, os.O_RDWR)
                for _ in range(rounds):
                    with lock:
                        count = int.from_bytes(os.pread(fd, 8, 32), "little")
                        os.pwrite(fd, (count + 1).to_bytes(8, "little"), 32)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with open(lock_path, "rb") as file:
        assert int.from_bytes(file.read()[32:40], "little") == 2 * rounds


def test_a_spinning_waiter_still_waits_for_a_long_holder(lock_path, processes):
    """Past its spins, a waiter sleeps in the kernel until the holder lets go (here: dies)."""
    holder = processes.python(HOLD_LOCK, lock_path, 9, stdout=-1, text=True)
    assert holder.stdout.readline().strip() == "locked"
    lock = LockFile(lock_path).byte_lock(9, spins=16)
    taken = threading.Event()

    def wait_for_it():
        lock.acquire()
        taken.set()

    waiter = threading.Thread(target=wait_for_it, daemon=True)
    waiter.start()
    assert not taken.wait(0.5)          # the holder is alive: no spin may take the lock
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert taken.wait(30)
    lock.release()
