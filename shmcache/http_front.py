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
    POST   /cache/<group>?op=get     batches, JSON bodies (below)
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

Batches (``Content-Type: application/json``; values travel as base64):

    op=get     {"keys": ["k1", "k2", "k3"]}
               -> 200 {"values": {"k1": "<base64>"}, "missing": ["k2"],
                       "errors": {"k3": {"status": 500, "reason": "..."}}}
               Each key is answered as a single GET would be: a hit from memory, a miss
               loaded (all at once, each through the host-wide singleflight, from its owner
               on a cluster); absent keys are "missing"; a failed load is in "errors" with
               the status its GET would have had (500 load error, 502 peer unavailable,
               504 timeout). The answer comes when every load is done. A read: it needs the
               token only with --token-reads.
    op=set     {"items": {"k1": "<base64>"}, "ttl": 60}          (ttl optional, seconds > 0)
               -> 200 {"stored": N}; 413 if any value is too large (nothing is stored);
               on a cluster each key goes to its owner as a PUT would, and if a peer failed:
               502 {"stored": N, "failed_peers": [url, ...], "peer_errors": {url: reason}}
               (N: keys stored on their owner).
    op=delete  {"keys": ["k1", ...]}
               -> 200 {"deleted": ["k1"]}: the keys that were there (on a cluster, as the
               DELETE of one key answers: removed here, or the owner acknowledged); 502 as
               for set.

At most MAX_BATCH_KEYS (10,000) keys a request, each valid as in a single request (1 to
--max-key-bytes UTF-8 bytes); a key given twice is answered once. A POST body may be 64 MiB
(more if --max-item-size needs it: batch.max_batch_body), else 413. Unknown group: 404. A
missing or unknown op, malformed JSON, a wrong shape, unknown fields, bad base64 or a bad
ttl: 400. Writes need the token. DELETE /cache/<group> is the flush (a write, so it needs
the token too); GET and PUT of /cache/<group> answer 400.
"""

import hmac
import json
import logging
import re
import threading
import time
from concurrent.futures import Future
from urllib.parse import parse_qs, unquote

from .batch import MAX_BATCH_KEYS, OPS, b64, unb64
from .errors import (InvalidKey, LoadError, LoadTimeout, NotFound, PeerUnavailable, UnknownGroup,
                     ValueTooLarge)
from .httpserver import error, render
from .arena import MAX_KEY_BYTES
from .lru_index import encode_key
from .validate import GROUP_NAME_RULE, is_group_name, positive_ttl
from .metrics import SERVER_REQUESTS, prometheus_text
from .reader import NOT_FOUND
from .stale import stale_headers
from .wire import PROTOBUF, decode_set_request, encode_get_response

log = logging.getLogger("shmcache")

OCTETS = b"application/octet-stream"
METRICS = b"text/plain; version=0.0.4; charset=utf-8"
JSON = b"application/json"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class BadPath(Exception):
    """A request path that cannot name a group and key; the message is the 4xx reason."""


def split_group_key(rest):
    """``"<group>/<key>"`` (percent-escaped) -> (group, key) as text. BadPath if malformed."""
    group, slash, key = rest.partition("/")
    if not slash or not group or not key:
        raise BadPath("expected /<group>/<key>")
    return _unescape(group, rest), _unescape(key, rest)


def _unescape(part, whole):
    if _BAD_ESCAPE.search(whole):
        raise BadPath("malformed percent-escape in path")
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise BadPath("path is not valid UTF-8 once unescaped") from None


def then(future, transform):
    """A Future of ``transform(future)``, called when ``future`` is done. ``transform`` may
    return a Future itself: its outcome is passed on."""
    result = Future()

    def finish(done):
        try:
            value = transform(done)
        except BaseException as exc:          # transform bugs surface as a 500 upstream
            result.set_exception(exc)
            return
        if isinstance(value, Future):
            value.add_done_callback(lambda inner: settle(result, inner))
        else:
            result.set_result(value)
    future.add_done_callback(finish)
    return result


def settle(result, done):
    """Pass the outcome of the Future ``done`` on to the Future ``result``."""
    exc = done.exception()
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(done.result())


def all_done(futures):
    """A Future of ``futures`` (a list), done when every one of them is."""
    result = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_done):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            result.set_result(futures)
    if not futures:
        result.set_result(futures)
    for future in futures:
        future.add_done_callback(one_done)
    return result


_LOAD_STATUS = ((NotFound, 404), (UnknownGroup, 404), (PeerUnavailable, 502),
                (LoadTimeout, 504), (LoadError, 500))


def load_status(exc):
    """The status a GET answers for a load that raised ``exc``; None for an unexpected one."""
    for kind, status in _LOAD_STATUS:
        if isinstance(exc, kind):
            return status
    return None


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
        if not is_group_name(group):
            raise _Answer(error(400, f"bad group name: {GROUP_NAME_RULE}"))
        if self.node.group(group) is None:
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
            hit = node.peek(group, key)
            if hit is NOT_FOUND:
                return _not_found(group, key)
            if hit is not None:
                return render(200, hit[0], content_type=OCTETS, head=head)
            hit = node.peek_stale(group, key)
            if hit is not None:
                return self._value_answer(group, hit[0], hit[1], head)
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
        node = self.node
        if not node.clustered:
            return then(node.pool.submit(node.store.delete_many, group, keys), lambda done:
                        _json_answer(200, {"deleted": [key for key, there in
                                                       zip(keys, done.result()) if there]}))
        return then(all_done(node.run_all(node.delete_everywhere, [(group, k) for k in keys])),
                    lambda done: self._cluster_batch_answer(done, keys, "deleted"))

    def _batch_keys(self, document):
        """The distinct keys of a {"keys": [...]} body, in order; ValueError if malformed."""
        return list(dict.fromkeys(self._keyed(document, "keys", list, '{"keys": [key, ...]}')))

    def _keyed(self, document, field, kind, shape):
        """``document[field]``, a ``kind`` of at most MAX_BATCH_KEYS valid keys (a list, or
        a dict keyed by them); ValueError (naming ``shape``) or InvalidKey if not."""
        keys = document.get(field)
        if not isinstance(keys, kind):
            raise ValueError(f"the body must be {shape}")
        if len(keys) > MAX_BATCH_KEYS:
            raise ValueError(f"{len(keys)} keys; a batch holds at most {MAX_BATCH_KEYS}")
        for key in keys:
            self._check_key(key)
        return keys

    def _batch_get(self, group, keys):
        """Hits answered from memory; the misses loaded at once, each as a single GET."""
        node = self.node
        values, pending, missing = {}, {}, []
        for key in keys:
            hit = node.peek(group, key)
            if hit is NOT_FOUND:
                missing.append(key)
                continue
            hit = hit or node.peek_stale(group, key)
            if hit is not None:
                values[key] = hit[0]
            else:
                pending[key] = node.get_future(group, key)
        if not pending:
            return self._batch_get_answer(values, {}, missing)
        return then(all_done(list(pending.values())),
                    lambda _done: self._batch_get_answer(values, pending, missing))

    @staticmethod
    def _batch_get_answer(values, pending, missing):
        errors = {}
        for key, future in pending.items():
            try:
                values[key] = future.result()[0]
            except NotFound:
                missing.append(key)
            except Exception as exc:
                status = load_status(exc)
                if status is None:
                    log.error("batch load of %r failed", key, exc_info=exc)
                    status, exc = 500, "internal error"
                errors[key] = {"status": status, "reason": str(exc)}
        return _json_answer(200, {"values": {key: b64(value) for key, value in values.items()},
                                  "missing": missing, "errors": errors})

    def _batch_set(self, group, body):
        """(On the pool.) The answer to a set batch, or a Future of it on a cluster."""
        try:
            document = _json_body(body, {"items", "ttl"})
            items = self._keyed(document, "items", dict,
                                '{"items": {key: base64 value, ...}, "ttl": seconds}')
            items = {key: unb64(value) for key, value in items.items()}
            ttl = document.get("ttl")
            if ttl is not None:
                if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
                    raise ValueError("ttl must be a positive number of seconds")
                ttl = positive_ttl(ttl)
            node = self.node
            if not node.clustered:
                node.store.set_many(group, items.items(), ttl)
                return _json_answer(200, {"stored": len(items)})
            node.store.check_fits_many(group, items.items())
        except ValueTooLarge as exc:
            return error(413, str(exc))
        except (ValueError, InvalidKey) as exc:
            return error(400, str(exc))
        return then(all_done(node.run_all(node.set_everywhere, [(group, key, value, ttl)
                                                                for key, value in items.items()])),
                    lambda done: self._cluster_batch_answer(done, list(items), "stored"))

    @staticmethod
    def _cluster_batch_answer(done, keys, field):
        """200 if every host did its part for every key, else 502 naming the failed peers.
        ``field`` "stored": how many keys reached their owner; "deleted": which keys."""
        outcomes = [future.result() for future in done.result()]
        peer_errors = {}
        for outcome in outcomes:
            for url, reason in outcome["failed_peers"].items():
                peer_errors.setdefault(url, reason)
        succeeded = [key for key, outcome in zip(keys, outcomes) if outcome[field]]
        answer = {field: len(succeeded) if field == "stored" else succeeded}
        if peer_errors:
            answer.update(failed_peers=sorted(peer_errors), peer_errors=peer_errors)
        return _json_answer(502 if peer_errors else 200, answer)

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
            peek_only = parse_qs(request.query).get("peek") == ["1"]
            node.store.count(group, SERVER_REQUESTS)
            hit = node.peek(group, key)
            if hit is NOT_FOUND:                 # remembered by this host, the owner
                return _not_found(group, key)
            if hit is None and not peek_only:     # a peek refreshes nothing: fresh values only
                hit = node.peek_stale(group, key, from_peer=True)
            if hit is not None:
                return render(200, encode_get_response(hit[0], hit[1]), content_type=PROTOBUF)
            if peek_only:                       # ?peek=1: from memory only (discovery.py)
                return error(404, f"{group}/{key[:100]} is not held here")
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


def _query(query, allowed):
    """{name: [values]} of a query string; ValueError if malformed or a name not allowed."""
    if not query:
        return {}
    try:
        fields = parse_qs(query, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed query string") from None
    unknown = set(fields) - set(allowed)
    if unknown:
        raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r}")
    return fields


def _batch_op(query):
    """The op of a batch request's query string; ValueError unless exactly one known op."""
    ops = _query(query, ("op",)).get("op")
    if ops is None:
        raise ValueError(f"POST /cache/<group> needs ?op={'|'.join(OPS)}")
    if len(ops) != 1 or ops[0] not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}")
    return ops[0]


def _json_body(body, fields):
    """The JSON object of a request body with no field but ``fields``; ValueError if not."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(document) - fields
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r} in the body")
    return document


def _json_answer(status, document):
    return render(status, json.dumps(document) + "\n", content_type=JSON)


class _Answer(Exception):
    """Internal: a finished response raised out of path resolution."""

    def __init__(self, response):
        super().__init__()
        self.response = response
