"""HTTP endpoints of a worker, and the wire encoding shared with groupcache peers.

Routes (DESIGN.md):

    GET    /cache/<group>/<key>      raw value; 404 if absent (after trying to load)
    PUT    /cache/<group>/<key>      body = value, ?ttl=SECONDS
    DELETE /cache/<group>/<key>
    GET    <base>/<group>/<key>      protobuf GetResponse (peer route; never forwarded)
    PUT    <base>/<group>/<key>      protobuf SetRequest  (peer-side set)
    DELETE <base>/<group>/<key>      peer-side remove
    GET    /healthz, /stats

``<group>`` and ``<key>`` are percent-escaped by the sender (``quote(s, safe="")``) and
decoded here with ``unquote`` (never ``unquote_plus``); the key may contain ``/``.
Every error is a short text body with a 4xx/5xx status; a worker never sends a traceback.
"""

import hmac
import json
import logging
import math
import re
import time
from concurrent.futures import Future
from urllib.parse import parse_qs, unquote

from . import kcachepb_pb2 as pb
from .errors import (InvalidKey, LoadError, LoadTimeout, NotFound, PeerUnavailable, UnknownGroup,
                     ValueTooLarge)
from .httpserver import error, render
from .arena import MAX_KEY_BYTES
from .group import GROUP_NAME
from .lru_index import encode_key
from .metrics import SERVER_REQUESTS, prometheus_text

log = logging.getLogger("shmcache")

OCTETS = b"application/octet-stream"
METRICS = b"text/plain; version=0.0.4; charset=utf-8"
PROTOBUF = b"application/x-protobuf"
JSON = b"application/json"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class BadPath(Exception):
    """A request path that cannot name a group and key; the message is the 4xx reason."""


# -- wire encoding -------------------------------------------------------------------------

def expire_to_ns(expire_at):
    return int(expire_at * 1e9) if expire_at else 0


def ns_to_expire(nanoseconds):
    return nanoseconds / 1e9 if nanoseconds else None


def encode_get_response(value, expire_at=None):
    message = pb.GetResponse(value=value)
    if expire_at:
        message.expire = expire_to_ns(expire_at)
    return message.SerializeToString()


def decode_get_response(body):
    """(value, expiry Unix time or None). ValueError if the body is not a GetResponse."""
    message = pb.GetResponse()
    try:
        message.ParseFromString(body)
    except Exception as exc:                  # protobuf's DecodeError and friends
        raise ValueError(f"not a GetResponse: {exc}") from None
    return message.value, ns_to_expire(message.expire)


def encode_set_request(group, key, value, expire_at=None):
    message = pb.SetRequest(group=group, key=key, value=value)
    if expire_at:
        message.expire = expire_to_ns(expire_at)
    return message.SerializeToString()


def decode_set_request(body):
    message = pb.SetRequest()
    try:
        message.ParseFromString(body)
    except Exception as exc:
        raise ValueError(f"not a SetRequest: {exc}") from None
    if not message.IsInitialized():
        raise ValueError("SetRequest lacks group or key")
    return message.group, message.key, message.value, ns_to_expire(message.expire)


def split_group_key(rest):
    """``"<group>/<key>"`` (percent-escaped) -> (group, key) as text. BadPath if malformed."""
    group, slash, key = rest.partition("/")
    if not slash or not group or not key:
        raise BadPath("expected /<group>/<key>")
    if _BAD_ESCAPE.search(rest):
        raise BadPath("malformed percent-escape in path")
    try:
        group, key = unquote(group, errors="strict"), unquote(key, errors="strict")
    except UnicodeDecodeError:
        raise BadPath("path is not valid UTF-8 once unescaped") from None
    return group, key


def then(future, transform):
    """A Future of ``transform(future)``, called when ``future`` is done."""
    result = Future()

    def finish(done):
        try:
            result.set_result(transform(done))
        except BaseException as exc:          # transform bugs surface as a 500 upstream
            result.set_exception(exc)
    future.add_done_callback(finish)
    return result


class Front:
    """Routes requests to a ``Node``."""

    def __init__(self, node, base_path="/_kcache/", token=None, token_reads=False,
                 max_key_bytes=MAX_KEY_BYTES):
        self.node = node
        self.base_path = "/" + base_path.strip("/") + "/"
        self.token = token.encode() if token else None
        self.token_reads = token_reads
        self.max_key_bytes = max_key_bytes

    def handle(self, request):
        path = request.path
        try:
            if self.token is not None and self._needs_token(request) and not self._authorized(request):
                return error(401, "missing or wrong bearer token",
                             headers=[("WWW-Authenticate", 'Bearer realm="shmcache"')])
            if path.startswith("/cache/"):
                return self._user(request, path[7:])
            if path.startswith(self.base_path):
                return self._peer(request, path[len(self.base_path):])
            if path == "/healthz":
                return self._only(request, ("GET", "HEAD")) or render(200, "ok\n", head=request.method == "HEAD")
            if path == "/stats":
                return self._only(request, ("GET",)) or then(
                    self.node.pool.submit(self.node.stats),
                    lambda done: render(200, json.dumps(done.result(), indent=1), content_type=JSON))
            if path == "/metrics":
                return self._only(request, ("GET",)) or then(
                    self.node.pool.submit(self.node.stats),
                    lambda done: render(200, prometheus_text(done.result()), content_type=METRICS))
            return error(404, f"no route for {path[:100]}")
        except BadPath as exc:
            return error(400, str(exc))

    def _needs_token(self, request):
        """Writes and the peer route always; reads of /cache/, /stats, /metrics with
        --token-reads; /healthz never."""
        path = request.path
        if path.startswith(self.base_path):
            return True
        if path.startswith("/cache/") and request.method not in ("GET", "HEAD"):
            return True
        return self.token_reads and path != "/healthz"

    def _authorized(self, request):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token)

    @staticmethod
    def _only(request, methods):
        if request.method not in methods:
            return error(405, f"{request.method} not allowed here",
                         headers=[("Allow", ", ".join(methods))])
        return None

    def _resolve(self, rest):
        group, key = split_group_key(rest)
        if not GROUP_NAME.fullmatch(group):
            raise _Answer(error(400, "bad group name: 1 to 64 of letters, digits, '_', '.', '-'"))
        if self.node.group(group) is None:
            raise _Answer(error(404, f"unknown group {group!r}"))
        try:
            if len(encode_key(key)) > self.max_key_bytes:
                raise InvalidKey(f"key must be 1 to {self.max_key_bytes} bytes")
        except InvalidKey as exc:
            raise _Answer(error(400, str(exc))) from None
        return group, key

    # -- /cache/ --------------------------------------------------------------------------------

    def _user(self, request, rest):
        method = request.method
        if method not in ("GET", "HEAD", "PUT", "DELETE"):
            return error(405, f"{method} not allowed on /cache/",
                         headers=[("Allow", "GET, HEAD, PUT, DELETE")])
        try:
            group, key = self._resolve(rest)
        except _Answer as answer:
            return answer.response
        node = self.node
        if method in ("GET", "HEAD"):
            head = method == "HEAD"
            hit = node.peek(group, key)
            if hit is not None:
                return render(200, hit[0], content_type=OCTETS, head=head)
            return then(node.get_future(group, key),
                        lambda done: self._user_answer(done, group, key, head))
        if method == "PUT":
            try:
                ttl = self._ttl(request.query)
                if not node.clustered:
                    node.set(group, key, request.body, ttl=ttl)
                    return render(200, '{"stored": true}\n', content_type=JSON)
                node.store.check_fits(group, key, request.body)
            except ValueTooLarge as exc:
                return error(413, str(exc))
            except ValueError as exc:
                return error(400, str(exc))
            return then(node.pool.submit(node.set_everywhere, group, key, request.body, ttl),
                        self._cluster_answer)
        if not node.clustered:
            deleted = node.delete(group, key)
            return render(200, json.dumps({"deleted": deleted}) + "\n", content_type=JSON)
        return then(node.pool.submit(node.delete_everywhere, group, key), self._cluster_answer)

    @staticmethod
    def _cluster_answer(done):
        """200 if every host did its part, else 502; the body says which peers failed."""
        try:
            outcome = done.result()
        except ValueTooLarge as exc:
            return error(413, str(exc))
        status = 502 if outcome["failed_peers"] else 200
        return render(status, json.dumps(outcome) + "\n", content_type=JSON)

    @staticmethod
    def _ttl(query):
        if not query:
            return None
        try:
            fields = parse_qs(query, strict_parsing=True, errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise ValueError("malformed query string") from None
        unknown = set(fields) - {"ttl"}
        if unknown:
            raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r}")
        values = fields.get("ttl")
        if values is None:
            return None
        try:
            ttl = float(values[-1])
        except ValueError:
            raise ValueError("ttl must be a number of seconds") from None
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError("ttl must be a positive number of seconds")
        return ttl

    def _user_answer(self, done, group, key, head):
        try:
            value, _expiry = done.result()
        except NotFound:
            return error(404, f"{group}/{key[:100]} not found")
        except PeerUnavailable as exc:
            return error(502, str(exc))
        except LoadTimeout as exc:
            return error(504, str(exc))
        except LoadError as exc:
            return error(500, str(exc))
        except UnknownGroup as exc:
            return error(404, str(exc))
        return render(200, value, content_type=OCTETS, head=head)

    # -- peer route ---------------------------------------------------------------------------

    def _peer(self, request, rest):
        method = request.method
        if method not in ("GET", "PUT", "DELETE"):
            return error(405, f"{method} not allowed on {self.base_path}",
                         headers=[("Allow", "GET, PUT, DELETE")])
        try:
            group, key = self._resolve(rest)
        except _Answer as answer:
            return answer.response
        node = self.node
        if method == "GET":
            node.store.count(group, SERVER_REQUESTS)
            hit = node.peek(group, key)
            if hit is not None:
                return render(200, encode_get_response(hit[0], hit[1]), content_type=PROTOBUF)
            return then(node.get_future(group, key, from_peer=True),
                        lambda done: self._peer_answer(done, group, key))
        if method == "PUT":
            try:
                body_group, body_key, value, expire_at = decode_set_request(request.body)
            except ValueError as exc:
                return error(400, str(exc))
            if (body_group, body_key) != (group, key):
                return error(400, "SetRequest group/key differ from the path")
            if expire_at is not None and expire_at <= time.time():
                node.delete(group, key)              # already expired: nothing to keep
                return render(200, "ok\n")
            try:
                node.set(group, key, value, expire_at=expire_at)
            except ValueTooLarge as exc:
                return error(413, str(exc))
            return render(200, "ok\n")
        node.delete(group, key)
        return render(200, "ok\n")

    def _peer_answer(self, done, group, key):
        try:
            value, expiry = done.result()
        except NotFound:
            return error(404, f"{group}/{key[:100]} not found")
        except LoadError as exc:
            return error(500, str(exc))
        return render(200, encode_get_response(value, expiry), content_type=PROTOBUF)


class _Answer(Exception):
    """Internal: a finished response raised out of path resolution."""

    def __init__(self, response):
        super().__init__()
        self.response = response
