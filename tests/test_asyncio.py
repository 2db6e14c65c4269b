"""shmcache.asyncio: hits from shared memory without awaiting, misses over asyncio streams,
one request per key per process, cancellation, restarts, writes, close, several loops."""

import asyncio
import gc
import json
import os
import signal
import subprocess
import time
import warnings

import pytest

import shmcache
from apps.counting import open_gate
from shmcache.asyncio import connect
from test_reattach import group_supervised  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]
TOKEN = "s3cret-token"


async def wait_for(condition, what, timeout=60):
    """Poll ``condition()`` (a plain function) until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


def loads(cache, group="test"):
    """Requests that reached the front and missed there, summed over the host."""
    return cache._client.stats()["groups"][group]["loads"]


async def waiting_gets(cache, key, count):
    """``count`` tasks getting the cold ``key``, once its request has reached the front."""
    before = loads(cache)
    tasks = [asyncio.create_task(cache.get("test", key)) for _ in range(count)]
    await wait_for(lambda: loads(cache) > before, f"the request for {key} reached the front")
    return tasks


def calls_of(server, key):
    return [pid for pid, k in server.calls() if k == key]


def answered_without_suspending(coroutine):
    """The value of a coroutine that finishes in its first step, else AssertionError."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("the coroutine suspended")


def test_hits_misses_absent_keys_and_errors(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            assert cache.peek("test", "a") is None
            assert await cache.get("test", "a") == b"value-of-a"     # loaded by a worker
            assert cache.peek("test", "a") == b"value-of-a"
            calls = len(server.calls())
            # A hit is answered in the coroutine's first step: nothing is awaited.
            assert answered_without_suspending(cache.get("test", "a")) == b"value-of-a"
            assert await cache.get("test", b"a") == b"value-of-a"
            assert len(server.calls()) == calls
            assert await cache.get("test", b"bytes-key") == b"value-of-bytes-key"
            assert await cache.get("test", "str-x") == b"text:str-x"
            assert await cache.get("test", "a b/c%d") == b"value-of-a b/c%d"
            with pytest.raises(shmcache.NotFound):
                await cache.get("test", "missing-1")
            with pytest.raises(shmcache.LoadError, match="cannot load fail-1"):
                await cache.get("test", "fail-1")
            with pytest.raises(shmcache.UnknownGroup):
                await cache.get("nope", "x")
            with pytest.raises(shmcache.InvalidKey):
                await cache.get("test", b"\xff\xfe")
            stats = await cache.stats()
            assert stats["groups"]["test"]["items"] >= 3
    asyncio.run(main())


def test_concurrent_gets_of_a_cold_key_in_three_processes_call_the_getter_once(
        supervised, processes):
    server = supervised(APP)
    key = "gate-cold"
    script = """
import asyncio, json, sys
from shmcache.asyncio import connect

async def main(name, key, count):
    async with connect(name=name) as cache:
        tasks = [asyncio.create_task(cache.get("test", key)) for _ in range(count)]
        await asyncio.sleep(0)          # every task has missed shared memory and waits
        print("waiting", flush=True)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        print(json.dumps(sorted({repr(result) for result in results})), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""

    async def main():
        async with connect(name=server.name) as cache:
            before = loads(cache)
            tasks = [asyncio.create_task(cache.get("test", key)) for _ in range(1000)]
            await asyncio.sleep(0)
            children = [processes.python(script, server.name, key, 1000,
                                         stdout=subprocess.PIPE, text=True) for _ in range(2)]
            loop = asyncio.get_running_loop()
            for child in children:
                assert await loop.run_in_executor(None, child.stdout.readline) == "waiting\n"
            # One request per process reached the front, each while the key was cold.
            await wait_for(lambda: loads(cache) >= before + 3, "three requests reached the front")
            assert loads(cache) == before + 3
            assert not any(task.done() for task in tasks)
            open_gate(server.dir, key)
            results = await asyncio.gather(*tasks)
            assert results == [b"value-of-gate-cold"] * 1000
            for child in children:
                line = await loop.run_in_executor(None, child.stdout.readline)
                assert json.loads(line) == [repr(b"value-of-gate-cold")]
                assert child.wait(60) == 0
        assert len(calls_of(server, key)) == 1
    asyncio.run(main())


def test_cancelled_waiters_leave_the_load_to_the_others(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            tasks = await waiting_gets(cache, "gate-cancel", 1000)
            for task in tasks[::100]:
                task.cancel()
            open_gate(server.dir, "gate-cancel")
            results = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
            assert len(cancelled) == 10
            assert [r for r in results if r not in cancelled] == [b"value-of-gate-cancel"] * 990
            assert cache.peek("test", "gate-cancel") == b"value-of-gate-cancel"

            # Every waiter cancelled: the request they shared goes on, and is answered.
            tasks = await waiting_gets(cache, "gate-all", 5)
            requests = asyncio.all_tasks() - set(tasks) - {asyncio.current_task()}
            assert len(requests) == 1
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert all(task.cancelled() for task in tasks)
            assert not any(request.done() for request in requests)
            open_gate(server.dir, "gate-all")
            assert [await request for request in requests] == [b"value-of-gate-all"]
            assert cache.peek("test", "gate-all") == b"value-of-gate-all"
        assert len(calls_of(server, "gate-cancel")) == 1
        assert len(calls_of(server, "gate-all")) == 1
    asyncio.run(main())


def test_a_failed_load_reaches_every_waiter(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            tasks = await waiting_gets(cache, "gate-fail", 100)
            open_gate(server.dir, "gate-fail")
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, shmcache.LoadError) and "cannot load gate-fail" in str(r)
                       for r in results)
        assert len(calls_of(server, "gate-fail")) == 1
    asyncio.run(main())


def test_a_miss_does_not_block_the_event_loop(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            get = asyncio.create_task(cache.get("test", "gate-tick"))
            ticks = 0
            # The getter runs and waits for the gate while this coroutine keeps running on
            # the same loop: a get that blocked the loop would not let it tick until done.
            while not calls_of(server, "gate-tick"):
                await asyncio.sleep(0.01)
                ticks += 1
            assert not get.done()
            for _ in range(10):
                await asyncio.sleep(0)
                ticks += 1
            assert not get.done() and ticks >= 10
            open_gate(server.dir, "gate-tick")
            assert await get == b"value-of-gate-tick"
    asyncio.run(main())


def test_the_client_follows_a_supervisor_killed_and_restarted_on_another_port(
        group_supervised):
    first = group_supervised()

    async def get_or_none(cache, key):
        try:
            return await cache.get("test", key)
        except (shmcache.SegmentNotFound, shmcache.PeerUnavailable):
            return None

    async def main():
        async with connect(name=first.name) as cache:
            assert await cache.get("test", "k") == b"value-of-k"
            assert await cache.get("test", "warm-up") == b"value-of-warm-up"   # kept alive
            first.kill_group()
            with pytest.raises(shmcache.SegmentNotFound):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    await cache.get("test", "k")
                    await asyncio.sleep(0.02)
            second = group_supervised(first, same_port=False)
            assert second.port != first.port
            deadline = time.monotonic() + 60
            while await get_or_none(cache, "k") is None:
                assert time.monotonic() < deadline, "the client did not follow the restart"
                await asyncio.sleep(0.02)
            assert cache.peek("test", "k") == b"value-of-k"      # from the new segment
            assert await cache.get("test", "after") == b"value-of-after"
            assert [k for _pid, k in second.calls()].count("after") == 1
    asyncio.run(main())


def test_a_kept_alive_connection_the_front_closed_is_made_again(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            assert await cache.get("test", "before") == b"value-of-before"    # kept alive
            workers = server.worker_pids()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            # Blocking this loop meanwhile: it does not see the connection close.
            server.wait_for_workers(2, exclude=workers)
            assert await cache.get("test", "after") == b"value-of-after"
    asyncio.run(main())


def test_a_front_slower_than_the_timeout_is_peer_unavailable(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name, timeout=0.5) as cache:
            with pytest.raises(shmcache.PeerUnavailable, match="did not answer"):
                await cache.get("test", "gate-timeout")
            open_gate(server.dir, "gate-timeout")
            # The connection that timed out is not used again: its late answer is not
            # taken for the next one's.
            assert await cache.get("test", "next") == b"value-of-next"
    asyncio.run(main())


def test_a_front_that_wants_a_token_raises_auth_error_without_it(supervised):
    server = supervised([*APP, "--token", TOKEN, "--token-reads"])

    async def main():
        async with connect(name=server.name) as cache:
            with pytest.raises(shmcache.AuthError, match="token"):
                await cache.get("test", "t")
        async with connect(name=server.name, token=TOKEN) as cache:
            assert await cache.get("test", "t") == b"value-of-t"
    asyncio.run(main())


def test_set_and_delete_on_a_single_host_write_shared_memory(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            assert answered_without_suspending(cache.set("test", "w", b"written")) is None
            assert cache.peek("test", "w") == b"written"
            assert server.get("test", "w")[:2] == (200, b"written")
            await cache.set("test", "t", "text", ttl=60)
            assert await cache.get("test", "t") == b"text"
            assert await cache.delete("test", "w") is True
            assert await cache.delete("test", "w") is False
            with pytest.raises(shmcache.ValueTooLarge):
                await cache.set("test", "big", b"x" * (1 << 20))

            await cache.set_many("test", {"m1": b"one", b"m2": "two"}, ttl=60)
            assert cache.peek("test", "m1") == b"one" and cache.peek("test", "m2") == b"two"
            with pytest.raises(shmcache.ValueTooLarge):
                await cache.set_many("test", {"m3": b"3", "big": b"x" * (1 << 20)})
            assert cache.peek("test", "m3") is None              # nothing was stored
            assert await cache.delete_many("test", ["m1", b"m2", "never"]) == 2
            assert cache.peek("test", "m1") is None
    asyncio.run(main())


def test_get_many_of_hits_reads_shared_memory_only(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            await cache.set_many("test", {"h1": b"1", "h2": b"2"})
            assert answered_without_suspending(cache.get_many("test", ["h1", b"h2"])) == {
                "h1": b"1", b"h2": b"2"}
            assert await cache.get_many("test", []) == {}
        assert server.calls() == []
    asyncio.run(main())


def test_get_many_sends_the_misses_in_one_request(supervised):
    server = supervised(APP)

    async def main():
        async with connect(name=server.name) as cache:
            await cache.set("test", "hit", b"cached")
            before = loads(cache)
            got = await cache.get_many("test", ["hit", "m-a", b"m-b", "missing-c"])
            assert got == {"hit": b"cached", "m-a": b"value-of-m-a", b"m-b": b"value-of-m-b"}
            assert sorted(k for _pid, k in server.calls()) == ["m-a", "m-b", "missing-c"]
            with pytest.raises(shmcache.LoadError, match="fail-1") as failed:
                await cache.get_many("test", ["ok-1", "fail-1"])
            assert list(failed.value.failed) == ["fail-1"]
            assert cache.peek("test", "ok-1") == b"value-of-ok-1"
            await wait_for(lambda: loads(cache) >= before + 1, "the batch is counted")
    asyncio.run(main())


def test_set_and_delete_on_a_cluster_go_through_the_front(cluster):
    hosts = cluster(2, [*APP, "--hot-fraction", "0"])
    key = "missing-everywhere"                   # the getter says it does not exist

    async def main():
        async with connect(name=hosts[0].name) as cache:
            await cache.set("test", key, b"cluster value", ttl=60)
            for host in hosts:
                assert host.get("test", key)[:2] == (200, b"cluster value")
            assert await cache.get("test", key) == b"cluster value"
            assert await cache.delete("test", key) is True
            for host in hosts:
                assert host.get("test", key)[0] == 404
            hosts[1].stop()
            with pytest.raises(shmcache.PeerUnavailable, match="only part of the cluster"):
                await cache.set("test", key, b"half")
    asyncio.run(main())


def test_writes_on_a_cluster_need_the_token(cluster):
    hosts = cluster(2, [*APP, "--token", TOKEN])

    async def main():
        async with connect(name=hosts[0].name) as cache:
            with pytest.raises(shmcache.AuthError):
                await cache.set("test", "x", b"v")
            with pytest.raises(shmcache.AuthError):
                await cache.delete("test", "x")
        async with connect(name=hosts[0].name, token=TOKEN) as cache:
            await cache.set("test", "x", b"v")
            assert await cache.delete("test", "x") is True
    asyncio.run(main())


def test_batch_writes_on_a_cluster_go_through_the_front(cluster):
    hosts = cluster(2, [*APP, "--hot-fraction", "0"])

    async def main():
        async with connect(name=hosts[0].name) as cache:
            await cache.set_many("test", {"missing-1": b"one", "missing-2": b"two"}, ttl=60)
            for host in hosts:
                assert host.get("test", "missing-1")[:2] == (200, b"one")
                assert host.get("test", "missing-2")[:2] == (200, b"two")
            assert await cache.delete_many("test", ["missing-1", "missing-2", "missing-3"]) == 2
            for host in hosts:
                assert host.get("test", "missing-1")[0] == 404
    asyncio.run(main())


def test_every_call_after_close_raises_client_closed(supervised):
    server = supervised(APP)

    async def main():
        cache = connect(name=server.name)
        assert await cache.get("test", "c") == b"value-of-c"
        await cache.close()
        await cache.close()                      # idempotent
        calls = [cache.get("test", "c"), cache.get("test", "new"),
                 cache.get_many("test", ["c"]), cache.set("test", "c", b"v"),
                 cache.set_many("test", {"c": b"v"}), cache.delete("test", "c"),
                 cache.delete_many("test", ["c"]), cache.stats()]
        for call in calls:
            with pytest.raises(shmcache.ClientClosed):
                await call
        with pytest.raises(shmcache.ClientClosed):
            cache.peek("test", "c")
    asyncio.run(main())


def test_one_client_serves_two_event_loops_in_turn(supervised):
    server = supervised(APP)
    cache = connect(name=server.name)                # outside any event loop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(cache.get("test", "loop-1")) == b"value-of-loop-1"
        assert asyncio.run(cache.get("test", "loop-2")) == b"value-of-loop-2"
        assert asyncio.run(cache.get("test", "loop-1")) == b"value-of-loop-1"      # a hit
        assert len(cache._loops) <= 1            # nothing kept for the first, closed loop
        asyncio.run(cache.close())
        gc.collect()
    # The first loop's kept-alive connection was closed when asyncio.run shut it down.
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


# An embedding process: its own getter for group "users" (recording each call, then
# waiting for the gate file), `count` tasks awaiting one cold key, `cancel` of them cancelled.
EMBEDDED = r"""
import asyncio, os, sys, time
import shmcache, shmcache.asyncio
name, calls, gate, count, cancel = sys.argv[1:6]
count, cancel = int(count), int(cancel)

def getter(key):
    with open(calls, "a") as log:
        log.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)                   # a slow database (runs on the loop: plain getter)
    return f"loaded {key}"

async def main():
    cache = shmcache.asyncio.AsyncClient(shmcache.connect(name=name, timeout=120))
    cache.define_group("users", "1MiB", getter=getter)
    print("started", flush=True)
    tasks = [asyncio.ensure_future(cache.get("users", "ada")) for _ in range(count)]
    for _ in range(5):
        await asyncio.sleep(0)
    for task in tasks[:cancel]:              # in the loading process, the getter held the
        task.cancel()                         # loop: its tasks may be done by now
    results = [type(r).__name__ if isinstance(r, BaseException) else repr(r)
               for r in await asyncio.gather(*tasks, return_exceptions=True)]
    for outcome in sorted(set(results)):
        print(results.count(outcome), outcome, flush=True)
    await cache.close()
asyncio.run(main())
"""


def test_embedded_getters_load_once_for_the_host_across_loops_and_processes(
        segment_name, processes, tmp_path):
    from conftest import REPO, wait_for_waiters
    calls, gate = tmp_path / "calls", tmp_path / "gate"
    with shmcache.create(segment_name, "8MiB", groups={"users": "1MiB"}) as owner:
        children = [processes.python(EMBEDDED, segment_name, calls, gate, 300, 5,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
                    for _ in range(3)]
        for child in children:
            assert child.stdout.readline().strip() == "started"
        wait_for_waiters(owner._live_store(), "users", "ada", 2)     # all but the loader
        gate.write_text("open")
        outcomes = {}
        for child in children:
            out, _ = child.communicate(timeout=120)
            assert child.returncode == 0, out
            for line in out.splitlines():
                count, outcome = line.split(" ", 1)
                outcomes[outcome] = outcomes.get(outcome, 0) + int(count)
        cancelled = outcomes.pop("CancelledError", 0)
        assert set(outcomes) == {"b'loaded ada'"}
        assert outcomes["b'loaded ada'"] + cancelled == 900 and 10 <= cancelled <= 15
        assert len(calls.read_text().split()) == 1
        assert owner.peek("users", "ada") == b"loaded ada"


def test_an_async_client_of_its_own_segment(segment_name):
    from shmcache.asyncio import create
    runs = []

    def getter(key):
        runs.append(key)
        if key == "nobody":
            raise KeyError(key)
        return key.upper()

    async def main():
        group = shmcache.Group("names", "1MiB", getter)
        async with create(segment_name, "8MiB", groups=[group]) as cache:
            assert await asyncio.gather(*[cache.get("names", "ada") for _ in range(50)]) \
                == [b"ADA"] * 50
            with pytest.raises(shmcache.NotFound):
                await cache.get("names", "nobody")
            assert await cache.get_many("names", ["ada", "bob", "nobody"]) == {
                "ada": b"ADA", "bob": b"BOB"}
            await cache.set_many("names", {"cy": b"C"})
            assert await cache.delete_many("names", ["cy", "zed"]) == 1
        assert not os.path.exists(os.path.join(shmcache.arena.shm_dir(), segment_name))
    asyncio.run(main())
    assert runs == ["ada", "nobody", "bob", "nobody"]
