"""connect(): hits from shared memory, misses through the host's front, clear errors."""

import http.server
import json
import signal
import threading

import pytest

import shmcache

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]


def test_get_reads_hits_locally_and_loads_misses_through_the_front(supervised):
    server = supervised(APP)
    with shmcache.connect(name=server.name) as cache:
        assert cache.peek("test", "a") is None
        assert cache.get("test", "a") == b"value-of-a"         # loaded by a worker
        assert cache.peek("test", "a") == b"value-of-a"        # now in shared memory
        calls = len(server.calls())
        assert cache.get("test", "a") == b"value-of-a" and len(server.calls()) == calls
        assert cache.get("test", b"bytes-key") == b"value-of-bytes-key"
        with pytest.raises(shmcache.NotFound):
            cache.get("test", "missing-1")
        with pytest.raises(shmcache.LoadError, match="cannot load fail-1"):
            cache.get("test", "fail-1")
        with pytest.raises(shmcache.UnknownGroup):
            cache.get("nope", "x")
        with pytest.raises(shmcache.InvalidKey):
            cache.get("test", b"\xff\xfe")
        cache.set("test", "written", b"by a client", ttl=60)
        assert server.get("test", "written")[:2] == (200, b"by a client")
        assert cache.delete("test", "written") is True
        stats = cache.stats()
        assert stats["groups"]["test"]["items"] >= 2
        assert stats["groups"]["test"]["hits"] >= 2          # this client's, summed with all
        assert stats["groups"]["test"]["gets"] >= stats["groups"]["test"]["hits"]


def test_connect_by_port_finds_the_default_segment_name(supervised, tmp_path):
    from conftest import free_port
    port = free_port()
    server = supervised(APP, port=port, name=f"kcache-{port}")
    with shmcache.connect(port=port) as cache:
        assert cache.get("test", "p") == b"value-of-p"
    server.stop()


def test_front_down_is_peer_unavailable(supervised):
    server = supervised([*APP, "--warm-restart"])
    cache = shmcache.connect(name=server.name)
    assert cache.get("test", "x") == b"value-of-x"
    server.stop(signal.SIGTERM)                  # the segment stays (warm); the front is gone
    assert cache.peek("test", "x") == b"value-of-x"
    with pytest.raises(shmcache.PeerUnavailable):
        cache.get("test", "y")
    cache.close()
    cache.close()                                 # idempotent


class Origin(http.server.BaseHTTPRequestHandler):
    hits = []

    def do_GET(self):
        Origin.hits.append(self.path)
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        if self.path.startswith("/broken"):
            self.send_error(503)
            return
        body = f"origin:{self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_origin_group_loads_over_http_and_caches_only_successes(supervised):
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{origin.server_address[1]}"
        server = supervised(["--origin", url, "--workers", "2"])
        assert server.get("origin", "a/b c")[:2] == (200, b"origin:/a/b%20c")
        assert server.get("origin", "a/b c")[:2] == (200, b"origin:/a/b%20c")
        assert Origin.hits.count("/a/b%20c") == 1                  # cached
        assert server.get("origin", "missing")[0] == 404
        assert server.get("origin", "broken")[0] == 500
        assert server.get("origin", "broken")[0] == 500
        assert Origin.hits.count("/broken") == 2                   # errors are not cached
        assert server.get("scores", "Tom")[0] == 404               # no demo group with --origin
    finally:
        origin.shutdown()


BATCH_FAILURES = [
    # (errors of a batch get answer, the exception it raises)
    ({"f": {"status": 500, "reason": "boom"}}, shmcache.LoadError),
    ({"f": {"status": 504, "reason": "slow"}, "g": {"status": 504, "reason": "slow"}},
     shmcache.LoadTimeout),
    ({"f": {"status": 502, "reason": "owner down"}}, shmcache.PeerUnavailable),
    ({"f": {"status": 502, "reason": "owner down"}, "g": {"status": 504, "reason": "slow"}},
     shmcache.LoadError),
]


def read_batch_answer(status, answer):
    from shmcache.front_client import given_keys, many_answer, many_result
    found, failed = {}, {}
    many_answer("g", given_keys(["ok", "a", b"b/c", "f", "g", "m"]), status, answer, found,
                failed)
    return many_result("g", found, failed)


@pytest.mark.parametrize("errors, kind", BATCH_FAILURES)
def test_a_batch_get_answer_with_failed_keys_raises_naming_them(errors, kind):
    answer = json.dumps({"values": {"ok": "dmFsdWU="}, "missing": [], "errors": errors})
    with pytest.raises(kind) as raised:
        read_batch_answer(200, answer.encode())
    assert type(raised.value) is kind
    assert sorted(raised.value.failed) == sorted(errors)
    assert raised.value.values == {"ok": b"value"}
    assert all(repr(key) in str(raised.value) for key in errors)


def test_a_batch_get_answer_gives_the_values_and_leaves_out_missing_keys():
    answer = {"values": {"a": "dmFsdWU=", "b/c": ""}, "missing": ["m"], "errors": {}}
    assert read_batch_answer(200, json.dumps(answer).encode()) == {"a": b"value", b"b/c": b""}
    with pytest.raises(shmcache.UnknownGroup):
        read_batch_answer(404, b"unknown group 'g'")
    with pytest.raises(shmcache.AuthError):
        read_batch_answer(401, b"missing or wrong bearer token")
    with pytest.raises(shmcache.LoadError, match="not a batch get answer"):
        read_batch_answer(200, b'{"values": {"a": "not base64!"}}')
