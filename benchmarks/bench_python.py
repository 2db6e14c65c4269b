"""The Python integrations against what Python shops use instead, in one run, as ratios.

    python benchmarks/bench_python.py [--seconds 0.5]

1. Django's cache API, ``cache.get`` of a 100 B hit and ``cache.get_many`` of 100 hits,
   through each backend: shmcache.django.ShmCache (embedded), Django's locmem, Django's
   Redis backend (Redis on a unix socket), Django's pymemcache backend (memcached on a unix
   socket) and diskcache's DjangoCache.
2. The asyncio client against redis-py's asyncio client: ``await get`` of a hit, and of a
   miss (shmcache: loaded through a supervisor's front by a getter that computes the value
   at once; Redis: a GET of an absent key, the cheapest thing a miss can cost there).
3. ``get_many`` of 100 keys through the sync and async clients.

Each figure is the best of five rounds of ``--seconds``; ratios are against shmcache in the
same run. memcached and redis-server are started here (Debian: memcached, redis-server); a
missing one is reported and skipped. Needs: pip install -e '.[bench]'.
"""

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import shmcache  # noqa: E402

VALUE = os.urandom(100)
ROUNDS = 5


def best_us(operation, seconds, batch=200):
    """Microseconds per call of ``operation()``: the best of ROUNDS rounds."""
    best = float("inf")
    for _ in range(ROUNDS):
        calls, begin = 0, time.perf_counter()
        deadline = begin + seconds / ROUNDS
        while True:
            for _ in range(batch):
                operation()
            calls += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = min(best, (now - begin) / calls * 1e6)
    return best


async def best_us_async(operation, seconds, batch=200):
    best = float("inf")
    for _ in range(ROUNDS):
        calls, begin = 0, time.perf_counter()
        deadline = begin + seconds / ROUNDS
        while True:
            for _ in range(batch):
                await operation()
            calls += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = min(best, (now - begin) / calls * 1e6)
    return best


def table(title, rows, base):
    print(f"\n{title}")
    print(f"  {'backend':34} {'us/op':>10} {'x shmcache':>11}")
    for name, us in rows:
        if us is None:
            print(f"  {name:34} {'skipped':>10}")
            continue
        print(f"  {name:34} {us:10.2f} {us / rows[base][1]:11.2f}")


# -- Django ----------------------------------------------------------------------------------

def django_caches(tmp, servers):
    caches = {
        "shmcache": {"BACKEND": "shmcache.django.ShmCache",
                     "LOCATION": f"kcache-bench-{uuid.uuid4().hex[:8]}",
                     "OPTIONS": {"memory": "64MiB"}},
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                   "OPTIONS": {"MAX_ENTRIES": 100_000}},
        "diskcache": {"BACKEND": "diskcache.DjangoCache",
                      "LOCATION": os.path.join(tmp, "diskcache")},
    }
    if "redis" in servers:
        caches["redis"] = {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                           "LOCATION": f"unix://{servers['redis']}"}
    if "memcached" in servers:
        caches["memcached"] = {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                               "LOCATION": f"unix:{servers['memcached']}"}
    return caches


def bench_django(tmp, servers, seconds):
    import django
    from django.conf import settings
    settings.configure(CACHES={"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
                               **django_caches(tmp, servers)})
    django.setup()
    from django.core.cache import caches
    names = ["shmcache", "locmem", "redis", "memcached", "diskcache"]
    keys = [f"key:{i:04d}" for i in range(100)]
    gets, manys = [], []
    try:
        for name in names:
            if name not in settings.CACHES:
                gets.append((f"django {name}", None))
                manys.append((f"django {name}", None))
                continue
            cache = caches[name]
            for key in keys:
                cache.set(key, VALUE, timeout=None)
            assert cache.get(keys[7]) == VALUE and len(cache.get_many(keys)) == 100, name
            gets.append((f"django {name}", best_us(lambda: cache.get("key:0042"), seconds)))
            manys.append((f"django {name}", best_us(lambda: cache.get_many(keys), seconds,
                                                    batch=10)))
    finally:
        shmcache_cache = caches["shmcache"]
        shmcache_cache.clear()
        shmcache_cache.close()
        _remove_segment(settings.CACHES["shmcache"]["LOCATION"])
    return gets, manys


def _remove_segment(name):
    from shmcache.arena import retire, shm_dir
    path = os.path.join(shm_dir(), name)
    try:
        retire(path)
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- asyncio and the sync client -------------------------------------------------------------

async def bench_async(port, name, servers, seconds):
    from shmcache.asyncio import connect
    keys = [f"many:{i:04d}" for i in range(100)]
    rows = {}
    async with connect(name=name) as client:
        await client.set("bench", "hot", VALUE)
        await client.set_many("bench", {key: VALUE for key in keys})
        rows["hit"] = [("shmcache asyncio", await best_us_async(
            lambda: client.get("bench", "hot"), seconds))]
        counter = iter(range(10 ** 9))
        rows["miss"] = [("shmcache asyncio (loaded by the front)", await best_us_async(
            lambda: client.get("bench", f"miss-{next(counter)}"), seconds, batch=20))]
        rows["many"] = [("shmcache asyncio get_many", await best_us_async(
            lambda: client.get_many("bench", keys), seconds, batch=10))]
    if "redis" in servers:
        import redis.asyncio
        peer = redis.asyncio.Redis(unix_socket_path=servers["redis"])
        await peer.set("hot", VALUE)
        await peer.mset({key: VALUE for key in keys})
        rows["hit"].append(("redis-py asyncio GET", await best_us_async(
            lambda: peer.get("hot"), seconds)))
        rows["miss"].append(("redis-py asyncio GET (absent)", await best_us_async(
            lambda: peer.get("absent"), seconds)))
        rows["many"].append(("redis-py asyncio MGET", await best_us_async(
            lambda: peer.mget(keys), seconds, batch=10)))
        await peer.aclose()
    else:
        for kind in rows:
            rows[kind].append(("redis-py asyncio", None))
    return rows


def bench_sync_many(name, servers, seconds):
    keys = [f"many:{i:04d}" for i in range(100)]
    rows = []
    with shmcache.connect(name=name) as client:
        client.set_many("bench", {key: VALUE for key in keys})
        rows.append(("shmcache get_many", best_us(lambda: client.get_many("bench", keys),
                                                  seconds, batch=10)))
        rows.append(("shmcache 100 x get", best_us(
            lambda: [client.get("bench", key) for key in keys], seconds, batch=10)))
    if "redis" in servers:
        import redis
        peer = redis.Redis(unix_socket_path=servers["redis"])
        rows.append(("redis-py MGET", best_us(lambda: peer.mget(keys), seconds, batch=10)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per figure")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="kcache-bench-")
    servers, processes = {}, []
    supervisor = None
    try:
        for kind, start in (("redis", harness.start_redis), ("memcached", harness.start_memcached)):
            sock = os.path.join(tmp, f"{kind}.sock")
            server, why = start(sock)
            if server is None:
                print(f"# {kind}: skipped, {why}")
                continue
            servers[kind] = sock
            processes.append(server)
        gets, manys = bench_django(tmp, servers, args.seconds)
        supervisor, port, name = harness.start_supervisor("bench_app:groups", workers=2)
        async_rows = asyncio.run(bench_async(port, name, servers, args.seconds))
        sync_many = bench_sync_many(name, servers, args.seconds)
    finally:
        if supervisor is not None:
            supervisor.terminate()
            supervisor.wait()
        for server in processes:
            harness.stop(server)
        shutil.rmtree(tmp, ignore_errors=True)

    table("Django cache.get, 100 B hit", gets, 0)
    table("Django cache.get_many, 100 hits of 100 B", manys, 0)
    table("asyncio await get, 100 B hit", async_rows["hit"], 0)
    table("asyncio await get, miss", async_rows["miss"], 0)
    table("asyncio get_many, 100 hits of 100 B", async_rows["many"], 0)
    table("sync get_many, 100 hits of 100 B", sync_many, 0)
    locmem = dict(gets).get("django locmem")
    shm = dict(gets)["django shmcache"]
    print("\ngoals: Django hit within 3x of locmem "
          f"({shm / locmem:.2f}x)" if locmem else "\ngoals: Django hit within 3x of locmem", end="")
    slowest_peer = [us for n, us in gets if us and n in ("django redis", "django memcached")]
    if slowest_peer:
        print(f"; >= 20x faster than the Redis and memcached backends "
              f"({min(slowest_peer) / shm:.1f}x faster than the faster of them)")
    else:
        print()


if __name__ == "__main__":
    main()
