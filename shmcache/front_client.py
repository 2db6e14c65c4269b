"""A co-located client's side of its host's HTTP front: ``FrontConnection``, the
kept-alive connection (per thread) over which a ``Client`` sends its misses and, on a host
with peers, its writes; and the front's /cache/ routes as a client speaks them: paths,
bodies, and the mapping of the front's answers to values and errors, shared by ``Client``
and ``asyncio.AsyncClient``.
"""

import http.client
import json
import os
import ssl
import threading
from urllib.parse import quote

from . import batch
from .errors import (AuthError, InvalidArgument, InvalidKey, LoadError, LoadTimeout, NotFound,
                     PeerUnavailable, UnknownGroup, ValueTooLarge)
from .validate import check_ttl, encode_value
from .tls import NamedHTTPSConnection, TlsFilesError, client_context, trust_of, verify_problem


class FrontConnection:
    """How one client reaches its host's front: where the front is (the live segment's
    record, else the last one seen), whether it speaks TLS and how to verify it, the token
    to send, and one kept-alive connection per thread, made again when the client's front
    generation changes (the segment or its front moved) or in a forked child."""

    def __init__(self, client, token=None, tls_ca=None, tls_server_name=None):
        self.client = client             # its name, attachment, timeout, front generation
        self.tls_ca, self.tls_server_name = tls_ca, tls_server_name
        self.tls_contexts = {}           # CA file (None: the system's store) -> SSLContext
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.local = threading.local()   # per thread: (pid, front generation, HTTPConnection)

    def connection(self):
        cached = getattr(self.local, "connection", None)
        client = self.client
        generation = client._front_generation
        if cached is not None and cached[:2] == (os.getpid(), generation):
            return cached[2]
        if cached is not None:
            cached[2].close()                        # the front moved, or another process's
        front = self.address()
        tls = self.tls(front)
        if tls is None:
            connection = http.client.HTTPConnection(front.host, front.port,
                                                    timeout=client.timeout)
        else:
            connection = NamedHTTPSConnection(front.host, front.port, server_name=tls[1],
                                              context=tls[0], timeout=client.timeout)
        self.local.connection = (os.getpid(), generation, connection)
        return connection

    def address(self):
        """The ``arena.Front`` to reach this host's front at; PeerUnavailable if it has none."""
        attachment = self.client._attachment
        store = attachment.current
        front = store.arena.front() if store is not None else attachment.front
        if front is None:
            raise PeerUnavailable(f"segment {self.client.name!r} has no HTTP front to load "
                                  f"misses")
        if front.host in ("0.0.0.0", "::", ""):
            front = front._replace(host="127.0.0.1")
        return front

    def tls(self, front):
        """(SSLContext, name to verify its certificate for) if ``front`` speaks TLS, else
        None. PeerUnavailable if the CA file cannot be read."""
        if not front.tls:
            return None
        ca = self.tls_ca or front.tls_ca or None
        context = self.tls_contexts.get(ca)
        if context is None:
            try:
                context = self.tls_contexts[ca] = client_context(ca)
            except TlsFilesError as exc:
                raise PeerUnavailable(f"cannot verify the front of {self.client.name!r}: "
                                      f"{exc}") from None
        return context, self.tls_server_name or front.tls_name or front.host

    def untrusted(self, exc):
        """The PeerUnavailable for a front whose certificate did not verify."""
        front = self.address()
        return PeerUnavailable(
            f"the front of {self.client.name!r} at {front.host}:{front.port} has a TLS "
            f"certificate that does not verify for {self.tls(front)[1]!r} against "
            f"{trust_of(self.tls_ca or front.tls_ca)}: {verify_problem(exc)} (see "
            f"connect(tls_ca=..., tls_server_name=...))")

    def call(self, method, path, body=None, headers=None):
        """(status, body) of a request to this host's front."""
        headers = {**self.headers, **headers} if headers else self.headers
        name = self.client.name
        for attempt in (1, 2):                      # a kept-alive connection may have closed
            connection = self.connection()
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError) as exc:
                connection.close()
                self.local.connection = None
                if attempt == 2:
                    raise PeerUnavailable(f"front of {name!r} closed the connection: "
                                          f"{exc}") from None
            except ssl.SSLCertVerificationError as exc:
                connection.close()
                self.local.connection = None
                raise self.untrusted(exc) from None
            except OSError as exc:
                connection.close()
                self.local.connection = None
                raise PeerUnavailable(f"cannot reach the front of {name!r}: {exc}") from None

    def close(self):
        """Close this thread's connection, if it has one."""
        connection = getattr(self.local, "connection", None)
        if connection is not None:
            connection[2].close()
            self.local.connection = None


# -- the front's /cache/ routes as a client speaks them (Client and asyncio.AsyncClient) -----

def front_key(key):
    """``key`` as the text the front's routes carry; InvalidKey if bytes that are not UTF-8."""
    if isinstance(key, (bytes, bytearray)):
        try:
            return bytes(key).decode()
        except UnicodeDecodeError:
            raise InvalidKey("a key sent to the front must be UTF-8 text") from None
    return key


def front_path(group, key=None):
    """``/cache/<group>/<key>`` (``/cache/<group>`` without a key), percent-escaped."""
    if key is None:
        return f"/cache/{quote(group, safe='')}"
    return f"/cache/{quote(group, safe='')}/{quote(front_key(key), safe='')}"


def ttl_query(ttl):
    """The ``?ttl=SECONDS`` query of a write, or "" for the group's default TTL."""
    return f"?ttl={check_ttl(ttl)!r}" if ttl is not None else ""


def front_error(status, data, what, not_found=NotFound):
    """The exception for the front's non-200 answer ``status`` with body ``data`` to
    ``what`` ("GET group/key"): the one mapping of the front's statuses to errors."""
    reason = data.decode(errors="replace").strip()
    if status == 404:
        return not_found(reason)
    if status in (401, 403):
        return AuthError(f"the front refused {what}: a token is wanted (connect(token=...) "
                         f"or $SHMCACHE_TOKEN): {reason}")
    if status in (502, 503):
        return PeerUnavailable(f"{what}: {reason}")
    if status == 504:
        return LoadTimeout(reason)
    if status == 413:
        return ValueTooLarge(reason)
    if status == 400:
        return InvalidArgument(f"the front refused {what}: {reason}")
    return LoadError(f"{status}: {reason}")


def fetch_answer(status, body, what="GET"):
    """The value a front's answer to ``GET /cache/<group>/<key>`` carries, else its error."""
    if status == 200:
        return body
    raise front_error(status, body, what)


def write_answer(what, status, data):
    """The JSON a front's answer to the write ``what`` ("PUT group/key") carries, else its
    error: PeerUnavailable if it reached only part of the cluster."""
    if status == 200:
        return json.loads(data)
    if status == 502:
        reason = data.decode(errors="replace").strip()
        raise PeerUnavailable(f"{what} reached only part of the cluster: {reason}")
    raise front_error(status, data, what, not_found=UnknownGroup)


# -- batches (the route: batch.py) --------------------------------------------------------

BATCH_HEADERS = {"Content-Type": "application/json"}


def batch_path(group, op):
    return f"{front_path(group)}?op={op}"


def given_keys(keys):
    """{key as text: [the keys given for it]}, for mapping a batch answer back."""
    given = {}
    for key in keys:
        given.setdefault(front_key(key), []).append(key)
    return given


def set_many_body(items, ttl):
    """The body of a set batch of (key, value) ``items``."""
    body = {"items": {front_key(key): batch.b64(encode_value(value)) for key, value in items}}
    if ttl is not None:
        body["ttl"] = check_ttl(ttl)
    return body


def many_answer(group, given, status, data, found, failed):
    """Read a front's answer to a get batch of the keys ``given`` (see given_keys): add
    the values to ``found`` and the keys that failed to ``failed`` ({key: exception}),
    both keyed by the keys as given; raise the answer's own error if it is one."""
    if status != 200:
        raise front_error(status, data, f"get batch of {group!r}", not_found=UnknownGroup)
    try:
        values, errors = batch.decode_get_answer(data)
    except ValueError as exc:
        raise LoadError(f"the front's answer to get_many of {group!r}: {exc}") from None
    for text, value in values.items():
        for key in given.get(text, ()):
            found[key] = value
    for text, (status, reason) in errors.items():
        for key in given.get(text, ()):
            failed[key] = front_error(status, reason.encode(), f"GET {group}/{text}")


def many_result(group, found, failed):
    """``found``, unless some keys failed: then raise the error (of the one type they share
    if LoadTimeout or PeerUnavailable, else LoadError) naming them, carrying both as
    ``values`` and ``failed``."""
    if not failed:
        return found
    kinds = {type(exc) for exc in failed.values()}
    kind = kinds.pop() if len(kinds) == 1 else LoadError
    if kind not in (LoadTimeout, PeerUnavailable):
        kind = LoadError
    shown = list(failed.items())[:5]
    more = f"; and {len(failed) - len(shown)} more" if len(failed) > len(shown) else ""
    error = kind(f"{len(failed)} of the keys of {group!r} failed to load: "
                 + "; ".join(f"{key!r}: {exc}" for key, exc in shown) + more)
    error.values, error.failed = found, failed
    raise error


def distinct_keys(keys):
    """The keys of an iterable, each once, in order; InvalidArgument for one str or bytes
    (whose characters would be taken for keys)."""
    if isinstance(keys, (str, bytes, bytearray)):
        raise InvalidArgument(f"keys must be an iterable of keys, not one {type(keys).__name__}")
    return list(dict.fromkeys(keys))
