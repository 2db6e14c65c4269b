"""HTTP routes of a worker: user routes, peer route and its wire format, escaping, and bad
input (each gets its 4xx with a text reason, and the worker keeps answering)."""

import socket
import struct
from urllib.parse import quote

import pytest

import shmcache
from shmcache import kcachepb_pb2 as pb
from shmcache.http_front import BadPath, split_group_key
from shmcache.wire import decode_get_response, encode_get_response, encode_set_request

pytestmark = pytest.mark.integration

APP = ["--app", "apps.counting:groups", "--workers", "2"]
SPECIAL_KEYS = ["a/b/c", "with space", "plus+sign", "per%cent", "ünïcödé ✓", "/leading", "q?x=1#f"]


def raw(port, data, timeout=10):
    """Send raw bytes; return the first response (by its Content-Length), or whatever came
    before the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock):
    received = b""
    while True:
        head, sep, rest = received.partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) >= length:
                return received
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk


def status_of(response):
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import Supervised
    instance = Supervised(tmp_path_factory.mktemp("front"), APP)
    instance.start()
    yield instance
    instance.cleanup()


def test_user_routes_get_put_delete_with_ttl(server):
    assert server.get("test", "k1")[:2] == (200, b"value-of-k1")
    status, body, headers = server.request("PUT", "/cache/test/mine?ttl=60", body=b"my value")
    assert status == 200 and b"stored" in body
    status, body, headers = server.get("test", "mine")
    assert (status, body) == (200, b"my value")
    assert headers["Content-Type"] == "application/octet-stream"
    status, body, _ = server.request("DELETE", "/cache/test/mine")
    assert status == 200 and b'"deleted": true' in body
    status, body, _ = server.request("DELETE", "/cache/test/mine")
    assert b'"deleted": false' in body
    assert server.request("HEAD", "/cache/test/k1")[:2] == (200, b"")


def test_put_ttl_expires(server):
    import time
    server.request("PUT", "/cache/test/missing-brief?ttl=0.3", body=b"short-lived")
    assert server.get("test", "missing-brief")[:2] == (200, b"short-lived")
    deadline = time.time() + 0.3
    while time.time() <= deadline:
        time.sleep(0.05)
    assert server.get("test", "missing-brief")[0] == 404      # gone; the getter says missing


def test_healthz_and_stats(server):
    assert server.request("GET", "/healthz")[:2] == (200, b"ok\n")
    status, body, headers = server.request("GET", "/stats")
    assert status == 200 and headers["Content-Type"] == "application/json"
    import json
    stats = json.loads(body)
    assert {"test", "brief"} <= set(stats["groups"]) and stats["worker_pid"] > 0


@pytest.mark.parametrize("key", SPECIAL_KEYS)
def test_special_keys_round_trip_through_every_route(server, key):
    escaped = quote(key, safe="")
    status, _, _ = server.request("PUT", f"/cache/test/{escaped}", body=key.encode() + b"!")
    assert status == 200
    assert server.request("GET", f"/cache/test/{escaped}")[:2] == (200, key.encode() + b"!")
    status, body, headers = server.request("GET", f"/_kcache/test/{escaped}")
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    assert decode_get_response(body) == (key.encode() + b"!", None)
    with shmcache.connect(name=server.name) as cache:
        assert cache.peek("test", key) == key.encode() + b"!"


def test_peer_route_loads_and_encodes_getresponse(server):
    status, body, _ = server.request("GET", "/_kcache/test/" + quote("peer/loaded", safe=""))
    message = pb.GetResponse()
    message.ParseFromString(body)
    assert status == 200 and message.value == b"value-of-peer/loaded"
    assert server.request("GET", "/_kcache/test/missing-x")[0] == 404
    status, body, _ = server.request("GET", "/_kcache/test/fail-x")
    assert status == 500 and b"cannot load fail-x" in body
    assert server.request("GET", "/_kcache/nogroup/x")[0] == 404


def test_peer_route_expiry_is_unix_nanoseconds(server):
    import time
    before = time.time()
    server.request("PUT", "/cache/test/expiring?ttl=100", body=b"v")
    value, expire = decode_get_response(server.request("GET", "/_kcache/test/expiring")[1])
    assert value == b"v" and before + 99 < expire < time.time() + 101


def test_peer_set_and_delete(server):
    body = encode_set_request("test", "from-peer", b"peer value", expire_at=None)
    assert server.request("PUT", "/_kcache/test/from-peer", body=body)[0] == 200
    assert server.get("test", "from-peer")[:2] == (200, b"peer value")
    assert server.request("DELETE", "/_kcache/test/from-peer")[0] == 200
    mismatch = encode_set_request("test", "other", b"x")
    assert server.request("PUT", "/_kcache/test/from-peer", body=mismatch)[0] == 400
    assert server.request("PUT", "/_kcache/test/from-peer", body=b"\xff\xff garbage")[0] == 400


def test_getresponse_built_byte_by_byte_decodes():
    value = b"hello"
    expire = 1_700_000_000_123_456_789
    qps = 2.5
    body = (bytes([0x0A, len(value)]) + value                 # field 1, bytes
            + bytes([0x11]) + struct.pack("<d", qps)          # field 2, double
            + bytes([0x18]) + _varint(expire))                # field 3, int64
    assert decode_get_response(body) == (value, expire / 1e9)
    message = pb.GetResponse()
    message.ParseFromString(encode_get_response(b"hello", expire / 1e9))
    assert message.value == b"hello" and abs(message.expire - expire) < 1000


def _varint(number):
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@pytest.mark.parametrize("rest, expected", [
    ("g/k", ("g", "k")),
    ("g/a%2Fb", ("g", "a/b")),
    ("g/a/b", ("g", "a/b")),
    ("g/a+b", ("g", "a+b")),                 # unquote, not unquote_plus
    ("g/%C3%BC", ("g", "ü")),
])
def test_split_group_key(rest, expected):
    assert split_group_key(rest) == expected


@pytest.mark.parametrize("rest", ["g", "g/", "/k", "g/%zz", "g/%C3", "g/%4"])
def test_split_group_key_refuses(rest):
    with pytest.raises(BadPath):
        split_group_key(rest)


BAD_REQUESTS = [
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, b"no route"),
    (b"POST /cache/test/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, b"not allowed"),
    (b"PATCH /_kcache/test/k HTTP/1.1\r\nHost: x\r\n\r\n", 405, b"not allowed"),
    (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405, b"not allowed"),
    (b"GET /cache/test/%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"percent-escape"),
    (b"GET /cache/test/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"UTF-8"),
    (b"GET /cache/test HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"expected"),
    (b"GET /cache/nogroup/k HTTP/1.1\r\nHost: x\r\n\r\n", 404, b"unknown group"),
    (b"GET /cache/test/" + b"k" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"1 to 250 bytes"),
    (b"PUT /cache/test/k?ttl=-1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv", 400, b"ttl"),
    (b"PUT /cache/test/k?ttl=abc HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv", 400, b"ttl"),
    (b"PUT /cache/test/k?color=red HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv", 400, b"unknown"),
    (b"PUT /cache/test/k HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413, b"exceeds"),
    (b"PUT /cache/test/k HTTP/1.1\r\nHost: x\r\nContent-Length: 262200\r\n\r\n" + b"x" * 262200,
     413, b"max item size"),
    (b"PUT /cache/test/k HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n" + b"x" * 900000,
     413, b"exceeds the limit"),
    (b"PUT /cache/test/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411, b"chunked"),
    (b"PUT /cache/test/k HTTP/1.1\r\nContent-Length: x1\r\n\r\n", 400, b"Content-Length"),
    (b"GARBAGE\r\n\r\n", 400, b"malformed request line"),
    (b"GET /x HTTP/2.0\r\n\r\n", 400, b"HTTP/1.0 and HTTP/1.1"),
    (b"GET nopath HTTP/1.1\r\n\r\n", 400, b"must be a path"),
    (b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n", 400, b"malformed header"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, b"too long"),
    (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431, b"too many"),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, b"too large"),
]


@pytest.mark.parametrize("request_bytes, status, reason", BAD_REQUESTS,
                         ids=[f"{case[1]}-{i}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_4xx_with_a_reason_and_the_worker_keeps_serving(server, request_bytes,
                                                                         status, reason):
    response = raw(server.port, request_bytes)
    assert status_of(response) == status, response[:300]
    head, _, body = response.partition(b"\r\n\r\n")
    assert reason in body and b"Traceback" not in response
    assert b"Content-Type: text/plain" in head
    if status == 405:
        assert b"Allow: " in head
    assert server.get("test", "still-alive")[:2] == (200, b"value-of-still-alive")


def test_expect_100_continue_and_keep_alive(server):
    body = b"x" * 5000
    request = (b"PUT /cache/test/continued HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: 5000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        first = sock.recv(1000)
        assert status_of(first) == 200
        sock.sendall(b"GET /cache/test/continued HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    assert rest.count(b"HTTP/1.1 200 OK") == 2 and body in rest      # pipelined, in order
    assert rest.endswith(b"ok\n")


def test_http_1_0_closes_unless_keep_alive(server):
    response = raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200 and b"Connection: close" in response


def test_max_key_bytes_and_group_name_charset(supervised):
    host = supervised(["--workers", "1", "--max-key-bytes", "10"])
    assert host.get("scores", "Tom")[:2] == (200, b"630")
    status, body, _ = host.get("scores", "k" * 11)
    assert status == 400 and b"1 to 10 bytes" in body
    status, body, _ = host.request("GET", "/cache/bad%20group/k")
    assert status == 400 and b"bad group name" in body


@pytest.mark.parametrize("value", [
    b"no newline", b"ends with one\n", b"\r\n", b"\x00\xff binary \x00", b"", b" " * 3,
    bytes(range(256)) * 40,
], ids=["plain", "newline", "crlf", "binary", "empty", "spaces", "10KiB"])
def test_values_keep_their_exact_bytes_and_their_type(server, value):
    """What is PUT is what GET and the peer route answer, byte for byte; an empty value is
    still application/octet-stream."""
    key = f"exact-{len(value)}-{value[:4].hex()}"
    assert server.request("PUT", f"/cache/test/{key}", body=value)[0] == 200
    status, body, headers = server.get("test", key)
    assert (status, body) == (200, value)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(len(value))
    status, _, headers = server.request("HEAD", f"/cache/test/{key}")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    status, body, headers = server.request("GET", f"/_kcache/test/{key}")
    assert status == 200 and decode_get_response(body)[0] == value
    assert headers["Content-Type"] == "application/x-protobuf"
