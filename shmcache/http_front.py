"""HTTP endpoints of a worker (the protobuf bodies of the peer routes: wire.py).

Routes (DESIGN.md):

    GET    /cache/<group>/<key>      raw value; 404 if absent (after trying to load), or
                                     remembered absent (the group's not_found_ttl)
    PUT    /cache/<group>/<key>      body = value, ?ttl=SECONDS
    DELETE /cache/<group>/<key>
    DELETE /cache/<group>            flush: the group's entries on every host, hot copies
                                     too -> 200 {"cleared": true, "failed_peers": {}}; 502
                                     with the failed peers in "failed_peers" ({url: reason})
                                     if some host could not be flushed (the others are)
    GET    <base>/<group>/<key>      protobuf GetResponse (peer route; never forwarded);
                                     404 from a not-found the owner remembers, too
    PUT    <base>/<group>/<key>      protobuf SetRequest  (peer-side set)
    DELETE <base>/<group>/<key>      peer-side remove; answers "deleted" or "absent"
    DELETE <base>/<group>            peer-side flush of this host only; answers "cleared"
    GET    /healthz, /stats, /metrics
    POST   /cache/<group>?op=get     batches, JSON bodies (http_batch.py)
    POST   /cache/<group>?op=set
    POST   /cache/<group>?op=delete

A group's stale window (``Group(stale=SECONDS)``; stale.py): past a value's ttl and within
the window, a GET answers the old value at once and reloads it in the background (once per
host). Such an answer, on /cache/ (and to a non-owner that fetched one from its owner), has
two more headers:

    X-Cache: stale
    Age: <whole seconds since the value was loaded: the group's ttl + time past its expiry>

Fresh answers have neither. The peer route answers a stale value with its (past) ``expire``
(but a ``?peek=1`` only a fresh one: a peek starts no refresh); a batch get serves stale
values as GET does, unmarked.

``<group>`` and ``<key>`` are percent-escaped by the sender (``quote(s, safe="")``) and
decoded here with ``unquote`` (never ``unquote_plus``); the key may contain ``/``.
Every error is a short text body with a 4xx/5xx status; a worker never sends a traceback.
DELETE /cache/<group> is the flush (a write, so it needs the token); GET and PUT of
/cache/<group> answer 400.

The front only translates: HTTP in, a call of its ``Node`` (node.py: the Get path, and the
writes), HTTP out.
"""

import hmac
import json
import logging
import re
import time
from concurrent.futures import Future
from urllib.parse import parse_qs, unquote

from .errors import InvalidKey, LoadError, NotFound, ValueTooLarge
from .httpserver import error, render
from .arena import MAX_KEY_BYTES
from .lru_index import encode_key
from .validate import GROUP_NAME_RULE, is_group_name, positive_ttl
from .futures import FUTURES, then
from .http_batch import JSON, BatchRoutes, _batch_op, _json_body, _query, load_status
from .metrics import prometheus_text
from .node import StaleHit
from .reader import NOT_FOUND
from .stale import stale_headers
from .wire import PROTOBUF, decode_set_request, encode_get_response

log = logging.getLogger("shmcache")

OCTETS = b"application/octet-stream"
METRICS = b"text/plain; version=0.0.4; charset=utf-8"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class BadPath(Exception):
    """A request path that cannot name a group and key; the message is the 4xx reason."""


def split_group_key(rest):
    """``"<group>/<key>"`` (percent-escaped) -> (group, key) as text. BadPath if malformed."""
    group, slash, key = rest.partition("/")
    if not slash or not group or not key:
        raise BadPath("expected /<group>/<key>")
    if "%" not in rest:                   # nothing escaped: unquote would give the same
        return group, key
    return _unescape(group, rest), _unescape(key, rest)


def _unescape(part, whole):
    if _BAD_ESCAPE.search(whole):
        raise BadPath("malformed percent-escape in path")
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise BadPath("path is not valid UTF-8 once unescaped") from None


class Front(BatchRoutes):
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
        """Writes and the peer route always; reads of /cache/ (a batch get included),
        /stats, /metrics with --token-reads; /healthz never."""
        path = request.path
        if path.startswith(self.base_path):
            return True
        if path.startswith("/cache/") and request.method not in ("GET", "HEAD") \
                and not self._is_batch_get(request):
            return True
        return self.token_reads and path != "/healthz"

    @staticmethod
    def _is_batch_get(request):
        if request.method != "POST" or "/" in request.path[7:]:
            return False
        try:
            return _batch_op(request.query) == "get"
        except ValueError:
            return False

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
        self._check_group(group)
        try:
            self._check_key(key)
        except InvalidKey as exc:
            raise _Answer(error(400, str(exc))) from None
        return group, key

    def _check_group(self, group):
        if self.node.group(group) is not None:     # a group served is a valid name
            return
        if not is_group_name(group):
            raise _Answer(error(400, f"bad group name: {GROUP_NAME_RULE}"))
        raise _Answer(error(404, f"unknown group {group!r}"))

    def _check_key(self, key):
        """InvalidKey unless ``key`` is text of 1 to max_key_bytes UTF-8 bytes."""
        if not isinstance(key, str):
            raise InvalidKey(f"keys must be strings, not {type(key).__name__}")
        try:
            encode_key(key, self.max_key_bytes)
        except UnicodeEncodeError:
            raise InvalidKey("key is not valid Unicode text") from None

    # -- /cache/ --------------------------------------------------------------------------------

    def _user(self, request, rest):
        method = request.method
        if method == "POST" and "/" not in rest:
            return self._batch(request, rest)
        if method == "DELETE" and "/" not in rest:
            return self._flush(rest, self.node.clear_everywhere, self._cluster_answer)
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
            answer = node.get(group, key)
            if answer.__class__ is tuple:                  # a fresh hit
                return render(200, answer[0], content_type=OCTETS, head=head)
            if answer is NOT_FOUND:
                return _not_found(group, key)
            if answer.__class__ is StaleHit:
                return self._value_answer(group, answer[0], answer[1], head)
            return then(answer, lambda done: self._user_answer(done, group, key, head))
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

    def _flush(self, rest, clear, answer):
        """``DELETE /cache/<group>`` (``clear`` every host's entries) or ``DELETE
        <base>/<group>`` (this host's, for a peer's flush); on the pool, the answer made by
        ``answer(done)``."""
        try:
            group = _unescape(rest, rest)
            self._check_group(group)
        except _Answer as response:
            return response.response
        return then(self.node.pool.submit(clear, group), answer)

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
        values = _query(query, ("ttl",)).get("ttl")
        if values is None:
            return None
        try:
            return positive_ttl(float(values[-1]))
        except ValueError:
            raise ValueError("ttl must be a positive number of seconds") from None

    def _user_answer(self, done, group, key, head):
        try:
            value, expiry = done.result()
        except Exception as exc:
            status = load_status(exc)
            if status is None:
                raise
            if isinstance(exc, NotFound):
                return _not_found(group, key)
            return error(status, str(exc))
        return self._value_answer(group, value, expiry, head)

    def _value_answer(self, group, value, expiry, head):
        """200 with the value; marked stale (X-Cache, Age) if past its expiry."""
        return render(200, value, content_type=OCTETS, head=head,
                      headers=stale_headers(self.node.groups[group].ttl, expiry))

    # -- batches: POST /cache/<group>?op=get|set|delete (batch.py) ----------------------------

    def _batch(self, request, rest):
        try:
            op = _batch_op(request.query)
            group = _unescape(rest, rest)
            self._check_group(group)
            if op == "set":                 # a big body: decoded off the event loop
                return then(self.node.pool.submit(self._batch_set, group, request.body),
                            Future.result)
            keys = self._batch_keys(_json_body(request.body, {"keys"}))
        except _Answer as answer:
            return answer.response
        except (ValueError, InvalidKey) as exc:
            return error(400, str(exc))
        if op == "get":
            return self._batch_get(group, keys)
        return self._batch_delete(group, keys)

    # -- peer route ---------------------------------------------------------------------------

    def _peer(self, request, rest):
        method = request.method
        if method not in ("GET", "PUT", "DELETE"):
            return error(405, f"{method} not allowed on {self.base_path}",
                         headers=[("Allow", "GET, PUT, DELETE")])
        if method == "DELETE" and "/" not in rest:      # a peer's flush: this host only
            return self._flush(rest, self.node.store.clear, _cleared)
        try:
            group, key = self._resolve(rest)
        except _Answer as answer:
            return answer.response
        node = self.node
        if method == "GET":
            if request.query and parse_qs(request.query).get("peek") == ["1"]:
                # from memory only (discovery.py); a peek refreshes nothing
                answer = node.peek(group, key, from_peer=True)
                if answer is None:
                    return error(404, f"{group}/{key[:100]} is not held here")
            else:
                answer = node.get(group, key, from_peer=True)
            if answer is NOT_FOUND:                 # remembered by this host, the owner
                return _not_found(group, key)
            if isinstance(answer, FUTURES):
                return then(answer, lambda done: self._peer_answer(done, group, key))
            return render(200, encode_get_response(answer[0], answer[1]), content_type=PROTOBUF)
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
        # "deleted" or "absent": the owner's answer is what a cluster-wide delete reports.
        return render(200, "deleted\n" if node.delete(group, key) else "absent\n")

    def _peer_answer(self, done, group, key):
        try:
            value, expiry = done.result()
        except NotFound:
            return _not_found(group, key)
        except LoadError as exc:
            return error(500, str(exc))
        return render(200, encode_get_response(value, expiry), content_type=PROTOBUF)


def _cleared(done):
    done.result()                       # raises what the clear raised: a 500
    return render(200, "cleared\n")


def _not_found(group, key):
    return error(404, f"{group}/{key[:100]} not found")


class _Answer(Exception):
    """Internal: a finished response raised out of path resolution."""

    def __init__(self, response):
        super().__init__()
        self.response = response
